"""Fused RMSNorm (as transformers' ``LlamaRMSNorm``), forward and backward.

Shapes: x is (M, N) with unit stride along N (the op layer flattens leading dims), w is (N,).

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
"""

import torch
import triton
import triton.language as tl

from ._launch import on_tensor_device, persistent_programs, row_block, warps_for_row

# Widest row held in registers in one piece. Llama-3-70B needs 8192; 32768 keeps fp32 rows
# within a 16-warp program (64 values per thread per tensor).
MAX_COLS = 32768


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
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # LlamaRMSNorm casts the normalised row back to the input dtype before the weight multiply.
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * xhat

    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    # pointers
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    # sizes
    n_rows, n_cols,
    # strides (elements)
    stride_dy_row, stride_x_row, stride_dx_row,
    # meta-parameters
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Rows pid, pid + P, pid + 2P, ...: consecutive programs touch consecutive rows.
    for row in range(pid, n_rows, tl.num_programs(0)):
        x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)

        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)

    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


@on_tensor_device
def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y, rstd for x (M, N) with x.stride(1) == 1 and w (N,)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(w.dtype, x.dtype), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block = row_block(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x, w, y, rstd,
        n_cols,
        x.stride(0), y.stride(0),
        eps,
        BLOCK_N=block, num_warps=warps_for_row(block, x.element_size()),
    )
    return y, rstd


@on_tensor_device
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and dw (w's dtype) for dy (M, N) with dy.stride(1) == 1."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    programs = persistent_programs(x.device, n_rows, per_sm=2)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(w)
    block = row_block(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, w, rstd, dx, dw_partial,
        n_rows, n_cols,
        dy.stride(0), x.stride(0), dx.stride(0),
        BLOCK_N=block, num_warps=warps_for_row(block, x.element_size()),
    )
    return dx, dw_partial.sum(0).to(w.dtype)
