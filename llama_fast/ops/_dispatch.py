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


class KernelOp:
    """One op's kernels as ``torch.library`` custom ops, registered once: ``llama_fast::{name}_fwd`` and
    ``_bwd``, their fake implementations (shapes for torch.compile and fake tensors) and autograd on the
    forward. ``backward_with(bwd_op)`` builds the autograd formula around a backward op, so the C++
    extension's kernels of the same op (``extension="rms_norm"``: ``torch.ops.llama_fast.rms_norm_fwd``)
    get the same fake and autograd, through ``llama_fast.extension.add_python_parts``.

    Custom ops rather than ``triton_op``: the launchers choose tiles and paths on the host, which
    Dynamo would otherwise trace, and they also run on CPU tensors under Triton's interpreter.
    ``run`` is the op's one dispatch: Triton's launcher itself for a direct call, else the custom op;
    or the extension's op, below autograd for a direct call.
    """

    def __init__(self, name: str, forward, backward, *, fake_forward, fake_backward, setup_context, backward_with,
                 extension: str | None = None, fake_extension_forward=None):
        self.launch = forward
        self.forward = torch.library.custom_op(f"llama_fast::{name}_fwd", forward, mutates_args=())
        self.backward = torch.library.custom_op(f"llama_fast::{name}_bwd", backward, mutates_args=())
        self.forward.register_fake(fake_forward)
        self.backward.register_fake(fake_backward)
        self.forward.register_autograd(backward_with(self.backward), setup_context=setup_context)
        self._extension_name, self._extension_op = extension, None
        if extension is not None:
            from .. import extension as cpp

            cpp.add_python_parts(extension, fake_forward=fake_extension_forward or fake_forward,
                                 fake_backward=fake_backward, backward_with=backward_with, setup_context=setup_context)

    def run(self, backend: str, direct: bool, *args):
        """The forward on ``backend`` ("triton", or the extension's "cpu" / "cuda"); ``direct`` from
        ``direct_call_ok`` on the op's tensor inputs."""
        if backend == "triton":
            return self.launch(*args) if direct else self.forward(*args)
        op = self._extension_op
        if op is None:  # first use: load the extension (and its Python half), then keep the op's handle
            from .. import extension as cpp

            cpp.available()
            op = self._extension_op = getattr(torch.ops.llama_fast, f"{self._extension_name}_fwd")
        return call_extension_op(op, *args) if direct else op(*args)
