"""llama_fast: fused Triton kernels for Llama-family models in Hugging Face transformers."""

from . import extension, ops, references
from .backend import backend_for
from .patch import is_patched, patch, patched_backends, unpatch

__version__ = "0.1.0"
__all__ = ["backend_for", "extension", "is_patched", "ops", "patch", "patched_backends", "references", "unpatch"]
