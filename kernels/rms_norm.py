"""Fused RMSNorm (as transformers' ``LlamaRMSNorm``), forward and backward, alone or after a residual add.

Shapes: x is (M, N) with unit stride along N (the op layer flattens leading dims), w is (N,).
``unit_offset`` (UNIT_OFFSET) selects Gemma's RMSNorm, whose formulas follow Llama's below.

Forward, per row, exactly the rounding of ``LlamaRMSNorm.forward``:
    rstd = 1 / sqrt(mean(x²) + eps)              in fp32
    xhat = round_to(x.dtype, x · rstd)           the normalised row, cast back to x's dtype
    y    = w · xhat                              in fp32, rounded to promote(w.dtype, x.dtype)

Backward, with g = dy · w (fp32) and xhat unrounded (rounding has derivative one):
    dx = rstd · (g − xhat · mean(g · xhat))
    dw = Σ_rows dy · round_to(x.dtype, xhat)
Saved for backward: x, w and rstd (one fp32 per row); xhat is recomputed, never stored.
dw is reduced deterministically: each program of the backward owns a set of rows and writes one
fp32 partial row; the partials are then summed in a fixed order.

Bytes (the roofline of this op):
    forward   M·N·(x + y) + N·w + 4·M                  (reads x, w; writes y, rstd)
    backward  M·N·(x + dy + dx) + N·w + 4·M + 4·P·N·2   (P partial dw rows written and re-read)
where x, y, ... are element sizes in bytes.

Gemma's RMSNorm (``Gemma3RMSNorm.forward``: ``x̂ · (1 + w)`` all in fp32, one rounding, to x's dtype):
    y    = round_to(x.dtype, x · rstd · (1 + w))  with rstd as above; xhat is never rounded
    dx   = rstd · (g − xhat · mean(g · xhat))   with g = dy · (1 + w)
    dw   = Σ_rows dy · xhat
Bytes as Llama's, with y and dy in x's dtype.

add_rms_norm (the decoder layer's ``hidden = residual + attn_out`` fused into the post-attention norm):
    s    = round_to(promote(x, r), x + r)        the sum as eager rounds it; the norm is of this s
    y    = rms_norm(s)                           as above, with s in place of x
Backward, given dy and ds (the gradient reaching s from the later layers through the residual):
    dx = dr = rms_norm's dx(dy) + ds             one tensor in s's dtype (the op casts it per input)
    dw      as rms_norm's, of s
Bytes: forward M·N·(x + r + y + s) + N·w + 4·M; backward rms_norm's of s, plus M·N·ds.
"""

import torch
import triton
import triton.language as tl

from ._launch import grid_of, on_tensor_device, persistent_programs, row_block, warps_for_row

# Widest row held in registers in one piece. Llama-3-70B needs 8192; 32768 keeps fp32 rows
# within a 16-warp program (64 values per thread per tensor).
MAX_COLS = 32768


@triton.jit
def _normalize_row(x, w, n_cols, eps, x_ptr, UNIT_OFFSET: tl.constexpr = False):
    """y (fp32, before its final rounding) and rstd of one row ``x`` (fp32, masked columns 0), whose input
    dtype is ``x_ptr``'s element type: the rounding of ``LlamaRMSNorm.forward`` (UNIT_OFFSET: Gemma's)."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if UNIT_OFFSET:
        # Gemma's norm stays in fp32 to the end: (x · rstd) · (1 + w), rounded once at the store.
        return x * rstd * (1.0 + w), rstd
    # LlamaRMSNorm casts the normalised row back to the input dtype before the weight multiply.
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    return w * xhat, rstd


@triton.jit
def _rms_norm_fwd_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    # sizes
    n_cols,
    # strides (elements)
    stride_x_row, stride_y_row,
    # parameters
    eps,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma's RMSNorm: x̂ · (1 + w) in fp32
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y, rstd = _normalize_row(x, w, n_cols, eps, x_ptr, UNIT_OFFSET)

    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_rms_norm_fwd_kernel(
    # pointers
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    # sizes
    n_cols,
    # strides (elements)
    stride_x_row, stride_r_row, stride_y_row, stride_s_row,
    # parameters
    eps,
    # meta-parameters
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
    # Eager's add rounds its output to promote(x, r), and the norm reads that rounded tensor. torch adds
    # fp16/bf16 in fp32 and rounds once to the output dtype, as here: s is eager's bit for bit.
    s = (x + r).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * stride_s_row + cols, s, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y, rstd = _normalize_row(s.to(tl.float32), w, n_cols, eps, s_ptr)

    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    # pointers
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, dadd_ptr,
    # sizes
    n_rows, n_cols,
    # strides (elements)
    stride_dy_row, stride_x_row, stride_dx_row, stride_dadd_row,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    HAS_DADD: tl.constexpr,  # add_rms_norm: dx also takes the gradient that reached the sum directly
    UNIT_OFFSET: tl.constexpr = False,  # Gemma's RMSNorm
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w += 1.0  # masked columns too: their dy is 0
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Rows pid, pid + P, pid + 2P, ...: consecutive programs touch consecutive rows.
    for row in range(pid, n_rows, tl.num_programs(0)):
        x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)

        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DADD:
            dx += tl.load(dadd_ptr + row * stride_dadd_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if UNIT_OFFSET:
            dw += dy * xhat
        else:
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)

    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


@on_tensor_device
def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """y, rstd for x (M, N) with x.stride(1) == 1 and w (N,); y in promote(w, x), or for Gemma's norm
    (``unit_offset``) in x's dtype."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=output_dtype(x, w, unit_offset), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block = row_block(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x, w, y, rstd,
        n_cols,
        x.stride(0), y.stride(0),
        eps,
        BLOCK_N=block, num_warps=warps_for_row(block, x.element_size()), UNIT_OFFSET=unit_offset,
    )
    return y, rstd


def output_dtype(x: torch.Tensor, w: torch.Tensor, unit_offset: bool) -> torch.dtype:
    """The dtype of y (and of dy): ``LlamaRMSNorm``'s promote(w, x), Gemma's x's own (``type_as(x)``)."""
    return x.dtype if unit_offset else torch.promote_types(w.dtype, x.dtype)


@on_tensor_device
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and dw (w's dtype) for dy (M, N) with dy.stride(1) == 1."""
    return _backward(dy, x, w, rstd, None, unit_offset)


@on_tensor_device
def add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, summed = x + residual, rstd for x, residual (M, N) with unit stride along N and w (N,): summed in
    promote(x, residual), y in promote(w, summed)."""
    n_rows, n_cols = x.shape
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty((n_rows, n_cols), dtype=summed_dtype, device=x.device)
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(w.dtype, summed_dtype), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, summed, rstd
    block = row_block(n_cols)
    _add_rms_norm_fwd_kernel[grid_of(n_rows)](
        x, residual, w, y, summed, rstd,
        n_cols,
        x.stride(0), residual.stride(0), y.stride(0), summed.stride(0),
        eps,
        # warps for the widest of the row's tensors: the narrower then hold 16 bytes a thread, still 128-bit
        BLOCK_N=block, num_warps=warps_for_row(block, summed.element_size()),
    )
    return y, summed, rstd


@on_tensor_device
def add_rms_norm_bwd(
    dy: torch.Tensor, dsummed: torch.Tensor | None, summed: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(summed) in summed's dtype, the gradient of both x and residual (rms_norm's dx plus ``dsummed``, both
    (M, N) with unit stride along N; None: no gradient reached summed directly), and dw (w's dtype)."""
    return _backward(dy, summed, w, rstd, dsummed)


def _backward(dy, x, w, rstd, dadd, unit_offset=False):
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    programs = persistent_programs(x.device, n_rows, per_sm=2)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(w)
    block = row_block(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, w, rstd, dx, dw_partial, dy if dadd is None else dadd,
        n_rows, n_cols,
        dy.stride(0), x.stride(0), dx.stride(0), 0 if dadd is None else dadd.stride(0),
        BLOCK_N=block, num_warps=warps_for_row(block, x.element_size()), HAS_DADD=dadd is not None,
        UNIT_OFFSET=unit_offset,
    )
    return dx, dw_partial.sum(0).to(w.dtype)
