"""A static performance model of the attention kernels on Hopper, from their compiled SASS (no GPU).

For each autotuning config the audit compiles for sm_90a (bench/audit.py), one iteration of the
steady inner loop (the unmasked key blocks of the forward, the unmasked query blocks of dK/dV, the
key blocks of dQ) is read as an instruction mix, and three per-SM limits give its cycles:

    tensor cores  FLOPs of the iteration / 4,096     (dense bf16 per SM per clock: the H100/H200
                                                       datasheet's 989 TFLOP/s over 132 SMs at 1.83 GHz)
    issue         instructions x warps / 4           (4 schedulers, one warp instruction a clock each)
    exp2 unit     MUFU.EX2 x warps x 2               (16 lanes per SM: 8 clocks per warp instruction
                                                       on each of 4 sub-partitions)

The ceiling is the iteration's FLOPs at the slowest of the three when they overlap perfectly (what
FlashAttention-3 gets from warp specialization and ping-pong scheduling), and at the sum of the
tensor-core and issue cycles when they do not overlap at all (no warp specialization: the softmax
waits for its scores). Causal attention gives programs unequal work; ``schedule_efficiency``
replays the kernel's grid order on the SMs (greedy, the way the block scheduler hands out programs)
and the prediction is the ceiling times that efficiency. Everything else (global-memory stalls,
the epilogue, L2 misses, clock throttling, the atomic dQ's L2 traffic) is left out, so the
prediction is an upper bound: a model, never a measurement.
"""

import dataclasses
import heapq

from .audit import Report

CLOCK_HZ = 989.4e12 / (132 * 4096)  # 1.83 GHz: the clock at which the datasheet's bf16 peak holds
SMS = 132  # H100 SXM and H200
TENSOR_FLOPS_PER_CLOCK = 4096
# Published figures, H100 unless marked, bf16, causal, head_dim 128, long sequences (TFLOP/s).
ANCHORS = {
    "FlashAttention-3 forward": "602-740",
    "FlashAttention-3 backward": "~560",
    "Triton tutorial, TMA + warp specialization, forward": "~500-600",
    "FlashAttention-2 forward": "~335",
}

# Which matrix loop of each kernel is the steady one (bench.audit.matrix_loops order: the forward
# runs its unmasked blocks first; dK/dV its masked diagonal blocks, then the unmasked ones), and how
# many matrix products one iteration does.
_STEADY = {"_attn_fwd_kernel": (0, 2), "_attn_bwd_dq_kernel": (0, 3)}


def _steady(r: Report) -> tuple[int, int]:
    if r.kernel == "_attn_bwd_dkdv_kernel":
        return 1, 5 if r.case.endswith("bwd") else 4  # atomic dQ adds the fifth product
    return _STEADY[r.kernel]


@dataclasses.dataclass
class Prediction:
    case: str
    kernel: str
    tile: tuple
    num_warps: int
    num_stages: int
    registers: int
    occupancy: float
    mix: dict  # one steady-loop iteration, per warp: instructions, hgmma, ex2, ffma, fmul, fadd, select, compare, sync
    flops: int  # of one iteration, the whole program
    tensor_cycles: float
    issue_cycles: float
    ex2_cycles: float
    bound: str
    ceiling_overlapped: float  # TFLOP/s
    ceiling_serial: float
    schedule_efficiency: float
    predicted: tuple  # (serial, overlapped) x efficiency, TFLOP/s


def schedule_efficiency(works: list[float], slots: int) -> float:
    """Busy fraction of ``slots`` program slots when programs of the given work start in grid order,
    each on the first slot that frees up."""
    if not works:
        return 1.0
    free = [0.0] * slots
    heapq.heapify(free)
    end = 0.0
    for work in works:
        start = heapq.heappop(free)
        end = max(end, start + work)
        heapq.heappush(free, start + work)
    return sum(works) / (end * slots)


def _grid_works(kernel: str, tile: tuple, batch: int, q_heads: int, kv_heads: int, seq: int) -> list[float]:
    """Work of each program of a causal Sq = Skv launch, in the order the GPU starts them."""
    block_m, block_n = tile[:2]
    group = q_heads // kv_heads
    if kernel == "_attn_fwd_kernel":  # grid (heads, query blocks reversed): the longest rows first
        m_blocks = -(-seq // block_m)
        return [float(min(seq, (m + 1) * block_m)) for m in reversed(range(m_blocks)) for _ in range(batch * q_heads)]
    if kernel == "_attn_bwd_dkdv_kernel":  # grid (key blocks, batch x KV heads); key block j sees queries >= j
        n_blocks = -(-seq // block_n)
        return [float(group * (seq - j * block_n)) for _ in range(batch * kv_heads) for j in range(n_blocks)]
    m_blocks = -(-seq // block_m)  # dQ: grid (query blocks, heads)
    return [float(min(seq, (m + 1) * block_m)) for _ in range(batch * q_heads) for m in range(m_blocks)]


def predict(r: Report, head_dim: int, batch: int, q_heads: int, kv_heads: int, seq: int) -> Prediction:
    loop, products = _steady(r)
    mix = r.matrix_loops[loop]
    block_m, block_n = r.tile[:2]
    flops = products * 2 * block_m * block_n * head_dim
    tensor = flops / TENSOR_FLOPS_PER_CLOCK
    issue = mix["instructions"] * r.num_warps / 4
    ex2 = mix["ex2"] * r.num_warps * 2
    cycles = {"tensor cores": tensor, "issue": issue, "exp2": ex2}
    bound = max(cycles, key=cycles.get)

    def tflops(c):
        return flops / c * CLOCK_HZ * SMS / 1e12

    overlapped, serial = tflops(cycles[bound]), tflops(tensor + issue)
    per_sm = max(1, round(r.occupancy * 2048 / (32 * r.num_warps)))
    eff = schedule_efficiency(_grid_works(r.kernel, r.tile, batch, q_heads, kv_heads, seq), SMS * per_sm)
    return Prediction(r.case, r.kernel, r.tile, r.num_warps, r.num_stages, r.registers, r.occupancy, mix, flops,
                      tensor, issue, ex2, bound, overlapped, serial, eff, (serial * eff, overlapped * eff))


def attention_model(tokens: int = 16384, seq: int = 4096) -> list[Prediction]:
    """Predictions for every sm_90a config of the attention matrix kernels at Llama-3-8B heads
    (32 q / 8 kv, head_dim 128) and SmolLM2 heads (9 / 3, head_dim 64), batch x seq = ``tokens``."""
    from .audit import audit
    from .shapes import MODELS

    out = []
    for name in ("llama3-8b", "smollm2-135m"):
        m = MODELS[name]
        for r in audit(models=[name], archs=(90,), groups=["attention"]):
            if r.kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
                out.append(predict(r, m.head_dim, max(1, tokens // seq), m.q_heads, m.kv_heads, seq))
    return out


def summary(predictions: list[Prediction]) -> list[dict]:
    """Per model shape, the best predicted forward, atomic backward (dK/dV with dQ) and deterministic
    backward (dK/dV, then dQ: their times add), TFLOP/s as (serial, overlapped), each counted with
    the FLOPs of the pass (backward: five products, 2.5x the forward's)."""
    rows = []
    for shape in dict.fromkeys(p.case.split()[0] for p in predictions):
        ours = [p for p in predictions if p.case.startswith(shape + " ")]

        def best(case, kernel):
            found = [p for p in ours if p.case.endswith(case) and p.kernel == kernel]
            return max(found, key=lambda p: p.predicted[0])

        fwd = best("fwd", "_attn_fwd_kernel")
        atomic = best("bwd", "_attn_bwd_dkdv_kernel")
        dkdv, dq = best("determ.", "_attn_bwd_dkdv_kernel"), best("determ.", "_attn_bwd_dq_kernel")
        # The deterministic pass does 4 + 3 products for the 5 it is credited with.
        determ = tuple(5 / (4 / a + 3 / b) for a, b in zip(dkdv.predicted, dq.predicted))
        rows += [dict(shape=shape, pass_="forward", configs=[fwd.tile], predicted=fwd.predicted),
                 dict(shape=shape, pass_="backward (atomic dQ)", configs=[atomic.tile], predicted=atomic.predicted),
                 dict(shape=shape, pass_="backward (deterministic)", configs=[dkdv.tile, dq.tile], predicted=determ)]
    return rows


def format_table(predictions: list[Prediction]) -> str:
    header = (f"{'case':<31} {'kernel':<22} {'tile':>7} {'w':>2} {'s':>2} {'instr':>5} {'hgmma':>5} {'ex2':>4} "
              f"{'fma/mul/add':>11} {'sel/cmp':>7} {'cycles tc/issue/ex2':>19} {'bound':>12} "
              f"{'ceiling':>9} {'sched':>5} {'predicted':>9}")
    lines = [header, "-" * len(header)]
    for p in predictions:
        m = p.mix
        lines.append(
            f"{p.case:<31} {p.kernel.removeprefix('_attn_').removesuffix('_kernel'):<22} "
            f"{'x'.join(map(str, p.tile)):>7} {p.num_warps:>2} {p.num_stages:>2} {m['instructions']:>5} {m['hgmma']:>5} "
            f"{m['ex2']:>4} {m['ffma']:>3}/{m['fmul']:>3}/{m['fadd']:>3} {m['select']:>3}/{m['compare']:>3} "
            f"{p.tensor_cycles:>5.0f}/{p.issue_cycles:>6.0f}/{p.ex2_cycles:>5.0f} {p.bound:>12} "
            f"{p.ceiling_serial:>4.0f}-{p.ceiling_overlapped:<4.0f} {p.schedule_efficiency:>5.0%} "
            f"{p.predicted[0]:>4.0f}-{p.predicted[1]:<4.0f}")
    lines.append("")
    for row in summary(predictions):
        tiles = " + ".join("x".join(map(str, t)) for t in row["configs"])
        lines.append(f"{row['shape']:<13} {row['pass_']:<25} best tile {tiles:<16} predicted "
                     f"{row['predicted'][0]:.0f}-{row['predicted'][1]:.0f} TFLOP/s")
    lines.append("\nTFLOP/s on an H100/H200 (132 SMs, 1.83 GHz), a static model from the sm_90a SASS: ceiling = serial-"
                 "overlapped bound of one steady loop iteration, sched = causal grid efficiency, predicted = ceiling x "
                 "sched. Not a measurement.")
    lines.append("Anchors (published, H100): " + "; ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    return "\n".join(lines)
