"""When an op may run its kernels without going through its ``torch.library`` custom op.

The custom ops are what ``torch.compile``, fake tensors, dispatch modes and autograd need. Plain
eager inference needs none of that, and pays for it on every call: the Python dispatch of a custom
op (its autograd wrapper redispatching below autograd, the ``torch._dynamo.disable`` frame around
the implementation) cost ~8 µs of host time per call on the 2-core Xeon this was written on
(torch 2.14), where the Triton launcher itself costs ~5 µs and one ``torch.mul`` ~1 µs; calling
the C++ extension's op below autograd saves ~2.5 µs of its ~5 µs. At batch-1 decode on a GPU that
host time is the step's time, so eager inference calls the same implementation directly.
``bench/overhead.py`` measures both paths.
"""

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


# A model's weights are Parameters: a subclass, but one with no dispatch of its own.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """True when no autograd graph is needed for any of ``tensors``, none is a tensor subclass with
    its own dispatch (fake, functional, DTensor, ...), no dispatch mode is active (FakeTensorMode,
    make_fx, a checker) and torch.compile is not tracing: then the custom op would only add host time."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


def call_extension_op(op, *args):
    """Run a C++ extension op below its (Python-registered) autograd kernel: for direct calls only."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
