"""The gated MLP's activation, act(gate) · up: SwiGLU (act = SiLU, transformers' ``LlamaMLP``) and GeGLU
(act = GELU with the tanh approximation, Gemma's MLP), one kernel each way with ACTIVATION a constexpr.

Shapes: gate and up (M, N), any row stride and unit stride along N (a fused gate_up projection
split with ``chunk`` arrives as two such views); out (M, N) contiguous.

Forward, with σ the logistic function:
    out = gate · σ(gate) · up
Backward (saves gate and up, recomputes σ):
    d_up   = dout · gate · σ(gate)
    d_gate = dout · up · σ(gate) · (1 + gate · (1 − σ(gate)))
GeGLU, with z = √(2/π) · (gate + 0.044715 · gate³) and s = σ(2z) (= (1 + tanh z) / 2, so gate · s is
``gelu(gate, approximate="tanh")``):
    out    = gate · s · up
    d_up   = dout · gate · s
    d_gate = dout · up · (s + gate · 2s(1 − s) · √(2/π) · (1 + 3 · 0.044715 · gate²)),  1 − s = σ(−2z)
Maths in fp32, one rounding at the store.

Bytes: forward M·N·(gate + up + out); backward M·N·(dout + gate + up + d_gate + d_up).
"""

import torch
import triton
import triton.language as tl

from ._launch import cdiv, grid_of, on_tensor_device

# 1024 elements per program: 4 warps × 32 threads × 8 values, one 128-bit vector of bf16 each.
_BLOCK_N = 1024

ACTIVATIONS = ("silu", "gelu_tanh")
# constexpr: a compiled kernel may read only constexpr globals (the interpreter reads any)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _activation(gate, ACTIVATION: tl.constexpr):
    """act(gate) and its derivative, gate fp32."""
    if ACTIVATION == "silu":
        sig = tl.sigmoid(gate)
        return gate * sig, sig * (1.0 + gate * (1.0 - sig))
    else:  # "gelu_tanh"
        x = 2.0 * _SQRT_2_OVER_PI * (gate + _GELU_CUBIC * gate * gate * gate)
        s = tl.sigmoid(x)
        dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * gate * gate)
        # 1 - s as σ(-x): computed as 1 - s it cancels for gate > 0 (s near 1), and the derivative was 2e-6
        # off in fp32 at gate = 5, twice eager's error; σ(-x) took it to 2e-7 (a sweep of [-8, 8])
        return gate * s, s + gate * 2.0 * s * tl.sigmoid(-x) * dz


@triton.jit
def _swiglu_fwd_kernel(
    # pointers
    gate_ptr, up_ptr, out_ptr,
    # sizes
    n_cols,
    # strides (elements)
    stride_gate_row, stride_up_row, stride_out_row,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "silu" or "gelu_tanh"
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * stride_gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up_row + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(gate, ACTIVATION)  # the derivative unused: dead code, removed by the compiler
    out = act * up
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    # pointers
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    # sizes
    n_cols,
    # strides (elements)
    stride_dout_row, stride_gate_row, stride_up_row, stride_dgate_row, stride_dup_row,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dout = tl.load(dout_ptr + row * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up_row + cols, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(gate, ACTIVATION)
    d_up = dout * act
    d_gate = dout * up * d_act
    tl.store(dgate_ptr + row * stride_dgate_row + cols, d_gate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup_row + cols, d_up.to(dup_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return grid_of(n_rows, cdiv(n_cols, _BLOCK_N))


@on_tensor_device
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) · up, ``activation`` one of ACTIVATIONS."""
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() == 0:
        return out
    _swiglu_fwd_kernel[_grid(n_rows, n_cols)](
        gate, up, out,
        n_cols,
        gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_N=_BLOCK_N, num_warps=4, ACTIVATION=activation,
    )
    return out


@on_tensor_device
def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = gate.shape
    d_gate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if d_gate.numel() == 0:
        return d_gate, d_up
    _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
        dout, gate, up, d_gate, d_up,
        n_cols,
        dout.stride(0), gate.stride(0), up.stride(0), d_gate.stride(0), d_up.stride(0),
        BLOCK_N=_BLOCK_N, num_warps=4, ACTIVATION=activation,
    )
    return d_gate, d_up
