"""``swiglu``: silu(gate) · up in one kernel each way (the gating of ``LlamaMLP``)."""

import torch

from .. import extension, references
from ..backend import backend_for
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_rows


class _SwiGLUFunction(torch.autograd.Function):
    """On 2-D rows only: the public function flattens first."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from ..kernels import swiglu as kernel

        ctx.save_for_backward(gate, up)
        return kernel.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        from ..kernels import swiglu as kernel

        gate, up = ctx.saved_tensors
        return kernel.swiglu_bwd(unit_stride_rows(dout), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up. gate, up: same shape and dtype (float32/float16/bfloat16)."""
    check_dtype("swiglu", gate=gate, up=up)
    check_same_dtype("swiglu", gate=gate, up=up)
    check_same_device("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(f"swiglu: inputs need a non-empty last dim, got shape {tuple(gate.shape)}")
    chosen = backend_for(gate, backend)
    if chosen == "reference":
        return references.swiglu(gate, up)
    if chosen in ("cpu", "cuda"):
        extension.available()  # loads it (and its fake/autograd parts) once
        out = torch.ops.llama_fast.swiglu_fwd(unit_stride_rows(gate), unit_stride_rows(up))
    else:
        out = _SwiGLUFunction.apply(unit_stride_rows(gate), unit_stride_rows(up))
    return out if gate.dim() == 2 else out.view(gate.shape)
