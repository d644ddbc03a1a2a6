"""Ahead-of-time audit of every kernel for Hopper (sm_90a) and Ampere (sm_80), with no GPU.

Each kernel launch of the library is captured (the launchers run on CPU tensors with the
launch itself intercepted), specialised the way Triton's JIT would (pointer and integer
arguments divisible by 16 get ``tt.divisibility``), compiled with ``triton.compile`` for the
target, and read back with the tools in Triton's wheel (docs/testing.md, "Compiling for Hopper without a GPU"):
``cuobjdump --dump-resource-usage`` for registers, stack and local memory and shared memory, and
``nvdisasm`` for the instruction mix: ``HGMMA`` (Hopper's warpgroup matrix multiply), ``UTMALDG``
(Hopper's bulk tensor copies, TMA), 128-bit global loads (``LDG.E.128``) and local-memory stores
and loads (``STL``/``LDL``: register spills).

Spills are counted three ways, and any one fails the audit: ptxas on sm_90 reports spilled
registers as STACK, not LOCAL (checked 2026-11-29: an attention config with 50 STL / 58 LDL in its
SASS showed LOCAL:0, STACK:136), so an audit that read LOCAL alone passed four spilling configs.

Per loop that issues HGMMA the audit also reports the HGMMA shapes, the mma.sync (HMMA), barrier
(BAR) and global atomic (ATOMG) counts of one iteration, and the work multiple: the matrix FLOPs the
loop's HGMMA and HMMA issue across the program (an HGMMA once per warpgroup, an HMMA once per warp)
over the algorithm's FLOPs per iteration (``LOOP_PRODUCTS``: the products times 2·rows·BLOCK_N·BLOCK_D).
Above 1.0 some product is computed more than once: Triton lays a product that feeds another one
out as warpsPerCTA = [num_warps, 1], 16 rows per warp, and a tile with fewer rows than that is
computed by every warpgroup.

Run ``python -m bench audit``; it exits non-zero on a spill, on an attention kernel without HGMMA or
TMA on sm_90a, with mma.sync (HMMA) on sm_90a or with a work multiple above 1.01, a memory-bound
kernel without 128-bit loads, or a regression against the committed
baseline (``bench/audit_baseline.json``, written by ``--update-baseline``): fewer HGMMA or TMA
instructions than recorded, more than 5% more instructions per iteration of a matrix loop, or fewer
exponentials issued under a matrix product (``ex2_under_hgmma``: the attention forward's overlap).
The baseline is for one Triton version; under another the comparison is skipped and the audit says
so (the instruction counts are the compiler's, and move with it). Must run without
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llama_fast.backend import interpreting

from .shapes import MODELS

_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1",
}

# Per-SM limits for the occupancy estimate (CUDA C programming guide, compute capability tables).
_SM_LIMITS = {
    90: dict(regs=65536, smem=228 * 1024, threads=2048, blocks=32),
    80: dict(regs=65536, smem=164 * 1024, threads=2048, blocks=32),
}


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the kernel, its bound arguments and its launch options."""

    kernel: object
    args: dict
    num_warps: int
    num_stages: int


@dataclasses.dataclass
class Report:
    case: str
    kernel: str
    arch: int
    tile: tuple  # the block sizes of the launch (BLOCK_M, BLOCK_N, BLOCK_R ... whichever it has)
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # STACK + LOCAL bytes per thread
    spill_instructions: int  # STL + LDL in the SASS
    shared_bytes: int
    occupancy: float
    hgmma: int
    utmaldg: int
    ldg128: int
    ldg_other: int
    problems: list
    matrix_loops: list = dataclasses.field(default_factory=list)  # instruction mix per HGMMA loop iteration
    hmma: int = 0  # mma.sync instructions in the whole kernel
    loop_flops: int | None = None  # the algorithm's matrix FLOPs per inner-loop iteration (loop_flops()), if known
    ex2_under_hgmma: list = dataclasses.field(default_factory=list)  # per HGMMA loop iteration: EX2 under a wgmma


# The instruction classes counted per loop iteration (SASS opcode prefixes): the work of a flash
# attention step is the matrix products (HGMMA), the exponentials (MUFU.EX2) and the softmax
# arithmetic; masks cost selects and compares; barriers and waits are synchronisation. HMMA is
# mma.sync (Ampere's matrix instruction, one warp each), BAR the block-wide barriers alone and ATOMG
# the global atomics (the backward's dQ additions).
_MIX = {"hgmma": ("HGMMA",), "ex2": ("MUFU.EX2",), "ffma": ("FFMA",), "fmul": ("FMUL",), "fadd": ("FADD",),
        "select": ("FSEL", "SEL"), "compare": ("ISETP", "FSETP"), "sync": ("BAR", "WARPGROUP", "WARPSYNC", "DEPBAR"),
        "hmma": ("HMMA",), "bar": ("BAR.",), "atomg": ("ATOMG", "RED.")}
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
# mma.sync shapes as SASS spells them: HMMA.16816 is m16 n8 k16, HMMA.1688 m16 n8 k8 (tf32), HMMA.884 m8 n8 k4.
_HMMA_SHAPE = re.compile(r"^HMMA\.(16|8)(8)(\d+)")


def _matrix_flops(opcodes: list[str]) -> tuple[dict, int, int]:
    """The HGMMA shapes among ``opcodes`` (shape -> count), the FLOPs their HGMMA issue for one
    warpgroup (2·m·n·k each: a warpgroup issues each one together) and the FLOPs their HMMA issue
    for one warp (mma.sync is per warp)."""
    shapes, hgmma_flops, hmma_flops = {}, 0, 0
    for o in opcodes:
        if shape := _HGMMA_SHAPE.match(o):
            m, n, k = map(int, shape.groups())
            shapes[f"{m}x{n}x{k}"] = shapes.get(f"{m}x{n}x{k}", 0) + 1
            hgmma_flops += 2 * m * n * k
        elif shape := _HMMA_SHAPE.match(o):
            m, n, k = map(int, shape.groups())
            hmma_flops += 2 * m * n * k
    return shapes, hgmma_flops, hmma_flops


def matrix_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS that issue HGMMA, in program order: for one iteration, the number
    of instructions and of each class in ``_MIX``, the HGMMA shapes (``hgmma_shapes``: "MxNxK" ->
    count) and the matrix FLOPs issued (``hgmma_flops`` per warpgroup, ``hmma_flops`` per warp; the
    audit multiplies them by the warpgroups and warps that run the loop). A loop is a backward branch
    to a label; an outer loop (the dK/dV kernel's loop over the query heads of a group) counts its
    inner loops' bodies once, and ``inner`` says how many innermost reported loops it holds (0 for an
    innermost one). The forward's two loops are the unmasked blocks, then the masked ones. A backward branch
    whose span holds an EXIT is not a loop: ptxas places the retry of an mbarrier wait (TMA) out of
    line after the kernel's end and branches back into the body."""
    opcodes, labels, loops, spans = [], {}, [], []
    for line in sass.splitlines():
        if label := _LABEL.match(line):
            labels[label.group(1)] = len(opcodes)
        elif op := _INSTRUCTION.match(line):
            opcodes.append(op.group(1))
            branch = _BRANCH.search(line)
            start = labels.get(branch.group(1)) if branch else None
            if start is not None and start < len(opcodes) - 1:
                body = opcodes[start:]
                if "EXIT" in body:
                    continue
                mix = {name: sum(o.startswith(prefixes) for o in body) for name, prefixes in _MIX.items()}
                if mix["hgmma"]:
                    shapes, hgmma_flops, hmma_flops = _matrix_flops(body)
                    inner = sum(start <= s and e <= len(opcodes) for s, e, held in spans if not held)
                    spans.append((start, len(opcodes), inner))
                    loops.append(dict(instructions=len(body), **mix, hgmma_shapes=shapes, hgmma_flops=hgmma_flops,
                                      hmma_flops=hmma_flops, inner=inner))
    return loops


# Matrix products one iteration of an attention kernel's inner loop does, each of 2·rows·BLOCK_N·BLOCK_D
# FLOPs (rows: BLOCK_M, or BLOCK_R for decode): the algorithm's work, against which the audit sets the
# work the HGMMA and HMMA of the loop issue. Forward and decode: S = QKᵀ and PV; dK/dV: Sᵀ, dPᵀ, dV,
# dK, and dQ when it adds dQ atomically; dQ kernel: S, dP, dQ.
LOOP_PRODUCTS = {
    "_attn_fwd_kernel": lambda args: 2,
    "_attn_decode_kernel": lambda args: 2,
    "_attn_bwd_dkdv_kernel": lambda args: 5 if args.get("ATOMIC_DQ") else 4,
    "_attn_bwd_dq_kernel": lambda args: 3,
}
_WORK_TOLERANCE = 1.01  # matrix work per iteration above this multiple of the algorithm's is duplicated work


def loop_flops(kernel_name: str, args: dict) -> int | None:
    """The algorithm's matrix FLOPs per inner-loop iteration of a kernel, or None for a kernel not in
    ``LOOP_PRODUCTS``."""
    products = LOOP_PRODUCTS.get(kernel_name)
    if products is None:
        return None
    rows = args.get("BLOCK_M", args.get("BLOCK_R"))
    return products(args) * 2 * rows * args["BLOCK_N"] * args["BLOCK_D"]


def _work_multiples(loops: list[dict], num_warps: int, algorithm: int | None) -> None:
    """Adds to each loop ``matrix_work`` (the FLOPs its HGMMA and HMMA issue across the program: each
    HGMMA once per warpgroup, each HMMA once per warp, none warp-specialized) and ``work_multiple``
    (that over the algorithm's FLOPs for the iterations the loop body holds: an outer loop holds one
    of each inner loop; 1.0 is no duplicated work; None when the kernel's products are unknown)."""
    for loop in loops:
        loop["matrix_work"] = loop["hgmma_flops"] * max(1, num_warps // 4) + loop["hmma_flops"] * num_warps
        loop["work_multiple"] = (round(loop["matrix_work"] / (algorithm * max(1, loop["inner"])), 4)
                                 if algorithm else None)


_DEPBAR = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


def hgmma_loop_bodies(sass: str) -> Iterator[list[tuple[str, str]]]:
    """One iteration of each loop that issues HGMMA, in program order, as (opcode, line) pairs: the
    loops ``matrix_loops`` counts, found by the same rules (bench/model.py reads them too)."""
    lines, labels = [], {}
    for line in sass.splitlines():
        if label := _LABEL.match(line):
            labels[label.group(1)] = len(lines)
        elif op := _INSTRUCTION.match(line):
            lines.append((op.group(1), line))
            branch = _BRANCH.search(line)
            start = labels.get(branch.group(1)) if branch else None
            if start is not None and start < len(lines) - 1:
                body = lines[start:]
                if any(o == "EXIT" for o, _ in body) or not any(o.startswith("HGMMA") for o, _ in body):
                    continue
                yield body


def ex2_under_hgmma(sass: str) -> list[int]:
    """Per iteration of each HGMMA loop (``matrix_loops`` order), how many MUFU.EX2 issue while a
    wgmma group is in flight: after an HGMMA is issued and before the WARPGROUP.DEPBAR that waits
    for its group. The number the softmax/matrix-product overlap of the attention forward is
    judged by: 0 when the exponentials of a key block wait for its products and none are issued
    under the next ones (each warpgroup runs wait, HGMMA, EX2, HGMMA in lockstep).

    An HGMMA without ``gsb0`` opens a group (the tensor cores start on it at issue); the one with
    ``gsb0`` commits it; ``WARPGROUP.DEPBAR.LE gsb0, N`` waits until at most N committed groups are
    pending (groups complete in issue order). The body is walked twice and the second pass
    counted, so that a group committed at the end of one iteration and waited for in the next
    (the loop-carried P·V) counts as in flight at the top of the loop."""
    counts = []
    for body in hgmma_loop_bodies(sass):
        open_group, pending, under = False, 0, 0
        for second_pass in (False, True):
            for op, line in body:
                if op.startswith("HGMMA"):
                    open_group = not re.search(r"\bgsb0\b", line)
                    pending += not open_group
                elif depbar := _DEPBAR.search(line):
                    pending = min(pending, int(depbar.group(1), 0))
                elif op.startswith("MUFU.EX2") and second_pass and (open_group or pending):
                    under += 1
        counts.append(under)
    return counts


def _bind(kernel, args, kwargs) -> dict:
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    for p in kernel.params:
        if p.name not in bound and p.default is not inspect.Parameter.empty:
            bound[p.name] = p.default
    return bound


@contextlib.contextmanager
def capture_launches(arch: int | None = None) -> Iterator[list]:
    """Within the block, Triton kernel launches are recorded instead of run: one per autotuning config
    the kernel's early prune keeps for ``arch`` (every config when None)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, _bind(self, args, kwargs), kwargs.get("num_warps", 4),
                               kwargs.get("num_stages", 3)))

    def autotune_run(self, *args, **kwargs):
        configs = self.configs
        if arch is not None and self.early_config_prune and len(configs) > 1:
            launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}

            def shared_bytes(config):  # what the pruner reads on a GPU, from the compile for ``arch``
                merged = {**launch_kwargs, **config.all_kwargs()}
                launch = Launch(self.fn, _bind(self.fn, args, merged), merged["num_warps"], merged["num_stages"])
                return _compile(launch, arch).metadata.shared

            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), target_arch=arch,
                                              shared_bytes=shared_bytes, **launch_kwargs)
        for config in configs:
            merged = {**kwargs, **config.all_kwargs()}
            for launch_only in ("grid", "warmup"):
                merged.pop(launch_only, None)
            jit_run(self.fn, *args, grid=None, warmup=False, **merged)

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run, Autotuner.run = jit_run, autotune_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def _specialise(launch: Launch):
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = launch.args[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"audit: cannot specialise argument {param.name}={value!r}")
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), str(path)], capture_output=True, text=True, check=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return fields, sass


def _occupancy(arch: int, registers: int, shared: int, num_warps: int) -> float:
    """Fraction of the SM's warp slots a kernel can fill (register allocation rounded per warp to 256)."""
    limits = _SM_LIMITS[arch]
    threads = 32 * num_warps
    regs_per_block = num_warps * (((max(registers, 1) * 32) + 255) // 256 * 256)
    blocks = min(limits["blocks"], limits["threads"] // threads, limits["regs"] // regs_per_block)
    if shared:
        blocks = min(blocks, limits["smem"] // shared)
    return blocks * threads / limits["threads"]


def _uses_dot(kernel, depth: int = 2) -> bool:
    """Whether a kernel, or a @triton.jit helper it calls (two levels deep), has a matrix product."""
    from triton.runtime.jit import JITFunction

    if "tl.dot" in kernel.src:
        return True
    helpers = kernel.fn.__globals__
    return depth > 0 and any(isinstance(helpers.get(name), JITFunction) and _uses_dot(helpers[name], depth - 1)
                             for name in set(re.findall(r"\b(\w+)\(", kernel.src)))


def _aligned(launch: Launch) -> bool:
    """Whether every tensor argument of a launch starts 16-byte aligned."""
    return all(v.data_ptr() % 16 == 0 for v in launch.args.values() if isinstance(v, torch.Tensor))


def _compile(launch: Launch, arch: int):
    """``triton.compile`` of one launch for ``arch`` (Triton caches the result on disk)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(launch)
    source = ASTSource(launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def compile_launch(case: str, launch: Launch, arch: int, kind: str) -> Report:
    """Compile one launch for ``arch`` and report it.

    ``kind`` is the case's: "memory" kernels must issue 128-bit loads; in a "matrix" case the
    kernels with matrix products (``tl.dot``) must use HGMMA on sm_90a, and TMA there when launched
    with USE_TMA, and the others (attention's δ pre-pass) count as memory-bound. Every kernel must
    fit the block's shared memory and, but in a "shared-memory" case, compile without spills: those
    cases are the fp32 and head_dim 256 paths, kept for correctness (the tuned paths are 16-bit at
    head_dim 64 and 128), whose spills are reported and not failed.
    """
    fit_only = kind == "shared-memory"
    if kind == "matrix" and not _uses_dot(launch.kernel):
        kind = "memory"
    from llama_fast.kernels.attention import SHARED_MEMORY_LIMIT

    compiled = _compile(launch, arch)
    fields, sass = _resources(compiled.asm["cubin"])
    registers, spill = fields.get("REG", 0), fields.get("STACK", 0) + fields.get("LOCAL", 0)
    spill_ops = len(re.findall(r"\b(?:STL|LDL)(?:\.[\w]+)*\b", sass))
    shared = max(compiled.metadata.shared, fields.get("SHARED", 0))
    hgmma = len(re.findall(r"\bHGMMA\b", sass))
    hmma = len(re.findall(r"\bHMMA\b", sass))
    utmaldg = len(re.findall(r"\bUTMALDG\b", sass))
    ldg128 = len(re.findall(r"\bLDG\.E\.128\b", sass))
    ldg_all = len(re.findall(r"\bLDG\.E[.\w]*", sass))
    problems = []
    if shared > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"needs {shared:,} bytes of shared memory, over sm_{arch}'s "
                        f"{SHARED_MEMORY_LIMIT[arch]:,} per block")
    if (spill or spill_ops) and not fit_only:
        problems.append(f"spills registers: {spill} bytes of stack/local memory, {spill_ops} STL/LDL")
    if kind == "matrix" and arch == 90 and hgmma == 0:
        problems.append("no HGMMA on sm_90a")
    # Decode's tiles of 16 packed query rows are too few for wgmma: mma.sync is its right instruction,
    # and the kernel is memory-bound; the rules below are for the matrix-bound kernels.
    matrix_bound = kind == "matrix" and arch == 90
    if matrix_bound and hmma:
        problems.append(f"{hmma} HMMA (mma.sync) on sm_90a: a product wgmma does not take")
    loops = matrix_loops(sass)
    algorithm = loop_flops(launch.kernel.__name__, launch.args)
    _work_multiples(loops, launch.num_warps, algorithm)
    for i, loop in enumerate(loops):
        if matrix_bound and loop["work_multiple"] is not None and loop["work_multiple"] > _WORK_TOLERANCE:
            problems.append(f"matrix loop {i} issues {loop['work_multiple']:.2f}x the algorithm's FLOPs per "
                            f"iteration (HGMMA {loop['hgmma_shapes']}): duplicated work")
    if kind == "matrix" and arch == 90 and launch.args.get("USE_TMA") and utmaldg == 0:
        problems.append("no TMA loads (UTMALDG) on sm_90a")
    if launch.args.get("USE_TMA") is False and utmaldg:
        problems.append(f"{utmaldg} TMA loads (UTMALDG) on the pointer path (USE_TMA=False)")
    # A kernel handed a tensor that is not 16-byte aligned (the pointer cases' unaligned 16-bit inputs)
    # cannot read it 16 bytes at a time: Triton gets no tt.divisibility for it, as on a GPU.
    if kind == "memory" and ldg128 == 0 and _aligned(launch):
        problems.append("no 128-bit global loads")
    tile = tuple(v for k, v in launch.args.items() if k.startswith("BLOCK_") and k not in ("BLOCK_D",))
    return Report(case, launch.kernel.__name__, arch, tile, launch.num_warps, launch.num_stages, registers, spill,
                  spill_ops, shared, _occupancy(arch, registers, shared, launch.num_warps), hgmma, utmaldg, ldg128,
                  ldg_all - ldg128, problems, loops, hmma, algorithm, ex2_under_hgmma(sass))


BASELINE = Path(__file__).with_name("audit_baseline.json")
_LOOP_GROWTH = 1.05  # more instructions per matrix-loop iteration than this times the baseline fails


def _key(r: Report) -> str:
    return f"{r.case} | {r.kernel} | sm_{r.arch} | tile {'x'.join(map(str, r.tile))} | {r.num_warps}w {r.num_stages}s"


def _baseline_entry(r: Report) -> dict:
    return dict(hgmma=r.hgmma, utmaldg=r.utmaldg, loop_instructions=[loop["instructions"] for loop in r.matrix_loops]) \
        | _overlap_entry(r)


def _overlap_entry(r: Report) -> dict:
    """The baseline's record of EX2 issued under a wgmma per loop, for the kernels that have any (the
    attention kernels on sm_90a): fewer than recorded is a regression of the softmax overlap."""
    return {"ex2_under_hgmma": r.ex2_under_hgmma} if any(r.ex2_under_hgmma) else {}


def write_baseline(reports: list[Report], path: Path = BASELINE) -> None:
    import triton

    path.write_text(json.dumps({"triton": triton.__version__,
                                "kernels": {_key(r): _baseline_entry(r) for r in reports}}, indent=1) + "\n")


def check_baseline(reports: list[Report], path: Path = BASELINE) -> str:
    """Add a problem to each report that regressed against the baseline; returns a line saying
    what was compared (or why nothing was)."""
    import triton

    if not path.exists():
        return f"no baseline at {path}: nothing compared"
    baseline = json.loads(path.read_text())
    if baseline["triton"] != triton.__version__:
        return (f"baseline recorded with triton {baseline['triton']}, this is {triton.__version__}: "
                "instruction counts not compared")
    compared = 0
    for r in reports:
        old = baseline["kernels"].get(_key(r))
        if old is None:
            continue
        compared += 1
        new = _baseline_entry(r)
        for what in ("hgmma", "utmaldg"):
            if new[what] < old[what]:
                r.problems.append(f"regression: {new[what]} {what.upper()} (baseline {old[what]})")
        was_under = old.get("ex2_under_hgmma", [])
        for i, (now, was) in enumerate(zip(new.get("ex2_under_hgmma") or [0] * len(was_under), was_under)):
            if now < was:
                r.problems.append(f"regression: matrix loop {i} issues {now} EX2 under a wgmma (baseline {was})")
        if len(new["loop_instructions"]) != len(old["loop_instructions"]):
            r.problems.append(f"regression: matrix loops {new['loop_instructions']} "
                              f"(baseline {old['loop_instructions']})")
            continue
        for i, (now, was) in enumerate(zip(new["loop_instructions"], old["loop_instructions"])):
            if now > was * _LOOP_GROWTH:
                r.problems.append(f"regression: matrix loop {i} has {now} instructions per iteration (baseline {was})")
    return f"baseline (triton {baseline['triton']}): {compared} of {len(reports)} compiled kernels compared"


def _memory_bound_cases(model) -> Iterator[tuple[str, Callable[[int], object], str]]:
    from llama_fast.kernels import cross_entropy, rms_norm, rope, swiglu

    tokens, batch, seq = 4096, 2, 2048
    bf16 = torch.bfloat16
    x = torch.empty(tokens, model.hidden, dtype=bf16)
    w = torch.empty(model.hidden, dtype=bf16)
    rstd = torch.empty(tokens, dtype=torch.float32)
    yield "rms_norm fwd", lambda arch: rms_norm.rms_norm_fwd(x, w, 1e-5), "memory"
    yield "rms_norm bwd", lambda arch: rms_norm.rms_norm_bwd(x, x, w, rstd), "memory"
    yield "gemma rms_norm fwd", lambda arch: rms_norm.rms_norm_fwd(x, w, 1e-5, True), "memory"
    yield "gemma rms_norm bwd", lambda arch: rms_norm.rms_norm_bwd(x, x, w, rstd, True), "memory"
    yield "add_rms_norm fwd", lambda arch: rms_norm.add_rms_norm_fwd(x, x, w, 1e-5), "memory"
    yield "add_rms_norm bwd", lambda arch: rms_norm.add_rms_norm_bwd(x, x, x, w, rstd), "memory"
    q = torch.empty(batch, seq, model.q_heads, model.head_dim, dtype=bf16).transpose(1, 2)
    k = torch.empty(batch, seq, model.kv_heads, model.head_dim, dtype=bf16).transpose(1, 2)
    cos = torch.empty(batch, seq, model.head_dim, dtype=bf16)
    yield "rope fwd", lambda arch: rope.rope_fwd(q, k, cos, cos), "memory"
    yield "rope bwd", lambda arch: rope.rope_bwd(q, k, cos, cos), "memory"
    # decode: one token rotated, its k and v written into a static cache at a device-held fill count
    q1, k1 = q[:, :, :1], k[:, :, :1]
    cache = torch.empty(batch, model.kv_heads, 4096, model.head_dim, dtype=bf16)
    filled = torch.zeros((), dtype=torch.long)
    yield "rope into cache", lambda arch: rope.rope_into_cache(q1, k1, k1, cos[:, :1], cos[:, :1], cache, cache,
                                                               filled), "memory"
    gate = torch.empty(tokens, model.intermediate, dtype=bf16)
    yield "swiglu fwd", lambda arch: swiglu.swiglu_fwd(gate, gate), "memory"
    yield "swiglu bwd", lambda arch: swiglu.swiglu_bwd(gate, gate, gate), "memory"
    yield "geglu fwd", lambda arch: swiglu.swiglu_fwd(gate, gate, "gelu_tanh"), "memory"
    yield "geglu bwd", lambda arch: swiglu.swiglu_bwd(gate, gate, gate, "gelu_tanh"), "memory"
    # the fused loss's kernels: a chunk of logits (rows x the vocabulary), and a block of columns
    logits = torch.empty(256, model.vocab, dtype=bf16)
    labels = torch.zeros(256, dtype=torch.long)
    lse = torch.empty(256, dtype=torch.float32)
    yield "cross_entropy loss", lambda arch: cross_entropy.loss_rows(logits, labels, ignore_index=-100,
                                                                     label_smoothing=0.0, softcap=None), "memory"
    yield "cross_entropy grad", lambda arch: cross_entropy.grad_in_place(logits[:, :4096], labels, lse, lse, 0,
                                                                         model.vocab, ignore_index=-100,
                                                                         label_smoothing=0.0, softcap=None), "memory"


def _attention_cases(model) -> Iterator[tuple[str, Callable[[int], object], str]]:
    """Launchers take the architecture: on sm_90a the prefill kernels read through tensor
    descriptors (TMA), as they do on an H100/H200 for such 16-byte-aligned inputs."""
    from llama_fast.kernels import attention

    batch, seq, decode_kv = 1, 4096, 8192
    bf16 = torch.bfloat16

    def bshd(heads, length):  # the attention module's layout: (B, S, H, D) viewed as (B, H, S, D)
        return torch.empty(batch, length, heads, model.head_dim, dtype=bf16).transpose(1, 2)

    q, k, v = bshd(model.q_heads, seq), bshd(model.kv_heads, seq), bshd(model.kv_heads, seq)
    out = bshd(model.q_heads, seq)
    lse = torch.empty(batch, model.q_heads, seq, dtype=torch.float32)
    scale = model.head_dim ** -0.5
    yield "attention fwd", lambda arch: attention.attention_fwd(q, k, v, causal=True, softmax_scale=scale, pad=None,
                                                                splits=0, tma=arch == 90), "matrix"
    yield "attention bwd", lambda arch: attention.attention_bwd(out, q, k, v, out, lse, causal=True,
                                                                softmax_scale=scale, pad=None, tma=arch == 90,
                                                                arch=arch), "matrix"
    yield "attention bwd determ.", lambda arch: attention.attention_bwd(out, q, k, v, out, lse, causal=True,
                                                                        softmax_scale=scale, pad=None,
                                                                        deterministic=True, tma=arch == 90,
                                                                        arch=arch), "matrix"
    q1, k1, v1 = bshd(model.q_heads, 1), bshd(model.kv_heads, decode_kv), bshd(model.kv_heads, decode_kv)
    yield "attention decode", lambda arch: attention.attention_fwd(q1, k1, v1, causal=True, softmax_scale=scale,
                                                              pad=None, splits=32, arch=arch), "memory"
    # One split (a large batch, a short cache): the decode kernel writes out and lse itself (FINAL).
    yield "attention decode 1 split", lambda arch: attention.attention_fwd(q1, k1, v1, causal=True,
                                                                      softmax_scale=scale, pad=None, splits=1,
                                                                      arch=arch), "memory"
    # Packed sequences (flash_attention_varlen): the same kernels with VARLEN, over (1, H, total, D)
    # views of (total, H, D) tensors, here 8 sequences of up to 512 tokens in the same 4096.
    packed = attention.Packed(torch.zeros(9, dtype=torch.int32), torch.zeros(9, dtype=torch.int32), 512, 512)
    yield "attention varlen fwd", lambda arch: attention.attention_fwd(q, k, v, causal=True, softmax_scale=scale,
                                                                       pad=None, tma=arch == 90,
                                                                       packed=packed), "matrix"
    yield "attention varlen bwd", lambda arch: attention.attention_bwd(out, q, k, v, out, lse, causal=True,
                                                                       softmax_scale=scale, pad=None, tma=arch == 90,
                                                                       packed=packed, arch=arch), "matrix"
    q32 = bshd(model.q_heads, 32)  # a 32-token chunk on the cache: 64-row tiles of packed query rows
    yield "attention chunk", lambda arch: attention.attention_fwd(q32, k1, v1, causal=True, softmax_scale=scale,
                                                             pad=None, splits=16, arch=arch), "memory"
    # A local layer's sliding window (Mistral, Qwen2, Gemma): the same kernels with HAS_WINDOW, which
    # masks the blocks crossing the window's lower edge and never reads the ones before it. Gemma 2's
    # attention logit soft-cap (50): HAS_SOFTCAP, one σ more per score forward and its slope on dS
    # backward; on its global layers, and with the window on its local ones (prefill forward and backward).
    variants = (("window", dict(window=1024), 8), ("softcap", dict(softcap=50.0), 32),
                ("softcap window", dict(window=1024, softcap=50.0), None))
    for name, extra, splits in variants:
        options = dict(causal=True, softmax_scale=scale, pad=None, **extra)
        yield f"attention {name} fwd", functools.partial(
            lambda arch, options: attention.attention_fwd(q, k, v, splits=0, tma=arch == 90, **options),
            options=options), "matrix"
        yield f"attention {name} bwd", functools.partial(
            lambda arch, options: attention.attention_bwd(out, q, k, v, out, lse, tma=arch == 90, arch=arch,
                                                          **options), options=options), "matrix"
        if splits is None:
            continue
        yield f"attention {name} bwd determ.", functools.partial(
            lambda arch, options: attention.attention_bwd(out, q, k, v, out, lse, deterministic=True,
                                                          tma=arch == 90, arch=arch, **options),
            options=options), "matrix"
        yield f"attention {name} decode", functools.partial(
            lambda arch, options, splits: attention.attention_fwd(q1, k1, v1, splits=splits, arch=arch, **options),
            options=options, splits=splits), "memory"


def _pointer_cases(model) -> Iterator[tuple[str, Callable[[int], object], str]]:
    """The attention kernels' pointer path on sm_90a (USE_TMA=False) at the model's shapes: what
    Hopper runs for fp32 inputs and for 16-bit ones that are not ``tma_ready``, here bf16 views whose
    base pointer is one element (2 bytes) off 16-byte alignment. The launches choose as on an H100:
    ``tma`` is ``tma_ready`` of the inputs (False, asserted), so the pruner keeps the pointer path's
    tiles. Checked like the attention cases (spills fail, HGMMA on sm_90a; no UTMALDG, which the
    pointer path never issues; 128-bit loads only where the inputs are aligned), on sm_90a only:
    on sm_80 the attention cases are the pointer path already. fp32 products are wgmma too on
    sm_90a: Triton lowers an fp32 tl.dot to tf32 HGMMA (HGMMA.64xNx8.F32.TF32, 8-deep k-steps, half
    the 16-bit ones' 16), so the HGMMA expectation holds for both dtypes."""
    from llama_fast.kernels import attention

    batch, seq, decode_kv = 1, 4096, 8192
    packed = attention.Packed(torch.zeros(9, dtype=torch.int32), torch.zeros(9, dtype=torch.int32), 512, 512)
    for tag, dtype, offset in (("pointer fp32", torch.float32, 0), ("pointer bf16 unaligned", torch.bfloat16, 1)):
        def bshd(heads, length, dtype=dtype, offset=offset):  # (B, S, H, D) viewed as (B, H, S, D)
            size = batch * length * heads * model.head_dim
            flat = torch.empty(size + offset, dtype=dtype)[offset:]
            return flat.view(batch, length, heads, model.head_dim).transpose(1, 2)

        q, out = bshd(model.q_heads, seq), bshd(model.q_heads, seq)
        k, v = bshd(model.kv_heads, seq), bshd(model.kv_heads, seq)
        tma = attention.tma_ready(q, k, v, out)
        assert not tma, "the pointer cases must be inputs Hopper reads through pointers"
        lse = torch.empty(batch, model.q_heads, seq, dtype=torch.float32)
        q1, k1, v1 = bshd(model.q_heads, 1), bshd(model.kv_heads, decode_kv), bshd(model.kv_heads, decode_kv)
        q32 = bshd(model.q_heads, 32)
        common = dict(causal=True, softmax_scale=model.head_dim ** -0.5, pad=None)

        def on_sm90(launch):  # a launcher that runs for sm_90a only
            return lambda arch: launch(arch) if arch == 90 else None

        fwd = functools.partial(attention.attention_fwd, tma=tma, **common)
        bwd = functools.partial(attention.attention_bwd, out, q, k, v, out, lse, tma=tma, **common)
        yield f"{tag} attention fwd", on_sm90(lambda arch, fwd=fwd, q=q, k=k, v=v: fwd(q, k, v, splits=0)), "matrix"
        yield f"{tag} attention bwd", on_sm90(lambda arch, bwd=bwd: bwd(arch=arch)), "matrix"
        yield f"{tag} attention bwd determ.", on_sm90(lambda arch, bwd=bwd: bwd(arch=arch, deterministic=True)), \
            "matrix"
        yield f"{tag} attention varlen fwd", on_sm90(
            lambda arch, fwd=fwd, q=q, k=k, v=v: fwd(q, k, v, splits=0, packed=packed)), "matrix"
        yield f"{tag} attention varlen bwd", on_sm90(lambda arch, bwd=bwd: bwd(arch=arch, packed=packed)), "matrix"
        yield f"{tag} attention decode", on_sm90(
            lambda arch, q1=q1, k1=k1, v1=v1: attention.attention_fwd(q1, k1, v1, splits=32, arch=arch, **common)), \
            "memory"
        yield f"{tag} attention chunk", on_sm90(
            lambda arch, q32=q32, k1=k1, v1=v1: attention.attention_fwd(q32, k1, v1, splits=16, arch=arch,
                                                                       **common)), "memory"
        yield f"{tag} attention window fwd", on_sm90(
            lambda arch, fwd=fwd, q=q, k=k, v=v: fwd(q, k, v, splits=0, window=1024)), "matrix"
        yield f"{tag} attention window bwd", on_sm90(lambda arch, bwd=bwd: bwd(arch=arch, window=1024)), "matrix"
        yield f"{tag} attention softcap fwd", on_sm90(
            lambda arch, fwd=fwd, q=q, k=k, v=v: fwd(q, k, v, splits=0, softcap=50.0)), "matrix"
        yield f"{tag} attention softcap bwd", on_sm90(lambda arch, bwd=bwd: bwd(arch=arch, softcap=50.0)), "matrix"
        yield f"{tag} attention softcap window bwd", on_sm90(
            lambda arch, bwd=bwd: bwd(arch=arch, window=1024, softcap=50.0)), "matrix"


def _shared_memory_cases() -> Iterator[tuple[str, Callable[[int], object], str]]:
    """The attention passes where shared memory runs out first, whatever the model: the widest heads
    (head_dim 128 and 256, the largest blocks), in fp32 (4-byte tiles through pointer loads) and bf16
    (through TMA on sm_90a). Each compiles the configs the launch can choose there, which must all
    fit the block's shared memory (the pruner compiles every candidate and drops the rest)."""
    from llama_fast.kernels import attention

    kv_heads, group, seq = 2, 4, 1024
    for head_dim in (128, 256):
        for dtype in (torch.float32, torch.bfloat16):
            def bshd(heads, length):
                return torch.empty(1, length, heads, head_dim, dtype=dtype).transpose(1, 2)

            q, out = bshd(kv_heads * group, seq), bshd(kv_heads * group, seq)
            k, v = bshd(kv_heads, seq), bshd(kv_heads, seq)
            lse = torch.empty(1, kv_heads * group, seq, dtype=torch.float32)
            q16 = bshd(kv_heads * group, 16)  # 64 packed rows per KV head: the decode kernel's largest row tile
            tma = attention.tma_ready(q, k, v)
            common = dict(causal=True, softmax_scale=head_dim ** -0.5, pad=None)
            tag = f"d{head_dim} {str(dtype).removeprefix('torch.')}"
            yield f"{tag} attention fwd", functools.partial(
                lambda arch, q, k, v, tma: attention.attention_fwd(q, k, v, splits=0, tma=arch == 90 and tma, **common),
                q=q, k=k, v=v, tma=tma), "shared-memory"
            for deterministic in (False, True):
                yield f"{tag} attention bwd{' determ.' if deterministic else ''}", functools.partial(
                    lambda arch, q, k, v, out, lse, tma, deterministic: attention.attention_bwd(
                        out, q, k, v, out, lse, deterministic=deterministic, tma=arch == 90 and tma, arch=arch,
                        **common),
                    q=q, k=k, v=v, out=out, lse=lse, tma=tma, deterministic=deterministic), "shared-memory"
            yield f"{tag} attention decode", functools.partial(
                lambda arch, q, k, v: attention.attention_fwd(q, k, v, splits=4, arch=arch, **common),
                q=q16, k=k, v=v), "shared-memory"
            if head_dim == 256 and dtype == torch.bfloat16:  # Gemma 2's heads, its logit cap and a local window
                gemma = dict(common, window=512, softcap=50.0)
                yield f"{tag} attention softcap window fwd", functools.partial(
                    lambda arch, q, k, v, tma: attention.attention_fwd(q, k, v, splits=0, tma=arch == 90 and tma,
                                                                      **gemma),
                    q=q, k=k, v=v, tma=tma), "shared-memory"
                yield f"{tag} attention softcap window bwd", functools.partial(
                    lambda arch, q, k, v, out, lse, tma: attention.attention_bwd(
                        out, q, k, v, out, lse, tma=arch == 90 and tma, arch=arch, **gemma),
                    q=q, k=k, v=v, out=out, lse=lse, tma=tma), "shared-memory"


CASE_GROUPS = {"memory": _memory_bound_cases, "attention": _attention_cases, "pointer": _pointer_cases}
# Cases that do not depend on the model's shape: run once, named "shared-memory ...".
SHAPE_FREE_GROUPS = {"shared-memory": _shared_memory_cases}


def audit(models=None, archs=(90, 80), groups=None) -> list[Report]:
    if interpreting():
        raise RuntimeError("bench audit compiles real kernels: unset TRITON_INTERPRET")
    groups = groups or [*CASE_GROUPS, *SHAPE_FREE_GROUPS]
    cases = [(f"{name} {case}", launcher, kind)
             for name in models or MODELS for group in groups if group in CASE_GROUPS
             for case, launcher, kind in CASE_GROUPS[group](MODELS[name])]
    cases += [(f"{group} {case}", launcher, kind)
              for group in groups if group in SHAPE_FREE_GROUPS for case, launcher, kind in SHAPE_FREE_GROUPS[group]()]
    reports = []
    for case, launcher, kind in cases:
        for arch in archs:  # each architecture compiles the tiles the kernel keeps for it
            with capture_launches(arch) as launches:
                launcher(arch)
            for launch in launches:
                reports.append(compile_launch(case, launch, arch, kind))
    return reports


def format_table(reports: list[Report]) -> str:
    """One line per compiled kernel; per matrix loop (``/``-separated): instructions, the work multiple
    (matrix FLOPs issued over the algorithm's, 1.00 = no duplicated work), BAR and ATOMG per iteration."""
    header = f"{'case':<34} {'kernel':<28} {'sm':>3} {'tile':>9} {'warps':>5} {'stg':>3} {'regs':>4} " \
             f"{'spill':>5} {'stl/ldl':>7} {'smem':>7} {'occ':>5} {'hgmma':>5} {'hmma':>4} {'tma':>4} " \
             f"{'ldg128':>6} {'ldg<128':>7} {'loop instr':>10} {'work':>9} {'bar':>5} {'atomg':>5}  problems"
    lines = [header, "-" * len(header)]

    def per_loop(r, what, fmt="{}"):
        return "/".join("-" if loop.get(what) is None else fmt.format(loop[what]) for loop in r.matrix_loops) or "-"

    for r in reports:
        lines.append(
            f"{r.case:<34} {r.kernel:<28} {r.arch:>3} {'x'.join(map(str, r.tile)):>9} {r.num_warps:>5} "
            f"{r.num_stages:>3} {r.registers:>4} {r.spill_bytes:>5} {r.spill_instructions:>7} {r.shared_bytes:>7} "
            f"{r.occupancy:>5.0%} {r.hgmma:>5} {r.hmma:>4} {r.utmaldg:>4} {r.ldg128:>6} {r.ldg_other:>7} "
            f"{per_loop(r, 'instructions'):>10} {per_loop(r, 'work_multiple', '{:.2f}'):>9} "
            f"{per_loop(r, 'bar'):>5} {per_loop(r, 'atomg'):>5}  {'; '.join(r.problems) or 'ok'}"
        )
    return "\n".join(lines)
