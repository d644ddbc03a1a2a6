"""Which implementation an op runs for a given tensor.

Backends:
  "triton"     the Triton kernels: on CUDA tensors, or on CPU tensors when Triton's interpreter
               is on (``TRITON_INTERPRET=1`` set before triton is imported; that is how the kernels
               are tested without a GPU).
  "reference"  the eager PyTorch references in ``llama_fast.references``: always correct, never fast.

With no backend asked for, a CUDA tensor runs Triton and a CPU tensor runs Triton under the
interpreter and the reference otherwise. Asking for a backend that cannot run on the tensor is an
error, never a silent switch.
"""

import os

import torch

BACKENDS = ("triton", "reference")


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend an op on ``tensor`` runs: ``backend`` if given and possible, else the default."""
    device = tensor.device.type
    if backend is None:
        if device == "cuda" or (device == "cpu" and interpreting()):
            return "triton"
        if device == "cpu":
            return "reference"
        raise ValueError(f"llama_fast: no backend for tensors on device {tensor.device}")
    if backend not in BACKENDS:
        raise ValueError(f"llama_fast: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and not (device == "cuda" or (device == "cpu" and interpreting())):
        raise ValueError(
            f"llama_fast: backend 'triton' needs CUDA tensors (got {tensor.device}); on CPU it runs only "
            "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    return backend
