"""Every kernel compiles ahead of time for Hopper (sm_90a) at Llama-3-8B shapes with no register
spills, memory-bound kernels issue 128-bit loads, attention uses HGMMA and TMA, and no instruction
count regresses against the committed baseline (bench/audit.py).

The audit compiles real kernels, so it runs in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def full_audit(tmp_path_factory):
    """The whole audit CI asks for: every kernel, every autotuning config, all three model shapes,
    sm_90a and sm_80 (about three minutes on two cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "audit", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    reports = json.loads(out.read_text())["results"] if out.exists() else []
    return proc, reports


MATRIX_KERNELS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
MEMORY_KERNELS = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                  "_swiglu_bwd_kernel", "_attn_bwd_delta_kernel", "_attn_decode_kernel", "_attn_decode_combine_kernel",
                  "_loss_rows_kernel", "_grad_kernel"}


def test_audit_passes_everywhere(full_audit):
    proc, reports = full_audit
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["arch"] for r in reports} == {80, 90}
    assert {r["case"].split()[0] for r in reports} == {"smollm2-135m", "llama3-8b", "llama3-70b"}
    assert not [r for r in reports if r["problems"]]
    assert "compiled kernels compared" in proc.stdout, proc.stdout[-500:]  # the baseline was read and used


def test_sm90a_at_llama3_8b(full_audit):
    """Every kernel at Llama-3-8B shapes on sm_90a: no spills; attention's matrix kernels use HGMMA
    in every autotuning config; the memory-bound kernels issue 128-bit loads."""
    _, reports = full_audit
    ours = [r for r in reports if r["arch"] == 90 and r["case"].startswith("llama3-8b")]
    assert {r["kernel"] for r in ours} == MATRIX_KERNELS | MEMORY_KERNELS
    for r in ours:
        assert r["spill_bytes"] == 0 and r["spill_instructions"] == 0, r
        if r["kernel"] in MATRIX_KERNELS:
            assert r["hgmma"] > 0 and r["utmaldg"] > 0, r
            # the instruction mix of each loop iteration that issues HGMMA is reported
            assert r["matrix_loops"] and all(loop["hgmma"] > 0 and loop["instructions"] >= loop["hgmma"] + loop["ex2"]
                                             for loop in r["matrix_loops"]), r
        else:
            assert r["ldg128"] > 0, r


def _compile_forward_with_tile(tile, arch):
    """The attention forward at Llama-3-8B shapes (head_dim 128), compiled for ``arch`` with ``tile``."""
    code = f"""
import dataclasses, json, torch
from bench.audit import Launch, capture_launches, compile_launch
from llama_fast.kernels import attention
q = torch.empty(1, 4096, 32, 128, dtype=torch.bfloat16).transpose(1, 2)
k = torch.empty(1, 4096, 8, 128, dtype=torch.bfloat16).transpose(1, 2)
with capture_launches({arch}) as launches:
    attention.attention_fwd(q, k, k, causal=True, softmax_scale=0.088, pad=None, splits=0)
m, n, w, s = {tuple(tile)}
launch = Launch(launches[0].kernel, dict(launches[0].args, BLOCK_M=m, BLOCK_N=n), w, s)
print(json.dumps(dataclasses.asdict(compile_launch("forward", launch, {arch}, "matrix"))))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_audit_fails_a_spilling_kernel():
    """The forward with (128, 64) tiles on 4 warps runs out of registers at head_dim 128 (a tile the
    library used to autotune over): ptxas on sm_90a reports the spill as STACK, with LOCAL, the one
    count the audit used to read, at 0 (../shared/DESIGN.md, fact 5), and STL/LDL appear in the
    SASS. The audit must call it a problem."""
    report = _compile_forward_with_tile((128, 64, 4, 3), 90)
    assert report["spill_bytes"] > 0 and report["spill_instructions"] > 0, report
    assert any("spills registers" in p for p in report["problems"]), report
    kept = _compile_forward_with_tile((128, 64, 8, 3), 90)  # the same tile on 8 warps fits
    assert kept["spill_bytes"] == kept["spill_instructions"] == 0 and not kept["problems"], kept


def test_single_config_runs_suit_every_architecture():
    """With one config (LLAMA_FAST_AUTOTUNE=0, the GPU test run) Triton skips pruning and runs the
    first tile of each kernel, so that tile must be one every architecture keeps."""
    code = """
from llama_fast.kernels import attention as a
for tiles in (a._FWD_TILES, a._BWD_DKDV_TILES, a._BWD_DQ_TILES):
    first = next(iter(tiles.values()))[0]
    assert all(first in arch_tiles for arch_tiles in tiles.values()), (first, tiles)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_matrix_loop_instruction_mix():
    """matrix_loops finds a loop as a backward branch to a label and counts one iteration's instructions
    by class; a loop without HGMMA and a forward branch are not reported."""
    from bench.audit import matrix_loops

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   FFMA R2, R3, R4, -R5 ;
        /*0030*/                   MUFU.EX2 R6, R2 ;
        /*0040*/                   FSEL R7, R6, RZ, P0 ;
        /*0050*/              @!P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   FMUL R8, R8, R9 ;
        /*0070*/               @P2 BRA `(.L_x_1) ;
        /*0080*/                   BRA `(.L_x_2);
.L_x_2:
        /*0090*/                   EXIT ;
"""
    (loop,) = matrix_loops(sass)
    assert loop == dict(instructions=5, hgmma=1, ex2=1, ffma=1, fmul=0, fadd=0, select=1, compare=0, sync=0)


def test_ex2_under_hgmma_counts_exponentials_under_a_wgmma():
    """ex2_under_hgmma counts, per iteration of each HGMMA loop, the MUFU.EX2 issued between an HGMMA and
    the WARPGROUP.DEPBAR that waits for its group: none in the lockstep order (wait for S, then the
    exponentials, then P·V waited for before the next iteration), all in the overlapped one (P·V
    issued, exponentials, then the wait), and those after a group committed at the end of an
    iteration and waited for at the top of the next (the loop-carried P·V)."""
    from bench.audit import ex2_under_hgmma, matrix_loops

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   MUFU.EX2 R6, R2 ;
        /*0060*/                   MUFU.EX2 R7, R3 ;
        /*0070*/                   WARPGROUP.ARRIVE ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88, gsb0 ;
        /*0090*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00a0*/              @!P1 BRA `(.L_x_0) ;
.L_x_1:
        /*00b0*/                   WARPGROUP.ARRIVE ;
        /*00c0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   MUFU.EX2 R9, R2 ;
        /*00f0*/                   WARPGROUP.ARRIVE ;
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88 ;
        /*0110*/                   MUFU.EX2 R6, R2 ;
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R88, R156, gdesc[UR16].tnspB, R88, gsb0 ;
        /*0130*/                   MUFU.EX2 R7, R3 ;
        /*0140*/                   MUFU.EX2 R8, R4 ;
        /*0150*/               @P2 BRA `(.L_x_1) ;
.L_x_2:
        /*0160*/                   WARPGROUP.ARRIVE ;
        /*0170*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0180*/                   MUFU.EX2 R6, R2 ;
        /*0190*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*01a0*/                   MUFU.EX2 R7, R3 ;
        /*01b0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*01c0*/                   MUFU.EX2 R8, R3 ;
        /*01d0*/               @P2 BRA `(.L_x_2) ;
        /*01e0*/                   EXIT ;
"""
    assert [loop["ex2"] for loop in matrix_loops(sass)] == [2, 4, 3]
    # loop 1: R9's EX2 follows the wait that also retires the previous iteration's P·V; the other
    # three issue under this iteration's. Loop 2: one group in flight until DEPBAR 0x1 leaves it pending.
    assert ex2_under_hgmma(sass) == [0, 3, 2]


def test_forward_overlaps_softmax_and_matrix_products(full_audit):
    """Issue 25: on sm_90a the attention forward's exponentials of one key block issue while a
    wgmma of another is in flight, in both its loops and every autotuning tile up to head_dim 128
    (the one-block-at-a-time loop read 0 on 2026-12-02); the baseline records the counts."""
    _, reports = full_audit
    forward = [r for r in reports if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == 90]
    assert forward and all(len(r["ex2_under_hgmma"]) == len(r["matrix_loops"]) == 2 for r in forward)
    for r in forward:
        for loop, under in zip(r["matrix_loops"], r["ex2_under_hgmma"]):
            assert 2 * under >= loop["ex2"] > 0, r
    baseline = json.loads((ROOT / "bench" / "audit_baseline.json").read_text())["kernels"]
    recorded = [k for k, entry in baseline.items() if "ex2_under_hgmma" in entry]
    assert recorded and all("attention" in k and "fwd" in k and "sm_90" in k for k in recorded), recorded


def test_baseline_catches_a_regression(tmp_path):
    """check_baseline flags fewer HGMMA or TMA instructions, or a matrix loop grown by more than 5%,
    and skips the comparison under another Triton version, saying so."""
    import triton

    from bench.audit import Report, check_baseline, write_baseline

    def report(hgmma=24, utmaldg=13, loops=(330, 448)):
        return Report("llama3-8b attention fwd", "_attn_fwd_kernel", 90, (128, 64), 8, 3, 155, 0, 0, 132096, 0.125,
                      hgmma, utmaldg, 0, 0, [], [dict(instructions=n) for n in loops])

    path = tmp_path / "baseline.json"
    write_baseline([report()], path)
    same, fewer_tma, longer, slightly_longer = report(), report(utmaldg=0), report(loops=(330, 471)), report(loops=(346, 448))
    line = check_baseline([same, fewer_tma, longer, slightly_longer], path)
    assert line.endswith("4 of 4 compiled kernels compared"), line
    assert same.problems == [] and slightly_longer.problems == []  # 346 <= 1.05 * 330
    assert fewer_tma.problems == ["regression: 0 UTMALDG (baseline 13)"]
    assert longer.problems == ["regression: matrix loop 1 has 471 instructions per iteration (baseline 448)"]
    other = json.loads(path.read_text()) | {"triton": "0.0.1"}
    path.write_text(json.dumps(other))
    skipped = report(hgmma=0)
    assert check_baseline([skipped], path) == (f"baseline recorded with triton 0.0.1, this is {triton.__version__}: "
                                               "instruction counts not compared")
    assert skipped.problems == []


def test_baseline_catches_a_lost_overlap(tmp_path):
    """The baseline records ex2_under_hgmma only for kernels that have any, and check_baseline flags
    a loop that issues fewer exponentials under a wgmma than recorded (or none at all)."""
    from bench.audit import Report, check_baseline, write_baseline

    def report(kernel="_attn_fwd_kernel", under=(66, 66)):
        return Report("llama3-8b attention fwd", kernel, 90, (128, 128), 8, 2, 255, 0, 0, 164864, 0.125,
                      32, 9, 0, 0, [], [dict(instructions=490), dict(instructions=721)], list(under))

    path = tmp_path / "baseline.json"
    write_baseline([report(), report(kernel="_attn_bwd_dq_kernel", under=(0, 0))], path)
    entries = json.loads(path.read_text())["kernels"]
    assert [("ex2_under_hgmma" in e) for e in entries.values()] == [True, False]
    same, fewer, none = report(), report(under=(66, 40)), report(under=())
    check_baseline([same, fewer, none], path)
    assert same.problems == []
    assert fewer.problems == ["regression: matrix loop 1 issues 40 EX2 under a wgmma (baseline 66)"]
    assert none.problems == [f"regression: matrix loop {i} issues 0 EX2 under a wgmma (baseline 66)" for i in (0, 1)]


def test_schedule_efficiency():
    from bench.model import schedule_efficiency

    assert schedule_efficiency([1.0] * 8, 4) == 1.0
    assert schedule_efficiency([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 1.0  # heavy first: 4 | 1+1+1+1
    assert schedule_efficiency([1.0, 1.0, 1.0, 1.0, 4.0], 2) == 8 / 12  # heavy last: the tail idles a slot
    assert schedule_efficiency([3.0], 4) == 0.25  # one program: three slots idle all along


def test_performance_model_arithmetic():
    """One steady iteration of a (128, 64) forward tile at head_dim 128 on 8 warps: 2 products of
    2·128·64·128 FLOPs = 1024 tensor-core clocks; 330 instructions x 8 warps / 4 schedulers = 660
    issue clocks; 34 EX2 x 8 warps x 2 = 544 exp2 clocks."""
    from bench.audit import Report
    from bench.model import CLOCK_HZ, SMS, predict

    mix = dict(instructions=330, hgmma=12, ex2=34, ffma=34, fmul=66, fadd=36, select=0, compare=5, sync=8)
    r = Report("llama3-8b attention fwd", "_attn_fwd_kernel", 90, (128, 64), 8, 3, 155, 0, 0, 132096, 0.125,
               24, 13, 0, 0, [], [mix, dict(mix, instructions=448)])
    p = predict(r, head_dim=128, batch=4, q_heads=32, kv_heads=8, seq=4096)
    assert (p.flops, p.tensor_cycles, p.issue_cycles, p.ex2_cycles, p.bound) == (4194304, 1024, 660, 544, "tensor cores")
    assert abs(p.ceiling_overlapped - 4194304 / 1024 * CLOCK_HZ * SMS / 1e12) < 1e-9
    assert abs(p.ceiling_serial - 4194304 / (1024 + 660) * CLOCK_HZ * SMS / 1e12) < 1e-9
    assert 0.99 < p.schedule_efficiency <= 1.0  # 4096 programs, longest first
    assert p.predicted == (p.ceiling_serial * p.schedule_efficiency, p.ceiling_overlapped * p.schedule_efficiency)


def test_model_only_command(tmp_path):
    """`python -m bench attention --model-only` compiles the attention kernels for sm_90a and prints the
    model, labelled as one, with a JSON that says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", "attention", "--model-only", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Not a measurement." in proc.stdout and "llama3-8b     forward" in proc.stdout
    data = json.loads((tmp_path / "attention_model.json").read_text())
    assert "not a measurement" in data["meta"]["what"]
    passes = {(row["shape"], row["pass_"]) for row in data["meta"]["summary"]}
    assert ("llama3-8b", "backward (atomic dQ)") in passes and ("smollm2-135m", "forward") in passes
    assert all(0 < r["predicted"][0] <= r["predicted"][1] <= 989.5 for r in data["results"])  # the bf16 peak
