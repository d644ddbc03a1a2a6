"""``flash_attention``: causal flash attention with GQA, key padding and KV-cache alignment."""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last
from ._dispatch import KernelOp, direct_call_ok

_MAX_HEAD_DIM = 256
_LN2 = 0.6931471805599453


# The Triton kernels as custom ops, registered by KernelOp (ops/_dispatch.py); eager inference calls the
# launcher itself. pad: the (B, Skv) key padding mask as uint8 (a view of the bool one) or int32, or None.
def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None,
                kv_lens: torch.Tensor | None, causal: bool, softmax_scale: float,
                window: int, softcap: float, lse_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # lse_grad: the caller uses the lse, so its gradient goes into the backward (autograd gives the
    # backward zeros for an unused output, which would cost an operation for nothing)
    from ..kernels import attention

    return attention.attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, pad=pad, kv_lens=kv_lens,
                                   window=window, softcap=softcap)


def _launch_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, dlse: torch.Tensor | None, pad: torch.Tensor | None, causal: bool,
                softmax_scale: float, window: int, softcap: float,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention

    return attention.attention_bwd(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale, pad=pad,
                                   deterministic=deterministic, window=window, softcap=softcap, dlse=dlse)


def _fake_fwd(q, k, v, pad, kv_lens, causal, softmax_scale, window, softcap, lse_grad):
    # out in a (B, Sq, Hq, D) buffer viewed as (B, Hq, Sq, D), so transformers' transpose back is free
    batch, heads, q_len, head_dim = q.shape
    out = q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, q_len), dtype=torch.float32)


def _fake_bwd(dout, q, k, v, out, lse, dlse, pad, causal, softmax_scale, window, softcap, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pad, kv_lens, causal, softmax_scale, window, softcap, lse_grad = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], pad)
    ctx.causal, ctx.softmax_scale, ctx.window, ctx.softcap = causal, softmax_scale, window, softcap
    ctx.has_kv_lens, ctx.lse_grad = kv_lens is not None, lse_grad


def _backward_with(bwd_op):
    def backward(ctx, dout, dlse):
        if ctx.has_kv_lens:
            raise NotImplementedError("flash_attention: no backward with kv_lens (a static KV cache is for "
                                      "inference); train with the keys sliced to their length instead")
        q, k, v, out, lse, pad = ctx.saved_tensors
        dq, dk, dv = bwd_op(unit_stride_last(dout), q, k, v, out, lse, dlse if ctx.lse_grad else None, pad,
                            ctx.causal, ctx.softmax_scale, ctx.window, ctx.softcap,
                            torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None, None, None, None, None

    return backward


_KERNELS = KernelOp("triton_flash_attention", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd,
                    fake_backward=_fake_bwd, setup_context=_setup_context, backward_with=_backward_with)


def _check_heads(op, q_heads, kv_heads, head_dim, kv_head_dim) -> None:
    """What every backend needs; the reference takes any head_dim (``_check_kernel_head_dim``)."""
    if kv_head_dim != head_dim:
        raise ValueError(f"{op}: q has head_dim {head_dim} but k and v have head_dim {kv_head_dim}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{op}: q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim == 0:
        raise ValueError(f"{op}: head_dim must be at least 1, got 0")


def _check_kernel_head_dim(op, head_dim) -> None:
    """The Triton kernel's limit: tl.dot tiles of head_dim columns, a multiple of 16 up to 256."""
    if head_dim % 16 or not 16 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"{op}: the Triton kernel needs a head_dim that is a multiple of 16 between 16 and "
                         f"{_MAX_HEAD_DIM}, got {head_dim} (the eager reference, backend='reference', takes any)")


def _scale(op, q, softmax_scale) -> float:
    """The softmax scale as a float: head_dim ** -0.5 unless given; positive and finite, because the
    kernels take the running maximum on unscaled scores and scale inside the exponent."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not 0.0 < scale < float("inf"):
        raise ValueError(f"{op}: softmax_scale must be positive and finite, got {softmax_scale}")
    return scale


def _window(op, window, causal) -> int:
    """The sliding window as the kernels take it: 0 for none, else a positive int (causal only)."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be a positive int (the number of keys up to and including a query's "
                         f"own position that it sees) or None, got {window!r}")
    if not causal:
        raise ValueError(f"{op}: a sliding window needs causal=True")
    return window


def _softcap(op, softcap) -> float:
    """The attention logit cap as the kernels take it: 0.0 for none, else a positive finite float."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 < softcap < float("inf"):
        raise ValueError(f"{op}: softcap must be a positive finite number (Gemma 2's attn_logit_softcapping) or "
                         f"None, got {softcap!r}")
    return float(softcap)


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
    _check_heads(op, q_heads, k.shape[1], head_dim, k.shape[-1])
    if key_padding_mask is not None:
        if key_padding_mask.dtype not in (torch.bool, torch.int32):
            raise TypeError(f"{op}: key_padding_mask must be bool (True for real keys) or int32 (nonzero for real "
                            f"keys), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(f"{op}: key_padding_mask must have shape (batch, kv_len) = {(batch, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    if kv_lens is not None:
        if kv_lens.dtype not in (torch.int32, torch.int64) or tuple(kv_lens.shape) != (batch,):
            raise ValueError(f"{op}: kv_lens must be an int32 or int64 tensor of shape (batch,) = ({batch},), got "
                             f"{kv_lens.dtype} {tuple(kv_lens.shape)}")


def flash_attention(q, k, v, *, causal: bool = True, softmax_scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                    window: int | None = None, softcap: float | None = None, return_lse: bool = False,
                    causal_offset: int | None = None,
                    backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, v without materialising the score matrix.

    q: (batch, q_heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim) with q_heads a
    multiple of kv_heads (MHA, GQA, MQA; K/V are never expanded). Any strides with unit stride
    along head_dim (others are copied). head_dim a multiple of 16 up to 256 for the Triton kernel
    (64 and 128 are the tuned paths), any for the reference; float16, bfloat16, or float32 (matrix
    products then run in TF32 on the GPU).

    causal: query i sees keys 0 .. i + kv_len - q_len (bottom-right aligned, as after a KV cache).
    softmax_scale: positive; defaults to head_dim ** -0.5.
    key_padding_mask: bool (batch, kv_len), True where a key is real (left padding in generate()); or
    int32, nonzero where a key is real, read by the kernels as it is (a static cache's mask holds it so:
    no conversion per layer).
    kv_lens: integer (batch,) on the device, for a static KV cache: row b uses only the first
    kv_lens[b] keys of the buffer, and kv_lens[b] replaces kv_len in the causal rule. Read by the
    kernel, never on the host (no sync; CUDA graphs can replay it). Forward only.
    window: with causal, a sliding window of that many keys (Mistral's, Qwen2's and Gemma's local
    layers): query i sees keys j with i + kv_len − q_len − window < j <= i + kv_len − q_len, as
    transformers' sliding-window mask (``kv_idx > q_idx − sliding_window``). Key blocks outside every
    row's window are never read. None (default): no window.
    softcap: each scaled score s becomes softcap·tanh(s / softcap) before the softmax (Gemma 2's
    ``attn_logit_softcapping``), forward and backward. None (default): no cap.
    A query that sees no key returns zeros, with zero gradient.
    return_lse: also return lse, the natural-log log-sum-exp of each query row's scaled (and capped)
    visible scores, (batch, q_heads, q_len) float32, -inf for a row that sees no key: what merges
    attention over several key sets into attention over their union (``merge_attention``).
    causal_offset: with causal, query i sees keys j <= i + causal_offset instead: queries and keys that
    are two shards of one sequence, the keys' first token causal_offset places before the queries'
    (None: kv_len − q_len, bottom-right). Any int, negative included (rows that see no key give zeros
    and lse -inf). Not with a window or kv_lens.

    Returns out with q's shape and dtype, or (out, lse). Differentiable in q, k and v, through lse
    too. The backward accumulates dQ with atomic additions (fastest; its last bits vary run to run) unless
    ``torch.use_deterministic_algorithms(True)`` is on, when a separate dQ kernel makes every
    gradient bit-for-bit reproducible; dK and dV are deterministic either way.
    Decoding shapes (few queries, long KV) take the split-KV path automatically.
    """
    _check(q, k, v, key_padding_mask, kv_lens)
    scale = _scale("flash_attention", q, softmax_scale)
    window = _window("flash_attention", window, causal)
    softcap = _softcap("flash_attention", softcap)
    return_lse = _flag("flash_attention", "return_lse", return_lse)
    offset = _causal_offset("flash_attention", causal_offset, causal, window, kv_lens)
    if _dtensor.has_dtensor(q, k, v, key_padding_mask, kv_lens):
        return _on_dtensors(q, k, v, causal, scale, key_padding_mask, kv_lens, window, softcap, return_lse, backend,
                            offset)
    return _attention(q, k, v, causal, scale, key_padding_mask, kv_lens, window, softcap, return_lse, backend, offset)


def _flag(op, name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def _causal_offset(op, offset, causal, window, kv_lens) -> int | None:
    if offset is None:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{op}: causal_offset must be an int or None, got {offset!r}")
    if not causal:
        raise ValueError(f"{op}: causal_offset shifts the causal rule; it needs causal=True")
    if window or kv_lens is not None:
        raise ValueError(f"{op}: causal_offset is not implemented with {'a window' if window else 'kv_lens'}")
    return offset


def _offset_attention(q, k, v, offset, scale, key_padding_mask, softcap, return_lse, backend):
    """Attention with query i seeing keys j <= i + offset, from the kernels' own rules on slices of the
    rows: the first rows see no key (attention over none: zeros and lse -inf, in the graph with zero
    gradients), the rows up to where the band reaches the last key see a prefix of the keys, bottom-right
    causal, and the rest see every key (causal=False). Each row is computed once, by one of them."""
    q_len, kv_len = q.shape[2], k.shape[2]
    blind = min(max(-offset, 0), q_len)
    band = min(max(kv_len - offset, blind), q_len)
    pieces = []
    for rows, keys, causal in ((slice(0, blind), 0, False), (slice(blind, band), band + offset, True),
                               (slice(band, q_len), kv_len, False)):
        if rows.stop > rows.start:
            mask = None if key_padding_mask is None else key_padding_mask[:, :keys]
            pieces.append(_attention(q[:, :, rows], k[:, :, :keys], v[:, :, :keys], causal, scale, mask, None, 0,
                                     softcap, True, backend))
    out = torch.cat([p[0] for p in pieces], 2)
    return (out, torch.cat([p[1] for p in pieces], 2)) if return_lse else out


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 lse (+inf for a row that sees no key, their convention) as the ops return it:
    natural log, -inf for such a row. Differentiable: the kernels' backward takes the base-2 gradient."""
    return torch.where(lse2 == float("inf"), float("-inf"), lse2 * _LN2)


def _attention(q, k, v, causal, scale, key_padding_mask, kv_lens, window, softcap, return_lse, backend, offset=None):
    """``flash_attention`` on checked plain tensors."""
    if offset is not None and offset != k.shape[2] - q.shape[2] and q.shape[2]:
        return _offset_attention(q, k, v, offset, scale, key_padding_mask, softcap, return_lse, backend)
    if backend_for(q, backend, extension_op=False) == "reference":
        return references.attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=key_padding_mask,
                                    kv_lens=kv_lens, window=window or None, softcap=softcap or None,
                                    return_lse=return_lse)
    _check_kernel_head_dim("flash_attention", q.shape[-1])
    pad = None
    if key_padding_mask is not None:
        pad = unit_stride_last(key_padding_mask)
        # The kernels read the mask as bytes: a free view in eager. Under torch.compile a converting
        # copy instead (B·kv_len bytes, fused by Inductor), since torch 2.11's Inductor fails to
        # lower a bool -> uint8 view ("torch.bool is not supported by torch.iinfo"); 2.14's lowers it.
        if pad.dtype == torch.bool:
            pad = pad.to(torch.uint8) if torch.compiler.is_compiling() else pad.view(torch.uint8)
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32).contiguous()
    out, lse = _KERNELS.run("triton", direct_call_ok(q, k, v), unit_stride_last(q), unit_stride_last(k),
                            unit_stride_last(v), pad, kv_lens, bool(causal), scale, window, softcap, return_lse)
    return (out, _natural_lse(lse)) if return_lse else out


def _on_dtensors(q, k, v, causal, scale, key_padding_mask, kv_lens, window, softcap, return_lse, backend, offset):
    """DTensor inputs: q, k, v split alike, along the batch, or the heads with each rank's query heads the
    GQA groups of its KV heads; key_padding_mask and kv_lens (a row per batch entry) follow a batch split
    and are replicated otherwise. The output is split as q."""
    from torch.distributed.tensor import Replicate, Shard

    name = "flash_attention"
    tensors = dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask, kv_lens=kv_lens)
    mesh, placements = _dtensor.mesh_of(name, **tensors)
    _dtensor.attention_placements(name, tensors, placements, {0: "batch", 1: "heads"})
    _dtensor.check_head_split(name, q, k, placements["q"], 1)
    want = tuple(Shard(0) if p.is_shard(0) else Replicate() for p in placements["q"])
    for aux in ("key_padding_mask", "kv_lens"):
        if aux in placements and placements[aux] != want:
            raise _dtensor.refuse(name, aux, tensors[aux], f"with q split as {tuple(q.placements)} it must be {want}",
                                  "Distribute it like q's batch")
    local = [None if t is None else t.to_local() for t in (key_padding_mask, kv_lens)]
    result = _attention(q.to_local(), k.to_local(), v.to_local(), causal, scale, local[0], local[1], window, softcap,
                        return_lse, backend, offset)
    if not return_lse:
        return _dtensor.wrap(result, mesh, placements["q"], q.shape)
    out, lse = result  # lse (batch, heads, q_len): split as q's first two dimensions
    return _dtensor.wrap(out, mesh, placements["q"], q.shape), _dtensor.wrap(lse, mesh, placements["q"], q.shape[:3])


# Packed (varlen) sequences: the same kernels over (1, H, total, D) views, each "batch" entry a
# sequence (kernels/attention.py, Packed). Separate ops because the signature differs.
def _launch_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                       softmax_scale: float, window: int, softcap: float,
                       lse_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention

    packed = attention.Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = attention.attention_fwd(*_heads_first(q, k, v), causal=causal, softmax_scale=softmax_scale, pad=None,
                                       packed=packed, window=window, softcap=softcap)
    return out.transpose(1, 2).squeeze(0), lse.squeeze(0)


def _launch_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, causal: bool, softmax_scale: float, window: int, softcap: float,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention

    packed = attention.Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grads = attention.attention_bwd(*_heads_first(dout, q, k, v, out), lse.unsqueeze(0), causal=causal,
                                    softmax_scale=softmax_scale, pad=None, deterministic=deterministic, packed=packed,
                                    window=window, softcap=softcap, dlse=None if dlse is None else dlse.unsqueeze(0))
    return tuple(g.transpose(1, 2).squeeze(0) for g in grads)


def _heads_first(*packed: torch.Tensor) -> list[torch.Tensor]:
    """(total, H, D) tensors as the (1, H, total, D) views the kernels take."""
    return [t.unsqueeze(0).transpose(1, 2) for t in packed]


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                     window, softcap, lse_grad):
    total, heads, head_dim = q.shape
    return q.new_empty((total, heads, head_dim)), q.new_empty((heads, total), dtype=torch.float32)


def _fake_varlen_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     softmax_scale, window, softcap, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale, window, softcap, lse_grad = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = max_q, max_k, causal, softmax_scale, window, softcap
    ctx.lse_grad = lse_grad


def _varlen_backward_with(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = bwd_op(unit_stride_last(dout), q, k, v, out, lse, dlse if ctx.lse_grad else None, cu_q, cu_k,
                            *ctx.args, torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None, None, None, None, None, None, None

    return backward


_VARLEN_KERNELS = KernelOp("triton_flash_attention_varlen", _launch_varlen_fwd, _launch_varlen_bwd,
                           fake_forward=_fake_varlen_fwd, fake_backward=_fake_varlen_bwd,
                           setup_context=_varlen_setup_context, backward_with=_varlen_backward_with)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """Shapes, dtypes and devices; returns max_seqlen_q, max_seqlen_k as host ints."""
    op = "flash_attention_varlen"
    check_dtype(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    check_same_device(op, q=q, k=k, v=v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{op}: q, k, v must be 3-D (total_tokens, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    q_heads, head_dim = q.shape[1:]
    _check_heads(op, q_heads, k.shape[1], head_dim, k.shape[2])
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() == 0:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{op}: {name} must be a 1-D int32 tensor (batch + 1,), got {got}")
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    maxes = []
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, torch.Tensor):
            m = int(m)  # flash-attn takes these as ints too; a device tensor costs a sync here
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {m!r}")
        maxes.append(m)
    return maxes[0], maxes[1]


def _check_varlen_values(cu_q, cu_k, total_q, total_k, max_q, max_k) -> None:
    """What the offsets must satisfy: start at 0, never decrease, end at the total token count, no
    sequence longer than its max_seqlen (the grid covers only that many rows). On the CPU the
    values are host memory and a failure raises ValueError naming the rule; on a GPU (or while
    torch.compile traces) reading them would sync, so the same rules go to one device-side assert
    (torch._assert_async): an error, not a wrong answer, reported when the device gets there."""
    op = "flash_attention_varlen"
    rules = []
    for name, cu, total, longest in (("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)):
        lengths = cu[1:] - cu[:-1]
        rules += [
            (cu[0] == 0, f"{name} must start at 0"),
            ((lengths >= 0).all(), f"{name} must never decrease"),
            (cu[-1] == total, f"{name} must end at the total number of tokens, {total}"),
            ((lengths <= longest).all(), f"a sequence is longer than max_seqlen_{name[-1]} = {longest}"),
        ]
    if cu_q.device.type == "cpu" and not torch.compiler.is_compiling():
        for ok, message in rules:
            if not ok:
                raise ValueError(f"{op}: {message} (cu_seqlens_q {cu_q.tolist()}, cu_seqlens_k {cu_k.tolist()})")
        return
    ok = rules[0][0]
    for rule, _ in rules[1:]:
        ok = ok & rule
    torch._assert_async(ok, f"{op}: cu_seqlens_q/k or max_seqlen_q/k are inconsistent (start at 0, never decrease, "
                            "end at the token count, no sequence longer than its max_seqlen)")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal: bool = True,
                           softmax_scale: float | None = None, window: int | None = None,
                           softcap: float | None = None, return_lse: bool = False,
                           backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash attention over sequences packed without padding, in flash-attn's varlen layout.

    q: (total_q, q_heads, head_dim); k, v: (total_k, kv_heads, head_dim), q_heads a multiple of
    kv_heads (K/V never expanded). Sequence i is rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] of q
    and cu_seqlens_k[i] .. cu_seqlens_k[i + 1] of k and v: int32 (batch + 1,) tensors on q's
    device, from 0 to the total, never decreasing (zero-length sequences allowed). max_seqlen_q,
    max_seqlen_k: ints at least every sequence's length (they size the grid; a tensor is read on
    the host). Each sequence attends only to itself; ``causal`` is bottom-right aligned per
    sequence (query i of a sequence sees its keys j <= i + len_k − len_q), and ``window`` limits it
    per sequence as in ``flash_attention``. Other arguments (``softcap`` too) and
    numerics as ``flash_attention``. Returns (total_q, q_heads, head_dim) in q's dtype,
    differentiable in q, k and v; with ``return_lse``, also the lse as ``flash_attention``'s, laid
    out (q_heads, total_q) as flash-attn's varlen lse. No host sync on a GPU (the offsets are checked by a device-side
    assert there).
    """
    max_q, max_k = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _scale("flash_attention_varlen", q, softmax_scale)
    window = _window("flash_attention_varlen", window, causal)
    softcap = _softcap("flash_attention_varlen", softcap)
    return_lse = _flag("flash_attention_varlen", "return_lse", return_lse)
    if _dtensor.has_dtensor(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return _varlen_on_dtensors(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale, window, softcap,
                                   return_lse, backend)
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale, window, softcap,
                             return_lse, backend)


def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale, window, softcap, return_lse,
                      backend):
    """``flash_attention_varlen`` on checked plain tensors (the offsets' values are checked here)."""
    _check_varlen_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_q, max_k)
    if backend_for(q, backend, extension_op=False) == "reference":
        return references.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=scale,
                                           window=window or None, softcap=softcap or None, return_lse=return_lse)
    _check_kernel_head_dim("flash_attention_varlen", q.shape[-1])
    out, lse = _VARLEN_KERNELS.run("triton", direct_call_ok(q, k, v), unit_stride_last(q), unit_stride_last(k),
                                   unit_stride_last(v), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_q,
                                   max_k, bool(causal), scale, window, softcap, return_lse)
    return (out, _natural_lse(lse)) if return_lse else out


def _varlen_on_dtensors(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale, window, softcap,
                        return_lse, backend):
    """DTensor inputs: q, k, v split alike along the heads (as ``_on_dtensors``; a sequence split would
    cut sequences), the offsets replicated."""
    name = "flash_attention_varlen"
    tensors = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    mesh, placements = _dtensor.mesh_of(name, **tensors)
    _dtensor.attention_placements(name, tensors, placements, {1: "heads"})
    _dtensor.check_head_split(name, q, k, placements["q"], 1)
    for cu in ("cu_seqlens_q", "cu_seqlens_k"):
        _dtensor.require_replicated(name, cu, tensors[cu], placements[cu], "the sequence offsets must be replicated")
    result = _attention_varlen(q.to_local(), k.to_local(), v.to_local(), cu_seqlens_q.to_local(),
                               cu_seqlens_k.to_local(), max_q, max_k, causal, scale, window, softcap, return_lse,
                               backend)
    if not return_lse:
        return _dtensor.wrap(result, mesh, placements["q"], q.shape)
    from torch.distributed.tensor import Shard

    out, lse = result  # lse (heads, total_q): q's head split is its first dimension's
    lse_placements = tuple(Shard(0) if p.is_shard(1) else p for p in placements["q"])
    return (_dtensor.wrap(out, mesh, placements["q"], q.shape),
            _dtensor.wrap(lse, mesh, lse_placements, (q.shape[1], q.shape[0])))
