"""Small helpers shared by the launchers: nothing here touches a GPU at import time."""

import functools

import torch

# Programs per launch when the kernel loops over rows itself and the device has no SM count
# (the interpreter on CPU tensors). The interpreter runs programs one after another, so a small
# number keeps tests fast while still exercising the multi-program reduction.
_CPU_PROGRAMS = 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 1) -> int:
    """How many programs a row-looping (persistent) kernel should launch."""
    if device.type == "cuda":
        slots = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        slots = _CPU_PROGRAMS
    return max(1, min(work_items, slots))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code. triton.cdiv and triton.next_power_of_2 are
    ConstexprFunctions since Triton 3.8, about 1.7 and 2.6 µs a call on the host (measured
    2026-11-30), several times per launch; these are plain integer arithmetic."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, and 0 for 0, as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def row_block(n_cols: int) -> int:
    """The power-of-two block that holds a whole row of ``n_cols`` elements."""
    return next_power_of_2(n_cols)


def warps_for_row(block: int, element_bytes: int) -> int:
    """Warps for a one-row-per-program kernel: enough that each thread holds about two 16-byte
    vectors of the row (so loads are 128-bit), between 1 and 16."""
    per_warp = 32 * 16 // element_bytes * 2
    return max(1, min(16, block // per_warp))


# CUDA's per-launch limits on the grid: 2^31 - 1 programs along the first axis, 65,535 along the others.
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


def grid_of(*programs: int) -> tuple[int, ...]:
    """A launch grid, checked against the hardware's per-axis limits so that an oversized launch is a
    clear error rather than CUDA's "invalid argument". Launchers put the count that grows with the
    batch (batch x heads, sequences x heads) on the first axis, whose limit is 2^31 - 1: on the
    second, 8,192 packed sequences of 8 KV heads would already be too many."""
    for axis, (count, limit) in enumerate(zip(programs, GRID_LIMITS)):
        if count > limit:
            raise ValueError(f"llama_fast: a launch needs {count:,} programs along grid axis {axis}, over the "
                             f"hardware's {limit:,} (shapes too large for one kernel call: split the batch or the "
                             "sequence)")
    return programs


def on_tensor_device(launcher):
    """Runs ``launcher`` under the CUDA device of its first argument, a tensor.

    Triton launches on the current device and takes its stream, and the TMA descriptors' scratch
    comes from the current device too: a model spread over two GPUs (``device_map="auto"``) calls
    layers whose tensors are not on it, which would give illegal addresses. The device is switched
    only when it differs (the check costs well under a microsecond: ``bench overhead``)."""

    @functools.wraps(launcher)
    def on_device(x, *args, **kwargs):
        index = x.get_device()
        if index < 0 or index == torch.cuda.current_device():
            return launcher(x, *args, **kwargs)
        with torch.cuda.device(index):
            return launcher(x, *args, **kwargs)

    return on_device
