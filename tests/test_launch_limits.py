"""What a GPU enforces at launch and the interpreter never checks: the grid's per-axis limits, the
shared memory one block may use, and the device a kernel runs on.

The grids are read from the launches themselves (the interpreter's run is intercepted, nothing
executes); the shared-memory rule is checked here on the pruner's logic and, compiled for sm_90a and
sm_80, by the audit (tests/test_audit.py, the "shared-memory" cases).
"""

import contextlib
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import triton

from llama_fast.kernels import _launch, attention, cross_entropy, rms_norm, rope, swiglu

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def recorded_grids():
    """Within the block, kernel launches record (kernel name, grid) instead of running: interpreted
    ones (CI) and compiled ones (the GPU run, where the same CPU tensors must never reach a kernel)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    grids = []

    def run(self, *args, grid, warmup, **kwargs):
        grids.append((self.fn.__name__, tuple(grid(kwargs) if callable(grid) else grid)))

    saved = InterpretedFunction.run, JITFunction.run
    InterpretedFunction.run = JITFunction.run = run
    try:
        yield grids
    finally:
        InterpretedFunction.run, JITFunction.run = saved


def _within_limits(grid):
    return all(count <= limit for count, limit in zip(grid, _launch.GRID_LIMITS))


def test_packed_batch_of_9000_sequences_launches_within_the_grid_limits():
    """9,000 packed one-token sequences with 8 KV heads (4 query heads each): 72,000 (sequence, KV
    head) programs and 288,000 (sequence, query head) ones, more than the 65,535 a second grid axis
    may hold. Every pass puts them on the first axis."""
    sequences, kv_heads, group, head_dim = 9000, 8, 4, 16
    q = torch.zeros(1, kv_heads * group, sequences, head_dim)
    k = torch.zeros(1, kv_heads, sequences, head_dim)
    cu = torch.arange(sequences + 1, dtype=torch.int32)
    packed = attention.Packed(cu, cu, 1, 1)
    lse = torch.zeros(1, kv_heads * group, sequences)
    with recorded_grids() as grids:
        attention.attention_fwd(q, k, k, causal=True, softmax_scale=0.25, pad=None, packed=packed)
        attention.attention_bwd(q, q, k, k, q, lse, causal=True, softmax_scale=0.25, pad=None, packed=packed)
        attention.attention_bwd(q, q, k, k, q, lse, causal=True, softmax_scale=0.25, pad=None, packed=packed,
                                deterministic=True)
    kernels = {name for name, _ in grids}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    assert all(_within_limits(grid) for _, grid in grids), grids
    by_kernel = dict(grids)
    assert by_kernel["_attn_bwd_dkdv_kernel"][0] == sequences * kv_heads
    assert by_kernel["_attn_bwd_dq_kernel"][0] == sequences * kv_heads * group


def test_decode_of_a_large_batch_launches_within_the_grid_limits():
    """Split-KV decoding of 10,000 sequences with 8 KV heads: 80,000 (sequence, KV head) programs."""
    batch, kv_heads, group, head_dim = 10_000, 8, 1, 16
    q = torch.zeros(batch, kv_heads * group, 1, head_dim)
    k = torch.zeros(batch, kv_heads, 64, head_dim)
    with recorded_grids() as grids:
        attention.attention_fwd(q, k, k, causal=True, softmax_scale=0.25, pad=None, splits=2)
    assert [name for name, _ in grids] == ["_attn_decode_kernel", "_attn_decode_combine_kernel"]
    assert grids[0][1][0] == batch * kv_heads and all(_within_limits(grid) for _, grid in grids), grids


def test_an_oversized_grid_is_a_clear_error():
    assert _launch.grid_of(2**31 - 1, 65_535, 65_535) == (2**31 - 1, 65_535, 65_535)
    with pytest.raises(ValueError, match="70,000 programs along grid axis 1, over the hardware's 65,535"):
        _launch.grid_of(8, 70_000)
    with pytest.raises(ValueError, match="grid axis 0"):
        _launch.grid_of(2**31)


def _launchers():
    """Every public function of the kernel modules that launches a Triton kernel."""
    for module in (attention, cross_entropy, rms_norm, rope, swiglu):
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == module.__name__:
                if _launches(module, inspect.unwrap(fn)):
                    yield f"{module.__name__}.{name}", fn


def _launches(module, fn) -> bool:
    """Whether ``fn`` launches a kernel itself or through a private helper of its module (rope_fwd and
    rope_bwd share one)."""
    if "_kernel[" in inspect.getsource(fn):
        return True
    helpers = [getattr(module, n) for n in fn.__code__.co_names if n.startswith("_") and inspect.isfunction(
        getattr(module, n, None))]
    return any("_kernel[" in inspect.getsource(h) for h in helpers)


def test_every_launcher_runs_under_its_tensors_device():
    launchers = dict(_launchers())
    assert {"llama_fast.kernels.attention.attention_fwd", "llama_fast.kernels.rms_norm.rms_norm_bwd",
            "llama_fast.kernels.rope.rope_fwd", "llama_fast.kernels.rope.rope_bwd",
            "llama_fast.kernels.swiglu.swiglu_fwd",
            "llama_fast.kernels.cross_entropy.grad_in_place"} <= set(launchers)
    unguarded = [name for name, fn in launchers.items() if getattr(fn, "__wrapped__", None) is None
                 or fn.__code__ is not _launch.on_tensor_device(lambda x: x).__code__]
    assert not unguarded, unguarded


def test_device_guard_switches_only_when_the_device_differs(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: the launch runs with cuda:1 current, and the
    current device is back to cuda:0 afterwards; on the current device or the CPU, no switch."""
    current, entered = [0], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        saved, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launcher = _launch.on_tensor_device(lambda x, y, *, z: seen.append((current[0], y, z)) or "done")

    def on(index):
        return types.SimpleNamespace(get_device=lambda: index)

    assert launcher(on(1), 2, z=3) == "done" and seen[-1] == (1, 2, 3) and current[0] == 0
    assert launcher(on(0), 2, z=3) == "done" and seen[-1] == (0, 2, 3)
    assert launcher(on(-1), 2, z=3) == "done"  # a CPU tensor
    assert entered == [1]


def _configs(*tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def test_pruner_keeps_only_configs_that_fit_shared_memory(monkeypatch):
    """Given what each config's compiled kernel needs, the pruner drops those over the
    architecture's limit, and with LLAMA_FAST_AUTOTUNE=0 keeps the first that fits (not the first)."""
    tiles = {90: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)], 80: [(128, 64, 8, 3), (64, 64, 4, 3)]}
    pruner = attention._Pruner(tiles)
    pruner.kernel = types.SimpleNamespace(__name__="_attn_fwd_kernel")
    configs = _configs(*tiles[90])
    needs = {(128, 64): 262_144, (128, 128): 229_376, (64, 64): 114_688}
    args = dict(q_ptr=torch.empty(1, dtype=torch.float32))

    def shared_bytes(config):
        return needs[config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]]

    kept = pruner(configs, args, target_arch=90, shared_bytes=shared_bytes, BLOCK_D=128)
    assert [attention._tile(c) for c in kept] == [(128, 128, 8, 2), (64, 64, 4, 3)]
    kept = pruner(configs, args, target_arch=80, shared_bytes=shared_bytes, BLOCK_D=128)
    assert [attention._tile(c) for c in kept] == [(64, 64, 4, 3)]  # 166,912 B on sm_80
    monkeypatch.setattr(attention, "_AUTOTUNE", False)
    kept = pruner(configs, args, target_arch=90, shared_bytes=shared_bytes, BLOCK_D=128)
    assert [attention._tile(c) for c in kept] == [(128, 128, 8, 2)]
    with pytest.raises(RuntimeError, match=r"no tile of _attn_fwd_kernel fits the 232,448 bytes .* head_dim 256 in "
                                           r"torch.float32 \(the smallest tile needs 300,000\)"):
        pruner(configs, args, target_arch=90, shared_bytes=lambda config: 300_000, BLOCK_D=128, HEAD_DIM=256)


def test_pruner_on_a_gpu_compiles_each_candidate_for_the_device(monkeypatch):
    """On a GPU the pruner reads each config's need from the kernel compiled for the device:
    ``warmup`` with the launch's own arguments plus the config (no launch), against the device's limit."""
    compiled = []

    def warmup(**kwargs):
        compiled.append(kwargs)
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=kwargs["BLOCK_M"] * 1000))

    pruner = attention._Pruner({90: [(128, 64, 8, 3), (64, 64, 4, 3)], 80: [(64, 64, 4, 3)]})
    pruner.kernel = types.SimpleNamespace(__name__="_attn_fwd_kernel", warmup=warmup)
    monkeypatch.setattr(attention, "_arch", lambda index: 90)
    monkeypatch.setattr(attention, "_device_shared_limit", lambda index: 100_000)  # between 64 and 128 rows
    gpu_tensor = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    kept = pruner(_configs((128, 64, 8, 3), (64, 64, 4, 3)), dict(q_ptr=gpu_tensor, q_len=7), HEAD_DIM=128,
                  grid=lambda meta: (1,), warmup=False)
    assert [attention._tile(c) for c in kept] == [(64, 64, 4, 3)]
    assert [(c["BLOCK_M"], c["num_warps"], c["q_len"], c["HEAD_DIM"]) for c in compiled] == [(128, 8, 7, 128),
                                                                                              (64, 4, 7, 128)]
    assert all(c["q_ptr"] is gpu_tensor and c["grid"] == (1,) and "warmup" not in c for c in compiled)


@pytest.mark.system
def test_decode_tile_fits_every_architecture():
    """The decode kernel is not autotuned: its (BLOCK_N, num_stages) is the first whose shared memory
    bound fits. fp32 at head_dim 256 with 64 rows needs 458,752 B with three stages of 64 keys."""
    code = """
from llama_fast.kernels import attention as a
assert a.decode_shared_bound(64, 64, 256, 4, 3) == 458_752
for limit in (232_448, 166_912, 101_376):
    for rows in (16, 32, 64):
        for block_d in (16, 32, 64, 128, 256):
            for element in (2, 4):
                block_n, stages = a._decode_tile(rows, block_d, element, limit)
                assert a.decode_shared_bound(rows, block_n, block_d, element, stages) <= limit
assert a._decode_tile(16, 128, 2, 232_448) == (64, 3)  # the usual case keeps its three stages
assert a._decode_tile(64, 256, 4, 232_448) == (32, 2)
assert a._decode_tile(64, 256, 4, 166_912) == (32, 1)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
