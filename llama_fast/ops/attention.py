"""``flash_attention``: causal flash attention with GQA, key padding and KV-cache alignment."""

import torch

from .. import references
from ..backend import backend_for
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last

_MAX_HEAD_DIM = 256


class _FlashAttentionFunction(torch.autograd.Function):
    """q, k, v with unit stride along D; pad a (B, Skv) uint8 view of the key padding mask or None."""

    @staticmethod
    def forward(ctx, q, k, v, pad, causal: bool, softmax_scale: float):
        from ..kernels import attention

        out, lse = attention.attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, pad=pad)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from ..kernels import attention

        q, k, v, out, lse, pad = ctx.saved_tensors
        dq, dk, dv = attention.attention_bwd(unit_stride_last(dout), q, k, v, out, lse, causal=ctx.causal,
                                             softmax_scale=ctx.softmax_scale, pad=pad,
                                             deterministic=torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None



def _check(q, k, v, key_padding_mask) -> None:
    op = "flash_attention"
    check_dtype(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    tensors = dict(q=q, k=k, v=v) | ({} if key_padding_mask is None else dict(key_padding_mask=key_padding_mask))
    check_same_device(op, **tensors)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (batch, heads, seq, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    batch, q_heads, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{op}: q has batch {batch} but k and v have batch {k.shape[0]}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{op}: q has head_dim {head_dim} but k and v have head_dim {k.shape[-1]}")
    if k.shape[1] == 0 or q_heads % k.shape[1]:
        raise ValueError(f"{op}: q_heads ({q_heads}) must be a multiple of kv_heads ({k.shape[1]})")
    if head_dim % 16 or not 16 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be a multiple of 16 between 16 and {_MAX_HEAD_DIM}, got {head_dim}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_padding_mask must be bool (True for real keys), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(f"{op}: key_padding_mask must have shape (batch, kv_len) = {(batch, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")


def flash_attention(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention of q over k, v without materialising the score matrix.

    q: (batch, q_heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim) with q_heads a
    multiple of kv_heads (MHA, GQA, MQA; K/V are never expanded). Any strides with unit stride
    along head_dim (others are copied). head_dim a multiple of 16 up to 256 (64 and 128 are the
    tuned paths); float16, bfloat16, or float32 (matrix products then run in TF32 on the GPU).

    causal: query i sees keys 0 .. i + kv_len - q_len (bottom-right aligned, as after a KV cache).
    softmax_scale: positive; defaults to head_dim ** -0.5.
    key_padding_mask: bool (batch, kv_len), True where a key is real (left padding in generate()).
    A query that sees no key returns zeros, with zero gradient.

    Returns out with q's shape and dtype. Differentiable in q, k and v. The backward accumulates dQ
    with atomic additions (fastest; its last bits vary run to run) unless
    ``torch.use_deterministic_algorithms(True)`` is on, when a separate dQ kernel makes every
    gradient bit-for-bit reproducible; dK and dV are deterministic either way.
    Decoding shapes (few queries, long KV) take the split-KV path automatically.
    """
    _check(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not 0.0 < scale < float("inf"):
        # The kernels take the running maximum on unscaled scores and scale inside the exponent.
        raise ValueError(f"flash_attention: softmax_scale must be positive and finite, got {softmax_scale}")
    if backend_for(q, backend, extension_op=False) == "reference":
        return references.attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=key_padding_mask)
    pad = None
    if key_padding_mask is not None:
        pad = unit_stride_last(key_padding_mask).view(torch.uint8)
    return _FlashAttentionFunction.apply(unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), pad, bool(causal), scale)
