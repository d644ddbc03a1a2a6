"""The C++/CUDA extension ``llama_fast._C`` (csrc/): loading it, and its Python half.

Loading the shared library registers the ops ``torch.ops.llama_fast.{rms_norm,rope,swiglu}_{fwd,bwd}``
with CPU and (when built with CUDA) CUDA kernels. This module adds what the dispatcher needs from
Python, once, on first use: fake (meta) implementations, so the ops trace under
``torch.compile``, and autograd formulas that call the ``_bwd`` ops, so they train.

The library works without the extension: ``available()`` says whether it was built, and
``llama_fast.backend`` only offers the "cpu" / "cuda" backends when it was.
"""

import functools

import torch


@functools.lru_cache(maxsize=None)
def load():
    """The loaded extension module, or None when it was not built."""
    try:
        from . import _C
    except ImportError:
        return None
    _register_python_parts()
    return _C


# Under torch.compile these two run eagerly and their answers are constants of the graph:
# Dynamo must not trace into the loading and registration below.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the extension is built; the first call loads it and registers its Python half."""
    return load() is not None


@torch.compiler.assume_constant_result
def has_cuda_kernels() -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("llama_fast::rms_norm_fwd", "CUDA")


def _register_python_parts() -> None:
    from .ops._checks import unit_stride_last

    lib = "llama_fast::"

    @torch.library.register_fake(lib + "rms_norm_fwd")
    def _(x, weight, eps):
        return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.register_fake(lib + "rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    @torch.library.register_fake(lib + "rope_fwd")
    def _(q, k, cos, sin):
        return torch.empty_like(q), torch.empty_like(k)

    @torch.library.register_fake(lib + "rope_bwd")
    def _(dq, dk, cos, sin):
        return torch.empty_like(dq), torch.empty_like(dk)

    @torch.library.register_fake(lib + "swiglu_fwd")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake(lib + "swiglu_bwd")
    def _(dout, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    ops = torch.ops.llama_fast

    def rms_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def rms_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = ops.rms_norm_bwd(unit_stride_last(dy), x, weight, rstd)
        return dx, dweight, None

    torch.library.register_autograd(lib + "rms_norm_fwd", rms_backward, setup_context=rms_setup)

    def rope_setup(ctx, inputs, output):
        q, k, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, q.dtype, k.shape, k.dtype)

    def rope_backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        q_shape, q_dtype, k_shape, k_dtype = ctx.shapes
        dq_embed = dq_embed if dq_embed is not None else cos.new_zeros(q_shape, dtype=q_dtype)
        dk_embed = dk_embed if dk_embed is not None else cos.new_zeros(k_shape, dtype=k_dtype)
        dq, dk = ops.rope_bwd(unit_stride_last(dq_embed), unit_stride_last(dk_embed), cos, sin)
        return dq, dk, None, None

    torch.library.register_autograd(lib + "rope_fwd", rope_backward, setup_context=rope_setup)

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def swiglu_backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return ops.swiglu_bwd(unit_stride_last(dout), gate, up)

    torch.library.register_autograd(lib + "swiglu_fwd", swiglu_backward, setup_context=swiglu_setup)
