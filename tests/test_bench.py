"""The bench machinery on the CPU: the formulas, the traffic count, the suites' JSON and plots
(labelled CPU, never GPU), and the ops cases through pytest-benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import formulas
from bench import ops as ops_suite
from bench.traffic import traffic
from llama_fast import extension
from llama_fast.backend import interpreting

ROOT = Path(__file__).resolve().parent.parent


def test_formulas():
    assert formulas.attention_pairs(4, 4, causal=True) == 10  # the lower triangle with its diagonal
    assert formulas.attention_pairs(4, 4, causal=False) == 16
    assert formulas.attention_pairs(2, 5, causal=True) == 4 + 5  # bottom-right: query 0 sees keys 0..3
    assert formulas.attention_pairs(5, 2, causal=True) == 0 + 0 + 0 + 1 + 2  # early queries see nothing
    assert formulas.attention_flops(1, 1, 4, 4, 64, True, "bwd") == int(2.5 * 4 * 10 * 64)
    assert formulas.attention_pairs(4, 4, causal=True, window=2) == 1 + 2 + 2 + 2  # the last 2 of each row
    assert formulas.attention_pairs(2, 5, causal=True, window=3) == 3 + 3
    assert formulas.rms_norm_bytes(10, 8, 2, 4, "fwd") == 10 * 8 * 2 * 2 + 8 * 4
    assert formulas.swiglu_bytes(3, 5, 2, "fwdbwd") == 3 * 5 * 8 * 2


def test_traffic_count_shows_what_fusion_saves():
    rows = {(r["op"], r["mode"]): r for r in traffic(["llama3-8b"])}
    assert len(rows) == 6
    # Eager RMSNorm upcasts, squares, reduces, rescales and casts back: 9 kernels forward and about
    # 9x the bytes of one fused pass over x and y (4096 x 4096 bf16).
    fwd = rows[("rms_norm", "fwd")]
    assert fwd["eager_kernels"] == 9 and 8.5 < fwd["ratio"] < 9.5
    for r in rows.values():
        assert r["ratio"] > 1.5, r


def _bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench", *args, "--out", str(tmp_path), "--no-progress", "--rep-ms", "20"]
    return subprocess.run(command,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.system
@pytest.mark.parametrize("suite,extra", [("ops", ["--quick"]), ("attention", []), ("e2e", ["--no-smollm2"])])
def test_suites_on_cpu_are_labelled_cpu(tmp_path, suite, extra):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU labelling")
    proc = _bench(tmp_path, suite, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No GPU on this machine: timings below are CPU timings" in proc.stdout
    data = json.loads((tmp_path / f"{suite}.json").read_text())
    assert data["meta"]["kind"] == "cpu" and data["meta"]["device"].startswith("CPU") and data["meta"]["peaks"] is None
    for key in ("date", "torch", "triton", "transformers"):
        assert data["meta"][key]
    rows = data["results"]
    assert rows and not [r for r in rows if "error" in r]
    assert all("pct_peak" not in r for r in rows), "no % of a GPU peak from a CPU timing"
    ours = [r for r in rows if r["provider"].startswith("llama_fast")]
    assert ours and all(r["speedup_over"] for r in ours)
    # Labelled with what ran: on a CPU the C++ kernels, and the reference for attention (no CPU kernel).
    ext = "cpu" if extension.available() else "reference"
    label = {"ops": ext, "attention": "reference", "e2e": ext if ext == "reference" else "cpu, attention reference"}
    expected = {f"llama_fast[{label[suite]}]"}
    if suite == "e2e":  # generate() with a static cache too, and training on padded and packed examples
        expected |= {f"llama_fast[{label[suite]}] +static", f"llama_fast[{label[suite]}] padded",
                     f"llama_fast[{label[suite]}] packed"}
        assert {r["provider"] for r in rows if r["op"] == "generate"} >= {"transformers", "transformers +static"}
        packing = [r for r in rows if r["mode"] == "padded vs packed"]
        assert {r["provider"] for r in packing} == {"transformers padded", f"llama_fast[{label[suite]}] padded",
                                                    f"llama_fast[{label[suite]}] packed"}
        assert all(r["tokens_per_s"] > 0 and "attention FLOPs packed/padded" in r["shape"] for r in packing)
    assert {r["provider"] for r in ours} == expected
    assert all(r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] for r in rows)
    assert (tmp_path / f"{suite}.png").stat().st_size > 10_000



def test_cpu_timings_take_providers_in_turn():
    """On a CPU the providers of a case are timed round-robin, so a slow spell of a shared machine
    slows them alike; one that raises is reported and leaves the rotation."""
    from bench.device import measure_cpu

    calls = []

    def broken():
        calls.append("broken")
        if calls.count("broken") > 1:  # the warm-up succeeds, the first timed call fails
            raise ValueError("boom")

    out = measure_cpu({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "broken": broken}, rep_ms=5)
    timed = [c for c in calls[3:] if c != "broken"]
    assert timed[:6] == ["a", "b"] * 3, calls[:12]
    assert out["broken"] == {"error": "ValueError: boom"}
    assert all(out[k]["p20_ms"] <= out[k]["ms"] <= out[k]["p80_ms"] for k in "ab")

def test_noisy_rows_are_flagged_not_quoted():
    """A timing whose p20-p80 spread is wider than its median is flagged, and so is every speed-up
    computed from it (the 2-core VM once printed 154.70x from a 0.46-36.9 ms spread)."""
    from bench.cases import Case, add_speedups, rows_for
    from bench.report import format_table

    case = Case(suite="ops", op="rms_norm", mode="fwd", shape="smollm2-135m tokens=256", size=256, dtype="float32",
                bytes=10**6)
    rows = [rows_for(case, "eager", dict(ms=0.46, p20_ms=0.46, p80_ms=36.9, peak_bytes=None), None),
            rows_for(case, "torch.compile", dict(ms=0.5, p20_ms=0.45, p80_ms=0.6, peak_bytes=None), None),
            rows_for(case, "llama_fast[cpu]", dict(ms=0.25, p20_ms=0.24, p80_ms=0.27, peak_bytes=None), None)]
    add_speedups(rows)
    assert [r["noisy"] for r in rows] == [True, False, False]
    assert rows[2]["speedup_noisy"] == ["eager"]
    table = format_table(rows)
    assert "1.84x (noisy) vs eager" in table and "2.00x vs torch.compile" in table
    assert "noisy: the p20-p80 spread is wider than the median" in table


def test_rows_are_handed_over_as_they_are_measured(tmp_path, capsys):
    """report.run hands the rows so far (speed-ups filled in) to on_rows after each case, and prints each
    row as it is measured without the progress bar: a suite stopped at bench/gpu.sh's time limit keeps
    what it measured. write_json replaces the file whole, never leaving a truncated one."""
    from bench.cases import Case
    from bench.report import run, write_json

    cases = [Case(suite="ops", op="rms_norm", mode="fwd", shape=f"tokens={n}", size=n, dtype="float32", bytes=10**6,
                  providers={"eager": lambda: (lambda: None), "llama_fast[cpu]": lambda: (lambda: None)})
             for n in (16, 32, 64)]
    path = tmp_path / "ops.json"
    seen = []

    def on_rows(rows):
        seen.append([(r["shape"], r["provider"]) for r in rows])
        assert all(r["speedup_over"] for r in rows if r["provider"].startswith("llama_fast"))
        write_json(path, {"complete": False}, rows)

    rows = run(cases, torch.device("cpu"), None, rep_ms=1, progress=False, on_rows=on_rows)
    assert [len(s) for s in seen] == [2, 4, 6] and seen[-1] == [(r["shape"], r["provider"]) for r in rows]
    assert [r["shape"] for r in json.loads(path.read_text())["results"]] == ["tokens=16"] * 2 + ["tokens=32"] * 2 + [
        "tokens=64"] * 2
    assert not list(tmp_path.glob("*.tmp"))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rms_norm")]
    assert len(printed) == 6


def test_compiled_providers_never_run_eager_past_the_recompile_limit():
    """Past Dynamo's recompile limit (8) a compiled function runs eager with one log line: a shape sweep's
    later torch.compile rows would time eager PyTorch. Under the bench's strict_dynamo the limit is
    raised above any sweep, and reaching it raises, which the runner turns into an error row."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from bench.compiled import compile_static, strict_dynamo

    def double(x):
        return x * 2

    def graphs_for(fn, sizes):
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        for n in sizes:
            assert torch.equal(fn(torch.ones(n)), torch.full((n,), 2.0))
        return counters["stats"]["unique_graphs"] - before

    plain = torch.compile(double, dynamic=False, backend="eager")
    assert graphs_for(plain, range(1, 11)) == 8  # sizes 9 and 10 ran eager, and nothing said so
    with strict_dynamo():
        assert graphs_for(compile_static(double, backend="eager"), range(1, 11)) == 10
    with strict_dynamo(limit=3), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        graphs_for(plain, range(1, 5))
    torch._dynamo.reset()


def _ops_cases():
    device = torch.device(os.environ.get("LLAMA_FAST_TEST_DEVICE", "cpu"))
    tokens = [16] if device.type == "cpu" else [4096]
    for case in ops_suite.cases(device, torch.float32, ["smollm2-135m"], tokens, ["fwd", "bwd"], compile_too=False):
        for provider, setup in case.providers.items():
            name = f"{case.op}-{case.mode}-{case.shape}-{provider}".replace(" ", "_")
            yield pytest.param(setup, case.providers["eager"], id=name)


def _seeded(setup):
    torch.manual_seed(0)  # the same inputs (and output gradients) for every provider of a case
    return setup()


@pytest.mark.parametrize("setup,eager", list(_ops_cases()))
def test_ops_cases_through_pytest_benchmark(benchmark, setup, eager):
    """The bench's own ops cases under pytest-benchmark (timed with ``--benchmark-enable``; CI runs each once).
    On the CPU the Triton kernels run in the interpreter: a few rounds check the path, not speed. What a
    provider's timed call returns is what eager PyTorch's returns for the same inputs (fp32)."""
    fn = _seeded(setup)
    got = benchmark.pedantic(fn, rounds=3, iterations=1) if interpreting() else benchmark(fn)
    want = _seeded(eager)()
    got, want = (t if isinstance(t, tuple) else (t,) for t in (got, want))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.system
def test_overhead_bench(tmp_path):
    """`python -m bench overhead`: each op's host path with launches stubbed (no kernel compiled, none
    interpreted: a call takes well under a millisecond) beside eager, and a decoder layer's decode step."""
    proc = _bench(tmp_path, "overhead")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["meta"]["kind"] == "cpu" and "launches stubbed" in data["meta"]["what"]
    rows = {r["what"]: r for r in data["results"]}
    assert set(rows) == {"rms_norm", "rope", "swiglu", "flash_attention decode", "decoder layer decode step"}
    for name in ("rms_norm", "rope", "swiglu", "flash_attention decode"):
        assert 0 < rows[name]["llama_fast_host_us"] < 1000 and rows[name]["eager_us"] > 0, rows[name]
        assert 0 < rows[name]["llama_fast_grad_host_us"] < 2000, rows[name]
        assert rows[name]["in_torch_muls"] == rows[name]["llama_fast_host_us"] / rows[name]["torch_mul_us"]
    assert "Host time, not GPU time." in proc.stdout


def test_decode_kernels_per_layer(tmp_path):
    """`python -m bench kernels`: a patched decoder layer decodes a token in at most 6 non-GEMM kernels
    with a DynamicCache and with a StaticCache (RMSNorm, RoPE fused with the cache write, attention in one
    split-KV launch, add + RMSNorm, SwiGLU; the static cache's fill-count add), eager in 29 and 35; and
    compiled by Inductor, fewer than eager compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "kernels", "--compile", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "kernel_count.json").read_text())
    counts = {(r["cache"], r["model"]): r for r in data["results"]}
    for cache in ("dynamic", "static"):
        patched, eager = counts[cache, "patched"], counts[cache, "eager"]
        assert patched["kernels_per_layer"] <= 6, patched
        assert eager["kernels_per_layer"] >= 29, eager  # the counter sees eager's kernels: it can fail
        triton = {n for n in patched["by_kernel"] if n.startswith("triton.")}
        assert triton == {"triton._rms_norm_fwd_kernel", "triton._rope_kernel", "triton._attn_decode_kernel",
                          "triton._add_rms_norm_fwd_kernel", "triton._swiglu_fwd_kernel"}, patched
    # Compiled by Inductor (fullgraph, StaticCache): fewer kernels patched than eager's fused graph.
    patched, eager = counts["static, compiled", "patched"], counts["static, compiled", "eager"]
    assert 0 < patched["kernels_per_layer"] < eager["kernels_per_layer"], (patched, eager)


@pytest.mark.system
def test_loss_bench(tmp_path):
    """`python -m bench loss`: the loss step's peak, counted on meta tensors, fused against unfused;
    then its speed per provider, labelled CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "loss", "--rep-ms", "1", "--no-progress", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = json.loads((tmp_path / "loss.json").read_text())
    row = written["results"][0]
    gib = 2 ** 30
    # dweight alone (bf16, 128256 x 4096) is 0.98 GiB: the fused peak holds it and little else. The
    # unfused loss's backward holds three fp32 logits at once (log_softmax's saved output, the
    # gradient coming in and the one going out): 3 x 3.91 GiB.
    assert 0.98 * gib < row["fused_bytes"] < 1.5 * gib and row["unfused_bytes"] == pytest.approx(3 * 8192 * 128256 * 4,
                                                                                                 rel=1e-3), row
    assert "goal <= 0.125" in proc.stdout
    speed = {r["provider"]: r for r in written["speed"]}
    assert set(speed) == {"eager", "llama_fast[torch]"}, speed
    assert all(r["ms"] > 0 and r["tflop_per_s"] > 0 for r in speed.values()), speed
    assert set(speed["llama_fast[torch]"]["speedup_over"]) == {"eager"}
    assert "CPU timings (labelled CPU), not GPU performance" in proc.stdout


def test_live_bytes_counts_what_is_alive():
    from bench.loss import LiveBytes

    with LiveBytes() as counter:
        a = torch.empty(1024, device="meta")  # 4 KiB
        b = a + 1  # 4 KiB more
        view = b[:10]  # no new memory
        del a
        c = torch.empty(256, device="meta")  # 1 KiB
    assert counter.peak == 8192 and counter.live == 4096 + 1024
    del b, view, c
    assert counter.live == 0


def test_live_bytes_counts_storages_autograd_keeps():
    """Memory that lives on behind another tensor object still counts: an output autograd saved
    for the backward after the caller dropped it, and ``to`` another dtype (aliased in its schema)."""
    from bench.loss import LiveBytes

    x = torch.empty(1024, device="meta", requires_grad=True)
    with LiveBytes() as counter:
        y = x.exp()  # 4 KiB, saved by exp's backward
        loss = y.sum()
        del y
        assert counter.live == 4096 + 4  # the saved output and the 1-element sum
        half = x.detach().to(torch.float16)  # 2 KiB, a new storage
        same = x.detach().to(torch.float32)  # x itself: nothing new
        assert counter.live == 4096 + 4 + 2048 and same.untyped_storage()._cdata == x.untyped_storage()._cdata
        del loss, half, same
    assert counter.live == 0 and counter.peak == 4096 + 4 + 2048
