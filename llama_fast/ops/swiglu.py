"""``swiglu``: silu(gate) · up in one kernel each way (the gating of ``LlamaMLP``)."""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_rows
from ._dispatch import KernelOp, direct_call_ok


# Triton's kernels and the C++ extension's, registered as custom ops by KernelOp (ops/_dispatch.py).
def _launch_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_fwd(gate, up)


def _launch_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_bwd(dout, gate, up)


def _fake_fwd(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _fake_bwd(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return bwd_op(unit_stride_rows(dout), gate, up)

    return backward


_KERNELS = KernelOp("triton_swiglu", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with, extension="swiglu")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up. gate, up: same shape and dtype (float32/float16/bfloat16)."""
    check_dtype("swiglu", gate=gate, up=up)
    check_same_dtype("swiglu", gate=gate, up=up)
    check_same_device("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"swiglu: inputs need a non-empty last dim, got shape {tuple(gate.shape)}")
    if _dtensor.has_dtensor(gate, up):
        return _on_dtensors(gate, up, backend)
    return _swiglu(gate, up, backend)


def _swiglu(gate, up, backend):
    """``swiglu`` on checked plain tensors."""
    chosen = backend_for(gate, backend)
    if chosen == "reference":
        return references.swiglu(gate, up)
    out = _KERNELS.run(chosen, direct_call_ok(gate, up), unit_stride_rows(gate), unit_stride_rows(up))
    return out if gate.dim() == 2 else out.view_as(gate)


def _on_dtensors(gate, up, backend):
    """DTensor inputs: elementwise, so gate and up may be split along any dim, alike; out is split as gate."""
    mesh, placements = _dtensor.mesh_of("swiglu", gate=gate, up=up)
    _dtensor.same_placements("swiglu", "gate", placements, dict(gate=gate, up=up), "the op is elementwise")
    out = _swiglu(gate.to_local(), up.to_local(), backend)
    return _dtensor.wrap(out, mesh, placements["gate"], gate.shape)
