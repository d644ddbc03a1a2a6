"""Causal flash attention with grouped-query heads, key padding and the KV-cache alignment.

Shapes: q (B, Hq, Sq, D); k, v (B, Hk, Skv, D) with Hq = G·Hk (G = 1 MHA, Hk = 1 MQA); any strides
with unit stride along D. K and V are never expanded: query head h reads KV head h // G.
out (B, Hq, Sq, D), stored in a (B, Sq, Hq, D) buffer so that transformers' final
``transpose(1, 2).contiguous()`` is free; lse (B, Hq, Sq) fp32.

Maths, for one query row i with scale s (default D^-1/2), in base 2 so the GPU's exp2 is used
(log2(e) is folded into the scale, s2 = s·log2 e):
    x_j   = s2 · q_i·k_j                for keys j that row i may see, −∞ for the others
    m     = max_j x_j,  l = Σ_j 2^(x_j − m)
    out_i = Σ_j 2^(x_j − m) v_j / l,    lse_i = m + log2 l    (saved for backward, base 2)
computed online over key blocks (flash attention): a running max m, a running sum l and an
accumulator rescaled by 2^(m_old − m_new) whenever the max grows.

Visibility of key j from query i:
    causal: j ≤ i + Skv − Sq (the diagonal aligned bottom-right: the KV-cache convention of
            transformers' generate; with Sq == Skv it is the usual lower triangle)
    key_padding_mask (B, Skv) bool: key j of batch b is seen only where mask[b, j] is True.
    kv_lens (B,) int32 on the device (forward only): batch row b sees only keys j < kv_lens[b], and
            Skv in the causal rule is kv_lens[b]: a static KV cache of Skv slots filled up to there.
A row that sees no key returns zeros and lse = +∞, so that backward's 2^(x − lse) is 0: its
gradients are zero, never NaN.

Backward, with P_ij = 2^(x_ij − lse_i), dO the output gradient and δ_i = Σ_d dO_id·O_id:
    dV_j = Σ_i P_ij dO_i
    dS_ij = P_ij (dO_i·v_j − δ_i)
    dQ_i = s Σ_j dS_ij k_j,      dK_j = s Σ_i dS_ij q_i
One program per KV block accumulates dK and dV over every query block of all G query heads of
its group (the GQA sum happens in registers, so dK and dV are deterministic). dQ, two ways:
  atomic (default): the same program adds dS·k for each query block into an fp32 dQ buffer with
      atomic adds: five matrix products per (query block, key block) pair (S, dP, dV, dK, dQ);
      the order of the additions varies, and with it dQ's last bits. On Hopper it is computed
      transposed, dQᵀ = Kᵀ·dSᵀ, so that wgmma takes it, and only for heads of at most 64 (wider,
      the dK/dV tile runs out of registers with it: dQ comes from the second kernel below).
  deterministic: a second kernel, one program per query block, recomputes S and dP to form dQ
      (seven products), and every gradient repeats bit for bit.
Only the query blocks that cross the causal diagonal, and the last key block, apply masks.
P is recomputed from lse, never stored.

On Hopper (sm_90), for 16-bit inputs aligned for it (``tma_ready``), the tiles that stream through
the inner loops (K and V forward; Q and dO in dK/dV; K and V in dQ) come through per-head tensor
descriptors, which Triton lowers to TMA bulk copies (UTMALDG) and pipelines; out-of-range rows and
columns read as zeros. Elsewhere the same loops load through pointers with masks. There the forward
(up to head_dim 128) also runs its key loop software-pipelined by one block, so that the softmax of
one block issues while the tensor cores multiply the previous one (``_fwd_block_loop_overlapped``).

Decode (few query rows, long KV): split-KV flash-decoding. The G·Sq query rows of one KV head are
packed into tiles of up to 64 rows, so K and V are read once per KV head and row tile, not once
per query head; the KV length is cut into splits that run as separate programs, each writing a
partial out and lse, and a combine kernel merges them with weights 2^(lse_split − lse). Chosen
from the shapes (``decode_splits``): for decoding, and for longer chunks on a long cache when the
ordinary grid would leave the GPU idle.

FLOPs (matrix work only): forward 4·B·Hq·Sq·Skv·D, halved for causal Sq == Skv; backward 2.5×
forward (five matrix products instead of two). Bytes for decode (memory-bound): K and V read
once, 2·B·Hk·Skv·D·elem, plus q and out.
"""

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ._launch import cdiv, grid_of, next_power_of_2, on_tensor_device, persistent_programs

_LOG2E = 1.4426950408889634
# Read once, as triton.jit itself does when it decorates: the interpreter takes one autotuning
# config only (docs/testing.md, "The interpreter") and runs faster on small tiles.
_INTERPRET = interpreting()
# LLAMA_FAST_AUTOTUNE=0 keeps the first config of each kernel that the device can run (_Pruner): the
# GPU test run uses it, where dozens of test shapes would each pay for autotuning and the bench
# measures the tuned kernels.
_AUTOTUNE = os.environ.get("LLAMA_FAST_AUTOTUNE", "1") != "0"


# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture: 90 is Hopper (sm_90a); 80 serves
# every other GPU (Ampere and later without Hopper's instructions). Each list holds only tiles that
# compile without a register spill at head_dim 64 and 128 (python -m bench audit, which counts
# spills from ptxas's STACK as well as LOCAL and from STL/LDL in the SASS). Dropped by that count on
# 2026-11-30: forward (128, 64, 4, 3) (136 B spilled on sm_90a, 384 B on sm_80) and (128, 128, 8, 3)
# on sm_80 (56 B); every dK/dV tile with BLOCK_M x BLOCK_N above 32 x 64 once the kernel also
# accumulated the atomic dQ tile and gained its unmasked second loop (e.g. (64, 64, 8, 2): 168 B on
# sm_90a at head_dim 128), and (32, 64, 8, 2) on sm_80 (24 B at head_dim 64). dK/dV tiles must be
# spill-free with and without ATOMIC_DQ. Shared memory is not part of the lists: the pruner reads it
# from each compiled config and drops what the device cannot hold (fp32, head_dim 256).
# BLOCK_M a multiple of 64 per warpgroup (4 warps) lets the forward's tl.dot lower to wgmma.
# dK/dV on sm_90a: Triton gives a product that feeds another product (Sᵀ, dPᵀ) warpsPerCTA =
# [num_warps, 1], 16 rows per warp, so BLOCK_N must be 16 x num_warps keys (64 on 4 warps, 128 on 8):
# with 64 keys on 8 warps both warpgroups computed the same Sᵀ and dPᵀ (bench audit: 1.4-1.5x
# the algorithm's FLOPs per iteration, 2026-12-02), a tile the audit now fails. On sm_80,
# (16, 64, 4, 1) spills with the atomic dQ at head_dim 128 (16 B), so autotuning skips it there
# (_DKDV_VARIANT_SPILLS). The first tile of a list is what LLAMA_FAST_AUTOTUNE=0 runs where it fits.
_FWD_TILES = {90: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
              80: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]}
_BWD_DKDV_TILES = {90: [(32, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 1)],
                   80: [(16, 64, 4, 1), (16, 64, 8, 2), (32, 64, 8, 1)]}
_DQ_TILES = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
_BWD_DQ_TILES = {90: _DQ_TILES, 80: _DQ_TILES}
# Tiles of a list that spill in one variant of the kernel only, by (arch, USE_TMA, ATOMIC_DQ, VARLEN),
# counted at head_dim 128 with 16-bit inputs (2026-12-02, Triton 3.8): on sm_90a the dK/dV kernel
# without the atomic dQ (the only kind there at head_dim 128) spills 8 B at 32 x 128 and 120 B at
# 32 x 64 on 4 warps when it reads Q and dO through pointers, and 16 B and 8 B with packed sequences
# (VARLEN: per-sequence offsets and lengths) through descriptors; on sm_80, (16, 64, 4, 1) spills 16 B
# with the atomic dQ.
_SM90_DKDV_SPILLS = {(32, 128, 8, 2), (32, 64, 4, 2)}
#
# The pointer path on sm_90a (USE_TMA=False: fp32 inputs, and 16-bit ones whose base pointer or
# strides break TMA's 16-byte rule) has its own spills, counted by the audit's "pointer" cases
# (python -m bench audit; Llama-3-8B / 70B shapes at head_dim 128, SmolLM2's at 64; bf16 "unaligned"
# is a view whose base pointer is one element off 16 bytes; 2026-12-03, Triton 3.8). A key with a
# fifth element, "fp32" or "16-bit", applies to those inputs only and, like _BWD_DKDV_POINTER_TILES, up to
# head_dim 128 (_Pruner; wider heads keep their choice). Registers, stack bytes, STL+LDL:
#   forward 128 x 128 / 8 warps / 2 stages: 255, 32 B, 15 with unaligned bf16 at head_dim 128 (16 B, 7
#       with packed sequences; 8 B, 2 for aligned bf16 forced onto the pointer path); the other
#       forward tiles are clean (128 x 64 / 8 / 3: 246 registers, no spill), so the pointer path on
#       sm_90a drops it (_FWD_VARIANT_SPILLS). At head_dim 64 it was clean (187) but is dropped too:
#       the lists are per variant, not per head size.
#   dK/dV 16 x 64 / 4 / 1, the one tile the pointer path had left at head_dim 128: 255, 408 B, 314 in
#       fp32 (512 B, 243 packed) and 64 B, 45 for unaligned bf16 with packed sequences; at head_dim 64
#       with the atomic dQ, 64 B, 30 in fp32 packed, and 32 x 128 / 8 / 2 56 B, 27 and 32 x 64 / 4 / 2
#       128 B, 77 in fp32. The pointer path on sm_90a gains 16 x 128 / 8 / 2 (_BWD_DKDV_POINTER_TILES):
#       as many keys per warp (16, so no duplicated Sᵀ/dPᵀ work, multiple 1.0) on twice the threads,
#       clean where 16 x 64 spills (255 registers, no spill, fp32 at head_dim 128 dense and packed;
#       unaligned bf16 packed: 255, none); unaligned bf16 dense keeps 16 x 64 (255, none), where
#       16 x 128 spills 8 B, 3. With the atomic dQ in fp32 at head_dim 64 it spills too (16 B, 8), so
#       fp32 packed sequences at head_dim 64 take the dQ kernel there (attention_bwd).
#   dQ 64 x 64 / 4 / 3: 255, 40 B, 14 in fp32 at head_dim 128 (4 / 2 stages: 40 B, 16); its other
#       tiles are clean (128 x 32 / 8 / 3: 178 registers).
_DKDV_VARIANT_SPILLS = {(90, False, False, False): _SM90_DKDV_SPILLS, (90, False, False, True): _SM90_DKDV_SPILLS,
                        (90, True, False, True): _SM90_DKDV_SPILLS,
                        (90, False, False, False, "fp32"): {(16, 64, 4, 1)},
                        (90, False, False, False, "16-bit"): {(16, 128, 8, 2)},
                        (90, False, False, True, "fp32"): {(16, 64, 4, 1)},
                        (90, False, False, True, "16-bit"): {(16, 64, 4, 1)},
                        (90, False, True, False, "fp32"): {(32, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2)},
                        (90, False, True, True, "fp32"): {(32, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2)},
                        (80, False, True, False): {(16, 64, 4, 1)}, (80, False, True, True): {(16, 64, 4, 1)}}
# Triton 3.6 (the lent H200's) spills where 3.8 does not, in one place: the TMA path's 32 x 128 / 8 / 2
# dK/dV tile without the atomic dQ (the kind Hopper runs at head_dim 128) takes 16 B of stack and 8
# STL/LDL per thread (255 registers) at Llama-3-8B and 70B heads; 32 x 64 / 4 / 2 and 16 x 64 / 4 / 1 stay
# clean (python -m bench audit under each Triton, 2026-12-02). Under 3.6 it is dropped for that variant,
# so LLAMA_FAST_AUTOTUNE=0 starts at 32 x 64; the variant's head_dim 64 (deterministic mode) loses it too.
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8):
    _DKDV_VARIANT_SPILLS[(90, True, False, False)] = {(32, 128, 8, 2)}
_FWD_VARIANT_SPILLS = {(90, False, False, False): {(128, 128, 8, 2)}, (90, False, False, True): {(128, 128, 8, 2)}}
_DQ_VARIANT_SPILLS = {(90, False, False, False, "fp32"): {(64, 64, 4, 3)},
                      (90, False, False, True, "fp32"): {(64, 64, 4, 3)}}
# A sliding window (HAS_WINDOW) adds a loop over the key blocks that cross the window's lower edge, and
# with it live registers: at Llama-3-8B heads (head_dim 128, bf16) the forward's 128 x 64 / 8 / 3 spills
# 40 B on sm_80, the dK/dV kernel's 32 x 128 / 8 / 2 without the atomic dQ 16 B on sm_90a (TMA) and its
# 16 x 64 / 4 / 1 8 B on sm_80, and the dQ kernel's 128 x 64 / 8 / 3 16 B on sm_80 (python -m bench audit,
# "attention window" cases, Triton 3.8, 2026-12-03); so do, on sm_80, SmolLM2's (head_dim 64) dK/dV
# 32 x 64 / 8 / 1 with the atomic dQ (8 B), and through pointers on sm_90a the dQ kernel's 64 x 32 / 4 / 2
# in fp32 and 64 x 64 / 4 / 3 in unaligned bf16 (16 B each); the variants' other tiles are clean. A key
# ending in "window" applies to windowed launches only (_Pruner).
_FWD_VARIANT_SPILLS |= {(80, False, False, False, "window"): {(128, 64, 8, 3)},
                        (80, False, False, True, "window"): {(128, 64, 8, 3)}}
_DKDV_VARIANT_SPILLS |= {(90, True, False, False, "window"): {(32, 128, 8, 2)},
                         (90, True, False, True, "window"): {(32, 128, 8, 2)},
                         (80, False, False, False, "window"): {(16, 64, 4, 1)},
                         (80, False, False, True, "window"): {(16, 64, 4, 1)},
                         (80, False, True, False, "window"): {(32, 64, 8, 1)},
                         (80, False, True, True, "window"): {(32, 64, 8, 1)}}
_DQ_VARIANT_SPILLS |= {(80, False, False, False, "window"): {(128, 64, 8, 3)},
                       (80, False, False, True, "window"): {(128, 64, 8, 3)},
                       (90, False, False, False, "fp32", "window"): {(64, 32, 4, 2)},
                       (90, False, False, True, "fp32", "window"): {(64, 32, 4, 2)},
                       (90, False, False, False, "16-bit", "window"): {(64, 64, 4, 3)},
                       (90, False, False, True, "16-bit", "window"): {(64, 64, 4, 3)}}
# Gemma 2's soft-cap (HAS_SOFTCAP) holds a σ per score, and its slope through the backward's products:
# at Llama-3-8B heads (head_dim 128, bf16, TMA) on sm_90a the forward's 128 x 128 / 8 / 2 spills 72 B
# (64 B with a window), and with a window too the dK/dV kernel's 32 x 64 / 4 / 2 8 B; on sm_80 the dK/dV
# kernel without the atomic dQ (deterministic mode) spills 8 B at 16 x 64 / 4 / 1 (python -m bench audit,
# "attention softcap" cases, Triton 3.8, 2026-12-04); the packed-sequence variants (VARLEN), which hold
# more, drop the same tiles. Through pointers on sm_90a (the "pointer" cases), the dQ kernel's 64 x 64 / 4 / 3
# spills 8 B with unaligned bf16, as it does with a window.
_DQ_VARIANT_SPILLS |= {(90, False, False, False, "16-bit", "softcap"): {(64, 64, 4, 3)},
                       (90, False, False, True, "16-bit", "softcap"): {(64, 64, 4, 3)}}
_FWD_VARIANT_SPILLS |= {(90, True, False, False, "softcap"): {(128, 128, 8, 2)},
                        (90, True, False, True, "softcap"): {(128, 128, 8, 2)}}
_DKDV_VARIANT_SPILLS |= {(90, True, False, False, "softcap", "window"): {(32, 64, 4, 2)},
                         (90, True, False, True, "softcap", "window"): {(32, 64, 4, 2)},
                         (80, False, False, False, "softcap"): {(16, 64, 4, 1)},
                         (80, False, False, True, "softcap"): {(16, 64, 4, 1)}}
# Tiles the pointer path (USE_TMA=False) chooses from instead of the architecture's list, where given:
# the sm_90a dK/dV list and 16 x 128 / 8 / 2, last so that LLAMA_FAST_AUTOTUNE=0 keeps 16 x 64 where it
# fits (unaligned 16-bit inputs, dense sequences).
_BWD_DKDV_POINTER_TILES = {90: _BWD_DKDV_TILES[90] + [(16, 128, 8, 2)]}


def _tile(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(tiles: dict[int, list[tuple[int, int, int, int]]], interpreted: tuple[int, int],
             fallback: tuple[tuple[int, int, int, int], ...]) -> list[triton.Config]:
    """Autotuning configs: every architecture's tiles and the fallback tiles (``_Pruner`` keeps the
    device's, and with LLAMA_FAST_AUTOTUNE=0 the first of them that fits). The interpreter accepts
    only one config; its blocks are small so short test sequences still cross blocks."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": interpreted[0], "BLOCK_N": interpreted[1]}, num_warps=4, num_stages=1)]
    every = list(dict.fromkeys([t for arch_tiles in tiles.values() for t in arch_tiles] + list(fallback)))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every]


@functools.cache
def _arch(device_index: int) -> int:
    """90 on Hopper (sm_90), 80 on every other GPU: the key of the tile lists."""
    return 90 if torch.cuda.get_device_capability(device_index) == (9, 0) else 80


# The most shared memory one block may use, per architecture key, for the ahead-of-time audit (on
# a GPU the device's own limit is read): sm_90 232,448 B; "80" covers every GPU that is not Hopper,
# and the A100's 166,912 B is the largest of them (sm_86/89 allow 101,376: there the launch-time
# check drops what does not fit).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}


@functools.cache
def _device_shared_limit(device_index: int) -> int:
    """The most dynamic shared memory one block may use on this GPU: the opt-in limit Triton checks
    when it loads a kernel (raising OutOfResources above it)."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _no_benchmark(kernel_call, quantiles=None, **kwargs):
    """The autotuner's timing function under LLAMA_FAST_AUTOTUNE=0, where the pruner leaves one config:
    Triton 3.8 launches a single pruned config without timing it, but 3.6 (the lent H200's) times
    it anyway, a synchronising benchmark at every new key of a test run for a choice already made."""
    return [0.0, 0.0, 0.0] if quantiles else 0.0


class _Pruner:
    """The autotuner's early prune for one kernel, in three steps.

    1. The tiles of the device's architecture (or of ``target_arch``, which the ahead-of-time audit
       passes), less those that spill in this launch's variant; for heads wider than 128, small
       tiles only, which they need to stay in registers.
    2. Of those, the configs whose compiled kernel fits the block's shared memory. The interpreter
       never checks it, and on the GPU Triton raises OutOfResources at launch. What a config needs
       moves with the head size, the dtype and the load path (the forward's first tile asks 262,144 B
       in fp32 at head_dim 128, over Hopper's 232,448), so it is read from the compiled kernel: on a
       GPU by compiling for the device (``warmup``: the compile the launch or the autotuner does
       anyway, cached by Triton), in the audit by ``shared_bytes``, its compile for ``target_arch``.
       When none fits, the ``fallback`` tiles that do: small and slow, for the shapes no tuned tile
       serves (fp32 at head_dim 256 needs 262,272 B in the dK/dV kernel's smallest listed tile).
    3. With LLAMA_FAST_AUTOTUNE=0, the first config left.

    ``kernel`` is the JIT function, set once it is defined.
    """

    def __init__(self, tiles: dict[int, list[tuple[int, int, int, int]]], variant_spills: dict | None = None,
                 fallback: tuple[tuple[int, int, int, int], ...] = (),
                 pointer_tiles: dict[int, list[tuple[int, int, int, int]]] | None = None):
        self.tiles, self.variant_spills, self.fallback, self.kernel = tiles, variant_spills or {}, fallback, None
        self.pointer_tiles = pointer_tiles or {}

    def __call__(self, configs, named_args, target_arch: int | None = None, shared_bytes=None, **kwargs):
        def arg(name):
            return named_args.get(name, kwargs.get(name))

        device = named_args["q_ptr"].device
        if target_arch is None:
            target_arch = _arch(device.index or 0)
        variant = (target_arch, bool(arg("USE_TMA")), bool(arg("ATOMIC_DQ")), bool(arg("VARLEN")))
        spilling = set(self.variant_spills.get(variant, ()))
        # A sliding window's loop and the soft-cap's σ hold more registers: keys ending in "softcap",
        # "window" or both ("softcap", "window") apply to launches with those switches on.
        extras = tuple(name for name, flag in (("softcap", "HAS_SOFTCAP"), ("window", "HAS_WINDOW")) if arg(flag))
        suffixes = [(extra,) for extra in extras] + ([extras] if len(extras) > 1 else [])
        # The pointer path's own lists and spills (5-tuple keys) were counted at head_dim 64 and 128; wider
        # heads keep the choice they had (step 1's small tiles).
        counted = (arg("BLOCK_D") or 0) <= 128
        element = "fp32" if named_args["q_ptr"].dtype == torch.float32 else "16-bit"
        if counted:
            spilling |= self.variant_spills.get((*variant, element), set())
        for suffix in suffixes:
            spilling |= self.variant_spills.get((*variant, *suffix), set())
            if counted:
                spilling |= self.variant_spills.get((*variant, element, *suffix), set())
        pointer = not arg("USE_TMA") and counted and target_arch in self.pointer_tiles
        tiles = self.pointer_tiles if pointer else self.tiles
        allowed = [t for t in tiles.get(target_arch, self.tiles[80]) if t not in spilling]
        fallback = [c for c in configs if _tile(c) in self.fallback and _tile(c) not in allowed]
        kept = [c for c in configs if _tile(c) in allowed] or configs[:1]
        if (arg("BLOCK_D") or 0) > 128 and len(kept) > 1:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or kept[:1]
        limit = SHARED_MEMORY_LIMIT[target_arch]
        if shared_bytes is None and device.type == "cuda":
            launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            limit = _device_shared_limit(device.index if device.index is not None else torch.cuda.current_device())

            def shared_bytes(config):
                return self.kernel.warmup(**named_args, **launch, **config.all_kwargs(), grid=(1,)).metadata.shared

        if shared_bytes is not None:
            needs = [(config, shared_bytes(config)) for config in kept]
            kept = [config for config, need in needs if need <= limit]
            if not kept:
                needs += [(config, shared_bytes(config)) for config in fallback]
                kept = [config for config, need in needs if need <= limit]
            if not kept:
                raise RuntimeError(
                    f"llama_fast: no tile of {self.kernel.__name__} fits the {limit:,} bytes of shared memory a block "
                    f"may use at head_dim {arg('HEAD_DIM')} in {named_args['q_ptr'].dtype} (the smallest tile needs "
                    f"{min(need for _, need in needs):,}): the tile lists in kernels/attention.py need a smaller one")
        return kept if _AUTOTUNE else kept[:1]


# Fallback tiles (_Pruner, step 2), for shapes whose every listed tile overflows shared memory: at
# fp32 and head_dim 256 these need 69,632 B (forward), 98,304 (dK/dV) and 131,072 (dQ, 32 x 32) on
# sm_90a and sm_80, without spills (python -m bench audit, 2026-12-02).
_FWD_FALLBACK = ((32, 32, 4, 1),)
_BWD_DKDV_FALLBACK = ((16, 16, 4, 1),)
_BWD_DQ_FALLBACK = ((32, 32, 4, 1), (16, 16, 4, 1))
_FWD_CONFIGS = _configs(_FWD_TILES, (16, 16), _FWD_FALLBACK)
_BWD_DKDV_CONFIGS = _configs({**_BWD_DKDV_TILES, "pointer": _BWD_DKDV_POINTER_TILES[90]}, (16, 16), _BWD_DKDV_FALLBACK)
_BWD_DQ_CONFIGS = _configs(_BWD_DQ_TILES, (16, 16), _BWD_DQ_FALLBACK)
_FWD_PRUNER = _Pruner(_FWD_TILES, _FWD_VARIANT_SPILLS, fallback=_FWD_FALLBACK)
_DKDV_PRUNER = _Pruner(_BWD_DKDV_TILES, _DKDV_VARIANT_SPILLS, fallback=_BWD_DKDV_FALLBACK,
                       pointer_tiles=_BWD_DKDV_POINTER_TILES)
_DQ_PRUNER = _Pruner(_BWD_DQ_TILES, _DQ_VARIANT_SPILLS, fallback=_BWD_DQ_FALLBACK)
_BENCH = None if _AUTOTUNE else _no_benchmark  # None: Triton's own timing
# cache_results=True on the autotuners: the timings of each tuning key are kept in Triton's disk cache
# (keyed on Triton's version, the target, the kernel's source and the configs left), so a process
# tunes only the shapes no earlier one on the machine tuned, and bench/gpu.sh can carry the results
# from one lent GPU to the next (docs/gpu-run.md).
# What changes the best tile: the lengths (power-of-two buckets, so a growing KV cache does not
# retune every token), batch x query heads (power-of-two buckets: with the lengths, the grid, and so
# how well a tile fills the SMs), the GQA group (how many query heads share a K/V tile), the head
# size, the masks.
_TUNE_KEY = ["q_len_bucket", "kv_len_bucket", "heads_bucket", "group", "HEAD_DIM", "CAUSAL", "HAS_PAD", "HAS_WINDOW",
             "HAS_SOFTCAP"]


@triton.jit
def _head_source(base, rows, stride_s, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """Where the inner loops read one head's (rows, HEAD_DIM) matrix from: with USE_TMA a 2-D tensor
    descriptor (any batch and head strides; the host checks TMA's 16-byte alignment; rows past
    ``rows`` and columns past HEAD_DIM read as zeros), else the head's base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_s, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _fwd_scores(q, k_src, start_n, offs_n, offs_d, kv_len, stride_k_s, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """q·k_jᵀ for the key block at start_n (unscaled). K comes from a tensor descriptor (USE_TMA:
    Hopper's bulk copies, rows past kv_len read as zeros) or from a pointer to the head."""
    if USE_TMA:
        k = k_src.load([start_n, 0])
    else:
        cols = start_n + offs_n
        kv_tile = (cols < kv_len)[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_src + cols[:, None] * stride_k_s + offs_d[None, :], mask=kv_tile, other=0.0)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _fwd_values(v_src, start_n, offs_n, offs_d, kv_len, stride_v_s, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """The V block at start_n, read as ``_fwd_scores`` reads K."""
    if USE_TMA:
        return v_src.load([start_n, 0])
    else:
        cols = start_n + offs_n
        kv_tile = (cols < kv_len)[:, None] & (offs_d[None, :] < HEAD_DIM)
        return tl.load(v_src + cols[:, None] * stride_v_s + offs_d[None, :], mask=kv_tile, other=0.0)


@triton.jit
def _softcap(qk, cap_scale):
    """(tanh(x), 1 − tanh²(x)) at x = cap_scale·qk, through g = σ(2x): tanh = 2g − 1 and its slope
    4g(1 − g). The forward keeps the first (the compiler drops the second); the backward scales dS
    by the second. Where tanh nears ±1 both carry fp32's absolute error (about 1e-7). One σ
    (an EX2 and a reciprocal) more per score than without the cap."""
    g = tl.sigmoid(2.0 * cap_scale * qk)
    return 2.0 * g - 1.0, 4.0 * g * (1.0 - g)


@triton.jit
def _fwd_softmax(qk, m_i, l_i, pad_base, start_n, offs_n, offs_m, offset, kv_len, window, qk_scale, cap_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr):
    """One online-softmax step on the scores of the key block at start_n: (p, alpha, m_new, l_new)
    with p = 2^(s2·qk − m_new), alpha = 2^(m_old − m_new) the factor that brings the accumulator to
    the new max, l_new = alpha·l + Σ_j p. MASKED adds the bounds and causal masks (and, with
    HAS_WINDOW, the window's lower edge); blocks wholly below the diagonal, inside the window and
    inside Skv skip them.

    The scale is applied inside the exponent, 2^(s2·qk − m), one FFMA per score, with m the running
    maximum of s2·qk (taken on the unscaled scores: s2 > 0, checked by the caller).

    HAS_SOFTCAP (Gemma 2's cap·tanh(scale·qk / cap)): the scores become tanh(cap_scale·qk) before the
    masks (tanh(−∞) would be −1), with cap_scale = scale / cap and the cap folded into s2."""
    if HAS_SOFTCAP:
        qk, _ = _softcap(qk, cap_scale)
    cols = start_n + offs_n
    if MASKED:
        visible = (cols < kv_len)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > offs_m[:, None] + offset - window)
        qk = tl.where(visible, qk, float("-inf"))
    if HAS_PAD:
        real = tl.load(pad_base + cols, mask=cols < kv_len, other=0) != 0
        qk = tl.where(real[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED or HAS_PAD:
        # A row with no visible key yet has m = −∞: subtract 0 instead so 2^(−∞ − m) stays 0, not NaN.
        # Unmasked blocks without padding show every row at least one finite score.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = tl.math.exp2(m_i - m_new_safe)
    p = tl.math.exp2(qk * qk_scale - m_new_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_block_loop(
    acc, l_i, m_i, q, k_src, v_src, pad_base,
    lo, hi, offs_m, offs_d, offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi), one block after the other: scores, softmax, P·V.
    The decode kernel's loop, and the forward's where it does not overlap (OVERLAP in ``_attn_fwd_kernel``)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        qk = _fwd_scores(q, k_src, start_n, offs_n, offs_d, kv_len, stride_k_s, HEAD_DIM, USE_TMA)
        p, alpha, m_i, l_i = _fwd_softmax(qk, m_i, l_i, pad_base, start_n, offs_n, offs_m, offset, kv_len,
                                          window, qk_scale, cap_scale, MASKED, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP)
        v = _fwd_values(v_src, start_n, offs_n, offs_d, kv_len, stride_v_s, HEAD_DIM, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_i


@triton.jit
def _fwd_block_loop_overlapped(
    acc, l_i, m_i, q, k_src, v_src, pad_base,
    lo, hi, offs_m, offs_d, offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """The online softmax of ``_fwd_block_loop`` over key blocks [lo, hi), software-pipelined by one
    block so that the exponentials of one block issue while the tensor cores multiply another (the
    "intra-warpgroup" overlap of FlashAttention-3). The iteration for block j issues S_j = q·k_jᵀ and
    waits for it, issues acc·alpha_{j−1} + P_{j−1}·V_{j−1}, and only then computes the softmax of
    S_j: Triton leaves that product in flight (its result is next read after the following
    iteration's wait, which wgmma's in-order completion makes wait for it too), so the MUFU.EX2 work
    runs under it. The first block's scores and softmax come before the loop, the last block's P·V
    after it. Where the one-block-at-a-time loop waits for S_j right after issuing P_{j−1}·V_{j−1},
    wait → HGMMA → EX2 → HGMMA in lockstep, with no EX2 under a product (``python -m bench audit``,
    ``ex2_under_hgmma``: 0 before, every EX2 of the 128 x 128 tile after, 2026-12-02, Triton 3.8/3.6).

    The loop sits in an ``if`` of its own: the wait Triton puts after it holds the shared-memory
    operands of every product the loop's inputs came from, and with the first block's scores in
    the same block that kept their K buffer alive through the loop (164,864 -> 197,632 B at
    128 x 128, head_dim 128); a one-block range (the causal diagonal) also skips the loop set-up.

    The accumulator is rescaled every block. FlashAttention-4's lazy rescale (move a row's max
    only when it grows by more than log2 256 = 8, exact since the final normalisation divides by
    a sum taken against the same stale max) needs a branch uniform over the tile, which Triton
    gives only through a block-wide max and a barrier: at 128 x 128, head_dim 128, it made the loop
    516 instructions (490 without), 2 more barriers per iteration and 62 of 66 EX2 under a product;
    a skipped rescale saves its 64 FMUL, so an iteration without one runs about 452, and at 128 x 64
    nothing is saved (363 against 334, less 32 FMUL). Not kept (2026-12-02).

    Not warp-specialized: ``tl.range(..., warp_specialize=True)`` on the one-block loop aborted in
    Triton 3.8's NVGPUWarpSpecialization pass on 2026-11-30, compiled to the same SASS as without
    it on 2026-12-02, and still aborts there in Triton 3.6 (the lent H200's) for the (64, 64) tile."""
    offs_n = tl.arange(0, BLOCK_N)
    if lo < hi:
        qk = _fwd_scores(q, k_src, lo, offs_n, offs_d, kv_len, stride_k_s, HEAD_DIM, USE_TMA)
        p, alpha, m_i, l_i = _fwd_softmax(qk, m_i, l_i, pad_base, lo, offs_n, offs_m, offset, kv_len,
                                          window, qk_scale, cap_scale, MASKED, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP)
        if lo + BLOCK_N < hi:
            for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
                qk = _fwd_scores(q, k_src, start_n, offs_n, offs_d, kv_len, stride_k_s, HEAD_DIM, USE_TMA)
                v = _fwd_values(v_src, start_n - BLOCK_N, offs_n, offs_d, kv_len, stride_v_s, HEAD_DIM, USE_TMA)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                p, alpha, m_i, l_i = _fwd_softmax(qk, m_i, l_i, pad_base, start_n, offs_n, offs_m, offset, kv_len,
                                                  window, qk_scale, cap_scale, MASKED, CAUSAL, HAS_PAD, HAS_WINDOW,
                                                  HAS_SOFTCAP)
        acc = acc * alpha[:, None]
        last = lo + (hi - lo - 1) // BLOCK_N * BLOCK_N
        v = _fwd_values(v_src, last, offs_n, offs_d, kv_len, stride_v_s, HEAD_DIM, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_src, v_src, pad_base,
    lo, hi, offs_m, offs_d, offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr, OVERLAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Key blocks [lo, hi) through ``_fwd_block_loop_overlapped`` (OVERLAP) or ``_fwd_block_loop``."""
    if OVERLAP:
        acc, l_i, m_i = _fwd_block_loop_overlapped(acc, l_i, m_i, q, k_src, v_src, pad_base, lo, hi, offs_m, offs_d,
                                                   offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
                                                   HEAD_DIM, BLOCK_N, MASKED, CAUSAL, HAS_PAD, USE_TMA, HAS_WINDOW,
                                        HAS_SOFTCAP)
    else:
        acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, k_src, v_src, pad_base, lo, hi, offs_m, offs_d,
                                        offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
                                        HEAD_DIM, BLOCK_N, MASKED, CAUSAL, HAS_PAD, USE_TMA, HAS_WINDOW,
                                        HAS_SOFTCAP)
    return acc, l_i, m_i


@triton.jit
def _valid_keys(kv_len, kv_lens_ptr, b, HAS_KV_LENS: tl.constexpr):
    """The keys batch row b attends over: the first kv_lens[b] of the buffer when the lengths live on
    the device (a static KV cache, filled up to there), clamped to the buffer; else all kv_len."""
    if HAS_KV_LENS:
        return tl.minimum(tl.maximum(tl.load(kv_lens_ptr + b), 0), kv_len)
    else:
        return kv_len


@triton.jit
def _sequence(cu_ptr, b, rows, VARLEN: tl.constexpr):
    """(slice, first row, length) of batch entry b. Dense: its own batch slice b, from row 0, all
    ``rows``. Packed (VARLEN): every sequence lies in slice 0 of a (1, H, total, D) view, from row
    cu[b] for cu[b + 1] − cu[b] rows; the bounds are clamped to the ``rows`` the buffer has, so a
    bad cu_seqlens can make a wrong answer (the host checks it) but never an out-of-bounds access."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), rows)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), rows)
        return 0, start.to(tl.int64), end - start
    else:
        return b, 0, rows


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """Normalised output and base-2 lse; rows that saw no key give zeros and lse = +∞."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    return out, lse


@triton.autotune(configs=_FWD_CONFIGS, key=[*_TUNE_KEY, "USE_TMA", "HAS_KV_LENS", "VARLEN"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNER}, do_bench=_BENCH,
                 cache_results=True)
@triton.jit
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pad_ptr, kv_lens_ptr, cu_q_ptr, cu_k_ptr,
    # sizes
    q_heads, group, q_len, kv_len, q_len_bucket, kv_len_bucket, heads_bucket,
    # strides (elements; unit stride along D)
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_s,
    stride_pad_b,
    # parameters
    qk_scale, window, cap_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch x query head, query block). The grid's first axis is the heads, its
    second the query blocks in reverse, so the GPU starts the longest causal rows (the last query
    blocks, which see the most keys) first and the short ones fill the tail. VARLEN: "batch" is a
    packed sequence and the grid spans the longest one; the programs past a shorter one's end
    return at once."""
    bh = tl.program_id(0).to(tl.int64)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = bh // q_heads
    h = bh % q_heads
    kv_h = h // group
    rows = q_len
    sq, q_start, q_len = _sequence(cu_q_ptr, b, q_len, VARLEN)
    sk, k_start, kv_len = _sequence(cu_k_ptr, b, kv_len, VARLEN)
    if VARLEN:
        if start_m >= q_len:
            return
    kv_len = _valid_keys(kv_len, kv_lens_ptr, b, HAS_KV_LENS)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < q_len
    tile = in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_src = _head_source(q_ptr + sq * stride_q_b + q_start * stride_q_s + h * stride_q_h, q_len, stride_q_s,
                         HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _head_source(k_ptr + sk * stride_k_b + k_start * stride_k_s + kv_h * stride_k_h, kv_len, stride_k_s,
                         HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _head_source(v_ptr + sk * stride_v_b + k_start * stride_v_s + kv_h * stride_v_h, kv_len, stride_v_s,
                         HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    if USE_TMA:
        q = q_src.load([start_m, 0])
    else:
        q = tl.load(q_src + offs_m[:, None] * stride_q_s + offs_d[None, :], mask=tile, other=0.0)
    pad_base = pad_ptr + b * stride_pad_b

    # Query i sees keys j <= i + offset. Keys below `full` are seen by every row of this block.
    offset = kv_len - q_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + offset), 0)
        full = tl.maximum(tl.minimum(start_m + offset + 1, kv_len), 0)
    else:
        hi = kv_len
        full = kv_len
    full = full // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # The overlapped loop pays where wgmma is asynchronous (sm_90a: the TMA path) and fits there up to
    # head_dim 128. Elsewhere it only costs registers (it holds a block's scores beside the previous
    # block's probabilities): on sm_80 the (128, 64) tile spilled 24 B at head_dim 128, on sm_90a the
    # (64, 64) tile 16 B at head_dim 256, and fp32's (128, 128) 24 B at head_dim 64 with no EX2 under
    # its products (2026-12-02, triton 3.8).
    OVERLAP: tl.constexpr = USE_TMA and BLOCK_D <= 128
    lo = 0
    if HAS_WINDOW:
        # Sliding window (causal only): query i also needs i + offset − j < window. The key blocks
        # before `lo` hold no key any row of this block sees, and are never read; the blocks in
        # [lo, inside) cross the window's lower edge and are masked; from `inside` on, every key is
        # within every row's window.
        lo = tl.maximum(start_m + offset - window + 1, 0) // BLOCK_N * BLOCK_N
        inside = tl.cdiv(tl.maximum(start_m + BLOCK_M + offset - window, 0), BLOCK_N) * BLOCK_N
        inside = tl.maximum(tl.minimum(inside, full), lo)  # lo <= full: a row sees its own diagonal key
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_src, v_src, pad_base, lo, inside, offs_m, offs_d,
                                    offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
                                    HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_PAD, USE_TMA, OVERLAP, HAS_WINDOW,
                                HAS_SOFTCAP)
        lo = inside
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_src, v_src, pad_base, lo, full, offs_m, offs_d,
                                offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
                                HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_PAD, USE_TMA, OVERLAP, HAS_WINDOW,
                                HAS_SOFTCAP)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_src, v_src, pad_base, full, hi, offs_m, offs_d,
                                offset, kv_len, window, stride_k_s, stride_v_s, qk_scale, cap_scale,
                                HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_PAD, USE_TMA, OVERLAP, HAS_WINDOW,
                                HAS_SOFTCAP)
    out, lse = _finish_rows(acc, l_i, m_i)
    tl.store(o_ptr + sq * stride_o_b + q_start * stride_o_s + h * stride_o_h + offs_m[:, None] * stride_o_s
             + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=tile)
    tl.store(lse_ptr + (sq * q_heads + h) * rows + q_start + offs_m, lse, mask=in_q)


@triton.jit
def _attn_decode_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pad_ptr, kv_lens_ptr,
    # sizes
    kv_heads, group, q_len, kv_len, split_len, n_splits,
    # strides (elements; unit stride along D)
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_s,
    stride_pad_b,
    # parameters
    qk_scale, window, cap_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
):
    """One program per (batch x KV head, split, row tile): BLOCK_R of the G·Sq query rows of the KV
    head against keys [first + split·split_len, first + (split + 1)·split_len), where ``first`` is 0,
    or with HAS_WINDOW the first key the window shows the earliest query (so the splits share out only
    the window's keys, and no program reads a key outside it). Writes a partial out and lse per row
    and split, (B, Hq, Sq, splits[, D]) fp32; FINAL (one split): the output itself, in o's dtype and
    layout, and the lse (B, Hq, Sq), so no combine kernel runs."""
    b_kv = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = b_kv // kv_heads
    kv_h = b_kv % kv_heads
    kv_len = _valid_keys(kv_len, kv_lens_ptr, b, HAS_KV_LENS)

    # Packed row r is query position r % Sq of query head kv_h·G + r // Sq.
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = r < group * q_len
    h = kv_h * group + r // q_len
    qi = r % q_len
    offs_d = tl.arange(0, BLOCK_D)
    tile = in_rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_q_b + h[:, None] * stride_q_h + qi[:, None] * stride_q_s + offs_d[None, :],
                mask=tile, other=0.0)

    lo = split * split_len
    if HAS_WINDOW:
        lo += tl.maximum(kv_len - q_len - window + 1, 0)
    hi = tl.minimum(lo + split_len, kv_len)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, k_ptr + b * stride_k_b + kv_h * stride_k_h,
                                    v_ptr + b * stride_v_b + kv_h * stride_v_h, pad_ptr + b * stride_pad_b,
                                    lo, hi, qi, offs_d, kv_len - q_len, kv_len, window, stride_k_s, stride_v_s,
                                    qk_scale, cap_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_PAD, False, HAS_WINDOW,
                                    HAS_SOFTCAP)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # A split a row sees nothing of weighs 2^(−∞) = 0 in the combine; a final row that sees nothing
    # has lse = +∞, as the combine and the ordinary forward write it (P = 0 in the backward).
    lse = tl.where(empty, float("inf") if FINAL else float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    # A partial's split is its innermost index but D; a final output has one split.
    o_rows = b * stride_o_b + h * stride_o_h + qi * stride_o_s + split * HEAD_DIM
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=tile)
    row = (b * kv_heads * group + h) * q_len + qi
    tl.store(lse_ptr + row * n_splits + split, lse, mask=in_rows)


@triton.jit
def _attn_decode_combine_kernel(
    # pointers
    o_part_ptr, lse_part_ptr, o_ptr, lse_ptr,
    # sizes
    q_heads, q_len, n_splits,
    # strides (elements)
    stride_o_b, stride_o_h, stride_o_s,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = Σ_s 2^(lse_s − lse) out_s with lse = log2 Σ_s 2^lse_s, one program per query row."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (q_heads * q_len)
    h = row // q_len % q_heads
    i = row % q_len
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    in_s = s < n_splits
    lse_s = tl.load(lse_part_ptr + row * n_splits + s, mask=in_s, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)
    total = tl.sum(w, 0)
    o_s = tl.load(o_part_ptr + (row * n_splits + s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=in_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    empty = total == 0.0
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("inf"), m_safe + tl.math.log2(tl.where(empty, 1.0, total)))
    tl.store(o_ptr + b * stride_o_b + h * stride_o_h + i * stride_o_s + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _attn_bwd_delta_kernel(
    # pointers
    o_ptr, do_ptr, delta_ptr,
    # sizes
    q_heads, q_len,
    # strides (elements)
    stride_o_b, stride_o_h, stride_o_s,
    stride_do_b, stride_do_h, stride_do_s,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """δ_i = Σ_d dO_id · O_id in fp32, (B, Hq, Sq) contiguous."""
    # One flat grid axis, (batch x heads) x row blocks: a packed batch's rows are (1, H, total, D),
    # and total / BLOCK_M can pass the 65,535 programs a second axis may hold.
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(q_len, BLOCK_M)
    bh = pid // row_blocks
    offs_m = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = bh // q_heads
    h = bh % q_heads
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < q_len
    tile = in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s + offs_d[None, :],
                mask=tile, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_s + offs_d[None, :],
                 mask=tile, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * q_len + offs_m, tl.sum(o * do, 1), mask=in_q)


@triton.jit
def _attn_bwd_kv_inner(
    dk, dv, k, v, key_ok, offs_n, offs_d,
    q_src, do_src, g, lse_base, delta_base, dq_base,
    lo, hi, q_len, offset, window, stride_q_s, stride_do_s, sm_scale, qk_scale, cap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TRANSPOSED: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """dK, dV of one key block over query blocks [lo, hi) of one query head; with ATOMIC_DQ also
    each block's share of dQ, added atomically to the fp32 accumulator at dq_base. MASKED applies
    the bounds and causal masks: the caller passes only the blocks that cross the diagonal or the
    last key block; below the diagonal a query past q_len has lse = +∞ and so P = 0 already.
    Q and dO come through tensor descriptors (USE_TMA) or pointers to the head."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < q_len
        q_tile = in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
        if USE_TMA:
            q = q_src.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_src.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = tl.load(q_src + offs_m[:, None] * stride_q_s + offs_d[None, :], mask=q_tile, other=0.0)
            do = tl.load(do_src + offs_m[:, None] * stride_do_s + offs_d[None, :], mask=q_tile, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)

        # Transposed tiles (keys × queries), so dK and dV accumulate without a transpose.
        s_t = tl.dot(k, tl.trans(q))
        if HAS_SOFTCAP:
            s_t, slope_t = _softcap(s_t, cap_scale)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            visible = key_ok[:, None] & in_q[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + offset)
                if HAS_WINDOW:
                    visible = visible & (offs_n[:, None] > offs_m[None, :] + offset - window)
            p_t = tl.where(visible, p_t, 0.0)
        elif HAS_PAD:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * slope_t
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        if ATOMIC_DQ:
            # The scale goes on the (keys x queries) dS tile before the cast, half the elements of the dQ tile.
            ds_t = (ds_t * sm_scale).to(k.dtype)
            if DQ_TRANSPOSED:
                # dQᵀ = Kᵀ·dSᵀ, (head dim x queries): its rows are the head dimension, which the warpgroups
                # split, so on sm_90a it is a wgmma; dQ = dS·K has BLOCK_M rows, fewer than 64 per
                # warpgroup, and Triton 3.8 lowers it to mma.sync there (HMMA, with layout conversions).
                dq_t = tl.dot(tl.trans(k), ds_t)
                tl.atomic_add(dq_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None], dq_t, mask=tl.trans(q_tile),
                              sem="relaxed")
            else:
                # On sm_80 the transposed tile's atomics come out scalar (RED.E.ADD.F32, not F32x4).
                dq = tl.dot(tl.trans(ds_t), k)
                tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=q_tile, sem="relaxed")
    return dk, dv


# reset_to_zero: autotuning runs each config several times, and atomic dQ additions must start
# from zero each time.
@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=[*_TUNE_KEY, "ATOMIC_DQ", "USE_TMA", "VARLEN"],
                 reset_to_zero=["dq_acc_ptr"],
                 prune_configs_by={"early_config_prune": _DKDV_PRUNER}, do_bench=_BENCH,
                 cache_results=True)
@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, pad_ptr, dq_acc_ptr, cu_q_ptr, cu_k_ptr,
    # sizes
    kv_heads, group, q_len, kv_len, q_len_bucket, kv_len_bucket, heads_bucket,
    # strides (elements; unit stride along D; dq_acc is contiguous (B, Hq, Sq, HEAD_DIM), like lse and delta)
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_do_b, stride_do_h, stride_do_s,
    stride_dk_b, stride_dk_h, stride_dk_s,
    stride_dv_b, stride_dv_h, stride_dv_s,
    stride_pad_b,
    # parameters
    sm_scale, qk_scale, window, cap_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DQ_TRANSPOSED: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one KV block, summed over all query blocks of the G query heads of its group; with
    ATOMIC_DQ, dQ too (five matrix products per block pair instead of seven with the dQ kernel).
    VARLEN: "batch" is a packed sequence; programs past its last key return at once."""
    b_kv = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    b = b_kv // kv_heads
    kv_h = b_kv % kv_heads
    rows = q_len
    sq, q_start, q_len = _sequence(cu_q_ptr, b, q_len, VARLEN)
    sk, k_start, kv_len = _sequence(cu_k_ptr, b, kv_len, VARLEN)
    if VARLEN:
        if start_n >= kv_len:
            return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_kv = offs_n < kv_len
    kv_tile = in_kv[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Each sequence's start goes into the scalar base pointers, so the per-row offsets stay 32-bit
    # vectors (int64 ones cost the VARLEN kernel a 48-byte spill at 32 x 64 on sm_90a).
    k = tl.load(k_ptr + sk * stride_k_b + k_start * stride_k_s + kv_h * stride_k_h + offs_n[:, None] * stride_k_s
                + offs_d[None, :], mask=kv_tile, other=0.0)
    v = tl.load(v_ptr + sk * stride_v_b + k_start * stride_v_s + kv_h * stride_v_h + offs_n[:, None] * stride_v_s
                + offs_d[None, :], mask=kv_tile, other=0.0)
    key_ok = in_kv
    if HAS_PAD:
        key_ok = key_ok & (tl.load(pad_ptr + b * stride_pad_b + offs_n, mask=in_kv, other=0) != 0)

    # Query blocks [q_lo, q_full) cross the causal diagonal (query i sees key j iff j <= i + offset)
    # and are masked; from q_full on, every query sees every key of the block. The last key block
    # is masked throughout: its rows past kv_len hold zeros, whose P need not be small.
    offset = kv_len - q_len
    q_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    q_lo = 0
    q_full = 0
    if CAUSAL:
        q_lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        q_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, q_end)
        q_full = tl.maximum(q_full, q_lo)
    if start_n + BLOCK_N > kv_len:
        q_full = q_end
    q_inside = q_end
    q_stop = q_end
    if HAS_WINDOW:
        # Query i sees key j only while i + offset − j < window: no query from q_stop on sees a key of
        # this block (those blocks are never read), the rows below q_inside see all of its keys from
        # the window's side, and the blocks in [q_inside, q_stop) cross the window's edge (masked).
        q_stop = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset + window, 0), BLOCK_M) * BLOCK_M, q_end)
        q_full = tl.minimum(q_full, q_stop)
        q_inside = tl.maximum(tl.minimum(tl.maximum(start_n - offset + window, 0) // BLOCK_M * BLOCK_M, q_stop),
                              q_full)
        if not USE_TMA:
            # Through pointers one masked loop over all of [q_lo, q_stop) (the loops below): three loops
            # held enough addresses to spill the 16 x 64 tile, the only one the pointer path has left
            # there (8 B at head_dim 128 for unaligned bf16; python -m bench audit, Triton 3.8, 2026-12-03).
            q_full = q_stop

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # With USE_TMA, one rank-3 descriptor per input spans the group's G query heads (boxes of one
    # head's BLOCK_M rows), made once: a descriptor per head, made inside the loop over heads, kept
    # ~16 more scalars live across it and spilled them at 32 x 128 (Triton 3.8, sm_90a).
    h0 = kv_h * group
    q_head0 = q_ptr + sq * stride_q_b + q_start * stride_q_s + h0 * stride_q_h
    do_head0 = do_ptr + sq * stride_do_b + q_start * stride_do_s + h0 * stride_do_h
    if USE_TMA:
        q_src = tl.make_tensor_descriptor(q_head0, shape=[group, q_len, HEAD_DIM], strides=[stride_q_h, stride_q_s, 1],
                                          block_shape=[1, BLOCK_M, BLOCK_D])
        do_src = tl.make_tensor_descriptor(do_head0, shape=[group, q_len, HEAD_DIM],
                                           strides=[stride_do_h, stride_do_s, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    for g in range(group):
        h = h0 + g
        row0 = (sq * kv_heads * group + h) * rows + q_start  # this head's first query row in lse, delta, dq_acc
        if not USE_TMA:
            q_src = q_head0 + g * stride_q_h
            do_src = do_head0 + g * stride_do_h
        dq_base = dq_acc_ptr + row0 * HEAD_DIM
        dk, dv = _attn_bwd_kv_inner(dk, dv, k, v, key_ok, offs_n, offs_d, q_src, do_src, g, lse_ptr + row0,
                                    delta_ptr + row0, dq_base, q_lo, q_full, q_len, offset, window,
                                    stride_q_s, stride_do_s, sm_scale, qk_scale, cap_scale, HEAD_DIM=HEAD_DIM,
                                    BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, MASKED=True, CAUSAL=CAUSAL, HAS_PAD=HAS_PAD,
                                    ATOMIC_DQ=ATOMIC_DQ, DQ_TRANSPOSED=DQ_TRANSPOSED, USE_TMA=USE_TMA,
                                    HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP)
        if not (HAS_WINDOW and not USE_TMA):
            dk, dv = _attn_bwd_kv_inner(dk, dv, k, v, key_ok, offs_n, offs_d, q_src, do_src, g, lse_ptr + row0,
                                        delta_ptr + row0, dq_base, q_full, q_inside, q_len, offset, window,
                                        stride_q_s, stride_do_s, sm_scale, qk_scale, cap_scale, HEAD_DIM=HEAD_DIM,
                                        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, MASKED=False, CAUSAL=CAUSAL, HAS_PAD=HAS_PAD,
                                        ATOMIC_DQ=ATOMIC_DQ, DQ_TRANSPOSED=DQ_TRANSPOSED, USE_TMA=USE_TMA,
                                        HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP)
        if HAS_WINDOW and USE_TMA:
            dk, dv = _attn_bwd_kv_inner(dk, dv, k, v, key_ok, offs_n, offs_d, q_src, do_src, g, lse_ptr + row0,
                                        delta_ptr + row0, dq_base, q_inside, q_stop, q_len, offset, window,
                                        stride_q_s, stride_do_s, sm_scale, qk_scale, cap_scale, HEAD_DIM=HEAD_DIM,
                                        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, MASKED=True, CAUSAL=CAUSAL, HAS_PAD=HAS_PAD,
                                        ATOMIC_DQ=ATOMIC_DQ, DQ_TRANSPOSED=DQ_TRANSPOSED, USE_TMA=USE_TMA,
                                        HAS_WINDOW=HAS_WINDOW, HAS_SOFTCAP=HAS_SOFTCAP)

    tl.store(dk_ptr + sk * stride_dk_b + k_start * stride_dk_s + kv_h * stride_dk_h + offs_n[:, None] * stride_dk_s
             + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_tile)
    tl.store(dv_ptr + sk * stride_dv_b + k_start * stride_dv_s + kv_h * stride_dv_h + offs_n[:, None] * stride_dv_s
             + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_tile)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=[*_TUNE_KEY, "USE_TMA", "VARLEN"],
                 prune_configs_by={"early_config_prune": _DQ_PRUNER}, do_bench=_BENCH,
                 cache_results=True)
@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, pad_ptr, cu_q_ptr, cu_k_ptr,
    # sizes
    q_heads, group, q_len, kv_len, q_len_bucket, kv_len_bucket, heads_bucket,
    # strides (elements; unit stride along D)
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_do_b, stride_do_h, stride_do_s,
    stride_dq_b, stride_dq_h, stride_dq_s,
    stride_pad_b,
    # parameters
    sm_scale, qk_scale, window, cap_scale,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    VARLEN: tl.constexpr, USE_TMA: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block, over the key blocks it sees (K and V through tensor descriptors with
    USE_TMA). VARLEN: as in the forward."""
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // q_heads
    h = bh % q_heads
    kv_h = h // group
    rows = q_len
    sq, q_start, q_len = _sequence(cu_q_ptr, b, q_len, VARLEN)
    sk, k_start, kv_len = _sequence(cu_k_ptr, b, kv_len, VARLEN)
    if VARLEN:
        if start_m >= q_len:
            return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < q_len
    q_tile = in_q[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + sq * stride_q_b + q_start * stride_q_s + h * stride_q_h + offs_m[:, None] * stride_q_s
                + offs_d[None, :], mask=q_tile, other=0.0)
    do = tl.load(do_ptr + sq * stride_do_b + q_start * stride_do_s + h * stride_do_h + offs_m[:, None] * stride_do_s
                 + offs_d[None, :], mask=q_tile, other=0.0)
    row0 = (sq * q_heads + h) * rows + q_start
    lse = tl.load(lse_ptr + row0 + offs_m, mask=in_q, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + offs_m, mask=in_q, other=0.0)
    k_src = _head_source(k_ptr + sk * stride_k_b + k_start * stride_k_s + kv_h * stride_k_h, kv_len, stride_k_s,
                         HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _head_source(v_ptr + sk * stride_v_b + k_start * stride_v_s + kv_h * stride_v_h, kv_len, stride_v_s,
                         HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    offset = kv_len - q_len
    hi = kv_len
    if CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, start_m + BLOCK_M + offset), 0)

    lo = 0
    if HAS_WINDOW:  # the key blocks before lo are outside every row's window
        lo = tl.maximum(start_m + offset - window + 1, 0) // BLOCK_N * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_kv = offs_n < kv_len
        if USE_TMA:
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            kv_tile = in_kv[:, None] & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_src + offs_n[:, None] * stride_k_s + offs_d[None, :], mask=kv_tile, other=0.0)
            v = tl.load(v_src + offs_n[:, None] * stride_v_s + offs_d[None, :], mask=kv_tile, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP:
            s, slope = _softcap(s, cap_scale)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        visible = in_q[:, None] & in_kv[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + offset - window)
        if HAS_PAD:
            real = tl.load(pad_ptr + b * stride_pad_b + offs_n, mask=in_kv, other=0) != 0
            visible = visible & real[None, :]
        p = tl.where(visible, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * slope
        dq = tl.dot(ds.to(k.dtype), k, dq)

    tl.store(dq_ptr + sq * stride_dq_b + q_start * stride_dq_s + h * stride_dq_h + offs_m[:, None] * stride_dq_s
             + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_tile)


# The pruners compile candidate configs to read their shared memory (_Pruner, step 2).
_FWD_PRUNER.kernel, _DKDV_PRUNER.kernel, _DQ_PRUNER.kernel = (
    _attn_fwd_kernel.fn, _attn_bwd_dkdv_kernel.fn, _attn_bwd_dq_kernel.fn)

# Decode tiles: rows are the packed G·Sq query rows (at least 16 for tl.dot); keys 64 at a time
# (32 under the interpreter, so short test caches still cross blocks and splits).
_DECODE_BLOCK_N = 32 if _INTERPRET else 64
# (BLOCK_N, num_stages) for the decode kernel, the first whose shared memory fits (_decode_tile).
_DECODE_TILES = ((64, 3), (64, 2), (32, 2), (32, 1), (16, 1))
_DECODE_MAX_ROWS = 64
_DECODE_MAX_SPLITS = 128


def _bucket(n: int) -> int:
    """Autotuning key for a size: its power of two, so a growing KV cache does not retune per token."""
    return next_power_of_2(max(n, 1))


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


@functools.cache
def _decode_tile(block_r: int, block_d: int, element_bytes: int, limit: int,
                 wide_loads: bool = True) -> tuple[int, int]:
    """(BLOCK_N, num_stages) of the decode kernel: the first of ``_DECODE_TILES`` whose shared memory
    fits ``limit``. The kernel is not autotuned (it runs at every generated token), so its need is
    bounded from the tiles: num_stages buffers of a K and a V tile, and the Q tile. The bound is at
    least what Triton allocates (the audit compiles every tile this picks and checks both); fp32 at
    head_dim 256 with 64 rows needs 458,752 B with three stages of 64 keys, twice Hopper's limit.

    Without ``wide_loads`` (on Hopper: fp32 inputs, or 16-bit ones not 16-byte aligned, ``_vector_aligned``)
    the 64-row tile at head_dim 128 takes 32 keys: 64 keys spilled there on sm_90a (a 32-token chunk of
    Llama-3-8B on the cache, the audit's "pointer" cases, Triton 3.8, 2026-12-03: fp32 255 registers,
    8 B, 2 STL/LDL with 3 stages or 2; unaligned bf16 255, 16 B, 6), 32 keys did not (fp32 202, bf16
    245 registers, 2 stages)."""
    if _INTERPRET:
        return _DECODE_BLOCK_N, 1
    for block_n, stages in _DECODE_TILES:
        if not wide_loads and block_n > 32 and block_r >= 64 and block_d == 128:
            continue
        if decode_shared_bound(block_r, block_n, block_d, element_bytes, stages) <= limit:
            return block_n, stages
    raise RuntimeError(f"llama_fast: no decode tile fits {limit:,} bytes of shared memory at head_dim {block_d}")


def decode_shared_bound(block_r: int, block_n: int, block_d: int, element_bytes: int, stages: int) -> int:
    """Shared memory the decode kernel may use with these tiles, in bytes (an upper bound)."""
    return (stages * 2 * block_n + block_r) * block_d * element_bytes


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]  # one call: a third of the host time of three stride(i) calls


def decode_splits(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, target_programs: int) -> int:
    """Number of KV splits for the split-KV path, or 0 to use the ordinary forward.

    The split-KV path packs the G·Sq query rows of a KV head into tiles of up to 64 rows, so K and
    V are read once per KV head and row tile rather than once per query head, and splits the keys
    so that about ``target_programs`` programs run (two per SM), each with at least one key block.
    Taken when the rows fit one tile (decoding a token, a short draft), and for more rows (a
    speculative-decoding verification, a chunk of a chunked prefill) when the KV cache is at
    least four times longer than the chunk and the ordinary forward, one program per 64 query
    rows of each query head, would leave SMs idle (fewer programs than half the target: one per SM).
    """
    group = q_heads // kv_heads
    row_tiles = cdiv(group * q_len, _DECODE_MAX_ROWS)
    if row_tiles > 1 and (kv_len < 4 * q_len or 2 * batch * q_heads * cdiv(q_len, 64) >= target_programs):
        return 0
    splits = -(-target_programs // (batch * kv_heads * row_tiles))
    return max(1, min(splits, cdiv(kv_len, _DECODE_BLOCK_N), _DECODE_MAX_SPLITS))


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether Hopper's tensor memory accelerator can read these (B, H, S, D) tensors per head:
    16-bit elements (TMA boxes of fp32 rows would halve the tile; the fp32 path is for accuracy,
    not speed), a 16-byte aligned start and every stride but the last a multiple of 16 bytes."""
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _vector_aligned(*tensors: torch.Tensor) -> bool:
    """Whether these tensors' rows can be read 16 bytes at a time: 16-bit elements (fp32 counts as
    not: its tiles hold twice the bytes), a 16-byte aligned start and every stride but the last a
    multiple of 16 bytes. What ``tma_ready`` asks, for the kernels without tensor descriptors."""
    return tma_ready(*tensors)


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Device-side tensor descriptors live in global memory Triton asks the launcher for (128 bytes
    # per program); a torch allocation comes from the caching allocator, so it costs no cudaMalloc.
    # "cuda" is the current device, which the launchers set to their tensors' (on_tensor_device).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(tma: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether a launch reads through tensor descriptors: ``tma`` when given, else on sm_90 when the
    tensors are ``tma_ready``. On a GPU, gives Triton an allocator for the descriptors unless the
    user (or torch) has set one."""
    first = tensors[0]
    if tma is None:
        tma = first.is_cuda and _arch(first.device.index or 0) == 90 and tma_ready(*tensors)
    if tma and first.is_cuda:
        from triton.runtime import _allocation

        current = getattr(_allocation, "_allocator", None)
        if current is None or isinstance(current.get(), _allocation.NullAllocator):
            triton.set_allocator(_tma_scratch)
    return tma


class Packed(NamedTuple):
    """Sequences packed along one axis: sequence i is rows cu_q[i] .. cu_q[i + 1] of the queries
    and cu_k[i] .. cu_k[i + 1] of the keys (int32 on the device); max_q, max_k bound every
    sequence's length and size the grid (host ints, as flash-attn's varlen functions take them)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _sequences(batch: int, q_len: int, kv_len: int, packed: Packed | None, dummy: torch.Tensor):
    """What the kernels iterate over: (entries, the longest query and key lengths, cu_q, cu_k, VARLEN).
    Packed: q, k, v are (1, H, total, D) views and each entry is a sequence."""
    if packed is None:
        return batch, q_len, kv_len, dummy, dummy, False  # the cu pointers are never read
    return packed.cu_q.numel() - 1, packed.max_q, packed.max_k, packed.cu_q, packed.cu_k, True


def _effective_window(window: int, longest_k: int) -> int:
    """The window the kernels run with: 0 (none) when it is at least the longest key sequence, where
    no key is outside any query's window (query i sees j > i + Skv − Sq − W, and i + Skv − Sq < Skv):
    Mistral's 4,096 over shorter sequences runs the plain causal kernels, without the window's loop."""
    return 0 if window >= longest_k else window


def _score_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(s2, cap_scale): the kernels' exponent is 2^(s2·x − m) over x = q·kᵀ, s2 = scale·log2 e; with
    a cap, over x = tanh(cap_scale·q·kᵀ), cap_scale = scale / cap and s2 = cap·log2 e."""
    if not softcap:
        return softmax_scale * _LOG2E, 0.0
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"attention: softcap must be a positive finite number or 0 (none), got {softcap}")
    return softcap * _LOG2E, softmax_scale / softcap


@on_tensor_device
def attention_fwd(q, k, v, *, causal: bool, softmax_scale: float, pad: torch.Tensor | None,
                  kv_lens: torch.Tensor | None = None, splits: int | None = None,
                  tma: bool | None = None, packed: Packed | None = None,
                  arch: int | None = None, window: int = 0, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's shape, in a (B, Sq, Hq, D) buffer) and base-2 lse (B, Hq, Sq) fp32.

    q, k, v with unit stride along D; ``softmax_scale`` > 0; ``pad`` a (B, Skv) uint8 view of the key
    padding mask or None. ``kv_lens``: (B,) int32 on q's device, or None: batch row b attends over
    the first kv_lens[b] keys of the buffer only, causal aligned to that length (a static KV cache
    filled up to there); read by the kernels, never on the host. ``splits``: force the decode path
    with that many splits (0: the ordinary forward); default chosen by ``decode_splits``. ``tma``:
    load Q, K, V through tensor descriptors (TMA on Hopper); default on for sm_90 when ``tma_ready``.
    ``packed``: q, k, v are (1, H, total, D) views of packed sequences (no pad, no kv_lens, never the
    decode path); out and lse keep that layout. ``arch``: the architecture (90 or 80) whose shared
    memory the decode tile must fit when q is not on a GPU (the ahead-of-time audit); on a GPU, its own.
    ``window``: with ``causal``, a sliding window (query i sees only keys j with i + offset − j < window);
    0 for none. Key blocks outside every row's window are not read. ``softcap``: > 0 caps each score
    s = scale·q·kᵀ to softcap·tanh(s / softcap) before the softmax (Gemma 2's attention logit
    soft-capping); 0 for none. The lse is then that of the capped scores.
    """
    if window and not causal:
        raise ValueError("attention_fwd: a sliding window needs causal attention")
    qk_scale, cap_scale = _score_scales(softmax_scale, softcap)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.empty((batch, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if kv_len == 0:  # no key to see: every row is one that sees nothing (zeros, lse = +inf)
        return out.zero_(), lse.fill_(float("inf"))
    entries, longest_q, longest_k, cu_q, cu_k, varlen = _sequences(batch, q_len, kv_len, packed, q)
    window = _effective_window(window, longest_k)
    if varlen:
        splits = 0
        if entries == 0 or longest_q == 0:  # no sequence has a query (the caller checked the lengths)
            return out.zero_(), lse.fill_(float("inf"))
    has_pad = pad is not None
    pad_arg = pad if has_pad else q  # never read when HAS_PAD is False
    stride_pad = pad.stride(0) if has_pad else 0
    lens = dict(HAS_KV_LENS=kv_lens is not None)
    kv_lens_arg = kv_lens if kv_lens is not None else q  # never read when HAS_KV_LENS is False
    block_d = _block_d(head_dim)
    # The keys the decode path splits: with a window, those the earliest query's window starts at
    # onwards (the kernel finds that start per row of the batch; no row's span is longer).
    span = min(kv_len, window + q_len - 1) if window else kv_len
    window_args = dict(HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap))
    if splits is None:
        target = persistent_programs(q.device, 1 << 30, per_sm=2)
        splits = decode_splits(batch, q_heads, kv_heads, q_len, span, target)

    if splits:
        split_len = cdiv(cdiv(span, splits), _DECODE_BLOCK_N) * _DECODE_BLOCK_N
        splits = cdiv(span, split_len)
        final = splits == 1  # one launch, not two: the decode kernel writes out and lse itself
        if final:
            o_part, lse_part = out, lse
        else:
            o_part = torch.empty((batch, q_heads, q_len, splits, head_dim), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((batch, q_heads, q_len, splits), dtype=torch.float32, device=q.device)
        block_r = min(_DECODE_MAX_ROWS, max(16, next_power_of_2(group * q_len)))
        limit = _device_shared_limit(q.get_device()) if q.is_cuda else SHARED_MEMORY_LIMIT[arch or 80]
        hopper = (_arch(q.device.index or 0) if q.is_cuda else arch or 80) == 90  # where the narrow tile was counted
        block_n, stages = _decode_tile(block_r, block_d, q.element_size(), limit,
                                       not hopper or _vector_aligned(q, k, v))
        _attn_decode_kernel[grid_of(batch * kv_heads, splits, cdiv(group * q_len, block_r))](
            q, k, v, o_part, lse_part, pad_arg, kv_lens_arg,
            kv_heads, group, q_len, kv_len, split_len, splits,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o_part), stride_pad,
            qk_scale, window, cap_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_PAD=has_pad, **lens, **window_args,
            BLOCK_R=block_r, BLOCK_N=block_n, FINAL=final, num_warps=4, num_stages=stages,
        )
        if final:
            return out, lse
        _attn_decode_combine_kernel[grid_of(batch * q_heads * q_len)](
            o_part, lse_part, out, lse,
            q_heads, q_len, splits,
            *_strides(out),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_power_of_2(splits),
            num_warps=4 if block_d >= 128 else 2,
        )
        return out, lse

    tma = _use_tma(tma, q, k, v)

    def grid(meta):
        return grid_of(entries * q_heads, cdiv(longest_q, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, lse, pad_arg, kv_lens_arg, cu_q, cu_k,
        q_heads, group, q_len, kv_len, _bucket(longest_q), _bucket(longest_k), _bucket(entries * q_heads),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_pad,
        qk_scale, window, cap_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_PAD=has_pad, USE_TMA=tma, VARLEN=varlen, **lens,
        **window_args,
    )
    return out, lse


@on_tensor_device
def attention_bwd(do, q, k, v, out, lse, *, causal: bool, softmax_scale: float, pad: torch.Tensor | None,
                  deterministic: bool = False, tma: bool | None = None, packed: Packed | None = None,
                  arch: int | None = None, window: int = 0, softcap: float = 0.0, dlse: torch.Tensor | None = None):
    """dq, dk, dv (each in its input's layout) from the output gradient ``do`` (unit stride along D).

    Default: dQ accumulates atomically in fp32 inside the dK/dV kernel (five matrix products per
    block pair; the order of the additions, and so the last bits of dQ, varies run to run).
    ``deterministic=True``: a separate dQ kernel recomputes P and dP (seven products), bit-for-bit
    reproducible. ``tma``: as for ``attention_fwd`` (Q and dO, or K and V, through tensor descriptors).
    ``packed``: as for ``attention_fwd``. ``arch``: the tile list and dQ scheme to choose, 90 (Hopper)
    or 80 (any other GPU); default the device's, 80 on the CPU (the interpreter). The ahead-of-time
    audit passes the architecture it compiles for; the tests pass 90 to run Hopper's scheme.

    On Hopper the dK/dV kernel adds dQ atomically only for heads of at most 64: at head_dim 128 every
    dK/dV tile whose products wgmma covers without duplicated work (128 keys on 8 warps, 64 on 4)
    spills registers once it also holds the dQ tile (32 x 128 on 8 warps: 40-240 bytes, Triton 3.8,
    2026-12-02), so there dQ comes from the dQ kernel in both modes (seven products, all on wgmma,
    no atomics) and the atomic mode is deterministic too. ``window``, ``softcap``: as for
    ``attention_fwd`` (``lse`` the forward's, from the same cap). ``dlse``: the gradient of the
    forward's base-2 lse (B, Hq, Sq) fp32 as well, where the caller used the lse (ring attention merges
    partial results by it), or None. The natural lse's gradient in score s_ij is p_ij, so it enters as
    p·(dP − (Δ − dlse·log2 e)): Δ lowered, one operation over (B, Hq, Sq) and nothing in the main kernels.
    """
    if window and not causal:
        raise ValueError("attention_bwd: a sliding window needs causal attention")
    qk_scale, cap_scale = _score_scales(softmax_scale, softcap)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    if arch is None:
        arch = _arch(q.device.index or 0) if q.is_cuda else 80
    # fp32 packed sequences on Hopper too: every dK/dV tile spills there with the dQ tile (16 x 128 on 8
    # warps 16 B, 16 x 64 on 4 64 B at head_dim 64; the tile lists, _DKDV_VARIANT_SPILLS); and fp32 with the
    # soft-cap, whose last clean tile there, 16 x 64 on 4, spills 8 B with it (SmolLM2's heads, 2026-12-04).
    fp32_spills = q.dtype == torch.float32 and (packed is not None or bool(softcap))
    atomic_dq = not deterministic and not (arch == 90 and (_block_d(head_dim) > 64 or fp32_spills))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(head_dim)
    has_pad = pad is not None
    pad_arg = pad if has_pad else q
    stride_pad = pad.stride(0) if has_pad else 0
    entries, longest_q, longest_k, cu_q, cu_k, varlen = _sequences(batch, q_len, kv_len, packed, q)
    window = _effective_window(window, longest_k)
    if varlen and (entries == 0 or longest_q == 0):
        return dq.zero_(), dk.zero_(), dv.zero_()
    buckets = (_bucket(longest_q), _bucket(longest_k), _bucket(entries * q_heads))
    tma = _use_tma(tma, q, k, v, do)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_PAD=has_pad, VARLEN=varlen, USE_TMA=tma,
                HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap))

    delta = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    delta_rows = 16 if _INTERPRET else 64
    # 8 warps where O or dO is read 2 bytes at a time (16-bit, not 16-byte aligned): on 4 warps the
    # 64-row tile spilled 24 B (10 STL/LDL, 96 registers) at head_dim 64 on sm_90a (Triton 3.8,
    # 2026-12-03), on 8 it does not (64 registers). fp32 reads 16 bytes at a time and stays on 4.
    narrow = out.element_size() == 2 and not _vector_aligned(out, do)
    _attn_bwd_delta_kernel[grid_of(batch * q_heads * cdiv(q_len, delta_rows))](
        out, do, delta, q_heads, q_len, *_strides(out), *_strides(do),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_rows, num_warps=8 if narrow else 4,
    )
    if dlse is not None:
        delta.sub_(dlse, alpha=_LOG2E)
    # (B, Hq, Sq, D) fp32, zeroed: the atomic dQ's accumulator (empty, never touched, when the dQ kernel runs).
    dq_acc = q.new_zeros((batch, q_heads, q_len, head_dim) if atomic_dq else (0,), dtype=torch.float32)
    _attn_bwd_dkdv_kernel[lambda m: grid_of(entries * kv_heads, cdiv(longest_k, m["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, pad_arg, dq_acc, cu_q, cu_k,
        kv_heads, group, q_len, kv_len, *buckets,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), stride_pad,
        softmax_scale, qk_scale, window, cap_scale, ATOMIC_DQ=atomic_dq, DQ_TRANSPOSED=arch == 90, **meta,
    )
    if atomic_dq:
        return dq.copy_(dq_acc), dk, dv
    _attn_bwd_dq_kernel[lambda m: grid_of(entries * q_heads, cdiv(longest_q, m["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, pad_arg, cu_q, cu_k,
        q_heads, group, q_len, kv_len, *buckets,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), stride_pad,
        softmax_scale, qk_scale, window, cap_scale, **meta,
    )
    return dq, dk, dv
