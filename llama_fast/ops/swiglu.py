"""The gated MLP's activation in one kernel each way: ``swiglu``, silu(gate) · up (``LlamaMLP``), and ``geglu``,
gelu_tanh(gate) · up (Gemma's MLP). One op with the activation an argument of its kernels, two names."""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_rows
from ._dispatch import KernelOp, direct_call_ok


# Triton's kernels and the C++ extension's, registered as custom ops by KernelOp (ops/_dispatch.py).
def _launch_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_fwd(gate, up, activation)


def _launch_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_bwd(dout, gate, up, activation)


def _fake_fwd(gate, up, activation="silu"):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _fake_bwd(dout, gate, up, activation="silu"):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, ctx.activation = inputs
    ctx.save_for_backward(gate, up)


def _backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return *bwd_op(unit_stride_rows(dout), gate, up, ctx.activation), None

    return backward


_KERNELS = KernelOp("triton_swiglu", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with, extension="swiglu")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up. gate, up: same shape and dtype (float32/float16/bfloat16)."""
    return _gated("swiglu", "silu", gate, up, backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up, Gemma's MLP gating (transformers' "gelu_pytorch_tanh").
    gate, up: same shape and dtype (float32/float16/bfloat16)."""
    return _gated("geglu", "gelu_tanh", gate, up, backend)


def _gated(name, activation, gate, up, backend):
    check_dtype(name, gate=gate, up=up)
    check_same_dtype(name, gate=gate, up=up)
    check_same_device(name, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"{name}: inputs need a non-empty last dim, got shape {tuple(gate.shape)}")
    if _dtensor.has_dtensor(gate, up):
        return _on_dtensors(name, activation, gate, up, backend)
    return _plain(activation, gate, up, backend)


def _plain(activation, gate, up, backend):
    """The op on checked plain tensors."""
    chosen = backend_for(gate, backend)
    if chosen == "reference":
        return references.swiglu(gate, up, activation)
    out = _KERNELS.run(chosen, direct_call_ok(gate, up), unit_stride_rows(gate), unit_stride_rows(up), activation)
    return out if gate.dim() == 2 else out.view_as(gate)


def _on_dtensors(name, activation, gate, up, backend):
    """DTensor inputs: elementwise, so gate and up may be split along any dim, alike; out is split as gate."""
    mesh, placements = _dtensor.mesh_of(name, gate=gate, up=up)
    _dtensor.same_placements(name, "gate", placements, dict(gate=gate, up=up), "the op is elementwise")
    out = _plain(activation, gate.to_local(), up.to_local(), backend)
    return _dtensor.wrap(out, mesh, placements["gate"], gate.shape)
