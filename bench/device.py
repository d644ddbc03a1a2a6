"""The device a bench runs on: its name, peak figures, measured figures, copy bandwidth, and the timer.

GPU timings use CUDA events through ``triton.testing.do_bench`` after warm-up; CPU timings use
``time.perf_counter`` and are always labelled CPU, never reported as GPU performance.
"""

import dataclasses
import datetime
import platform
import statistics
import time

import torch

# Dense peaks from the vendors' datasheets (SXM parts): HBM bytes/s and bf16 tensor-core FLOP/s
# without sparsity. Looked up by substring of torch.cuda.get_device_name().
PEAKS = {
    "H200": dict(bytes_per_s=4.8e12, bf16_flops=989e12),
    "H100": dict(bytes_per_s=3.35e12, bf16_flops=989e12),
    "A100": dict(bytes_per_s=2.039e12, bf16_flops=312e12),
    "L40S": dict(bytes_per_s=0.864e12, bf16_flops=362e12),
    "L4": dict(bytes_per_s=0.3e12, bf16_flops=121e12),
    "A10": dict(bytes_per_s=0.6e12, bf16_flops=125e12),
}


@dataclasses.dataclass(frozen=True)
class Measured:
    """What a device was measured to do on this project's lent machine, with where each figure came from.
    The static model (bench/model.py) takes its ceilings from here, never from a datasheet."""

    name: str
    sms: int
    l2_bytes: int
    gemm_bf16_flops: tuple  # (low, high) FLOP/s of an 8192^3 bf16 torch.matmul on random data
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    sm_clock_hz: tuple  # (low, high): the sustained SM clock range the model assumes
    sources: dict


# The lent H200's record (the device tool's KINDS.md for kind nvidia-h200). The GEMM rate on random
# data is 769-798 TFLOP/s (894 on zeros: the tensor cores draw less power on zeros and hold a higher
# clock, so zeros overstate it), 78-81% of the datasheet's 989.
H200 = Measured(
    name="NVIDIA H200", sms=132, l2_bytes=60 * 10**6,
    gemm_bf16_flops=(769e12, 798e12), copy_bytes_per_s=4.3e12, sm_clock_hz=(1.83e9, 1.98e9),
    sources={
        "sms, l2_bytes": "torch.cuda.get_device_properties on the lent H200, 2026-10-28 (gVisor machine)",
        "gemm_bf16_flops": "measured on the lent H200, 2026-11-04 (Firecracker), torch.matmul 8192x8192x8192 bf16, "
                           "random data, mean of ten after three warm-ups: 769-798 TFLOP/s (788 on 2026-10-28, gVisor)",
        "copy_bytes_per_s": "measured on the lent H200, 2026-10-28 and 2026-11-04, torch device-to-device copy: "
                            "8.6 GB read + written in 2.0 ms, about 4.3 TB/s",
        "sm_clock_hz": "low: 1.83 GHz, the clock at which NVIDIA's H100 whitepaper states the dense bf16 peak "
                       "(989.4 TFLOP/s = 132 SMs x 4,096 FLOP/clock x 1.83 GHz); high: 1980 MHz, the SM clock "
                       "nvidia-smi read on the lent H200 just after the GEMMs, 2026-10-28",
    },
)

# The H100 SXM has the H200's SMs and clocks but HBM3 at 3.35 TB/s (datasheet) against 4.8. Nothing was
# measured on an H100 here: its copy rate is the datasheet's scaled by what the H200 achieved of its own
# datasheet figure (4.3 / 4.8), and its GEMM rate is the H200's (same chip, same power limit). Used only
# to compare the model with measurements published on H100s (Liger-Kernel's benchmark CSV).
H100 = Measured(
    name="NVIDIA H100 80GB HBM3", sms=132, l2_bytes=50 * 2**20,
    gemm_bf16_flops=H200.gemm_bf16_flops, copy_bytes_per_s=3.35e12 * 4.3 / 4.8, sm_clock_hz=H200.sm_clock_hz,
    sources={"sms, l2_bytes": "H100 SXM datasheet (132 SMs, 50 MB L2)",
             "copy_bytes_per_s": "derived, not measured: H100 SXM datasheet 3.35 TB/s x (H200 measured 4.3 / "
                                 "datasheet 4.8)",
             "gemm_bf16_flops, sm_clock_hz": "the H200's measured figures (same GH100 chip and clocks)"},
)

MEASURED = {"H200": H200, "H100": H100}


def peaks_for(name: str) -> dict | None:
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


def describe(device: torch.device) -> dict:
    import transformers
    import triton

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        triton=triton.__version__, transformers=transformers.__version__,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(kind="cuda", device=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    peaks=peaks_for(props.name))
    else:
        meta.update(kind="cpu", device=f"CPU ({platform.processor() or platform.machine()}, "
                                       f"{torch.get_num_threads()} threads)", peaks=None,
                    cpu_model=_cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability())
        from llama_fast import extension

        if extension.available():  # which SwiGLU loop the CPU kernels ran (LLAMA_FAST_NO_AVX2)
            from llama_fast import _C

            meta["cpu_swiglu_path"] = _C.swiglu_cpu_path()
    try:
        import liger_kernel  # noqa: F401  (only its presence is reported)

        meta["liger_kernel"] = getattr(liger_kernel, "__version__", "installed")
    except ImportError:
        meta["liger_kernel"] = None
    return meta


def _cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux): CPU results differ by vendor and vector width (eager
    PyTorch ran AVX-512 kernels on the Intel Xeon dev VMs, AVX2 on the AMD EPYC ones)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def measure(fn, device: torch.device, *, rep_ms: int = 100) -> dict:
    """Median, p20 and p80 milliseconds of ``fn()`` after warm-up, and peak memory in bytes."""
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ms, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        peak = torch.cuda.max_memory_allocated(device) - base
        return dict(ms=ms, p20_ms=p20, p80_ms=p80, peak_bytes=peak)
    timing = measure_cpu({"fn": fn}, rep_ms=rep_ms)["fn"]
    if "error" in timing:
        raise RuntimeError(timing["error"])
    return timing


def measure_cpu(fns: dict, *, rep_ms: int = 100) -> dict:
    """CPU timings of several callables taken in turn, one call of each per round.

    Round-robin because a shared CPU's speed drifts over seconds (other tenants, clocks): timed one
    after the other, two providers of one case differed by up to 2x between runs on the 2-core VM
    this was written on; taken in turn, each slow spell slows all of them alike. rep_ms is the
    time per callable. Returns {name: median, p20 and p80 ms}; a callable that raises gets
    {"error": ...} and leaves the rotation.
    """
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            fn()  # warm-up (and compilation for torch.compile)
            live[name] = fn
        except Exception as exc:  # noqa: BLE001  (reported in the row)
            results[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    times = {name: [] for name in live}
    deadline = time.perf_counter() + rep_ms * max(len(live), 1) / 1e3
    rounds = 0
    while live and (rounds < 5 or (time.perf_counter() < deadline and rounds < 200)):
        for name, fn in list(live.items()):
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                results[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
                del live[name], times[name]
                continue
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        results[name] = dict(ms=statistics.median(ts), p20_ms=q[1], p80_ms=q[7], peak_bytes=None)
    return results


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float | None:
    """Achieved bytes/s of a device-to-device copy (read + write), the practical memory roof."""
    if device.type != "cuda":
        return None
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 2 / (timing["ms"] / 1e3)
