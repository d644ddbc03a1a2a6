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

pytestmark = pytest.mark.system  # compiles for sm_90a / sm_80 in subprocesses

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
MEMORY_KERNELS = {"_rms_norm_fwd_kernel", "_add_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel",
                  "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_attn_bwd_delta_kernel", "_attn_decode_kernel",
                  "_attn_decode_combine_kernel", "_loss_rows_kernel", "_grad_kernel"}


def test_audit_passes_everywhere(full_audit):
    proc, reports = full_audit
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["arch"] for r in reports} == {80, 90}
    assert {r["case"].split()[0] for r in reports} == {"smollm2-135m", "llama3-8b", "llama3-70b", "shared-memory"}
    assert not [r for r in reports if r["problems"]]
    assert "compiled kernels compared" in proc.stdout, proc.stdout[-500:]  # the baseline was read and used


def test_sm90a_at_llama3_8b(full_audit):
    """Every kernel at Llama-3-8B shapes on sm_90a: no spills; attention's matrix kernels use HGMMA
    in every autotuning config; the memory-bound kernels issue 128-bit loads."""
    _, reports = full_audit
    ours = [r for r in reports
            if r["arch"] == 90 and r["case"].startswith("llama3-8b") and " pointer " not in r["case"]]
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


def _compile_forward_with_tile(tile, arch, dtype="bfloat16"):
    """The attention forward at Llama-3-8B shapes (head_dim 128), compiled for ``arch`` with ``tile``."""
    code = f"""
import dataclasses, json, torch
from bench.audit import Launch, capture_launches, compile_launch
from llama_fast.kernels import attention
q = torch.empty(1, 4096, 32, 128, dtype=torch.{dtype}).transpose(1, 2)
k = torch.empty(1, 4096, 8, 128, dtype=torch.{dtype}).transpose(1, 2)
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
    count the audit used to read, at 0 (docs/testing.md, "Compiling for Hopper without a GPU"), and STL/LDL
    appear in the SASS. The audit must call it a problem."""
    report = _compile_forward_with_tile((128, 64, 4, 3), 90)
    assert report["spill_bytes"] > 0 and report["spill_instructions"] > 0, report
    assert any("spills registers" in p for p in report["problems"]), report
    kept = _compile_forward_with_tile((128, 64, 8, 3), 90)  # the same tile on 8 warps fits
    assert kept["spill_bytes"] == kept["spill_instructions"] == 0 and not kept["problems"], kept


def test_every_config_the_launch_can_choose_fits_shared_memory(full_audit):
    """At head_dim 128 and 256, fp32 and bf16, forward, both backward modes and decode, on sm_90a and
    sm_80, the configs the pruner leaves (compiled for the architecture, as a GPU would) all fit the
    block's shared memory, and every kernel keeps at least one."""
    from llama_fast.kernels.attention import SHARED_MEMORY_LIMIT

    _, reports = full_audit
    fit = [r for r in reports if r["case"].startswith("shared-memory")]
    assert all(r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["arch"]] for r in fit), \
        [(r["case"], r["kernel"], r["arch"], r["tile"], r["shared_bytes"]) for r in fit if r["problems"]]
    kernels = {(r["case"], r["kernel"], r["arch"]) for r in fit}
    for head_dim in (128, 256):
        for dtype in ("float32", "bfloat16"):
            for arch in (90, 80):
                case = f"shared-memory d{head_dim} {dtype} attention"
                assert {(f"{case} fwd", "_attn_fwd_kernel", arch), (f"{case} bwd", "_attn_bwd_dkdv_kernel", arch),
                        (f"{case} bwd determ.", "_attn_bwd_dq_kernel", arch),
                        (f"{case} decode", "_attn_decode_kernel", arch)} <= kernels


def test_audit_fails_a_config_over_shared_memory():
    """The forward's first tile (128 x 64, 3 stages) needs 262,144 B in fp32 at head_dim 128, over
    sm_90's 232,448: the pruner must drop it there, and the audit calls it a problem."""
    report = _compile_forward_with_tile((128, 64, 8, 3), 90, dtype="float32")
    assert report["shared_bytes"] == 262_144, report
    assert any("262,144 bytes of shared memory, over sm_90's 232,448" in p for p in report["problems"]), report


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
    assert loop == dict(instructions=5, hgmma=1, ex2=1, ffma=1, fmul=0, fadd=0, select=1, compare=0, sync=0, hmma=0,
                        bar=0, atomg=0, hgmma_shapes={"64x64x16": 1}, hgmma_flops=2 * 64 * 64 * 16, hmma_flops=0,
                        inner=0)


def test_work_multiple_counts_each_warpgroup():
    """An outer loop holding an inner one: the inner loop issues two HGMMA.64x16x16 and one mma.sync
    (HMMA.16816) per iteration, the outer one holds that body and two barriers. On 8 warps each
    HGMMA runs once per warpgroup (two) and the HMMA once per warp (eight): 2·(2·2·64·16·16) +
    8·(2·16·8·16) = 163,840 FLOPs, 2.5x an algorithm of 65,536 FLOPs per iteration; the outer loop's
    multiple is over the one inner iteration its body holds, the same."""
    from bench.audit import _work_multiples, matrix_loops

    sass = """
.L_x_0:
        /*0000*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
        /*0010*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0040*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, [R2], R4 ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/              @!P2 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""
    inner, outer = matrix_loops(sass)
    assert (inner["hgmma"], inner["hmma"], inner["atomg"], inner["bar"], inner["inner"]) == (2, 1, 1, 0, 0)
    assert inner["hgmma_shapes"] == {"64x16x16": 2} and outer["hgmma_shapes"] == {"64x16x16": 2}
    assert (outer["bar"], outer["inner"]) == (2, 1)
    _work_multiples([inner, outer], num_warps=8, algorithm=65536)
    assert inner["matrix_work"] == 2 * (2 * 2 * 64 * 16 * 16) + 8 * (2 * 16 * 8 * 16) == 163840
    assert inner["work_multiple"] == outer["work_multiple"] == 2.5
    _work_multiples([inner], num_warps=4, algorithm=None)  # a kernel whose products the audit does not know
    assert inner["work_multiple"] is None


def _compile_backward(deterministic, arch=90, tile=None):
    """The dK/dV kernel of the attention backward at Llama-3-8B shapes (head_dim 128), compiled for
    sm_90a with ``tile`` (BLOCK_M, BLOCK_N, warps, stages), or each tile the kernel keeps when None."""
    code = f"""
import dataclasses, json, torch
from bench.audit import Launch, capture_launches, compile_launch
from llama_fast.kernels import attention
q = torch.empty(1, 4096, 32, 128, dtype=torch.bfloat16).transpose(1, 2)
k = torch.empty(1, 4096, 8, 128, dtype=torch.bfloat16).transpose(1, 2)
lse = torch.empty(1, 32, 4096)
with capture_launches({arch}) as launches:
    attention.attention_bwd(q, q, k, k, q, lse, causal=True, softmax_scale=0.088, pad=None, tma=True,
                            deterministic={deterministic}, arch={arch})
launches = [l for l in launches if l.kernel.__name__ == "_attn_bwd_dkdv_kernel"]
tile = {tile!r}
if tile is not None:
    m, n, w, s = tile
    launches = [Launch(launches[0].kernel, dict(launches[0].args, BLOCK_M=m, BLOCK_N=n), w, s)]
for launch in launches:
    print(json.dumps(dataclasses.asdict(compile_launch("backward", launch, {arch}, "matrix"))))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_audit_fails_duplicated_work():
    """The dK/dV tile the library used to run on Hopper, 32 queries x 64 keys on 8 warps: Sᵀ and dPᵀ
    (64 rows) are laid out over both warpgroups (warpsPerCTA [8, 1]), which then compute the same
    tile, so each iteration issues 1.5x the algorithm's four products (2.0x on those two). The audit
    must call it a problem; every tile the kernel keeps now is at 1.0 with no mma.sync."""
    (report,) = _compile_backward(True, tile=(32, 64, 8, 2))
    multiples = [loop["work_multiple"] for loop in report["matrix_loops"]]
    assert multiples and all(abs(m - 1.5) < 1e-3 for m in multiples), report["matrix_loops"]
    assert any("duplicated work" in p for p in report["problems"]), report["problems"]
    for kept in _compile_backward(True):
        assert kept["hmma"] == 0 and not kept["problems"], kept
        assert all(loop["work_multiple"] == 1.0 for loop in kept["matrix_loops"]), kept


def test_audit_fails_mma_sync_on_hopper():
    """dQ = dS·K with 16 to 64 query rows on 8 warps has fewer rows than wgmma's warpgroups take, and
    Triton lowers it to mma.sync (HMMA) on sm_90a: the old atomic dQ at 32 x 64. The audit fails it."""
    code = """
import dataclasses, json, torch
from bench.audit import Launch, capture_launches, compile_launch
from llama_fast.kernels import attention
q = torch.empty(1, 1024, 4, 128, dtype=torch.bfloat16).transpose(1, 2)
lse = torch.empty(1, 4, 1024)
with capture_launches(90) as launches:
    attention.attention_bwd(q, q, q, q, q, lse, causal=True, softmax_scale=0.088, pad=None, tma=True, arch=80)
(launch,) = [l for l in launches if l.kernel.__name__ == "_attn_bwd_dkdv_kernel"][:1]
launch = Launch(launch.kernel, dict(launch.args, BLOCK_M=32, BLOCK_N=64), 8, 2)
print(json.dumps(dataclasses.asdict(compile_launch("backward", launch, 90, "matrix"))))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["hmma"] > 0 and any("HMMA (mma.sync) on sm_90a" in p for p in report["problems"]), report


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
    (the one-block-at-a-time loop read 0 on 2026-12-02); the baseline records the counts. The
    fp32 and head_dim 256 paths of the shared-memory cases and the pointer cases (USE_TMA=False) keep the
    one-block loop. With a sliding window the forward has a third loop, over the key blocks that cross
    the window's lower edge, which overlaps too."""
    _, reports = full_audit
    forward = [r for r in reports if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == 90
               and not r["case"].startswith("shared-memory") and " pointer " not in r["case"]]
    assert forward and all(len(r["ex2_under_hgmma"]) == len(r["matrix_loops"]) == (3 if " window " in r["case"]
                                                                                      else 2) for r in forward)
    for r in forward:
        for loop, under in zip(r["matrix_loops"], r["ex2_under_hgmma"]):
            if " softcap " in r["case"]:
                # Two EX2 per score with the soft-cap (its σ's and the softmax's): at least 40% of them issue
                # under a product, the fewest at SmolLM2's head_dim 64 (14 of 34 per loop at 64 x 32, 29 of
                # 66 at 128 x 64 with a window; Llama-3's heads 34 of 66 and 18 of 34), 2026-12-04
                assert 5 * under >= 2 * loop["ex2"] > 0, r
            else:
                assert 2 * under >= loop["ex2"] > 0, r
    baseline = json.loads((ROOT / "bench" / "audit_baseline.json").read_text())["kernels"]
    recorded = [k for k, entry in baseline.items() if "ex2_under_hgmma" in entry]
    # the dQ kernel's exponentials run under its own products too (29 of 32 a loop at 128 x 64), so it
    # is recorded beside the forward
    assert any("attention fwd | _attn_fwd_kernel" in k for k in recorded), recorded
    assert all("attention" in k and "sm_90" in k for k in recorded), recorded


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
    same, fewer_tma = report(), report(utmaldg=0)
    longer, slightly_longer = report(loops=(330, 471)), report(loops=(346, 448))
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
                      32, 9, 0, 0, [], [dict(instructions=490), dict(instructions=721)],
                      ex2_under_hgmma=list(under))

    path = tmp_path / "baseline.json"
    write_baseline([report(), report(kernel="_attn_bwd_dq_kernel", under=(0, 0))], path)
    entries = json.loads(path.read_text())["kernels"]
    assert [("ex2_under_hgmma" in e) for e in entries.values()] == [True, False]
    same, fewer, none = report(), report(under=(66, 40)), report(under=())
    check_baseline([same, fewer, none], path)
    assert same.problems == []
    assert fewer.problems == ["regression: matrix loop 1 issues 40 EX2 under a wgmma (baseline 66)"]
    assert none.problems == [f"regression: matrix loop {i} issues 0 EX2 under a wgmma (baseline 66)" for i in (0, 1)]


@pytest.mark.system
def test_pointer_path_on_sm90a_compiles_without_spills(tmp_path):
    """Issue 26: on Hopper fp32 inputs, and 16-bit ones that TMA cannot read (here bf16 one element
    off 16-byte alignment), take the attention kernels' pointer path (USE_TMA=False). The audit's
    "pointer" group compiles it on sm_90a at Llama-3-8B shapes (head_dim 128, where it spilled: the
    forward's 128 x 128 / 8 warps / 2 stages tile 32 B, the dK/dV kernel's 16 x 64 408 B in fp32),
    each config the launch keeps, as checked matrix cases: no spill (STACK, LOCAL or STL/LDL), HGMMA
    in every matrix kernel (tf32, k = 8, for fp32), no UTMALDG. 48 compiles, about 1.5 minutes on
    two cores with a cold Triton cache."""
    from bench.audit import CASE_GROUPS

    assert "pointer" in CASE_GROUPS  # part of every default audit run
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "audit", "--group", "pointer", "--model", "llama3-8b",
                           "--arch", "90", "--arch", "80", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    reports = json.loads(out.read_text())["results"] if out.exists() else []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert reports and {r["arch"] for r in reports} == {90}  # the pointer cases are sm_90a's alone
    for dtype in ("fp32", "bf16 unaligned"):
        ours = [r for r in reports if r["case"].startswith(f"llama3-8b pointer {dtype} attention")]
        cases = {r["case"].removeprefix(f"llama3-8b pointer {dtype} attention ") for r in ours}
        assert cases == {"fwd", "bwd", "bwd determ.", "varlen fwd", "varlen bwd", "decode", "chunk", "window fwd",
                         "window bwd", "softcap fwd", "softcap bwd", "softcap window bwd"}, cases
        assert {r["kernel"] for r in ours} >= MATRIX_KERNELS | {"_attn_bwd_delta_kernel", "_attn_decode_kernel"}
        for r in ours:
            assert r["spill_bytes"] == 0 and r["spill_instructions"] == 0 and not r["problems"], r
            assert r["utmaldg"] == 0, r
            if r["kernel"] in MATRIX_KERNELS:
                assert r["hgmma"] > 0 and r["hmma"] == 0, r
                k_steps = {shape.split("x")[2] for loop in r["matrix_loops"] for shape in loop["hgmma_shapes"]}
                assert k_steps == ({"8"} if dtype == "fp32" else {"16"}), (r["case"], k_steps)
        # the forward's 128 x 128 tile spilled on this path and is no longer chosen; the dK/dV kernel
        # keeps a tile in every variant
        forward = [tuple(r["tile"]) + (r["num_warps"], r["num_stages"]) for r in ours
                   if r["kernel"] == "_attn_fwd_kernel"]
        assert forward and (128, 128, 8, 2) not in forward, forward
        assert any(r["kernel"] == "_attn_bwd_dkdv_kernel" and "varlen" in r["case"] for r in ours)
