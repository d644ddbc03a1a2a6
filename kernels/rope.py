"""Rotary position embedding in the rotate_half layout (transformers' ``apply_rotary_pos_emb``).

Shapes: q (B, Hq, S, D) and k (B, Hk, S, D), any strides with unit stride along D; cos and sin
(B or 1, S, D) with unit stride along D (a stride of 0 along B broadcasts one table to the batch).
Writing x = [x1, x2] and c = [c1, c2], s = [s1, s2] as halves of width D/2:

Forward (x · cos + rotate_half(x) · sin, with rotate_half(x) = [−x2, x1]):
    y1 = x1 · c1 − x2 · s1
    y2 = x2 · c2 + x1 · s2
Backward (the transpose of that linear map; rotate_halfᵀ(y) = [y2, −y1]):
    dx1 = dy1 · c1 + dy2 · s2
    dx2 = dy2 · c2 − dy1 · s1
The map is linear in x, so backward saves only cos and sin. Maths in fp32, one rounding at the
store (eager PyTorch rounds after each multiply and add).

One program per token (b, s) rotates every head of q and of k, so the cos/sin row is read once.
Bytes: forward and backward both move B·S·D·(Hq + Hk)·(in + out) + 2·B'·S·D·cos bytes.
"""

import torch
import triton
import triton.language as tl

from ._launch import next_power_of_2, on_tensor_device


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, n_heads, stride_in_h, stride_out_h,
    c1, c2, s1, s2, d, d_mask,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < n_heads) & d_mask[None, :]
    in_off = h * stride_in_h + d[None, :]
    out_off = h * stride_out_h + d[None, :]
    x1 = tl.load(in_ptr + in_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptr + in_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_ptr + out_off, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_off + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    # pointers
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_ptr, v_out_ptr, start_ptr,
    # sizes
    seq_len, n_q_heads, n_k_heads, kv_rows,
    # strides (elements; D has unit stride everywhere)
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_qo_b, stride_qo_h, stride_qo_s,
    stride_ko_b, stride_ko_h, stride_ko_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_vo_b, stride_vo_h, stride_vo_s,
    stride_cs_b, stride_cs_s,
    # meta-parameters
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
    HAS_V: tl.constexpr, HAS_START: tl.constexpr,
):
    """HAS_V: also copy v to v_out (a KV cache's value rows, beside the rotated keys). HAS_START:
    the k and v outputs start at the row held in start_ptr[0] (a static cache's fill count, read on
    the device); q's output does not move."""
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    s_kv = s
    if HAS_START:
        s_kv = s + tl.load(start_ptr).to(tl.int64)
    # A row past the k and v outputs' end (a static cache already full) is not written.
    n_kv_heads = tl.where(s_kv < kv_rows, n_k_heads, 0)

    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cs_off = b * stride_cs_b + s * stride_cs_s + d
    c1 = tl.load(cos_ptr + cs_off, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs_off + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs_off, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs_off + HALF, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    _rotate_heads(
        q_ptr + b * stride_q_b + s * stride_q_s, q_out_ptr + b * stride_qo_b + s * stride_qo_s,
        n_q_heads, stride_q_h, stride_qo_h, c1, c2, s1, s2, d, d_mask,
        HALF, BLOCK_HQ, BACKWARD,
    )
    _rotate_heads(
        k_ptr + b * stride_k_b + s * stride_k_s, k_out_ptr + b * stride_ko_b + s_kv * stride_ko_s,
        n_kv_heads, stride_k_h, stride_ko_h, c1, c2, s1, s2, d, d_mask,
        HALF, BLOCK_HK, BACKWARD,
    )
    if HAS_V:
        h = tl.arange(0, BLOCK_HK)[:, None]
        tile = (h < n_kv_heads) & d_mask[None, :]
        v_in = v_ptr + b * stride_v_b + s * stride_v_s + h * stride_v_h + d[None, :]
        v_out = v_out_ptr + b * stride_vo_b + s_kv * stride_vo_s + h * stride_vo_h + d[None, :]
        tl.store(v_out, tl.load(v_in, mask=tile), mask=tile)
        tl.store(v_out + HALF, tl.load(v_in + HALF, mask=tile), mask=tile)


@on_tensor_device
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D) by cos, sin (B or broadcast, S, D), in
    ``promote(q, k, cos)``. Outputs keep their input's memory layout (``empty_like``), so a
    transposed view of a projection stays one."""
    q_out, k_out = _outputs(q, k, cos, backward=False)
    if q.numel() or k.numel():
        _launch(q, k, cos, sin, q_out, k_out, None, None, None, backward=False)
    return q_out, k_out


@on_tensor_device
def rope_bwd(dq_embed: torch.Tensor, dk_embed: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q and k from those of ``rope_fwd``'s outputs: the transposed rotation, in
    the gradients' own dtypes and layouts."""
    dq, dk = _outputs(dq_embed, dk_embed, cos, backward=True)
    if dq_embed.numel() or dk_embed.numel():
        _launch(dq_embed, dk_embed, cos, sin, dq, dk, None, None, None, backward=True)
    return dq, dk


@on_tensor_device
def rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_dst: torch.Tensor, v_dst: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """The rotated q, returned, and the rotated k and v itself written into a KV cache's buffers in
    the same launch: k_dst, v_dst (B, Hk, rows, D) in the cache's dtype (``promote(q, k, cos)``,
    v's), written at rows [start, start + S) with ``start`` a one-element integer tensor on the
    device (a static cache's fill count, never read on the host), or at [0, S) when None (k_dst and
    v_dst are then views of the rows to fill). Rows past the buffer's end are not written."""
    q_out = torch.empty_like(q, dtype=k_dst.dtype)
    if q.numel() == 0 and k.numel() == 0:
        return q_out
    _launch(q, k, cos, sin, q_out, k_dst, v, v_dst, start, backward=False)
    return q_out


def _outputs(q, k, cos, *, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), cos.dtype)
    return (torch.empty_like(q, dtype=q.dtype if backward else out_dtype),
            torch.empty_like(k, dtype=k.dtype if backward else out_dtype))


def _launch(q, k, cos, sin, q_out, k_out, v, v_out, start, *, backward: bool) -> None:
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = head_dim // 2
    block_hq = next_power_of_2(n_q_heads)
    block_hk = next_power_of_2(n_k_heads)
    block_half = next_power_of_2(half)
    elements = (block_hq + block_hk * (1 if v is None else 2)) * block_half * 2
    has_v = v is not None
    _rope_kernel[(batch * seq_len,)](
        q, k, cos, sin, q_out, k_out, v if has_v else q, v_out if has_v else q_out, q if start is None else start,
        seq_len, n_q_heads, n_k_heads, k_out.shape[2],
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        *(v.stride()[:3] if has_v else (0, 0, 0)), *(v_out.stride()[:3] if has_v else (0, 0, 0)), *cos.stride()[:2],
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BACKWARD=backward,
        HAS_V=has_v, HAS_START=start is not None,
        # About 16 values per thread, a power of two warps: Llama-3-8B (32 + 8 heads, D 128) gets 8.
        num_warps=min(8, 1 << (max(1, elements // (32 * 16)).bit_length() - 1)),
    )
