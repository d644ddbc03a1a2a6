"""The C++/CUDA extension ``llama_fast._C`` (csrc/): loading it, and its Python half.

Loading the shared library registers the ops ``torch.ops.llama_fast.{rms_norm,rope,swiglu}_{fwd,bwd}``
with CPU and (when built with CUDA) CUDA kernels. This module adds what the dispatcher needs from
Python, once, on first use: fake (meta) implementations, so the ops trace under
``torch.compile``, and autograd formulas that call the ``_bwd`` ops, so they train.

The library works without the extension: ``available()`` says whether it loaded, ``status()`` why
not, and ``llama_fast.backend`` only offers the "cpu" / "cuda" backends when it did.

A C++ extension is tied to the torch it was compiled against: torch's C++ ABI changes between
releases, and loading a library built for another torch can fail on a missing symbol or, worse,
load and misbehave. setup.py therefore records the torch version it built against in
``llama_fast/_build_info.py``, and the library is loaded only under that same torch. After a
torch upgrade the extension is skipped with a warning that says how to rebuild it, and
``import llama_fast`` and every op keep working on the Triton kernels and the references.
"""

import functools
import importlib.util
import warnings

import torch


def _constant_under_compile(fn):
    """Mark ``fn`` the way ``torch.compiler.assume_constant_result`` does, without its import.

    Under torch.compile the marked function runs eagerly and its answer is a constant of the
    graph, so Dynamo never traces into the loading and registration below. The public decorator
    imports torch._dynamo (and with it torch._inductor and triton) the moment it is applied: at
    module level that cost ``import llama_fast`` 1.2-3 s (measured on torch 2.14.1), and imported
    triton before ``python -m llama_fast`` could choose Triton's interpreter. All the decorator
    does (torch 2.11 to 2.14) is set this attribute; tests/test_first_run.py checks that it still
    does.
    """
    fn._dynamo_marked_constant = True
    return fn


def _build_record() -> tuple[str | None, str | None]:
    """(torch version the extension was built against, why it cannot be loaded) from setup.py's record."""
    try:
        from . import _build_info
    except ImportError:
        return None, ("llama_fast._C has no build record (llama_fast/_build_info.py, written by setup.py when it "
                      "builds the extension); reinstall llama_fast to rebuild it")
    return _build_info.TORCH_VERSION, None


@functools.cache
def _load():
    """(the loaded extension module or None, the reason it is None)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, ("llama_fast._C is not built (LLAMA_FAST_NO_EXTENSION=1 at install, no C++ compiler, or a "
                      "failed build); reinstall with `pip install --no-build-isolation .` to build it")
    built_for, problem = _build_record()
    if problem is None and built_for != torch.__version__:
        problem = (f"llama_fast._C was built for torch {built_for} and this is torch {torch.__version__}; a C++ "
                   "extension must be rebuilt for each torch release. It is not loaded: the library runs on the "
                   "Triton kernels and the references. Rebuild it with `pip install --no-build-isolation .` "
                   "(or `pip install -e .` in a clone)")
    if problem is not None:  # built, but not for this torch: say so once, loudly
        warnings.warn(f"llama_fast: {problem}", RuntimeWarning, stacklevel=3)
        return None, problem
    try:
        from . import _C
    except (ImportError, OSError) as exc:
        problem = f"llama_fast._C failed to load ({type(exc).__name__}: {exc}); reinstall llama_fast to rebuild it"
        warnings.warn(f"llama_fast: {problem}", RuntimeWarning, stacklevel=3)
        return None, problem
    _register_python_parts()
    return _C, None


def load():
    """The loaded extension module, or None when it is not built or cannot be loaded (see ``status``)."""
    return _load()[0]


def status() -> str:
    """A sentence on the extension: loaded, or why not."""
    module, problem = _load()
    return f"llama_fast._C loaded from {module.__file__}" if module is not None else problem


@_constant_under_compile
def available() -> bool:
    """Whether the extension is loaded; the first call loads it and registers its Python half."""
    return load() is not None


@_constant_under_compile
def has_cuda_kernels() -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("llama_fast::rms_norm_fwd", "CUDA")


# What each op's file hands over for the extension's ops (``ops._dispatch.KernelOp``), by op name:
# registered with the dispatcher when the library loads, since the ops exist only then.
_PYTHON_PARTS: dict[str, dict] = {}


def add_python_parts(name: str, *, fake_forward, fake_backward, backward_with, setup_context) -> None:
    """The fake implementations and autograd formula of ``llama_fast::{name}_fwd`` / ``_bwd``: the same as
    the Triton ops' of that op, around the extension's backward op. Registered now if the library is
    loaded, else when it loads."""
    _PYTHON_PARTS[name] = dict(fake_forward=fake_forward, fake_backward=fake_backward, backward_with=backward_with,
                               setup_context=setup_context)
    if _load.cache_info().currsize and _load()[0] is not None:
        _register(name, **_PYTHON_PARTS[name])


def _register(name: str, fake_forward, fake_backward, backward_with, setup_context) -> None:
    torch.library.register_fake(f"llama_fast::{name}_fwd", fake_forward)
    torch.library.register_fake(f"llama_fast::{name}_bwd", fake_backward)
    torch.library.register_autograd(f"llama_fast::{name}_fwd", backward_with(getattr(torch.ops.llama_fast,
                                                                                     f"{name}_bwd")),
                                    setup_context=setup_context)


def _register_python_parts() -> None:
    """Fake implementations and autograd for the extension's ops, as the op files handed them over."""
    for name, parts in _PYTHON_PARTS.items():
        _register(name, **parts)
