"""RoPE fused with the KV-cache write: at inference the rotated keys, and the values, go straight
into transformers' cache buffers from the rotation's kernel (``ops.rope_into_cache``).

Unfused, ``LlamaAttention.forward`` rotates q and k (one kernel) and hands k and v to
``cache.update``: a ``DynamicLayer`` concatenates each onto its cache (two kernels, and a copy of the
whole cache every token), a ``StaticLayer`` index-copies them into its buffers (two kernels, plus the
positions' ``arange`` and add). Fused, one kernel rotates q and writes k and v into place:

- ``StaticLayer``: at rows [cumulative_length, + S) of its buffers, the fill count read on the device
  (no sync, nothing for CUDA graphs to break on), then ``cumulative_length.add_(S)`` as transformers
  does. A write past ``max_cache_len`` is dropped where transformers' index_copy_ fails; transformers'
  ``generate()`` sizes the cache so that it never happens.
- ``DynamicLayer``: its keys and values become views of buffers with room for ``_GROWTH`` more tokens,
  so a token is written in place, not appended by copying the cache; the buffers are reallocated (the
  cache copied once) when full, and whenever the layer's tensors are no longer the views handed out
  (a crop, a beam reorder, anyone assigning them), so rows another tensor may still show are never
  overwritten. Eager only: traced, transformers' own update runs.

Taken only when it computes what transformers' lines compute: no gradient wanted, the Triton
backend, plain tensors, a ``DynamicCache`` / ``StaticCache`` layer of exactly these classes whose
``update`` (and ``Cache.update``) is the source verified here, no offloading, the layer already
initialised (the prefill initialises it) and its dtypes the rotation's. Otherwise ``None``, and the
caller runs transformers' lines.
"""

import typing

import torch

from .layer import function_hash

_GROWTH = 256  # tokens of room a DynamicLayer's buffers gain when reallocated: a cache copy per 256 tokens

# sha256 of the sources of Cache.update, DynamicLayer.update and StaticLayer.update whose effect the fused
# write reproduces: transformers 5.24.0's, and 5.17.0's (the lent H200's; its Cache.update lacks one
# offloading line, and offloading is never fused).
VERIFIED_UPDATES = {
    "Cache": {"160f89cd9a968463fd5286d665b05133734d8047758a32742a3ba3c8df7d88ea",
              "ddd4599eb8ee7e4506dd4c59c07b67a0b3bc39797dc5b03a51a1331abdaf2ecf"},
    "DynamicLayer": {"15d634e7095acc0e2c229a11eb387496e462b8c51dc4e5000cd330c7d4e58c75"},
    "StaticLayer": {"14d004ef66e52358531606fe7fa7a95fbf1f57e470f2ab9af7c46d4eeb1a264c"},
}


class Verified(typing.NamedTuple):
    """What the fused write serves, resolved when the patch builds a forward, never in one: torch.compile
    cannot trace ``inspect``, and torch 2.11's breaks its graph on an import of transformers' lazy module."""

    static: dict  # cache layer class -> whether it is transformers' StaticLayer
    cache_update: object  # Cache.update, which the cache's class must not override


def verified_layers() -> Verified:
    """The cache layer classes whose ``update``, and ``Cache.update``, are the sources verified here."""
    from transformers import cache_utils

    static = {}
    if function_hash(cache_utils.Cache.update) in VERIFIED_UPDATES["Cache"]:
        static = {cls: cls is cache_utils.StaticLayer for cls in (cache_utils.DynamicLayer, cache_utils.StaticLayer)
                  if function_hash(cls.update) in VERIFIED_UPDATES[cls.__name__]}
    return Verified(static, cache_utils.Cache.update)


def rope_and_write(cache, layer_idx: int, q, k, v, cos, sin, backend, verified: Verified):
    """(rotated q, the layer's keys, its values) after writing the rotated k and v into ``cache``'s
    layer ``layer_idx``; or None when the fused write does not apply (the module docstring).
    ``verified``: ``verified_layers()``."""
    from .. import ops

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if ops.backend_for(q, backend) != "triton" or getattr(cache, "offloading", True):
        return None
    layers = getattr(cache, "layers", ())
    if layer_idx is None or layer_idx >= len(layers) or type(layers[layer_idx]) not in verified.static:
        return None
    if type(cache).update is not verified.cache_update:
        return None
    layer = layers[layer_idx]
    if not layer.is_initialized or cos.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if (layer.keys.dim() != 4 or layer.keys.dtype != q.dtype or layer.values.dtype != q.dtype
            or layer.keys.shape[:2] != k.shape[:2] or layer.values.shape[:2] != k.shape[:2]):
        return None
    if verified.static[type(layer)]:
        q_embed = ops.rope_into_cache(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length,
                                      backend=backend)
        layer.cumulative_length.add_(k.shape[2])
        return q_embed, layer.keys, layer.values
    if torch.compiler.is_compiling():
        return None
    keys_buf, values_buf = _room(layer, k.shape[2])
    filled, new = layer.keys.shape[2], k.shape[2]
    q_embed = ops.rope_into_cache(q, k, v, cos, sin, keys_buf[:, :, filled:filled + new],
                                  values_buf[:, :, filled:filled + new], backend=backend)
    layer.keys, layer.values = keys_buf[:, :, :filled + new], values_buf[:, :, :filled + new]
    layer._llama_fast_buffers = (keys_buf, values_buf, layer.keys, layer.values)
    return q_embed, layer.keys, layer.values


def _room(layer, new: int):
    """The DynamicLayer's (keys, values) buffers with room for ``new`` more tokens past its keys:
    the ones it already views when its tensors are still those views and there is room, else new
    ones holding a copy of its cache."""
    keys, values = layer.keys, layer.values
    held = getattr(layer, "_llama_fast_buffers", None)
    filled = keys.shape[2]
    if held is not None and held[2] is keys and held[3] is values and filled + new <= held[0].shape[2]:
        return held[0], held[1]
    rows = -(-(filled + new + _GROWTH) // _GROWTH) * _GROWTH
    batch, heads, _, head_dim = keys.shape
    keys_buf = keys.new_empty((batch, heads, rows, head_dim))
    values_buf = values.new_empty((batch, heads, rows, values.shape[3]))
    keys_buf[:, :, :filled].copy_(keys)
    values_buf[:, :, :filled].copy_(values)
    return keys_buf, values_buf
