"""``rms_norm``: transformers' ``LlamaRMSNorm.forward`` as one fused kernel each way, and Gemma's RMSNorm
(``unit_offset=True``) in the same kernels."""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, unit_stride_rows
from ._dispatch import KernelOp, direct_call_ok

# Triton's kernels and the C++ extension's, one forward and one backward each way, registered as custom
# ops by KernelOp (ops/_dispatch.py); eager inference calls the launcher itself, skipping the op's dispatch.


def _launch_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.rms_norm_fwd(x, weight, eps, unit_offset)


def _launch_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.rms_norm_bwd(dy, x, weight, rstd, unit_offset)


def _fake_fwd(x, weight, eps, unit_offset=False):
    """Outputs of the forward ops (x 2-D rows): y in promote(weight, x) (Gemma's: x's dtype), rstd fp32 per row."""
    from ..kernels.rms_norm import output_dtype

    return (x.new_empty(x.shape, dtype=output_dtype(x, weight, unit_offset)),
            x.new_empty(x.shape[:1], dtype=torch.float32))


def _fake_bwd(dy, x, weight, rstd, unit_offset=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _, ctx.unit_offset = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward_with(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (Triton's or the extension's)."""

    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = bwd_op(unit_stride_rows(dy), x, weight, rstd, ctx.unit_offset)
        return dx, dweight, None, None

    return backward


_KERNELS = KernelOp("triton_rms_norm", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with, extension="rms_norm")


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, unit_offset: bool = False,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``, exactly as ``LlamaRMSNorm.forward``.

    x: (..., N) float32/float16/bfloat16; weight: (N,). Returns (..., N) in
    ``promote_types(weight.dtype, x.dtype)``. Differentiable in x and weight.

    ``unit_offset=True``: Gemma's RMSNorm (``Gemma3RMSNorm``, Gemma 2's too) instead, the weight stored
    as an offset from one: ``x̂ · (1 + weight)`` computed in fp32 and rounded once, to x's dtype.
    """
    _check(x, weight)
    if _dtensor.has_dtensor(x, weight):
        return _on_dtensors(x, weight, eps, bool(unit_offset), backend)
    return _rms_norm(x, weight, eps, bool(unit_offset), backend)


def _rms_norm(x, weight, eps, unit_offset, backend):
    """``rms_norm`` on checked plain tensors."""
    chosen = backend_for(x, backend)
    if chosen == "reference":
        return references.rms_norm(x, weight, eps, unit_offset=unit_offset)
    y, _ = _KERNELS.run(chosen, direct_call_ok(x, weight), unit_stride_rows(x), weight.contiguous(), float(eps),
                        unit_offset)
    return y if x.dim() == 2 else y.view_as(x)


def _on_dtensors(x, weight, eps, unit_offset, backend):
    """DTensor inputs: x may be split along any dim but the last, which RMSNorm reduces over; the weight
    is replicated, and its gradient is Partial where x is sharded (each rank sums only its rows)."""
    mesh, placements = _dtensor.mesh_of("rms_norm", x=x, weight=weight)
    if x.dim() - 1 in _dtensor.sharded_dims(placements["x"]):
        raise _dtensor.refuse("rms_norm", "x", x, "its last dim, which RMSNorm reduces over, is sharded")
    _dtensor.require_replicated("rms_norm", "weight", weight, placements["weight"], "the weight must be replicated")
    local_weight = weight.to_local(grad_placements=_dtensor.partial_where_sharded(placements["x"]))
    y = _rms_norm(x.to_local(), local_weight, eps, unit_offset, backend)
    return _dtensor.wrap(y, mesh, placements["x"], x.shape)
