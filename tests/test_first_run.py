"""A new user's first run, as the README writes it: its two commands word for word, the CLI's every
command and --help, in a shell environment without this test run's variables (no TRITON_INTERPRET),
from the repository root and from another folder; import cost; the extension under another torch;
Python started in the folder above a clone named llama_fast.

Each test runs the commands as subprocesses, as a user types them: what an imported module of this
process has already set up (Triton's interpreter, a loaded extension) cannot help them pass.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import user_env

pytestmark = pytest.mark.system  # the README's commands, as subprocesses

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB = "bash install.sh && python -m llama_fast"
TEST_COMMAND = "bash install.sh && python -m pytest -q"
GPU = torch.cuda.is_available()


def run(command, cwd, timeout=300, **kwargs):
    shell = isinstance(command, str)
    return subprocess.run(command if shell else [sys.executable, *command], cwd=cwd, env=user_env(), shell=shell,
                          executable="/bin/bash" if shell else None, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def test_readme_gives_exactly_the_tested_commands():
    """The README's two commands are the ones these tests run, and .ci/run runs the second verbatim."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Two commands' section with a bash block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [MAIN_JOB, TEST_COMMAND], "the README's commands changed: change these tests with them"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in ci, ".ci/run must run the README's test command, verbatim"


@pytest.mark.skipif(GPU, reason="on a GPU the main job is checked by bench/gpu.sh's runs")
def test_main_job_as_the_readme_writes_it():
    """`bash install.sh && python -m llama_fast` in a new shell: exit 0, both answers, what ran, honestly."""
    proc = run(MAIN_JOB, ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    answers = re.search(r"^answer\s+(.*)$", out, re.M).group(1)
    assert answers.count("Paris") == 2, out
    assert "identical tokens: True" in out
    assert "rms_norm, rope, swiglu: cpu = llama_fast's C++ CPU kernels" in out
    assert "attention: reference = eager PyTorch" in out
    assert "interpreter on the CPU" not in out, "no Triton kernel ran, so none may be said to have"
    assert "never GPU performance" in out


@pytest.mark.parametrize("args,expect", [
    (["--help"], "usage: python -m llama_fast"),
    (["chat", "--help"], "--max-new-tokens"),
    (["ops", "--help"], "--backend"),
    (["ops"], "rms_norm, apply_rotary_pos_emb, swiglu: cpu = llama_fast's C++ CPU kernels"),
    (["ops", "--backend", "reference", "--dtype", "bfloat16"],
     "not compared: rms_norm, apply_rotary_pos_emb, swiglu, flash_attention, which here run the eager reference"),
    (["ops", "--backend", "triton"], "run in Triton's interpreter on the CPU"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_llama_fast_cli(tmp_path, where, args, expect):
    if GPU and args[:1] == ["ops"]:
        pytest.skip("the CPU labels are checked here; bench/gpu.sh runs the GPU")
    proc = run(["-m", "llama_fast", *args], ROOT if where == "root" else tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout
    if args == ["ops"] or "--backend" in args:
        assert "No GPU: these are CPU timings" in proc.stdout
        assert ("max |fwd diff|" in proc.stdout) == ("reference" not in args)
    if args == ["ops"]:  # attention runs the reference here: no row comparing it with itself
        assert not any(line.startswith("flash_attention ") for line in proc.stdout.splitlines())
        assert "not compared: flash_attention, which here runs the eager reference itself" in proc.stdout


@pytest.mark.skipif(GPU, reason="the interpreter is for machines without a GPU")
def test_cli_turns_the_interpreter_on_even_after_triton_was_imported(tmp_path):
    """Triton reads TRITON_INTERPRET when it is imported: if something imported it before the CLI could
    set the variable, the CLI starts the command again with it set rather than fail inside a kernel."""
    code = "import sys, triton; from llama_fast.__main__ import main; sys.exit(main(['ops', '--backend', 'triton']))"
    proc = run(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run in Triton's interpreter on the CPU" in proc.stdout


@pytest.mark.skipif(GPU, reason="needs a machine without a GPU")
def test_cli_refuses_a_backend_this_machine_cannot_run(tmp_path):
    proc = run(["-m", "llama_fast", "ops", "--backend", "cuda"], tmp_path)
    assert proc.returncode == 2
    assert "--backend cuda cannot run here (this machine has no GPU)" in proc.stderr


@pytest.mark.parametrize("command,own,foreign", [
    ("all", "--arch", None), ("ops", "--compile", "--arch"), ("attention", "--quick", "--model"),
    ("e2e", "--no-smollm2", "--compile"), ("audit", "--arch", "--rep-ms"), ("traffic", "--model", "--dtype"),
])
def test_bench_help_per_command(command, own, foreign):
    """`python -m bench CMD --help` describes CMD and the options CMD reads, not the top-level help."""
    proc = run(["-m", "bench", command, "--help"], ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m bench {command}")
    assert own in proc.stdout
    if foreign:  # as a whole option: attention's --model-only is not --model
        assert not re.search(rf"{foreign}(?![\w-])", proc.stdout), proc.stdout


def test_bench_top_level_help_and_a_command_run():
    top = run(["-m", "bench", "--help"], ROOT)
    assert top.returncode == 0 and all(c in top.stdout for c in ("ops", "attention", "e2e", "audit", "traffic"))
    traffic = run(["-m", "bench", "traffic", "--model", "smollm2-135m"], ROOT)
    assert traffic.returncode == 0, traffic.stderr
    assert "eager/fused" in traffic.stdout


def _import_cost(tmp_path, statement: str) -> tuple[dict, list]:
    """Cumulative import seconds per module (-X importtime) of `statement`, and the heavy modules it
    leaves imported."""
    heavy = ("triton", "torch._dynamo", "torch._inductor", "transformers")
    code = f"{statement}; import sys, json; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    proc = run(["-X", "importtime", "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cumulative = {}
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            cumulative[parts[2].strip()] = int(parts[1]) / 1e6
    return cumulative, json.loads(proc.stdout.splitlines()[-1])


def test_import_is_light(tmp_path):
    """`import llama_fast` costs at most 0.5 s more than `import torch`, and imports neither triton,
    torch._dynamo nor transformers (they load on first use): `python -m llama_fast` can still choose
    Triton's interpreter, and `--help` answers at once."""
    cumulative, loaded = _import_cost(tmp_path, "import llama_fast")
    assert loaded == [], f"imported at `import llama_fast`: {loaded}"
    extra = cumulative["llama_fast"] - cumulative["torch"]
    assert extra < 0.5, f"import llama_fast costs {extra:.2f} s over import torch"


def test_cli_help_is_quick(tmp_path):
    """`python -m llama_fast --help` within 1 s of `python -c "import torch"` (best of three each)."""
    def best(args):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            assert run(args, tmp_path).returncode == 0
            times.append(time.perf_counter() - start)
        return min(times)

    extra = best(["-m", "llama_fast", "--help"]) - best(["-c", "import torch"])
    assert extra < 1.0, f"--help takes {extra:.2f} s more than import torch"


def test_compile_marker_is_torchs_own():
    """extension._constant_under_compile sets what torch.compiler.assume_constant_result sets, without
    importing torch._dynamo at `import llama_fast` (see its docstring)."""
    import torch._dynamo

    from llama_fast.extension import _constant_under_compile

    def ours():
        return True

    def theirs():
        return True

    assert vars(_constant_under_compile(ours)) == vars(torch._dynamo.assume_constant_result(theirs)) != {}


def test_extension_is_not_loaded_under_another_torch(tmp_path):
    """A C++ extension built for one torch is not loaded under another (torch's C++ ABI changes between
    releases): a warning says how to rebuild, and the library runs on without it."""
    code = ("import torch; torch.__version__ = '0.0.1+other'\n"
            "import llama_fast\n"
            "from llama_fast import extension, ops\n"
            "x, w = torch.randn(3, 64), torch.ones(64)\n"
            "y = ops.rms_norm(x, w)\n"
            "print(extension.available(), ops.available_backends(), ops.backend_for(x))\n"
            "print(extension.status())\n")
    proc = run(["-W", "always", "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, status = proc.stdout.splitlines()
    assert first == "False ['triton', 'reference'] reference"
    assert "built for torch" in status and "this is torch 0.0.1+other" in status and "--no-build-isolation" in status
    assert "RuntimeWarning: llama_fast: llama_fast._C was built for torch" in proc.stderr


def test_python_started_above_a_clone_named_llama_fast(tmp_path):
    """From the folder that holds a clone named llama_fast, `import llama_fast` finds that folder
    first; it hands the import to the installed package, or says what happened when there is none."""
    (tmp_path / "llama_fast").symlink_to(ROOT, target_is_directory=True)
    proc = run(["-c", "import llama_fast; print(llama_fast.patch.__module__, llama_fast.ops.rms_norm.__module__)"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["llama_fast.patch", "llama_fast.ops.rms_norm"]
    bare = run(["-S", "-c", "import llama_fast"], tmp_path)  # -S: no site-packages, so nothing installed
    assert bare.returncode == 1
    assert "found the llama_fast repository folder" in bare.stderr and "Install it" in bare.stderr
