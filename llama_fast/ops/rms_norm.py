"""``rms_norm``: transformers' ``LlamaRMSNorm.forward`` as one fused kernel each way."""

import torch

from .. import extension, references
from ..backend import backend_for
from ._checks import check_dtype, check_same_device, unit_stride_rows


class _RMSNormFunction(torch.autograd.Function):
    """On 2-D rows only: the public function flattens first, so ranks never change here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from ..kernels import rmsnorm

        y, rstd = rmsnorm.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from ..kernels import rmsnorm

        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rmsnorm.rms_norm_bwd(unit_stride_rows(dy), x, weight, rstd)
        return dx, dweight, None


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    from ..kernels.rmsnorm import MAX_COLS

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
    chosen = backend_for(x, backend)
    if chosen == "reference":
        return references.rms_norm(x, weight, eps)
    if chosen in ("cpu", "cuda"):
        extension.available()  # loads it (and its fake/autograd parts) once
        y, _ = torch.ops.llama_fast.rms_norm_fwd(unit_stride_rows(x), weight.contiguous(), float(eps))
    else:
        y = _RMSNormFunction.apply(unit_stride_rows(x), weight, float(eps))
    return y if x.dim() == 2 else y.view(x.shape)
