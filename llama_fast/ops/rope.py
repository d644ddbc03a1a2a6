"""``apply_rotary_pos_emb``: transformers' function of that name, fused over q and k."""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last
from ._dispatch import KernelOp, direct_call_ok


# Triton's kernels and the C++ extension's, registered as custom ops by KernelOp (ops/_dispatch.py).
def _launch_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rope

    return rope.rope_fwd(q, k, cos, sin)


def _launch_bwd(dq_embed: torch.Tensor, dk_embed: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rope

    return rope.rope_bwd(dq_embed, dk_embed, cos, sin)


def _fake_fwd(q, k, cos, sin):
    """q, k: (B, H, S, D) views with unit stride along D; cos, sin: (B, S, D). The outputs keep the
    inputs' layout (a transposed projection stays one) in promote(q, k, cos)."""
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), cos.dtype)
    return torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)


def _fake_fwd_extension(q, k, cos, sin):
    """The extension's forward rotates in q's dtype (its caller promotes q and k first)."""
    return torch.empty_like(q), torch.empty_like(k)


def _fake_bwd(dq_embed, dk_embed, cos, sin):
    return torch.empty_like(dq_embed), torch.empty_like(dk_embed)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)


def _backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        dq, dk = bwd_op(_grad(dq_embed, ctx.q_meta, cos), _grad(dk_embed, ctx.k_meta, cos), cos, sin)
        # With fp32 cos/sin and a half-precision q the outputs were fp32; gradients go back in q's dtype.
        return dq.to(ctx.q_meta[1]), dk.to(ctx.k_meta[1]), None, None

    return backward


def _grad(grad: torch.Tensor | None, meta, like: torch.Tensor) -> torch.Tensor:
    """An output gradient with unit stride along D; zeros for an output that did not reach the loss."""
    if grad is None:
        shape, dtype = meta
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return unit_stride_last(grad)


_KERNELS = KernelOp("triton_rope", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with, extension="rope",
                    fake_extension_forward=_fake_fwd_extension)


def _check(q, k, cos, sin, unsqueeze_dim) -> None:
    op = "apply_rotary_pos_emb"
    check_dtype(op, q=q, k=k, cos=cos, sin=sin)
    check_same_dtype(op, q=q, k=k)
    check_same_device(op, q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"{op}: unsqueeze_dim must be 1 (q is (batch, heads, seq, head_dim)) or 2 "
            f"(q is (batch, seq, heads, head_dim)), got {unsqueeze_dim}"
        )
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or k.shape[0] != q.shape[0] or k.shape[seq_dim] != q.shape[seq_dim]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even for the rotate_half layout, got {head_dim}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    expected = (q.shape[0], q.shape[seq_dim], head_dim)
    if cos.dim() != 3 or cos.shape[0] not in (1, expected[0]) or cos.shape[1:] != expected[1:]:
        raise ValueError(f"{op}: cos and sin must be (batch or 1, seq, head_dim) = {expected}, got {tuple(cos.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(f"{op}: gradients with respect to cos and sin are not supported; pass them detached")


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1, *, backend: str | None = None):
    """Rotary embedding of q and k, with the signature and result of transformers' function.

    q: (B, Hq, S, D), k: (B, Hk, S, D) for ``unsqueeze_dim=1`` (or (B, S, H, D) for 2), any
    strides; Hq and Hk may differ (GQA). cos, sin: (B or 1, S, D). Returns (q_embed, k_embed) in
    q's layout, differentiable in q and k.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    if _dtensor.has_dtensor(q, k, cos, sin):
        return _on_dtensors(q, k, cos, sin, unsqueeze_dim, backend)
    return _rope(q, k, cos, sin, unsqueeze_dim, backend)


def _rope(q, k, cos, sin, unsqueeze_dim, backend):
    """``apply_rotary_pos_emb`` on checked plain tensors."""
    chosen = backend_for(q, backend)
    if chosen == "reference":
        return references.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) views
    shape = (q.shape[0], q.shape[2], q.shape[3])
    cos = unit_stride_last(cos.expand(shape))
    sin = unit_stride_last(sin.expand(shape))
    direct = direct_call_ok(q, k)
    if chosen != "triton":
        # The extension rotates in q's dtype; the result dtype of transformers' function is
        # promote(q, cos) (fp32 tables with bf16 q give fp32), so promote first.
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k = q.to(out_dtype), k.to(out_dtype)
    q_embed, k_embed = _KERNELS.run(chosen, direct, unit_stride_last(q), unit_stride_last(k), cos, sin)
    if unsqueeze_dim == 2:
        q_embed, k_embed = q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return q_embed, k_embed


def _launch_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_dst: torch.Tensor, v_dst: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    from ..kernels import rope

    return rope.rope_into_cache(q, k, v, cos, sin, k_dst, v_dst, start)


# Inference only (a KV cache is written under no_grad): a custom op for torch.compile, which must
# see the writes into the cache's buffers, with no autograd.
_INTO_CACHE = torch.library.custom_op("llama_fast::triton_rope_into_cache", _launch_into_cache,
                                      mutates_args=("k_dst", "v_dst"))
_INTO_CACHE.register_fake(lambda q, k, v, cos, sin, k_dst, v_dst, start: torch.empty_like(q, dtype=k_dst.dtype))


def rope_into_cache(q, k, v, cos, sin, k_dst, v_dst, start=None, *, backend: str | None = None) -> torch.Tensor:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` with the rotated keys, and the values, written straight
    into a KV cache: one kernel where a rotation, then the cache's two copies, were three.

    q (B, Hq, S, D), k and v (B, Hk, S, D), cos and sin (B or 1, S, D) as for ``apply_rotary_pos_emb``;
    k_dst and v_dst (B, Hk, rows, D) with unit stride along D, of the dtype the rotation gives
    (``promote(q, k, cos)``) and v's. Rows [start, start + S) are written, ``start`` a one-element
    integer tensor on the device (a static cache's fill count: never read on the host), or rows
    [0, S) when None. Rows past ``rows`` are not written. Returns the rotated q. No gradient: for
    inference, where the cache is filled; the caller takes the unfused path when one is needed.
    """
    op = "rope_into_cache"
    _check(q, k, cos, sin, 1)
    check_dtype(op, v=v, k_dst=k_dst, v_dst=v_dst)
    check_same_device(op, q=q, k_dst=k_dst, v_dst=v_dst, v=v)
    if any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        raise ValueError(f"{op}: no gradient flows through a KV cache write; call it under torch.no_grad()")
    rotated = torch.promote_types(q.dtype, cos.dtype)
    if k_dst.dtype != rotated or v_dst.dtype != v.dtype:
        raise TypeError(f"{op}: the cache's buffers must hold the rotated keys' dtype {rotated} and v's {v.dtype}, "
                        f"got {k_dst.dtype} and {v_dst.dtype}")
    rows = (k.shape[0], k.shape[1], k_dst.shape[2], k.shape[3])
    if v.shape != k.shape or k_dst.shape != rows or v_dst.shape != rows:
        raise ValueError(f"{op}: k and v {tuple(k.shape)} must share one shape and k_dst, v_dst be (batch, kv_heads, "
                         f"rows, head_dim) = {rows}, got {tuple(v.shape)}, {tuple(k_dst.shape)}, {tuple(v_dst.shape)}")
    if k_dst.stride(-1) != 1 or v_dst.stride(-1) != 1:
        raise ValueError(f"{op}: k_dst and v_dst must have unit stride along head_dim (they are written in place)")
    if start is None and k_dst.shape[2] < k.shape[2]:
        raise ValueError(f"{op}: {k.shape[2]} new rows do not fit the {k_dst.shape[2]} rows of k_dst")
    if start is not None and (start.numel() != 1 or start.dtype.is_floating_point or start.device != q.device):
        raise ValueError(f"{op}: start must be a one-element integer tensor on {q.device}, got {start.dtype} "
                         f"{tuple(start.shape)} on {start.device}")
    if _dtensor.has_dtensor(q, k, v, cos, sin, k_dst, v_dst):
        raise NotImplementedError(f"{op}: DTensor inputs are not supported; use apply_rotary_pos_emb and the "
                                  "cache's own update")
    chosen = backend_for(q, backend)
    shape = (q.shape[0], q.shape[2], q.shape[3])
    cos, sin = unit_stride_last(cos.expand(shape)), unit_stride_last(sin.expand(shape))
    if chosen != "triton":  # the op's composition: the rotation (on that backend), then the two copies
        q_embed, k_embed = _rope(q, k, cos, sin, 1, chosen)
        at = torch.arange(k.shape[2], device=q.device) + (0 if start is None else start.reshape(()))
        at = at[at < k_dst.shape[2]]
        k_dst.index_copy_(2, at, k_embed[:, :, : at.numel()])
        v_dst.index_copy_(2, at, v[:, :, : at.numel()])
        return q_embed
    args = (unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), cos, sin, k_dst, v_dst, start)
    return _launch_into_cache(*args) if direct_call_ok(q, k, v, k_dst, v_dst) else _INTO_CACHE(*args)


def _on_dtensors(q, k, cos, sin, unsqueeze_dim, backend):
    """DTensor inputs: q and k may be split along batch, heads or positions, never head_dim (the rotation
    pairs its two halves); cos and sin, one row per (batch, position), follow a batch or position split
    of q and k and are replicated otherwise."""
    from torch.distributed.tensor import Replicate, Shard

    name = "apply_rotary_pos_emb"
    tensors = dict(q=q, k=k, cos=cos, sin=sin)
    mesh, placements = _dtensor.mesh_of(name, **tensors)
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    for t in ("q", "k"):
        if 3 in _dtensor.sharded_dims(placements[t]):
            raise _dtensor.refuse(name, t, tensors[t], "head_dim is sharded, and the rotation pairs its two halves")
    _dtensor.same_placements(name, "cos", {n: placements[n] for n in ("cos", "sin")}, tensors, "they are one table")
    for mesh_dim, (pq, pk, pc) in enumerate(zip(placements["q"], placements["k"], placements["cos"])):
        split_q = pq.dim if pq.is_shard() and pq.dim in (0, seq_axis) else None
        split_k = pk.dim if pk.is_shard() and pk.dim in (0, seq_axis) else None
        if split_q != split_k:
            raise ValueError(f"{name}: q and k must split the batch and the positions alike (they share cos and "
                             f"sin); got placements {tuple(q.placements)} and {tuple(k.placements)}")
        if split_q == seq_axis:
            want = Shard(1)
        elif split_q == 0 and cos.shape[0] > 1:
            want = Shard(0)
        else:
            want = Replicate()
        if pc != want:
            raise _dtensor.refuse(name, "cos", cos, f"on mesh dim {mesh_dim} q is {pq!r}, so cos and sin (batch or 1, "
                                                    f"seq, head_dim) must be {want!r}",
                                  "Distribute cos and sin to match q's split of the batch and positions")
    q_embed, k_embed = _rope(q.to_local(), k.to_local(), cos.to_local(), sin.to_local(), unsqueeze_dim, backend)
    return (_dtensor.wrap(q_embed, mesh, placements["q"], q.shape),
            _dtensor.wrap(k_embed, mesh, placements["k"], k.shape))
