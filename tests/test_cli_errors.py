"""`python -m llama_fast` errors as a user meets them, each run as a subprocess: one line
`llama_fast: error: ...` on stderr, a non-zero exit code, and a traceback only with --debug; the
`cache` command that lists and clears the default model's converted copies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import user_env

pytestmark = pytest.mark.system  # the CLI, as subprocesses

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "llama_fast", *args], cwd=cwd, env=user_env(HF_HUB_OFFLINE="1", **env),
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc, expect: str) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama_fast: error: ")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def relu_gemma2_folder(tmp_path_factory):
    """A tiny Gemma 2 model folder (random weights, a word-level tokenizer) with a ReLU MLP: a causal LM
    transformers loads and llama_fast does not patch (its gated-MLP kernels are SwiGLU and GeGLU)."""
    from tokenizers import Tokenizer, models
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("gemma2")
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=16, max_position_embeddings=64,
                          hidden_activation="relu")
    Gemma2ForCausalLM(config).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model,expect", [
    ("/nonexistent", "--model /nonexistent: no such folder"),
    ("./missing-model", "--model ./missing-model: no such folder"),
    ("missing.gguf", "--model missing.gguf: no such file"),
    ("nobody-has/this-model-llama-fast-test", "--model nobody-has/this-model-llama-fast-test: transformers could not "
                                              "load it"),
])
def test_a_model_that_is_not_there(tmp_path, model, expect):
    _one_error_line(run(["chat", "--model", model], tmp_path), expect)


def test_a_model_llama_fast_does_not_patch(tmp_path, relu_gemma2_folder):
    proc = run(["chat", "--model", str(relu_gemma2_folder)], tmp_path)
    # Gemma 2's norms, rotation and attention run the kernels; a ReLU MLP none does
    _one_error_line(proc, "or GELU with the tanh approximation (GeGLU), this model uses 'relu'")
    assert "answer" not in proc.stdout, "refused before generating with the unpatched model"


def test_debug_shows_the_traceback(tmp_path):
    for args in (["chat", "--model", "/nonexistent", "--debug"], ["--debug", "chat", "--model", "/nonexistent"]):
        proc = run(args, tmp_path)
        assert proc.returncode == 1
        assert "Traceback" in proc.stderr and "FileNotFoundError: --model /nonexistent: no such folder" in proc.stderr


def test_cache_lists_and_clears_the_converted_copies(tmp_path):
    cache = tmp_path / "cache"
    copy = cache / "SmolLM2-135M-Instruct.Q4_1-98362432-0123456789abcdef-transformers4.0.0"
    copy.mkdir(parents=True)
    (copy / "model.safetensors").write_bytes(bytes(2_000_000))
    (copy / "llama_fast-cache.json").write_text(json.dumps(dict(source="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                key="98362432-0123456789abcdef", transformers="4.0.0")))
    (cache / "not-ours").mkdir()
    listed = run(["cache"], tmp_path, LLAMA_FAST_CACHE=str(cache))
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert copy.name in listed.stdout and "2 MB" in listed.stdout and "transformers 4.0.0" in listed.stdout
    assert "not-ours" not in listed.stdout
    cleared = run(["cache", "--clear"], tmp_path, LLAMA_FAST_CACHE=str(cache))
    assert cleared.returncode == 0 and "removed" in cleared.stdout and "freed: 2 MB" in cleared.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["not-ours"]
    empty = run(["cache"], tmp_path, LLAMA_FAST_CACHE=str(cache))
    assert empty.returncode == 0 and "no converted copies" in empty.stdout
