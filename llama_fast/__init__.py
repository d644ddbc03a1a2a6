"""llama_fast: fused Triton kernels for Llama-family models in Hugging Face transformers."""

from . import ops, references
from .backend import backend_for
from .patch import is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["backend_for", "is_patched", "ops", "patch", "references", "unpatch"]
