"""bench/gpu.sh, the prepared GPU run, checked without a GPU: its usage and errors, its time budgets
against the lease (docs/gpu-run.md), a dry run of every step (the staged copy, the headline bench on
the CPU, every other bench command's cases, every test selection collected), its time limits, and the
autotuning results it restores and brings back."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.system  # bench/gpu.sh, as a subprocess

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.sh"

# The lease (the device tool's limits): 15 minutes of device time in all, a machine's start-up
# included (1-2 minutes), at most 10 minutes a command; the first command is to fit in 4 minutes.
LEASE_S, START_UP_S, COMMAND_LIMIT_S, FIRST_COMMAND_S = 900, 120, 600, 240
# What the script adds per part (packing the results) and per command (staging, the summary), and what
# each command costs the lease beyond its own run (sending the tree, bringing the files back).
PER_PART_S, PER_COMMAND_S, TRANSFER_S = 5, 10, 30


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLAMA_FAST_TEST_DEVICE")}
    return {**env, "GPU_RUN_DIR": str(tmp_path / "run"), **extra}


def _script(tmp_path, *args, timeout=900, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout)


def _parts(out: Path, name: str) -> dict:
    with tarfile.open(out / f"{name}.tar.gz") as tar:
        lines = tar.extractfile(f"{name}/parts.tsv").read().decode().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    return {r[0]: dict(budget=int(r[1]), limit=int(r[2]), taken=int(r[3]), exit=r[4]) for r in rows}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_runs_nothing(tmp_path, flag):
    proc = _script(tmp_path, flag, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash bench/gpu.sh")
    for step in ("first", "rest", "suites", "compile", "e2e", "all", "--dry-run", "--within", "--autotune"):
        assert step in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["nope"], "unknown step 'nope'"),
    (["--fast", "first"], "unknown option --fast"),
    (["--within", "soon", "first"], "--within needs whole seconds"),
    (["first", "out", "extra"], "one step and one OUT folder at most"),
])
def test_bad_arguments_fail_with_a_clear_message(tmp_path, args, message):
    proc = _script(tmp_path, *args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert not (tmp_path / "run").exists()


def _budgets(tmp_path):
    proc = _script(tmp_path, "--budgets", timeout=60)
    assert proc.returncode == 0, proc.stderr
    parts, steps = {}, {}
    for line in proc.stdout.splitlines():
        kind, name, *rest = line.split()
        if kind == "part":
            parts.setdefault(name, {})[rest[0]] = int(rest[1])
        else:
            steps[name] = rest
    return parts, steps


def test_budgets_fit_the_lease(tmp_path):
    """The script's own numbers: the first command fits in 4 minutes, the second (rest) under the
    command limit with a minute's margin, and start-up + both commands inside the 15-minute lease."""
    parts, steps = _budgets(tmp_path)

    def command_s(name):
        chosen = [parts[s] for s in steps[name]]
        return sum(sum(p.values()) + PER_PART_S * len(p) for p in chosen) + PER_COMMAND_S

    assert steps["first"] == ["first"] and steps["rest"] == ["suites", "compile", "e2e"]
    assert set(steps["all"]) == set(parts) == {"first", "suites", "compile", "e2e"}
    assert command_s("first") <= FIRST_COMMAND_S, command_s("first")
    assert command_s("rest") <= COMMAND_LIMIT_S - 60, command_s("rest")
    lease = START_UP_S + command_s("first") + command_s("rest") + 2 * TRANSFER_S
    assert lease <= LEASE_S, (command_s("first"), command_s("rest"), lease)
    for step in ("suites", "compile", "e2e"):
        assert command_s(step) < COMMAND_LIMIT_S
    assert all(budget >= 10 for p in parts.values() for budget in p.values()), "too short to start python"


def test_dry_run_of_every_step(tmp_path):
    """Every part runs on the CPU: the staged package imports from the stage, the headline bench writes
    complete JSON, every other bench command builds its cases, every test selection collects (a renamed
    file, a bad -k or an import error fails here), and three files come back."""
    out = tmp_path / "out"
    start = time.monotonic()
    proc = _script(tmp_path, "--dry-run", "all", str(out))
    log = (out / "all.log").read_text() if (out / "all.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["all.log", "all.tar.gz", "autotune.tar.gz"]
    parts = _parts(out, "all")
    assert set(parts) == {"first/env", "first/headline", "first/tests", "suites/attention", "suites/loss", "suites/ops",
                          "compile/tests", "e2e/e2e"}
    assert all(p["exit"] == "0" for p in parts.values()), parts

    assert "MISSING test file" not in log, log
    collected = [int(n) for n in re.findall(r"^(\d+) tests collected", log, re.M)]
    assert len(collected) == 2 and all(n > 20 for n in collected), collected
    assert log.count(" cases\n") == 4, "attention, loss, ops and e2e each list their cases"

    with tarfile.open(out / "all.tar.gz") as tar:
        headline = json.load(tar.extractfile("all/first-headline/headline.json"))
    assert headline["meta"]["complete"] is True and headline["meta"]["kind"] == "cpu"
    ops = {r["op"] for r in headline["results"]}
    assert ops == {"flash_attention", "rms_norm", "apply_rotary_pos_emb", "swiglu"}, ops
    assert {r["mode"] for r in headline["results"] if r["op"] == "flash_attention"} == {"fwd", "bwd", "decode"}
    assert time.monotonic() - start < 900

    stage = tmp_path / "run" / "stage"
    code = ("import llama_fast, llama_fast.kernels.attention as a, bench; "
            "print(llama_fast.__file__, a.__file__, bench.__file__)")
    files = subprocess.run([sys.executable, "-c", code], cwd=stage, env=_env(tmp_path), capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) == 3 and all(f.startswith(str(stage)) for f in files), files
    assert not list(stage.glob("llama_fast/_C*.so")), "the extension built here is not for the lent GPU's torch"


def test_a_part_past_its_limit_is_stopped_and_the_run_goes_on(tmp_path):
    """Each part runs under its own limit (GPU_SH_DRY_LIMIT stands in for the budget here): at the limit
    its whole process group ends, the part is marked timeout, and the next part starts."""
    out = tmp_path / "out"
    start = time.monotonic()
    proc = _script(tmp_path, "--dry-run", "first", str(out), timeout=120, GPU_SH_DRY_LIMIT="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = _parts(out, "first")
    assert [p["exit"] for p in parts.values()] == ["timeout"] * 3, parts
    assert all(p["taken"] <= 4 for p in parts.values()), parts
    assert time.monotonic() - start < 60
    assert "first/headline: exit timeout" in proc.stdout


def test_within_skips_what_cannot_fit_and_restores_autotuning_results(tmp_path):
    """--within: a part that would get under 20 s is skipped, not started. The autotuning results given
    with --autotune are unpacked into the run's Triton cache and come back in autotune.tar.gz."""
    saved = tmp_path / "saved.tar.gz"
    entry = tmp_path / "cache" / "ABCDEF" / "_attn_fwd_kernel.autotune.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"key": [1], "configs_timings": []}))
    (entry.parent / "_attn_fwd_kernel.cubin").write_bytes(b"not restored")
    with tarfile.open(saved, "w:gz") as tar:
        tar.add(entry.parent, arcname="./ABCDEF")
    out = tmp_path / "out"
    proc = _script(tmp_path, "--dry-run", "--within", "15", "--autotune", str(saved), "rest", str(out), timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert {p["exit"] for p in _parts(out, "rest").values()} == {"skipped"}
    cache = tmp_path / "run" / "triton-cache"
    assert (cache / "ABCDEF" / "_attn_fwd_kernel.autotune.json").exists()
    assert not (cache / "ABCDEF" / "_attn_fwd_kernel.cubin").exists()
    with tarfile.open(out / "autotune.tar.gz") as tar:
        names = [n.lstrip("./") for n in tar.getnames() if n.endswith(".json")]
        assert names == ["ABCDEF/_attn_fwd_kernel.autotune.json"]
    assert f"autotuning results restored from {saved}" in (out / "rest.log").read_text()
