"""llama_fast's layers as a kernel repository that Hugging Face's ``kernels`` package loads from this folder
(``llama_fast.hub``): it imports this package under the id in ../metadata.json and reads ``layers``."""

from . import layers

__all__ = ["layers"]
