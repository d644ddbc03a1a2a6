"""Installing llama_fast as a user does, in a new virtual environment: `pip install .` from a copy of
the sources (pip's isolated build: pyproject.toml's build requirements, the C++/CUDA extension
built on the way), `pip wheel .`, and a build whose compiler fails, which must install without the
extension rather than fail. About four minutes on two cores, most of it pip installing torch twice
(into the throwaway build environment and into the new one)."""

import shutil
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

from helpers import user_env

pytestmark = pytest.mark.system  # pip installs into fresh environments

ROOT = Path(__file__).resolve().parent.parent
# What a fresh clone holds: no build outputs, no virtual environments, no git metadata.
NOT_SOURCES = shutil.ignore_patterns(".git", ".ci", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     "_build_info.py", ".pytest_cache", ".benchmarks", "out", ".wheels")

CHECK = """
import sys, torch, llama_fast
from llama_fast import extension, ops
import llama_fast.kernels.attention
print(llama_fast.__file__)
print(ops.available_backends())
print(extension.status())
y = ops.rms_norm(torch.randn(0, 64, requires_grad=True), torch.ones(64, requires_grad=True))
y.sum().backward()
# A top-level "kernels" may be Hugging Face's hub package (transformers requires it from 5.25), never our folder
import importlib.util
spec = importlib.util.find_spec("kernels")
ours = spec is not None and "Triton kernels of llama_fast" in open(spec.origin).read()
print("our kernels/ at top level" if ours else "no top-level kernels of ours")
"""


def _run(args, cwd, timeout=900, **env):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=user_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(a new virtual environment with `pip install .` done in it, a copy of the sources)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "llama_fast-src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", str(source)], base)
    yield python, source
    shutil.rmtree(base, ignore_errors=True)


def _check(python, cwd):
    lines = _run([python, "-c", CHECK], cwd).stdout.splitlines()
    return dict(file=lines[0], backends=lines[1], status=lines[2], top_level_kernels=lines[3])


def test_pip_install_in_a_fresh_venv(fresh, tmp_path):
    python, _ = fresh
    got = _check(python, tmp_path)
    assert got["file"].startswith(str(python.parent.parent)), "llama_fast imported from outside the venv"
    assert "'cpu'" in got["backends"], got
    assert got["status"].startswith("llama_fast._C loaded from " + str(python.parent.parent)), got
    assert got["top_level_kernels"] == "no top-level kernels of ours", "kernels/ installs as llama_fast.kernels only"
    cli = _run([python, "-m", "llama_fast", "ops"], tmp_path)
    assert "cpu = llama_fast's C++ CPU kernels" in cli.stdout


def test_pip_wheel(fresh, tmp_path):
    python, source = fresh
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, source], tmp_path)
    (wheel,) = tmp_path.glob("llama_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("llama_fast/_C") and n.endswith(".so") for n in names), names
    assert "llama_fast/_build_info.py" in names and "llama_fast/kernels/attention.py" in names
    hub = "llama_fast/hub/repository/torch-universal/"  # the kernel repository llama_fast.hub registers
    assert {f"{hub}{name}" for name in ("metadata.json", "llama_fast_layers/__init__.py",
                                        "llama_fast_layers/layers.py")} <= set(names)
    assert not [n for n in names if n.split("/")[0] in ("kernels", "bench", "tests", "csrc")], names


def test_a_failed_extension_build_installs_without_it(fresh, tmp_path):
    """No working C++ compiler: the wheel is built without the extension (setup.py says why), and the
    library imports and runs on the references."""
    python, source = fresh
    proc = _run([python, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", tmp_path, source],
                tmp_path, CXX="/bin/false", CC="/bin/false")
    assert "llama_fast's C++ extension failed to build" in proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("llama_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("llama_fast/_C") or n == "llama_fast/_build_info.py"], names
    target = tmp_path / "site"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel], tmp_path)
    code = f"import sys; sys.path.insert(0, {str(target)!r}); exec({CHECK!r})"
    lines = _run([python, "-c", code], tmp_path).stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1] == "['triton', 'reference']", lines
    assert "is not built" in lines[2]
