"""Public ops of llama_fast. Each checks its inputs, picks a backend (``backend_for``) and runs the
Triton kernels or the C++ extension's through ``torch.library`` custom ops (fake implementations
and autograd registered, so ``torch.compile`` traces them whole), or the eager reference."""

from ..backend import BACKENDS, available_backends, backend_for, backend_on
from .add_rms_norm import add_rms_norm
from .attention import flash_attention, flash_attention_varlen
from .linear_cross_entropy import linear_cross_entropy
from .merge_attention import merge_attention
from .ring_attention import ZigzagShards, ring_attention
from .rms_norm import rms_norm
from .rope import apply_rotary_pos_emb, rope_into_cache
from .swiglu import geglu, swiglu

__all__ = ["BACKENDS", "ZigzagShards", "add_rms_norm", "apply_rotary_pos_emb", "available_backends", "backend_for",
           "backend_on", "flash_attention", "flash_attention_varlen", "geglu", "linear_cross_entropy",
           "merge_attention", "ring_attention", "rms_norm", "rope_into_cache", "swiglu"]
