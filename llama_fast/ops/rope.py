"""``apply_rotary_pos_emb``: transformers' function of that name, fused over q and k."""

import torch

from .. import extension, references
from ..backend import backend_for
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last


class _RoPEFunction(torch.autograd.Function):
    """q, k: (B, H, S, D) views with unit stride along D; cos, sin: (B, S, D), possibly broadcast."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from ..kernels import rope

        ctx.save_for_backward(cos, sin)
        ctx.q_meta = (q.shape, q.dtype)
        ctx.k_meta = (k.shape, k.dtype)
        return rope.rope(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        from ..kernels import rope

        cos, sin = ctx.saved_tensors
        dq, dk = rope.rope(_grad(dq_embed, ctx.q_meta, cos), _grad(dk_embed, ctx.k_meta, cos), cos, sin, backward=True)
        # With fp32 cos/sin and a half-precision q the outputs were fp32; gradients go back in q's dtype.
        return dq.to(ctx.q_meta[1]), dk.to(ctx.k_meta[1]), None, None


def _grad(grad: torch.Tensor | None, meta, like: torch.Tensor) -> torch.Tensor:
    """An output gradient with unit stride along D; zeros for an output that did not reach the loss."""
    if grad is None:
        shape, dtype = meta
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return unit_stride_last(grad)



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
    chosen = backend_for(q, backend)
    if chosen == "reference":
        return references.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) views
    shape = (q.shape[0], q.shape[2], q.shape[3])
    cos = unit_stride_last(cos.expand(shape))
    sin = unit_stride_last(sin.expand(shape))
    if chosen in ("cpu", "cuda"):
        extension.available()  # loads it (and its fake/autograd parts) once
        # The extension rotates in q's dtype; the result dtype of transformers' function is
        # promote(q, cos) (fp32 tables with bf16 q give fp32), so promote first.
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        q, k = q.to(out_dtype), k.to(out_dtype)
        q_embed, k_embed = torch.ops.llama_fast.rope_fwd(unit_stride_last(q), unit_stride_last(k), cos, sin)
    else:
        q_embed, k_embed = _RoPEFunction.apply(unit_stride_last(q), unit_stride_last(k), cos, sin)
    if unsqueeze_dim == 2:
        q_embed, k_embed = q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    return q_embed, k_embed
