"""Context-parallel attention across GPUs: ``ops.ring_attention`` forward and forward + backward over
the ranks of one machine (NCCL), against ``ops.flash_attention`` on the whole sequence on one GPU.
Not part of ``bench/gpu.sh``: it needs several GPUs; run it when a multi-GPU machine is lent.

  torchrun --standalone --nproc_per_node N -m bench.context_parallel --out DIR

Causal, bf16, Llama-3-8B's heads (32 query, 8 KV, head_dim 128), batch 1, sequences of 32k to 128k
tokens (``--seqs``). Each rank runs the same fixed number of calls (a collective per call: an adaptive
timer such as triton.testing.do_bench would pick a different count per rank and hang); a call's time is
the slowest rank's. TFLOP/s count the causal pairs once (bench/formulas.py), per GPU: the whole
sequence's FLOPs over the time and the ranks. The one-GPU run is rank 0's alone; a sequence it cannot
hold is reported as an error row. DIR/context_parallel.json holds every figure, the devices, the
versions and the date. With ``--device cpu`` (gloo) the same loop runs on the CPU, a check that the
script works, and says so: those are CPU timings, never GPU performance.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from llama_fast import ops

from . import formulas
from .device import describe
from .report import write_json

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
WARMUP, CALLS = 3, 10


def _timed(fn, device: torch.device, collective: bool = True) -> float:
    """Median milliseconds of CALLS calls of ``fn`` after WARMUP; ``collective``: every rank calls, and the
    time is the slowest rank's."""
    times = []
    for call in range(WARMUP + CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if collective:
            dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if call >= WARMUP:
            times.append((time.perf_counter() - start) * 1e3)
    if not collective:
        return sorted(times)[len(times) // 2]
    slowest = torch.tensor(sorted(times)[len(times) // 2], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def _inputs(shape_len: int, device, dtype, heads, head_dim, kv_heads, grad: bool):
    def t(h):
        return torch.randn(1, h, shape_len, head_dim, device=device, dtype=dtype).requires_grad_(grad)

    return t(heads), t(kv_heads), t(kv_heads)


def _call(attend, q, k, v, mode: str):
    def fn():
        out = attend(q, k, v)
        if mode == "fwdbwd":
            out.backward(torch.ones_like(out))

    return fn


def measure(seq: int, mode: str, device, dtype, heads, kv_heads, head_dim) -> list[dict]:
    world = dist.get_world_size()
    flops = formulas.attention_flops(1, heads, seq, seq, head_dim, True, mode)
    shards = ops.ZigzagShards(seq)
    grad = mode == "fwdbwd"
    q, k, v = _inputs(shards.length(shards.rank), device, dtype, heads, head_dim, kv_heads, grad)
    base = dict(seq=seq, mode=mode, heads=f"{heads}/{kv_heads}", head_dim=head_dim, dtype=str(dtype), ranks=world)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = _timed(_call(lambda a, b, c: ops.ring_attention(a, b, c, shards), q, k, v, mode), device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rows = [dict(base, provider=f"ring_attention x{world}", ms=ms, tflops_per_gpu=flops / (ms * 1e-3) / world / 1e12,
                 peak_bytes_rank=peak)]
    del q, k, v
    one = dict(base, provider="flash_attention x1", ranks=1)
    if dist.get_rank() == 0:
        try:
            q, k, v = _inputs(seq, device, dtype, heads, head_dim, kv_heads, grad)
            ms = _timed(_call(lambda a, b, c: ops.flash_attention(a, b, c), q, k, v, mode), device, collective=False)
            one.update(ms=ms, tflops_per_gpu=flops / (ms * 1e-3) / 1e12)
            del q, k, v
        except torch.OutOfMemoryError as error:
            one.update(error=f"OutOfMemoryError: {str(error).splitlines()[0]}")
    dist.barrier()
    return rows + [one]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--heads", type=int, nargs=3, default=[HEADS, KV_HEADS, HEAD_DIM],
                        metavar=("Q_HEADS", "KV_HEADS", "HEAD_DIM"))
    args = parser.parse_args()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, dtype = torch.device("cuda", local), torch.bfloat16
        dist.init_process_group("nccl", device_id=device)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        dist.init_process_group("gloo")
    heads, kv_heads, head_dim = args.heads
    meta = dict(describe(device), ranks=dist.get_world_size(), complete=False)
    rows = []
    path = os.path.join(args.out, "context_parallel.json")
    for seq in args.seqs:
        for mode in ("fwd", "fwdbwd"):
            rows += measure(seq, mode, device, dtype, heads, kv_heads, head_dim)
            if dist.get_rank() == 0:
                os.makedirs(args.out, exist_ok=True)
                write_json(path, meta, rows)
                print(*(f"{r['provider']:22} seq {r['seq']:>6} {r['mode']:6} "
                        + (f"{r['ms']:9.2f} ms {r['tflops_per_gpu']:7.1f} TFLOP/s per GPU" if "ms" in r
                           else r["error"]) for r in rows[-2:]), sep="\n")
    if dist.get_rank() == 0:
        write_json(path, dict(meta, complete=True), rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
