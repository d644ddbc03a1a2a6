"""The docs stay true: every shell command in a fenced ```bash block of README.md and docs/*.md is either
run here (cheap, no GPU) or listed in ALLOWED below with the reason it is not, and then at least its
entry point answers `--help` with every `--flag` the command uses. A command in neither fails the test,
and so does an entry of either list that no doc uses any more. Every relative link points to a file
(and a heading, for `#anchor` links into a Markdown page) that exists; every ```python block compiles,
and the README's ops quick start runs on small CPU tensors.

Commands run as a user types them: in a subprocess, from the repository root, in a shell environment
without this test run's variables (`helpers.user_env`, as tests/test_first_run.py does).
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import user_env

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # python, torchrun: the interpreter's own environment

# Commands run as written (argv through shlex, no shell), with a string their output must contain.
RUN = {
    "python -m bench traffic": "eager/fused",
    "python -m bench kernels": "kernels/layer",
    "bash bench/gpu.sh --help": "usage: bash bench/gpu.sh",
    "bash bench/gpu.sh --budgets": "part first headline",
}

# Commands too long, or needing a GPU, torchrun or a model download. Each: why it is not run, the
# command whose output must name every --flag it uses (its entry point's --help, or a cheaper form
# that parses the same arguments), and where it is run for real, if anywhere (a test that must exist).
ALLOWED = {
    # README "Two commands": byte-checked and run by tests/test_first_run.py, CI's .ci/run runs the second.
    "bash install.sh && python -m llama_fast": dict(
        why="installs, loads the real model (minutes)", check="python -m llama_fast --help",
        covered="tests/test_first_run.py::test_main_job_as_the_readme_writes_it"),
    "bash install.sh && python -m pytest -q": dict(
        why="the whole suite, what CI runs", check="python -m pytest --help",
        covered="tests/test_first_run.py::test_readme_gives_exactly_the_tested_commands"),
    # docs/benchmarks.md: the bench suites time for seconds to minutes; --list builds their cases untimed.
    "python -m bench": dict(why="every suite (minutes)", check="python -m bench all --help"),
    "python -m bench ops": dict(why="times every case", check="python -m bench ops --list"),
    "python -m bench attention": dict(why="times every case", check="python -m bench attention --list"),
    "python -m bench e2e": dict(why="trains and generates (minutes)", check="python -m bench e2e --list"),
    "python -m bench loss": dict(why="times the loss step", check="python -m bench loss --list"),
    "python -m bench audit": dict(why="compiles every kernel for two GPUs (minutes)",
                                  check="python -m bench audit --help", covered="tests/test_audit.py"),
    "python -m bench attention --model-only": dict(why="compiles every sm_90a config (~1.5 min)",
                                                   check="python -m bench attention --help"),
    "python -m bench overhead": dict(why="times every op on the host", check="python -m bench overhead --help"),
    "python -m pytest tests/test_bench.py --benchmark-enable": dict(
        why="times the ops cases through pytest-benchmark", check="python -m pytest --help"),
    # The GPU run (docs/gpu-run.md, docs/benchmarks.md): needs a GPU; its dry run takes minutes.
    "bash bench/gpu.sh first OUT": dict(why="needs a GPU", check="bash bench/gpu.sh --help",
                                        covered="tests/test_gpu_script.py::test_dry_run_of_every_step"),
    'bash bench/gpu.sh first "$OUT"': dict(why="needs a GPU", check="bash bench/gpu.sh --help",
                                           covered="tests/test_gpu_script.py::test_dry_run_of_every_step"),
    'bash bench/gpu.sh --within 500 rest "$OUT"': dict(
        why="needs a GPU", check="bash bench/gpu.sh --help",
        covered="tests/test_gpu_script.py::test_within_skips_what_cannot_fit_and_restores_autotuning_results"),
    "bash bench/gpu.sh --dry-run all /tmp/x": dict(why="minutes on a CPU", check="bash bench/gpu.sh --help",
                                                   covered="tests/test_gpu_script.py::test_dry_run_of_every_step"),
    # docs/context-parallel.md: the multi-GPU bench; its CPU form runs in test_context_parallel.py.
    "torchrun --standalone --nproc_per_node N -m bench.context_parallel --out bench/results/cp-<date>": dict(
        why="needs several GPUs", check=("torchrun --help", "python -m bench.context_parallel --help"),
        covered="tests/test_context_parallel.py::test_bench_script_runs"),
    # docs/patching.md: LoRA fine-tuning of the real model (minutes); the short forms run in test_train.py.
    "python -m llama_fast train --compare --out out/train": dict(
        why="trains the real model (minutes)", check="python -m llama_fast train --help",
        covered="tests/test_train.py::test_single_process_compare"),
    "python -m llama_fast train --packing --fused-loss": dict(
        why="trains the real model (minutes)", check="python -m llama_fast train --help"),
    "torchrun --standalone --nproc_per_node 2 -m llama_fast train --steps 2 --packing --fused-loss": dict(
        why="two processes training the real model", check=("torchrun --help", "python -m llama_fast train --help"),
        covered="tests/test_train.py::test_torchrun_two_processes"),
    # docs/testing.md: test selections that run for minutes; collecting them checks the marker expression.
    'python -m pytest -m "not slow and not system"': dict(
        why="most of the suite (minutes)", check='python -m pytest --collect-only -q -m "not slow and not system"'),
    "python -m pytest -m slow": dict(why="over half an hour in the interpreter",
                                     check="python -m pytest --collect-only -q -m slow"),
}


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # outside quotes, at a word's start)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), re.S | re.M)


def doc_commands() -> dict[str, list[str]]:
    """{command (comment stripped, whitespace collapsed): the pages that give it}."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+", " ", _strip_comment(line)).strip()
                if command:
                    found.setdefault(command, []).append(str(page.relative_to(ROOT)))
    return found


COMMANDS = doc_commands()


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif (BIN / argv[0]).exists():
        argv[0] = str(BIN / argv[0])
    return argv


def _run(command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(command), cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=timeout)


def test_every_doc_command_is_run_or_allowed():
    unknown = {c: pages for c, pages in COMMANDS.items() if c not in RUN and c not in ALLOWED}
    assert not unknown, f"commands in the docs that no test runs or allows (add them to RUN or ALLOWED): {unknown}"
    stale = sorted((set(RUN) | set(ALLOWED)) - set(COMMANDS))
    assert not stale, f"RUN / ALLOWED entries no doc gives any more: {stale}"
    assert not set(RUN) & set(ALLOWED)


@pytest.mark.system
@pytest.mark.parametrize("command", sorted(RUN))
def test_doc_command_runs(command):
    assert not re.search(r"[;&|<>$`]", command), "RUN commands go through argv, without a shell"
    proc = _run(command)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert RUN[command] in proc.stdout, proc.stdout[-3000:]


@pytest.mark.system
@pytest.mark.parametrize("command", sorted(ALLOWED))
def test_allowed_command_entry_point_and_flags_exist(command):
    entry = ALLOWED[command]
    assert entry["why"]
    checks = entry["check"] if isinstance(entry["check"], tuple) else (entry["check"],)
    output = ""
    for check in checks:
        proc = _run(check)
        assert proc.returncode == 0, f"{check}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        output += proc.stdout
    for flag in re.findall(r"(?<![\w-])--[\w-]+", command):
        assert re.search(rf"{re.escape(flag)}(?![\w-])", output), f"{command}: {flag} is not in `{checks}`'s output"
    if "covered" in entry:
        path, _, name = entry["covered"].partition("::")
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{entry['covered']} does not exist"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} points to nothing"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: link {link}: no such heading in {target.name}"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's index does not link docs/{page.name}"
    for word in ("../shared", "DESIGN.md", "STYLE.md"):
        assert word not in readme


def test_testing_page_has_the_sections_the_code_cites():
    headings = re.findall(r"^## (.*)$", (ROOT / "docs" / "testing.md").read_text(), re.M)
    for heading in ("The interpreter", "The bf16 trap", "Compiling for Hopper without a GPU", "The accuracy rule",
                    "Inner loop", "Supported versions"):
        assert heading in headings, heading


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile(page):
    for i, block in enumerate(blocks(page, "python")):
        compile(block, f"{page.name}, python block {i + 1}", "exec")


# The README's ops quick start with small inputs: a few milliseconds of work, on the default CPU backends.
OPS_INPUTS = """
import torch
torch.manual_seed(0)
x, weight = torch.randn(3, 64), torch.ones(64)
q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
gate, up = torch.randn(3, 64), torch.randn(3, 64)
hidden, lm_head_weight, labels = torch.randn(5, 16), torch.randn(11, 16), torch.tensor([1, 2, -100, 4, 10])
"""


@pytest.mark.system
def test_readme_ops_quick_start_runs():
    block = next(b for b in blocks(ROOT / "README.md", "python") if b.startswith("from llama_fast import ops"))
    code = OPS_INPUTS + block + "print(y.shape, q_embed.shape, h.shape, out.shape, float(loss) > 0)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0].endswith("True"), proc.stdout
