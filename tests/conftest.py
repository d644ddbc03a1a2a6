"""Test set-up: Triton's interpreter on CPU tensors when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported (``triton.jit`` reads it when a
kernel is decorated), so it is set here, ahead of every test module. On a machine with a GPU the
same tests run the compiled kernels on CUDA tensors (``LLAMA_FAST_TEST_DEVICE=cuda``).
"""

import os

if os.environ.get("LLAMA_FAST_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

from llama_fast.backend import interpreting


def _round_bf16_to_nearest() -> None:
    """Make the interpreter's fp32 -> bf16 casts round to nearest even, as the GPU does.

    Triton 3.8's interpreter truncates on ``x.to(tl.bfloat16)`` (checked: 0.0156 off on randn
    values, a whole bf16 ulp), so a kernel that rounds exactly like eager PyTorch would look wrong.
    torch's own conversion is round-to-nearest-even.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_llama_fast_rounded", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.uint16).numpy(), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._llama_fast_rounded = True
    builder.cast_impl = cast_impl
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)


def _widen_bf16_dot() -> None:
    """Make the interpreter's ``tl.dot`` exact on bf16 operands.

    The interpreter stores bf16 as raw uint16 and multiplies the bit patterns (a bf16 dot is off by
    ~1e10; docs/testing.md, "The bf16 trap"). Widening each operand to the fp32 it encodes (bits << 16)
    before the product is exactly what the tensor cores compute, so the GPU code stays unchanged and
    the CPU tests check the real maths.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_llama_fast_widened", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._llama_fast_widened = True
    builder.create_dot = create_dot


if interpreting():
    _round_bf16_to_nearest()
    _widen_bf16_dot()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("LLAMA_FAST_TEST_DEVICE", "cpu"))


@pytest.fixture
def tf32_for_fp32_on_gpu(device):
    """On a GPU the attention kernel's fp32 products run in TF32 (the tensor cores' fp32 mode); eager fp32
    then runs in TF32 too, so the error-ratio rule compares like with like. No effect on the CPU.
    The attention test modules use it for every test (pytestmark)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
