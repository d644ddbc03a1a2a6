"""``swiglu``: silu(gate) · up in one kernel each way (the gating of ``LlamaMLP``)."""

import torch

from .. import extension, references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_rows
from ._dispatch import call_extension_op, direct_call_ok


# The Triton path as torch.library custom ops, like the extension's (why: ops/rms_norm.py); eager
# inference calls the launcher itself (_dispatch.py).
def _launch_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_fwd(gate, up)


_triton_fwd = torch.library.custom_op("llama_fast::triton_swiglu_fwd", _launch_fwd, mutates_args=())


@torch.library.custom_op("llama_fast::triton_swiglu_bwd", mutates_args=())
def _triton_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import swiglu as kernel

    return kernel.swiglu_bwd(dout, gate, up)


def fake_fwd(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def fake_bwd(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return bwd_op(unit_stride_rows(dout), gate, up)

    return backward


_triton_fwd.register_fake(fake_fwd)
_triton_bwd.register_fake(fake_bwd)
_triton_fwd.register_autograd(backward_with(_triton_bwd), setup_context=setup_context)


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
        return _dtensor.swiglu(gate, up, backend)
    chosen = backend_for(gate, backend)
    if chosen == "reference":
        return references.swiglu(gate, up)
    direct = direct_call_ok(gate, up)
    if chosen in ("cpu", "cuda"):
        extension.available()  # loads it (and its fake/autograd parts) once
        args, op = (unit_stride_rows(gate), unit_stride_rows(up)), torch.ops.llama_fast.swiglu_fwd
        out = call_extension_op(op, *args) if direct else op(*args)
    else:
        out = (_launch_fwd if direct else _triton_fwd)(unit_stride_rows(gate), unit_stride_rows(up))
    return out if gate.dim() == 2 else out.view_as(gate)
