"""``rms_norm``: transformers' ``LlamaRMSNorm.forward`` as one fused kernel each way."""

import torch

from .. import extension, references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, unit_stride_rows
from ._dispatch import call_extension_op, direct_call_ok


# The Triton path as torch.library custom ops (one for each pass), like the C++ extension's ops:
# torch.compile sees one opaque call with a fake implementation for tracing, rather than tracing
# (and breaking on) the launcher's host code; autograd is registered on the forward op. custom_op
# rather than triton_op: the launchers choose tiles and paths on the host, which Dynamo would
# otherwise have to trace, and the ops must also run on CPU tensors under Triton's interpreter.
# Eager inference calls the launcher itself (``_launch_fwd``), skipping the op's dispatch (_dispatch.py).
def _launch_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.rms_norm_fwd(x, weight, eps)


_triton_fwd = torch.library.custom_op("llama_fast::triton_rms_norm_fwd", _launch_fwd, mutates_args=())


@torch.library.custom_op("llama_fast::triton_rms_norm_bwd", mutates_args=())
def _triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.rms_norm_bwd(dy, x, weight, rstd)


def fake_fwd(x, weight, eps):
    """Outputs of the forward ops (x 2-D rows): y in promote(weight, x), rstd fp32 per row."""
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape[:1],
                                                                                                dtype=torch.float32)


def fake_bwd(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = bwd_op(unit_stride_rows(dy), x, weight, rstd)
        return dx, dweight, None

    return backward


_triton_fwd.register_fake(fake_fwd)
_triton_bwd.register_fake(fake_bwd)
_triton_fwd.register_autograd(backward_with(_triton_bwd), setup_context=setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    from ..kernels.rms_norm import MAX_COLS

    check_dtype("rms_norm", x=x, weight=weight)
    check_same_device("rms_norm", x=x, weight=weight)
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}"
        )
    if not 1 <= x.shape[-1] <= MAX_COLS:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} is outside the supported 1..{MAX_COLS}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``, exactly as ``LlamaRMSNorm.forward``.

    x: (..., N) float32/float16/bfloat16; weight: (N,). Returns (..., N) in
    ``promote_types(weight.dtype, x.dtype)``. Differentiable in x and weight.
    """
    _check(x, weight)
    if _dtensor.has_dtensor(x, weight):
        return _dtensor.rms_norm(x, weight, eps, backend)
    chosen = backend_for(x, backend)
    if chosen == "reference":
        return references.rms_norm(x, weight, eps)
    direct = direct_call_ok(x, weight)
    if chosen in ("cpu", "cuda"):
        extension.available()  # loads it (and its fake/autograd parts) once
        args, op = (unit_stride_rows(x), weight.contiguous(), float(eps)), torch.ops.llama_fast.rms_norm_fwd
        y, _ = call_extension_op(op, *args) if direct else op(*args)
    else:
        y, _ = (_launch_fwd if direct else _triton_fwd)(unit_stride_rows(x), weight, float(eps))
    return y if x.dim() == 2 else y.view_as(x)
