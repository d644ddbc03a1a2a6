"""``flash_attention``: causal flash attention with GQA, key padding and KV-cache alignment."""

import torch

from .. import references
from ..backend import backend_for
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last
from ._dispatch import direct_call_ok

_MAX_HEAD_DIM = 256


# The Triton kernels as torch.library custom ops (why custom_op: ops/rms_norm.py); eager inference
# calls the launcher itself (_dispatch.py). pad: a (B, Skv) uint8 view of the key padding mask, or None.
def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None,
                kv_lens: torch.Tensor | None, causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention

    return attention.attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, pad=pad, kv_lens=kv_lens)


_triton_fwd = torch.library.custom_op("llama_fast::triton_flash_attention_fwd", _launch_fwd, mutates_args=())


@torch.library.custom_op("llama_fast::triton_flash_attention_bwd", mutates_args=())
def _triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, pad: torch.Tensor | None, causal: bool, softmax_scale: float,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention

    return attention.attention_bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, pad=pad,
                                   deterministic=deterministic)


@_triton_fwd.register_fake
def _(q, k, v, pad, kv_lens, causal, softmax_scale):
    # out in a (B, Sq, Hq, D) buffer viewed as (B, Hq, Sq, D), so transformers' transpose back is free
    batch, heads, q_len, head_dim = q.shape
    out = q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, q_len), dtype=torch.float32)


@_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, pad, causal, softmax_scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pad, kv_lens, causal, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], pad)
    ctx.causal, ctx.softmax_scale, ctx.has_kv_lens = causal, softmax_scale, kv_lens is not None


def _backward(ctx, dout, _dlse):
    if ctx.has_kv_lens:
        raise NotImplementedError("flash_attention: no backward with kv_lens (a static KV cache is for inference); "
                                  "train with the keys sliced to their length instead")
    q, k, v, out, lse, pad = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(unit_stride_last(dout), q, k, v, out, lse, pad, ctx.causal, ctx.softmax_scale,
                             torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(q, k, v, key_padding_mask, kv_lens) -> None:
    op = "flash_attention"
    check_dtype(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    tensors = dict(q=q, k=k, v=v) | ({} if key_padding_mask is None else dict(key_padding_mask=key_padding_mask))
    tensors |= {} if kv_lens is None else dict(kv_lens=kv_lens)
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
    if kv_lens is not None:
        if kv_lens.dtype not in (torch.int32, torch.int64) or tuple(kv_lens.shape) != (batch,):
            raise ValueError(f"{op}: kv_lens must be an int32 or int64 tensor of shape (batch,) = ({batch},), got "
                             f"{kv_lens.dtype} {tuple(kv_lens.shape)}")


def flash_attention(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Softmax attention of q over k, v without materialising the score matrix.

    q: (batch, q_heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim) with q_heads a
    multiple of kv_heads (MHA, GQA, MQA; K/V are never expanded). Any strides with unit stride
    along head_dim (others are copied). head_dim a multiple of 16 up to 256 (64 and 128 are the
    tuned paths); float16, bfloat16, or float32 (matrix products then run in TF32 on the GPU).

    causal: query i sees keys 0 .. i + kv_len - q_len (bottom-right aligned, as after a KV cache).
    softmax_scale: positive; defaults to head_dim ** -0.5.
    key_padding_mask: bool (batch, kv_len), True where a key is real (left padding in generate()).
    kv_lens: integer (batch,) on the device, for a static KV cache: row b uses only the first
    kv_lens[b] keys of the buffer, and kv_lens[b] replaces kv_len in the causal rule. Read by the
    kernel, never on the host (no sync; CUDA graphs can replay it). Forward only.
    A query that sees no key returns zeros, with zero gradient.

    Returns out with q's shape and dtype. Differentiable in q, k and v. The backward accumulates dQ
    with atomic additions (fastest; its last bits vary run to run) unless
    ``torch.use_deterministic_algorithms(True)`` is on, when a separate dQ kernel makes every
    gradient bit-for-bit reproducible; dK and dV are deterministic either way.
    Decoding shapes (few queries, long KV) take the split-KV path automatically.
    """
    _check(q, k, v, key_padding_mask, kv_lens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not 0.0 < scale < float("inf"):
        # The kernels take the running maximum on unscaled scores and scale inside the exponent.
        raise ValueError(f"flash_attention: softmax_scale must be positive and finite, got {softmax_scale}")
    if backend_for(q, backend, extension_op=False) == "reference":
        return references.attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=key_padding_mask,
                                    kv_lens=kv_lens)
    pad = None
    if key_padding_mask is not None:
        pad = unit_stride_last(key_padding_mask).view(torch.uint8)
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32).contiguous()
    forward = _launch_fwd if direct_call_ok(q, k, v) else _triton_fwd
    out, _ = forward(unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), pad, kv_lens, bool(causal), scale)
    return out
