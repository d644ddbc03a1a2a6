"""A static performance model of the kernels on Hopper, from their compiled SASS (no GPU).

Ceilings are the lent H200's *measured* figures (bench/device.py: a bf16 GEMM at 769-798 TFLOP/s, a
device copy at 4.3 TB/s, SM clocks 1.83-1.98 GHz), never the datasheet's. Every prediction is a range:
the low end takes the low GEMM rate and clock, the high end the high ones. It is a model, never a
measurement.

Attention (the matrix kernels). Each matrix loop of the SASS (the loops ``bench.audit.matrix_loops``
finds) is read as one iteration's instruction mix, per warp, and costed for one program (CTA of w warps,
w / 4 warpgroups), per SM:

    tensor   the HGMMA work the SASS *issues*: each HGMMA.64xNxK is 2·64·max(N, 64)·K FLOPs per
             warpgroup (``NARROW_N_FLOOR``), so a tile the layout covers twice (64 rows under 8 warps) or
             an 8-column HGMMA counts what it costs, not the algorithm's FLOPs; at the measured GEMM rate
             per SM (GEMM / 132). mma.sync (HMMA.16816, 2·16·8·16 FLOPs per warp) at 2/3 of that rate:
             FlashAttention-3 (Shah et al. 2024, section 2) gives mma.sync about 2/3 of the Hopper
             tensor cores' peak.
    issue    instructions x w / 4 clocks (4 schedulers, one warp instruction a clock each).
    exp2     MUFU.EX2 x w x 32 / 16 clocks: 16 results per clock per SM for exp2 on compute capability
             9.0 (CUDA C++ Programming Guide, arithmetic instruction throughput table; FlashAttention-3's
             3.9 TFLOP/s of special functions on an H100 SXM5 is the same 16 / clock / SM at 1.83 GHz).
    atomics  bytes added to global memory (ATOMG/RED .ADD, 16 bytes a lane for F32x4) at the SM's share
             of the measured copy rate: an L2 round trip per add, taken at the memory roof.

Serialisation: when the iteration waits for its own HGMMA (``WARPGROUP.DEPBAR``) and holds the CTA's
warpgroups together with ``BAR.SYNC`` (today's forward: QKᵀ, wait, softmax, barrier, PV), the tensor
cores and the rest take turns: chain = tensor + max(issue, exp2). A loop with no such wait overlaps
them: chain = max(tensor, issue, exp2). k programs resident on an SM fill each other's gaps: an
iteration of each takes max(chain, k·tensor, k·max(issue, exp2), k·atomics).

Each program's time is its prologue/epilogue (the tiles it reads before its first iteration and writes
after its last, at its share of the copy rate, plus its non-loop instructions) plus its iterations of
each loop (the causal diagonal's masked blocks with the masked loop's mix, the others with the
unmasked loop's); the programs are handed to the SMs in grid order (greedy, as the block scheduler
does) and the predicted time is the last one's end. Left out: L2 misses beyond the first tile, the
exposed latency of each wait and of dependent instructions (issue is taken at one instruction a clock),
launch overhead, clocks below 1.83 GHz. Resident programs are assumed to hide each other's softmax
perfectly (the k in the max above), which flatters the 4-warp tiles that fit 2-5 programs on an SM.

Memory-bound kernels (``memory_seconds``): bytes at the measured copy rate, stretched by the grid's last
partial wave over the SM slots the kernel's occupancy allows, plus a fixed per-launch cost fitted to
Liger-Kernel's published H100 measurements (``calibrate_liger``, which also fits how much of the
assumed copy rate those kernels reach).
"""

import contextlib
import dataclasses
import heapq
import math
import re

from .audit import _INSTRUCTION, Report, hgmma_loop_bodies
from .device import H200, Measured

# Published figures, H100 unless marked, bf16, causal, head_dim 128, long sequences (TFLOP/s): context
# only, not outputs of this model.
ANCHORS = {
    "FlashAttention-3 forward": "602-740",
    "FlashAttention-3 backward": "~560",
    "Triton tutorial, TMA + warp specialization, forward": "~500-600",
    "FlashAttention-2 forward": "~335",
}

MUFU_EX2_PER_CLOCK = 16  # per SM, compute capability 9.0 (see the module docstring)
SCHEDULERS = 4  # warp instructions issued per clock per SM
HMMA_RATE = 2 / 3  # mma.sync's share of the wgmma rate on Hopper (FlashAttention-3, section 2.2)
# An assumption, not a measurement (no published figure was found; a GPU run should time it): a wgmma
# narrower than 64 columns costs what a 64-column one does. The A tile (64 x 16) is fetched whatever N is,
# so an 8-column HGMMA cannot run at 1/8 of a 64-column one's time.
NARROW_N_FLOOR = 64

_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.(16816|1688|884)")
_HMMA_FLOPS = {"16816": 2 * 16 * 8 * 16, "1688": 2 * 16 * 8 * 8, "884": 2 * 8 * 8 * 4}
_ATOMIC_ADD = re.compile(r"\b(?:ATOMG|RED|REDG|ATOM)\.E\.ADD\.F32(x4)?")


@dataclasses.dataclass
class LoopMix:
    """One iteration of one matrix loop, per warp, as the SASS issues it."""

    instructions: int
    hgmma: int
    hgmma_flops: int  # per warpgroup: sum of 2·M·max(N, NARROW_N_FLOOR)·K over the HGMMA instructions
    hgmma_flops_raw: int  # the same with each HGMMA's own N
    hmma_flops: int  # per warp: mma.sync
    ex2: int
    atomic_bytes: int  # per warp: bytes added atomically to global memory
    waits: int  # WARPGROUP.DEPBAR: the loop waits for its own HGMMA
    barriers: int  # BAR.SYNC: the CTA's warpgroups in lockstep

    @property
    def serial(self) -> bool:
        return self.waits > 0 and self.barriers > 0


def loop_mixes(sass: str) -> tuple[list[LoopMix], int]:
    """The HGMMA loops of a kernel's SASS, found as ``bench.audit.matrix_loops`` finds them (same loops,
    same order, same instruction counts), each read for the model; and the kernel's instruction count."""
    instructions = sum(bool(_INSTRUCTION.match(line)) for line in sass.splitlines())
    return [_mix(body) for body in hgmma_loop_bodies(sass)], instructions


def _mix(body: list[tuple[str, str]]) -> LoopMix:
    hgmma_flops = hgmma_raw = hmma_flops = atomic = 0
    for _, line in body:
        if m := _HGMMA.search(line):
            hgmma_flops += 2 * int(m.group(1)) * max(int(m.group(2)), NARROW_N_FLOOR) * int(m.group(3))
            hgmma_raw += 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        elif m := _HMMA.search(line):
            hmma_flops += _HMMA_FLOPS[m.group(1)]
        elif m := _ATOMIC_ADD.search(line):
            atomic += 32 * (16 if m.group(1) else 4)
    ops = [o for o, _ in body]
    return LoopMix(len(ops), sum(o.startswith("HGMMA") for o in ops), hgmma_flops, hgmma_raw, hmma_flops,
                   sum(o.startswith("MUFU.EX2") for o in ops), atomic,
                   sum(o.startswith("WARPGROUP.DEPBAR") for o in ops), sum(o.startswith("BAR.SYNC") for o in ops))


@dataclasses.dataclass
class IterationCost:
    tensor_s: float
    issue_cycles: float
    ex2_cycles: float
    atomic_s: float
    serial: bool
    wall_s: float  # one iteration of each of the k resident programs


def iteration_cost(mix: LoopMix, num_warps: int, per_sm: int, device: Measured, end: int,
                   narrow_floor: bool = True) -> IterationCost:
    """``end`` 0 takes the low GEMM rate and clock, 1 the high ones; ``narrow_floor`` False costs each
    HGMMA by its own width (the optimistic reading of narrow HGMMA)."""
    gemm_per_sm = device.gemm_bf16_flops[end] / device.sms
    clock = device.sm_clock_hz[end]
    warpgroups = num_warps / 4
    hgmma = mix.hgmma_flops if narrow_floor else mix.hgmma_flops_raw
    tensor = (hgmma * warpgroups + mix.hmma_flops * num_warps / HMMA_RATE) / gemm_per_sm
    issue = mix.instructions * num_warps / SCHEDULERS
    ex2 = mix.ex2 * num_warps * 32 / MUFU_EX2_PER_CLOCK
    other = max(issue, ex2) / clock
    atomic = mix.atomic_bytes * num_warps / (device.copy_bytes_per_s / device.sms)
    chain = tensor + other if mix.serial else max(tensor, other)
    wall = max(chain, per_sm * tensor, per_sm * other, per_sm * atomic)
    return IterationCost(tensor, issue, ex2, atomic, mix.serial, wall)


def makespan(times: list[float], slots: int) -> float:
    """When the last program ends if programs of the given times start in grid order, each on the first
    of ``slots`` that frees up."""
    free = [0.0] * slots
    heapq.heapify(free)
    end = 0.0
    for t in times:
        start = heapq.heappop(free)
        end = max(end, start + t)
        heapq.heappush(free, start + t)
    return end


def schedule_efficiency(works: list[float], slots: int) -> float:
    """Busy fraction of ``slots`` when programs of the given work run in grid order (greedy)."""
    if not works:
        return 1.0
    return sum(works) / (makespan(works, slots) * slots)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int


def _programs(kernel: str, block_m: int, block_n: int, s: Shape) -> list[tuple[int, int, int]]:
    """(masked iterations, unmasked iterations, repeats) of each program of a causal Sq = Skv launch, in
    the order the GPU starts them (bench.audit's loop order: forward unmasked then masked; dK/dV masked
    then unmasked, repeated for each query head of the group; dQ one loop)."""
    group = s.q_heads // s.kv_heads
    m_blocks, n_blocks = -(-s.seq // block_m), -(-s.seq // block_n)
    if kernel == "_attn_fwd_kernel":  # grid (heads, query blocks reversed): the longest rows first
        out = []
        for m in reversed(range(m_blocks)):
            full = min(m * block_m + 1, s.seq) // block_n
            hi = -(-min(s.seq, (m + 1) * block_m) // block_n)
            out += [(hi - full, full, 1)] * (s.batch * s.q_heads)
        return out
    if kernel == "_attn_bwd_dkdv_kernel":  # grid (key blocks, batch x KV heads)
        out = []
        for _ in range(s.batch * s.kv_heads):
            for j in range(n_blocks):
                q_lo = j * block_n // block_m * block_m
                q_full = max(min(-(-(j * block_n + block_n - 1) // block_m) * block_m, m_blocks * block_m), q_lo)
                if j == n_blocks - 1:
                    q_full = m_blocks * block_m
                out.append(((q_full - q_lo) // block_m, (m_blocks * block_m - q_full) // block_m, group))
        return out
    out = []  # dQ: grid (query blocks, heads); one loop over the key blocks up to the diagonal
    for _ in range(s.batch * s.q_heads):
        for m in range(m_blocks):
            out.append((0, -(-min(s.seq, (m + 1) * block_m) // block_n), 1))
    return out


def _tile_bytes(kernel: str, block_m: int, block_n: int, d: int, e: int = 2) -> int:
    """Bytes a program reads before its first iteration and writes after its last."""
    if kernel == "_attn_fwd_kernel":  # Q in, O out, LSE out, and the first K and V tiles
        return 2 * block_m * d * e + 4 * block_m + 2 * block_n * d * e
    if kernel == "_attn_bwd_dkdv_kernel":  # K, V in, dK, dV out, and the first Q and dO tiles
        return 4 * block_n * d * e + 2 * block_m * d * e
    return 3 * block_m * d * e + 8 * block_m + 2 * block_n * d * e  # dQ: Q, dO, LSE, δ in, dQ out; first K, V


@dataclasses.dataclass
class Prediction:
    case: str
    kernel: str
    tile: tuple
    num_warps: int
    num_stages: int
    registers: int
    per_sm: int
    loops: list  # LoopMix of each matrix loop
    duplication: float  # HGMMA work the SASS issues / the algorithm's, in the steady loop (narrow ones floored)
    duplication_raw: float  # the same, each HGMMA at its own width
    costs: list  # IterationCost of each loop, low end
    seconds: tuple  # (low end, high end): the launch's predicted time
    seconds_narrow_full_rate: tuple  # the same with narrow HGMMA at its own width's cost
    flops: int  # the algorithm's FLOPs of the launch
    tflops: tuple  # (low, high)


# Products of one iteration of each kernel's steady loop: forward QKᵀ and PV; dK/dV S, dP, dV, dK
# (and dQ when atomic); dQ S, dP, dQ. For a compiled launch the audit's ``loop_flops`` says it from
# the launch's own arguments (the dK/dV kernel adds dQ atomically or not); this is for a Report
# without it.
def _products(r: Report) -> int:
    if r.kernel == "_attn_bwd_dkdv_kernel":
        return 5 if not r.case.endswith("determ.") else 4
    return 2 if r.kernel == "_attn_fwd_kernel" else 3


def _steady_loop(kernel: str) -> int:
    return 1 if kernel == "_attn_bwd_dkdv_kernel" else 0


def predict(r: Report, sass: str, s: Shape, device: Measured = H200) -> Prediction:
    loops, total_instructions = loop_mixes(sass)
    if [m.instructions for m in loops] != [loop["instructions"] for loop in r.matrix_loops]:
        raise ValueError(f"{r.kernel}: the model's loops {[m.instructions for m in loops]} are not the audit's "
                         f"{[loop['instructions'] for loop in r.matrix_loops]}")
    block_m, block_n = r.tile[:2]
    steady = loops[_steady_loop(r.kernel)]
    algorithm = r.loop_flops or _products(r) * 2 * block_m * block_n * s.head_dim
    duplication = steady.hgmma_flops * r.num_warps / 4 / algorithm
    duplication_raw = steady.hgmma_flops_raw * r.num_warps / 4 / algorithm
    per_sm = max(1, round(r.occupancy * 2048 / (32 * r.num_warps)))
    programs = _programs(r.kernel, block_m, block_n, s)
    # The loops the program runs: forward (unmasked, masked), dK/dV (masked, unmasked; a third, outer loop
    # over the group's heads holds both), dQ (one).
    if r.kernel == "_attn_fwd_kernel":
        masked_loop, unmasked_loop = loops[1], loops[0]
    elif r.kernel == "_attn_bwd_dkdv_kernel":
        masked_loop, unmasked_loop = loops[0], loops[1]
    else:
        masked_loop = unmasked_loop = loops[0]
    loop_instructions = sum(m.instructions for m in loops[:2 if r.kernel != "_attn_bwd_dq_kernel" else 1])
    seconds, costs = {True: [], False: []}, [iteration_cost(m, r.num_warps, per_sm, device, 0) for m in loops]
    for end, floor in ((0, True), (1, True), (0, False), (1, False)):
        masked = iteration_cost(masked_loop, r.num_warps, per_sm, device, end, floor)
        unmasked = iteration_cost(unmasked_loop, r.num_warps, per_sm, device, end, floor)
        share = device.copy_bytes_per_s / (device.sms * per_sm)
        prologue = (_tile_bytes(r.kernel, block_m, block_n, s.head_dim) / share
                    + max(0, total_instructions - loop_instructions) * r.num_warps / SCHEDULERS
                    / device.sm_clock_hz[end])
        times = [prologue + repeats * (n_masked * masked.wall_s + n_unmasked * unmasked.wall_s)
                 for n_masked, n_unmasked, repeats in programs]
        seconds[floor].append(makespan(times, device.sms * per_sm))
    flops = _launch_flops(r, s)
    return Prediction(r.case, r.kernel, r.tile, r.num_warps, r.num_stages, r.registers, per_sm, loops, duplication,
                      duplication_raw, costs, tuple(seconds[True]), tuple(seconds[False]), flops,
                      tuple(flops / t / 1e12 for t in seconds[True]))


def _pairs(seq: int) -> int:
    return seq * (seq + 1) // 2


def _launch_flops(r: Report, s: Shape) -> int:
    per_product = 2 * s.batch * s.q_heads * _pairs(s.seq) * s.head_dim
    return _products(r) * per_product


def _sass_of(launch, arch: int) -> str:
    """The SASS of one captured launch, compiled as bench.audit compiles it (Triton's cache makes the
    second compile of the same kernel a look-up)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .audit import _resources, _specialise

    signature, constexprs, attrs = _specialise(launch)
    compiled = triton.compile(ASTSource(launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return _resources(compiled.asm["cubin"])[1]


_MATRIX_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
_PASSES = {"attention fwd": "forward", "attention bwd": "backward (default)",
           "attention bwd determ.": "backward (deterministic)"}


def attention_model(models=("llama3-8b", "smollm2-135m"), tokens: int = 16384, seq: int = 4096,
                    device: Measured = H200, passes=tuple(_PASSES)) -> list[Prediction]:
    """Predictions for every sm_90a config of the attention matrix kernels at the given model shapes
    (Llama-3-8B: 32 q / 8 kv heads, head_dim 128; SmolLM2: 9 / 3, 64), batch x seq = ``tokens``."""
    from .audit import _attention_cases, capture_launches, compile_launch
    from .shapes import MODELS

    out = []
    for name in models:
        m = MODELS[name]
        shape = Shape(max(1, tokens // seq), m.q_heads, m.kv_heads, seq, m.head_dim)
        for case, launcher, kind in _attention_cases(m):
            if case not in passes:
                continue
            with capture_launches(90) as launches:
                launcher(90)
            for launch in launches:
                if launch.kernel.__name__ in _MATRIX_KERNELS:
                    r = compile_launch(f"{name} {case}", launch, 90, kind)
                    out.append(predict(r, _sass_of(launch, 90), shape, device))
    return out


def _delta_seconds(s: Shape, device: Measured, atomic: bool) -> float:
    """The backward's memory-bound extras: the δ pre-pass (reads O and dO, writes δ) and, for the atomic
    dQ, zeroing its fp32 accumulator and casting it to bf16 (write 4, read 4 + write 2 bytes a value)."""
    values = s.batch * s.q_heads * s.seq * s.head_dim
    nbytes = 2 * values * 2 + 4 * s.batch * s.q_heads * s.seq + (10 * values if atomic else 0)
    return nbytes / device.copy_bytes_per_s


def summary(predictions: list[Prediction], device: Measured = H200, tokens: int = 16384,
            seq: int = 4096) -> list[dict]:
    """Per model shape, the best predicted forward, default backward (δ pre-pass, dK/dV with the atomic
    dQ and its buffer's fill and cast; or, where the launch takes the dQ kernel in both modes, on
    Hopper with heads wider than 64, dK/dV then dQ) and deterministic backward (δ, dK/dV, then dQ),
    TFLOP/s as (low, high)
    counted with the pass's algorithm FLOPs (backward: five products, 2.5x the forward's), and as a
    fraction of the measured GEMM rate."""
    from .shapes import MODELS

    rows = []
    for name in dict.fromkeys(p.case.split()[0] for p in predictions):
        m = MODELS[name]
        s = Shape(max(1, tokens // seq), m.q_heads, m.kv_heads, seq, m.head_dim)
        ours = [p for p in predictions if p.case.startswith(name + " ")]
        fwd_flops = 2 * 2 * s.batch * s.q_heads * _pairs(s.seq) * s.head_dim

        def best(case, kernel):
            found = [p for p in ours if p.case.endswith(case) and p.kernel == kernel]
            return min(found, key=lambda p: p.seconds[0]) if found else None

        def row(pass_, parts, flops, extra):
            seconds = tuple(sum(p.seconds[i] for p in parts) + extra for i in (0, 1))
            tflops = tuple(flops / t / 1e12 for t in seconds)
            full_rate = tuple(flops / (sum(p.seconds_narrow_full_rate[i] for p in parts) + extra) / 1e12
                              for i in (0, 1))
            return dict(shape=name, pass_=pass_, configs=[dict(kernel=p.kernel, tile=p.tile, warps=p.num_warps,
                                                               duplication=round(p.duplication, 3),
                                                               duplication_raw=round(p.duplication_raw, 3))
                                                          for p in parts],
                        seconds=seconds, predicted=tflops, predicted_narrow_hgmma_full_rate=full_rate,
                        of_gemm=tuple(t * 1e12 / g for t, g in zip(tflops, device.gemm_bf16_flops)))

        if fwd := best(" attention fwd", "_attn_fwd_kernel"):
            rows.append(row("forward", [fwd], fwd_flops, 0.0))
        if default := best(" attention bwd", "_attn_bwd_dkdv_kernel"):
            dq_kernel = best(" attention bwd", "_attn_bwd_dq_kernel")
            rows.append(row("backward (default)", [default] + ([dq_kernel] if dq_kernel else []), 2.5 * fwd_flops,
                            _delta_seconds(s, device, atomic=dq_kernel is None)))
        dkdv, dq = best("determ.", "_attn_bwd_dkdv_kernel"), best("determ.", "_attn_bwd_dq_kernel")
        if dkdv and dq:
            rows.append(row("backward (deterministic)", [dkdv, dq], 2.5 * fwd_flops, _delta_seconds(s, device, False)))
    return rows


def format_table(predictions: list[Prediction], device: Measured = H200) -> str:
    header = (f"{'case':<31} {'kernel':<10} {'tile':>7} {'w':>2} {'k':>2} {'loop instr':>12} {'dup':>5} "
              f"{'steady: tensor us/issue/ex2 clk':>31} {'ser':>3} {'ms':>11} {'TFLOP/s':>9}")
    lines = [header, "-" * len(header)]
    for p in predictions:
        c = p.costs[_steady_loop(p.kernel)]
        lines.append(
            f"{p.case:<31} {p.kernel.removeprefix('_attn_').removesuffix('_kernel'):<10} "
            f"{'x'.join(map(str, p.tile)):>7} {p.num_warps:>2} {p.per_sm:>2} "
            f"{'/'.join(str(m.instructions) for m in p.loops):>12} {p.duplication:>5.2f} "
            f"{c.tensor_s * 1e6:>13.3f}/{c.issue_cycles:>6.0f}/{c.ex2_cycles:>5.0f}     "
            f"{'yes' if c.serial else 'no':>3} "
            f"{p.seconds[1] * 1e3:>5.2f}-{p.seconds[0] * 1e3:<5.2f} {p.tflops[0]:>4.0f}-{p.tflops[1]:<4.0f}")
    lines.append("")
    for row in summary(predictions, device):
        tiles = " + ".join("x".join(map(str, c["tile"])) + f" ({c['duplication']:.2f})" for c in row["configs"])
        lines.append(f"{row['shape']:<13} {row['pass_']:<25} best {tiles:<26} predicted "
                     f"{row['predicted'][0]:.0f}-{row['predicted'][1]:.0f} TFLOP/s, "
                     f"{row['of_gemm'][0]:.2f}-{row['of_gemm'][1]:.2f} of the measured GEMM (narrow HGMMA at "
                     f"its own width: {row['predicted_narrow_hgmma_full_rate'][0]:.0f}-"
                     f"{row['predicted_narrow_hgmma_full_rate'][1]:.0f})")
    lines.append(f"\nTFLOP/s on an {device.name} (ceilings measured: GEMM {device.gemm_bf16_flops[0] / 1e12:.0f}-"
                 f"{device.gemm_bf16_flops[1] / 1e12:.0f} TFLOP/s, copy {device.copy_bytes_per_s / 1e12:.1f} TB/s, "
                 f"clock {device.sm_clock_hz[0] / 1e9:.2f}-{device.sm_clock_hz[1] / 1e9:.2f} GHz), a static model "
                 "from the sm_90a SASS: dup = HGMMA work issued / the algorithm's in the steady loop, k = programs "
                 "per SM, ser = tensor cores and softmax take turns. Model, not a measurement.")
    lines.append("Published anchors (H100, context only, not this model's): "
                 + "; ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    return "\n".join(lines)


# ---- memory-bound kernels and the calibration against Liger-Kernel's published H100 figures ----

@contextlib.contextmanager
def _grids():
    """Inside ``bench.audit.capture_launches``: records each plain (not autotuned) launch's grid."""
    from triton.runtime.jit import JITFunction

    grids, inner = [], JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        grids.append(grid)
        return inner(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        yield grids
    finally:
        JITFunction.run = inner


def memory_seconds(nbytes: int, programs: int, per_sm: int, device: Measured, launch_s: float = 0.0) -> float:
    """Bytes at the measured copy rate, stretched by the last partial wave of ``programs`` over the
    device's SMs x ``per_sm`` slots, plus a fixed per-launch cost."""
    slots = device.sms * per_sm
    waves = programs / slots
    return launch_s + nbytes / device.copy_bytes_per_s * (math.ceil(waves) / waves if waves else 1.0)


@dataclasses.dataclass
class MemoryKernel:
    name: str
    kernel: str
    programs: int
    per_sm: int
    nbytes: int


def memory_kernel(name: str, run, nbytes: int) -> MemoryKernel:
    """Capture the one launch ``run()`` makes (CPU tensors, nothing runs), compile it for sm_90a and read
    its occupancy; ``nbytes`` is what it moves."""
    from .audit import capture_launches, compile_launch

    with capture_launches(90) as launches, _grids() as grids:
        run()
    if len(launches) != 1 or len(grids) != 1:
        raise ValueError(f"{name}: expected one plain launch, captured {len(launches)}")
    grid = grids[0](launches[0].args) if callable(grids[0]) else grids[0]
    r = compile_launch(name, launches[0], 90, "memory")
    per_sm = max(1, round(r.occupancy * 2048 / (32 * r.num_warps)))
    return MemoryKernel(name, r.kernel, math.prod(grid), per_sm, nbytes)


# Liger-Kernel's published H100 forward medians (ms) for the kernels calibrated here: linkedin/Liger-Kernel,
# benchmark/data/all_benchmark_data.csv (commit ead96b6, 2026-08-21), gpu_name "NVIDIA H100 80GB HBM3",
# provider liger, triton.testing.do_bench(rep=100) medians. megatron_rms_norm (Liger 0.8.0, 2026-06-10):
# [S=4096, B=1, H] bf16 through LigerRMSNormFunction, x = H. megatron_swiglu (0.8.1, 2026-07-26):
# [S=2048, B=4, 2·F] bf16 through the fused gate-up kernel, x = F. Liger's RoPE and cross-entropy have no
# H100 rows there (A100 only; its H100 RoPE rows are Llama-4's complex RoPE, another kernel).
LIGER_H100 = (
    [dict(kernel="megatron_rms_norm", x=x, ms=ms) for x, ms in
     ((1024, 0.0122), (2048, 0.0176), (4096, 0.0292), (8192, 0.0509), (16384, 0.0950))]
    + [dict(kernel="megatron_swiglu", x=x, ms=ms) for x, ms in
       ((1024, 0.0233), (2048, 0.0396), (4096, 0.0725), (8192, 0.1371), (16384, 0.2670), (32768, 0.5275))]
)


def memory_cases(kernel: str, x: int):
    """(bytes, Liger's launch, ours) for one calibration point, on empty CPU tensors."""
    import torch

    from llama_fast.kernels import rms_norm, swiglu

    from . import formulas

    bf16 = torch.bfloat16
    if kernel == "megatron_rms_norm":
        rows = 4096
        x_ = torch.empty(rows, x, dtype=bf16)
        w = torch.empty(x, dtype=bf16)
        nbytes = formulas.rms_norm_bytes(rows, x, 2, 2, "fwd") + 4 * rows  # and the fp32 rstd both save

        def liger():
            from liger_kernel.ops.rms_norm import rms_norm_forward

            rms_norm_forward(x_, w, 1e-6, 0.0, "llama", None)

        return nbytes, liger, lambda: rms_norm.rms_norm_fwd(x_, w, 1e-6)
    rows = 8192
    gate_up = torch.empty(rows, 2 * x, dtype=bf16)
    gate, up = gate_up[:, :x], gate_up[:, x:]

    def liger():
        from liger_kernel.ops.swiglu import swiglu_fused_gate_up_forward

        swiglu_fused_gate_up_forward(gate_up)

    nbytes = formulas.swiglu_bytes(rows, x, 2, "fwd")
    return nbytes, liger, lambda: swiglu.swiglu_fwd(gate.contiguous(), up.contiguous())


def calibrate_liger(rows=LIGER_H100) -> dict:
    """Liger's kernels compiled here for sm_90a at the CSV's shapes, predicted for an H100 (device.H100:
    the H200's measured figures, its copy rate scaled to the H100's HBM) and set against Liger's published
    H100 medians, with two fitted constants (``fit_line``): how much of the assumed copy rate the
    kernels reach, and a fixed cost per launch. Then Liger's and our kernels at the same shapes,
    predicted for the H200 at its measured copy rate plus that fixed cost."""
    from .device import H100

    points = []
    for row in rows:
        nbytes, liger, ours = memory_cases(row["kernel"], row["x"])
        theirs = memory_kernel(f"liger {row['kernel']} {row['x']}", liger, nbytes)
        mine = memory_kernel(f"ours {row['kernel']} {row['x']}", ours, nbytes)
        points.append(dict(row, bytes=nbytes, liger=dataclasses.asdict(theirs), ours=dataclasses.asdict(mine),
                           bandwidth_ms=memory_seconds(nbytes, theirs.programs, theirs.per_sm, H100) * 1e3))
    efficiency, launch_ms = fit_line([p["bandwidth_ms"] for p in points], [p["ms"] for p in points])
    for p in points:
        p["predicted_h100_ms"] = p["bandwidth_ms"] / efficiency + launch_ms
        p["predicted_over_measured"] = p["predicted_h100_ms"] / p["ms"]
        p["bandwidth_only_over_measured"] = p["bandwidth_ms"] / p["ms"]
        h200 = {who: memory_seconds(p["bytes"], p[who]["programs"], p[who]["per_sm"], H200) * 1e3 / efficiency
                + launch_ms for who in ("liger", "ours")}
        p["h200_model_ms"] = h200
        p["ours_over_liger_time"] = h200["ours"] / h200["liger"]
    # Out of sample: the constants fitted on one kernel's points predict the other kernel's.
    held_out = {}
    for kernel in dict.fromkeys(p["kernel"] for p in points):
        train = [p for p in points if p["kernel"] != kernel]
        if len(train) >= 2:
            eff, launch = fit_line([p["bandwidth_ms"] for p in train], [p["ms"] for p in train])
            held_out[kernel] = [(p["bandwidth_ms"] / eff + launch) / p["ms"] for p in points if p["kernel"] == kernel]
    return dict(bandwidth_efficiency_fitted=efficiency, launch_ms_fitted=launch_ms, points=points,
                held_out_predicted_over_measured=held_out)


def fit_line(model_ms: list[float], measured_ms: list[float]) -> tuple[float, float]:
    """Least squares of measured = model / efficiency + launch: (efficiency, launch). An efficiency above 1
    means the kernels beat the assumed copy rate; launch is the fixed cost of a launch the bytes leave out."""
    n = len(model_ms)
    mx, my = sum(model_ms) / n, sum(measured_ms) / n
    slope = (sum((x - mx) * (y - my) for x, y in zip(model_ms, measured_ms))
             / sum((x - mx) ** 2 for x in model_ms))
    return 1 / slope, my - slope * mx
