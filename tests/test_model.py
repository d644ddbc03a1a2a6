"""The static performance model (bench/model.py): its arithmetic on a synthetic SASS mix with round
numbers, its ceilings taken from bench/device.py's measured figures, and `python -m bench attention
--model-only` on the CPU (it compiles for sm_90a in a subprocess, without TRITON_INTERPRET).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One loop of ten instructions: two 128-column HGMMA and an 8-column one, a wait on the HGMMA, a
# barrier, one exp2, one 16-byte-a-lane atomic add.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   MUFU.EX2 R2, R2 ;
        /*0060*/                   FFMA R3, R2, R2, R3 ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   HGMMA.64x8x16.F32.BF16 R40, gdesc[UR12], R40 ;
        /*0090*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, [R4.64], R8 ;
        /*00a0*/              @P0 BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
"""


def _device():
    from bench.device import Measured

    return Measured(name="round", sms=1, l2_bytes=0, gemm_bf16_flops=(1e12, 2e12), copy_bytes_per_s=1e9,
                    sm_clock_hz=(1e9, 2e9), sources={})


def test_loop_mix_from_sass():
    from bench.audit import matrix_loops
    from bench.model import loop_mixes

    loops, total = loop_mixes(SASS)
    assert total == 12 and len(loops) == 1
    m = loops[0]
    assert m.instructions == matrix_loops(SASS)[0]["instructions"] == 10  # the audit's loop, the same count
    assert (m.hgmma, m.ex2, m.waits, m.barriers, m.serial) == (3, 1, 1, 1, True)
    # 2·64·128·16 twice, and the 8-column HGMMA costed at 64 columns: 2·64·64·16
    assert m.hgmma_flops == 2 * 262144 + 131072 == 655360
    assert m.hgmma_flops_raw == 2 * 262144 + 16384
    assert m.atomic_bytes == 32 * 16


def test_iteration_arithmetic():
    """8 warps = 2 warpgroups: tensor 2 x 655,360 FLOPs at 1e12 FLOP/s = 1.31072 us; issue 10 x 8 / 4 = 20
    clocks = 20 ns at 1 GHz; exp2 1 x 8 x 32 / 16 = 16 clocks; atomics 512 x 8 bytes at 1 GB/s = 4.096 us.
    Serial (wait + barrier): chain = 1.31072 + 0.020 us; the atomics bound the iteration."""
    from bench.model import iteration_cost, loop_mixes

    mix = loop_mixes(SASS)[0][0]
    one = iteration_cost(mix, num_warps=8, per_sm=1, device=_device(), end=0)
    assert one.tensor_s == pytest.approx(1.31072e-6)
    assert (one.issue_cycles, one.ex2_cycles) == (20, 16)
    assert one.atomic_s == pytest.approx(4.096e-6)
    assert one.wall_s == pytest.approx(4.096e-6)
    two = iteration_cost(mix, num_warps=8, per_sm=2, device=_device(), end=0)  # two programs share the SM
    assert two.wall_s == pytest.approx(2 * 4.096e-6)
    fast = iteration_cost(mix, num_warps=8, per_sm=1, device=_device(), end=1)  # 2e12 FLOP/s, 2 GHz
    assert fast.tensor_s == pytest.approx(0.65536e-6)
    raw = iteration_cost(mix, num_warps=8, per_sm=1, device=_device(), end=0, narrow_floor=False)
    assert raw.tensor_s == pytest.approx(2 * (2 * 262144 + 16384) / 1e12)
    no_wait = iteration_cost(loop_mixes(SASS.replace("WARPGROUP.DEPBAR.LE gsb0, 0x0", "NOP"))[0][0], 8, 1,
                             _device(), 0)
    assert not no_wait.serial


def test_predict_one_program_per_sm():
    """dQ kernel, tile 64 x 64, one head of 128 tokens, head_dim 64, on the one-SM device: two programs
    (1 and 2 key blocks), each with a prologue of 41,472 bytes (Q, dO, dQ, LSE, δ, the first K and V
    tiles) at 1 GB/s plus 2 non-loop instructions x 8 warps / 4 at 1 GHz; one slot, so they add."""
    from bench.audit import Report, matrix_loops
    from bench.model import Shape, predict

    r = Report("t attention bwd determ.", "_attn_bwd_dq_kernel", 90, (64, 64), 8, 2, 128, 0, 0, 0, 0.125,
               3, 0, 0, 0, [], matrix_loops(SASS))
    p = predict(r, SASS, Shape(1, 1, 1, 128, 64), _device())
    prologue = 41472 / 1e9 + 4e-9
    assert p.per_sm == 1
    assert p.seconds[0] == pytest.approx(2 * prologue + 3 * 4.096e-6)
    assert p.flops == 3 * 2 * (128 * 129 // 2) * 64
    assert p.duplication == pytest.approx(2 * 655360 / (3 * 2 * 64 * 64 * 64))
    assert p.tflops[0] == pytest.approx(p.flops / p.seconds[0] / 1e12)


def test_ceilings_are_the_measured_figures():
    from bench.device import H200
    from bench.model import iteration_cost, loop_mixes

    assert H200.gemm_bf16_flops == (769e12, 798e12) and H200.copy_bytes_per_s == 4.3e12 and H200.sms == 132
    assert H200.sm_clock_hz == (1.83e9, 1.98e9)
    assert all("measured on the lent H200" in H200.sources[k] for k in ("gemm_bf16_flops", "copy_bytes_per_s"))
    mix = loop_mixes(SASS)[0][0]
    low, high = (iteration_cost(mix, 8, 1, H200, end) for end in (0, 1))
    assert low.tensor_s == pytest.approx(2 * 655360 / (769e12 / 132))
    assert high.tensor_s == pytest.approx(2 * 655360 / (798e12 / 132))
    assert low.atomic_s == pytest.approx(512 * 8 / (4.3e12 / 132))


def test_schedule():
    from bench.model import makespan, schedule_efficiency

    assert schedule_efficiency([1.0] * 8, 4) == 1.0
    assert schedule_efficiency([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 1.0  # heavy first: 4 | 1+1+1+1
    assert schedule_efficiency([1.0, 1.0, 1.0, 1.0, 4.0], 2) == 8 / 12  # heavy last: the tail idles a slot
    assert makespan([3.0], 4) == 3.0


def test_memory_model_and_fit():
    from bench.model import fit_line, memory_seconds

    # 3 programs on 2 SMs x 1 slot: 1.5 waves run as 2
    assert memory_seconds(10**9, 3, 1, dataclasses.replace(_device(), sms=2)) == pytest.approx(4 / 3)
    assert memory_seconds(10**9, 2, 1, _device(), launch_s=0.5) == pytest.approx(1.0 * 2 / 2 + 0.5)
    efficiency, launch = fit_line([1.0, 2.0, 4.0], [0.005 + 1.0 / 0.9, 0.005 + 2.0 / 0.9, 0.005 + 4.0 / 0.9])
    assert efficiency == pytest.approx(0.9) and launch == pytest.approx(0.005)


def _bench(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.system
def test_memory_kernel_reads_grid_and_occupancy():
    """Our RMSNorm forward at Liger's calibration shape (4096 rows of 1024) compiles for sm_90a: one
    program a row, and the SM slots its occupancy allows."""
    code = ("from bench.model import memory_cases, memory_kernel; "
            "n, _, ours = memory_cases('megatron_rms_norm', 1024); k = memory_kernel('ours', ours, n); "
            "print(k.programs, k.per_sm, k.nbytes)")
    proc = _bench("-c", code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs, per_sm, nbytes = map(int, proc.stdout.split())
    assert programs == 4096 and 1 <= per_sm <= 32 and nbytes == 4096 * 1024 * 4 + 1024 * 2 + 4 * 4096


@pytest.mark.system
def test_model_only_command(tmp_path):
    """`python -m bench attention --model-only --quick` (SmolLM2's shape only, the CI case) prints the model,
    labelled as one, with a JSON that says so and names its measured ceilings."""
    proc = _bench("-m", "bench", "attention", "--model-only", "--quick", "--out", str(tmp_path / "new"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model, not a measurement." in proc.stdout and "smollm2-135m  forward" in proc.stdout
    data = json.loads((tmp_path / "new" / "attention_model.json").read_text())  # the folder is made
    assert "not a measurement" in data["meta"]["what"]
    assert data["meta"]["ceilings"]["gemm_bf16_flops"] == [769e12, 798e12]
    passes = {(row["shape"], row["pass_"]) for row in data["meta"]["summary"]}
    assert passes == {("smollm2-135m", "forward"), ("smollm2-135m", "backward (default)"),
                      ("smollm2-135m", "backward (deterministic)")}
    # no kernel, however tensor-bound, beats the measured GEMM
    assert all(0 < r["tflops"][0] <= r["tflops"][1] <= 798 for r in data["results"])
