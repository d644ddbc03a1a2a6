"""``add_rms_norm``: the decoder layer's residual add fused into the RMSNorm that follows it.

transformers' ``LlamaDecoderLayer.forward`` runs ``hidden = residual + attn_out`` and then
``post_attention_layernorm(hidden)``, keeping ``hidden`` as the next residual: two kernels, and the sum
written and read back between them, which Inductor cannot fuse through the norm's opaque custom op.
One kernel each way here. Triton only: the C++ extension has no fused kernel, so a CPU without
Triton's interpreter runs the eager reference (``references.add_rms_norm``).
"""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, unit_stride_rows
from ._dispatch import KernelOp, direct_call_ok

_OP = "add_rms_norm"


def _launch_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.add_rms_norm_fwd(x, residual, weight, eps)


def _launch_bwd(dy: torch.Tensor, dsummed: torch.Tensor, summed: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import rms_norm as kernel

    return kernel.add_rms_norm_bwd(dy, dsummed, summed, weight, rstd)


def _fake_fwd(x, residual, weight, eps):
    """Outputs of the forward op (2-D rows): y in promote(weight, summed), summed in promote(x, residual),
    rstd fp32 per row."""
    summed = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, summed)),
            x.new_empty(x.shape, dtype=summed), x.new_empty(x.shape[:1], dtype=torch.float32))


def _fake_bwd(dy, dsummed, summed, weight, rstd):
    return torch.empty_like(summed, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.dtypes = x.dtype, residual.dtype
    ctx.save_for_backward(output[1], weight, output[2])


def _backward_with(bwd_op):
    def backward(ctx, dy, dsummed, _drstd):
        summed, weight, rstd = ctx.saved_tensors
        dsum, dweight = bwd_op(unit_stride_rows(dy), unit_stride_rows(dsummed), summed, weight, rstd)
        # x and residual reach the norm only through their sum: each gets its gradient, in its own dtype
        # (the same tensor for both when the dtypes agree, as eager's add backward gives).
        x_dtype, residual_dtype = ctx.dtypes
        return dsum.to(x_dtype), dsum.to(residual_dtype), dweight, None

    return backward


_KERNELS = KernelOp(f"triton_{_OP}", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with)


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    from ..kernels.rms_norm import MAX_COLS

    check_dtype(_OP, x=x, residual=residual, weight=weight)
    check_same_device(_OP, x=x, residual=residual, weight=weight)
    if x.shape != residual.shape:
        raise ValueError(f"{_OP}: x and residual must have one shape (no broadcasting), got {tuple(x.shape)} and "
                         f"{tuple(residual.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have at least one dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{_OP}: weight must have shape ({x.shape[-1]},) to match x's last dim, got "
                         f"{tuple(weight.shape)}")
    if not 1 <= x.shape[-1] <= MAX_COLS:
        raise ValueError(f"{_OP}: hidden size {x.shape[-1]} is outside the supported 1..{MAX_COLS}")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``summed = x + residual`` and ``rms_norm(summed, weight, eps)`` in one kernel: returns (y, summed).

    x, residual: (..., N) of one shape, float32/float16/bfloat16 (summed is in their promoted dtype, as
    eager's add; the norm is of summed as rounded to it); weight: (N,), y in promote(weight, summed),
    exactly as ``LlamaRMSNorm.forward`` of summed. Differentiable in x, residual and weight, through both
    outputs. Backends "triton" and "reference" (no C++ kernel).
    """
    _check(x, residual, weight)
    if _dtensor.has_dtensor(x, residual, weight):
        return _on_dtensors(x, residual, weight, eps, backend)
    return _add_rms_norm(x, residual, weight, eps, backend)


def _add_rms_norm(x, residual, weight, eps, backend):
    """``add_rms_norm`` on checked plain tensors."""
    chosen = backend_for(x, backend, extension_op=False)
    if chosen == "reference":
        return references.add_rms_norm(x, residual, weight, eps)
    y, summed, _ = _KERNELS.run(chosen, direct_call_ok(x, residual, weight), unit_stride_rows(x),
                                unit_stride_rows(residual), weight.contiguous(), float(eps))
    return (y, summed) if x.dim() == 2 else (y.view(x.shape), summed.view(x.shape))


def _on_dtensors(x, residual, weight, eps, backend):
    """DTensor inputs, rms_norm's rule: x and residual split alike (the add is elementwise) along any dim
    but the last, which RMSNorm reduces over; the weight replicated, its gradient Partial where x is
    sharded. Both outputs are split as x."""
    mesh, placements = _dtensor.mesh_of(_OP, x=x, residual=residual, weight=weight)
    _dtensor.same_placements(_OP, "x", {n: placements[n] for n in ("x", "residual")},
                             dict(x=x, residual=residual), "the add is elementwise")
    if x.dim() - 1 in _dtensor.sharded_dims(placements["x"]):
        raise _dtensor.refuse(_OP, "x", x, "its last dim, which RMSNorm reduces over, is sharded")
    _dtensor.require_replicated(_OP, "weight", weight, placements["weight"], "the weight must be replicated")
    local_weight = weight.to_local(grad_placements=_dtensor.partial_where_sharded(placements["x"]))
    y, summed = _add_rms_norm(x.to_local(), residual.to_local(), local_weight, eps, backend)
    return (_dtensor.wrap(y, mesh, placements["x"], x.shape), _dtensor.wrap(summed, mesh, placements["x"], x.shape))
