"""Which implementation an op runs for a given tensor.

Backends:
  "triton"     the Triton kernels: on CUDA tensors, or on CPU tensors when Triton's interpreter
               is on (``TRITON_INTERPRET=1`` set before triton is imported; that is how the kernels
               are tested without a GPU).
  "cuda"       the CUDA kernels of the C++ extension llama_fast._C (csrc/), when it was built
               with CUDA: rms_norm, apply_rotary_pos_emb, swiglu and geglu.
  "cpu"        the CPU kernels of the same extension (parallel, vectorised), for CPU tensors.
  "reference"  the eager PyTorch references in ``llama_fast.references``: always correct.

With no backend asked for: a CUDA tensor runs Triton; a CPU tensor runs Triton under the
interpreter, else the extension's CPU kernels when built, else the reference. Flash attention has
no C++ kernel: it runs Triton or the reference. Asking for a backend that cannot run on the
tensor is an error, never a silent switch.
"""

import os

import torch

from . import extension

BACKENDS = ("triton", "cuda", "cpu", "reference")


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> list[str]:
    """The backends this installation can run (on some device)."""
    found = ["triton", "reference"]
    if extension.available():
        found.append("cpu")
    if extension.has_cuda_kernels():
        found.append("cuda")
    return found


def backend_for(tensor: torch.Tensor, backend: str | None = None, *, extension_op: bool = True) -> str:
    """The backend an op on ``tensor`` runs: ``backend`` if given and possible, else the default.

    ``extension_op=False`` for ops the C++ extension does not implement (flash attention).
    """
    if backend is None and tensor.is_cuda:  # the common case first: one attribute read, no device object
        return "triton"
    device = tensor.device.type
    if backend is None:
        if device == "cpu" and interpreting():
            return "triton"
        if device == "cpu":
            return "cpu" if extension_op and extension.available() else "reference"
        raise ValueError(f"llama_fast: no backend for tensors on device {tensor.device}")
    if backend not in BACKENDS:
        raise ValueError(f"llama_fast: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and not (device == "cuda" or (device == "cpu" and interpreting())):
        raise ValueError(
            f"llama_fast: backend 'triton' needs CUDA tensors (got {tensor.device}); on CPU it runs only "
            "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    if backend in ("cpu", "cuda"):
        if not extension_op:
            raise ValueError(f"llama_fast: backend {backend!r} has no kernel for this op (the C++ extension "
                             "implements rms_norm, apply_rotary_pos_emb, swiglu and geglu); use 'triton' or "
                             "'reference'")
        if device != backend:
            raise ValueError(f"llama_fast: backend {backend!r} needs {backend.upper()} tensors, got {tensor.device}")
        if not extension.available():
            raise ValueError("llama_fast: the C++ extension llama_fast._C is not built (pip install -e . builds it)")
        if backend == "cuda" and not extension.has_cuda_kernels():
            raise ValueError("llama_fast: the C++ extension was built without CUDA kernels (no CUDA toolkit at build "
                             "time)")
    return backend


def backend_on(device: torch.device | str, backend: str | None = None, *, extension_op: bool = True) -> str:
    """``backend_for`` for tensors on ``device``: what an op runs there (or the error saying it cannot)."""
    return backend_for(torch.empty(0, device=device), backend, extension_op=extension_op)
