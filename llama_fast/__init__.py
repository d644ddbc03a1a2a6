"""llama_fast: fused Triton kernels for Llama-family models in Hugging Face transformers."""

from . import ops, references
from .backend import backend_for

__version__ = "0.1.0"
__all__ = ["backend_for", "ops", "references"]
