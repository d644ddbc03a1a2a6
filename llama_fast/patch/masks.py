"""The mask protocol between llama_fast's mask function and its attention function.

transformers builds one mask per forward with the function registered in ``AttentionMaskInterface``
(``make_mask``) and hands it to every layer's attention function (``attention.attention_forward``).
llama_fast's kernels take no dense mask, so what passes between the two is one of these encodings,
each made and read here:

  None                          no padding, and the cache holds exactly the tokens seen (DynamicCache
                                or none): plain causal attention.
  (B, kv_len) bool              the key padding mask: True where a key is real (left padding in
                                ``generate()``), passed through as transformers does for FlashAttention-2.
  (B, 1, 1, slots + 1) int32    a static cache (``encode_static_cache`` / ``decode_static_cache``): per
                                slot 1 for a real key and 0 for padding, then the number of slots
                                filled (the same in every row). 4-D because transformers hands a 4-D mask
                                through unchanged: ``generate()`` builds a compileable cache's mask
                                before the (compiled) forward, which would otherwise rebuild it.
  (B, 1, 1, 0) int8, empty      packed sequences (``packed_marker`` / ``is_packed_marker``): the
                                attention function finds them in the position ids or keywords itself.

A sliding-window layer's mask is one of these too: its window travels to the attention function as
the layer's ``sliding_window`` keyword, as transformers hands it to FlashAttention-2. Anything else a
model asks the mask function for (a custom mask function, a mask laid over the causal one) is refused
there, when the mask is made, rather than computed wrongly.
"""

import torch


def make_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, **kwargs):
    """The mask function registered as "llama_fast": what the attention function needs besides the
    causal rule (and a local layer's window, which it takes from the layer's ``sliding_window``). With a
    cache that holds exactly the tokens seen so far (DynamicCache, or none), the (B, kv_len) key padding
    mask, or None. With a static cache (its query offset is a tensor on the device, or its slots
    outnumber the tokens it holds) or a sliding-window layer that dropped its oldest tokens (its keys
    start at position ``kv_offset``), ``encode_static_cache``'s encoding of the padding over the cache's
    slots and the number of slots filled.

    Nothing here reads a tensor's value on the host: no sync, and nothing for torch.compile to
    break its graph on. So an all-True padding mask is handed over as it is (the kernel's padded
    path costs one byte load per key block) rather than checked and dropped. Anything else a model
    might ask for (a custom mask function, masks laid over the causal one) is refused here, at mask
    creation, rather than computed wrongly.
    """
    # `from transformers.masking_utils import ...`, not `from transformers import masking_utils`:
    # the latter's import statement yields transformers' _LazyModule, on which torch 2.11's dynamo
    # breaks the graph ("Bad import result"); 2.14's traces either.
    from transformers.masking_utils import causal_mask_function

    # transformers' sliding-window mask (create_sliding_window_causal_mask) says so with local_size, its window
    sliding = kwargs.get("local_size") is not None
    if mask_function is not None and mask_function is not causal_mask_function:
        if kwargs.get("use_vmap"):
            # transformers 5.24 sets use_vmap when it lays an or_mask_function / and_mask_function over the causal
            # or sliding mask (Gemma 3's image tokens, say): a pattern the kernels do not know
            raise NotImplementedError("llama_fast attention: this forward lays another mask function over the causal "
                                      f"mask ({getattr(mask_function, '__name__', mask_function)}); patch with "
                                      "attention=False for such inputs")
        if attention_mask is None and q_offset == 0 and kv_offset == 0 and kv_length == q_length:
            # For these models, transformers asks for another mask without a cache or padding only when
            # position_ids show packed sequences, or for a sliding window: the attention function finds
            # the same sequences (or refuses, if it cannot), and applies the window.
            return packed_marker(batch_size, kwargs.get("device"))
        if not sliding:
            raise NotImplementedError(
                "llama_fast attention: this forward asks for a mask other than plain causal + padding "
                f"({getattr(mask_function, '__name__', mask_function)}; e.g. a custom mask function); patch with "
                "attention=False for such inputs"
            )
        # A sliding window's mask with a cache or padding: transformers lays no packing over it there.
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:  # transformers versions that pass the query positions instead
        q_offset, q_length = cache_position[0], cache_position.shape[0]
    if isinstance(kv_offset, torch.Tensor):
        raise NotImplementedError("llama_fast attention: a cache whose first key's position is a device tensor is not "
                                  "supported; use DynamicCache or StaticCache")
    if kv_offset and not sliding:
        raise NotImplementedError(f"llama_fast attention: keys from offset {kv_offset} in a layer without a sliding "
                                  "window: the cache dropped tokens the queries must see")
    static = isinstance(q_offset, torch.Tensor)
    end = q_offset + q_length  # one past the last query's position
    if not static and kv_offset + kv_length < end:
        raise NotImplementedError(f"llama_fast attention: {kv_length} keys from position {kv_offset} for queries at "
                                  f"[{q_offset}, {end}): the cache lost tokens the queries must see")
    if not static and not kv_offset and kv_length == end:  # the cache holds exactly the tokens seen so far
        return None if attention_mask is None else attention_mask[:, -kv_length:].bool()
    # A sliding-window layer that dropped its first kv_offset tokens (full DynamicSlidingWindowLayer or
    # StaticSlidingWindowLayer) holds the kv_length positions from there on, all filled: encoded as a static
    # cache's mask, since for a compileable cache generate() hands what this returns back to it as the
    # next attention_mask, which a 4-D mask passes through and a 2-D one would be cut again.
    device = (q_offset.device if static else attention_mask.device if attention_mask is not None
              else kwargs.get("device"))
    if device is None:
        raise NotImplementedError("llama_fast attention: a static cache's mask needs its device, and transformers "
                                  "passed none (no attention_mask, no device argument)")
    seen = None if attention_mask is None else attention_mask[:, kv_offset:]
    return encode_static_cache(batch_size, kv_length, kv_length if kv_offset and not static else end - kv_offset,
                               seen, device)


def encode_static_cache(batch_size, slots, filled, attention_mask, device) -> torch.Tensor:
    """A static cache's mask for the attention function, as a (B, 1, 1, slots + 1) int32 tensor: per
    slot 1 for a real key and 0 for padding, then the number of slots filled (the same in every row).

    4-D, because transformers hands a 4-D mask through unchanged: generate() builds the mask of a
    compileable cache before the (compiled) forward, which would otherwise try to rebuild it.
    ``filled`` is a device tensor (the cache's own count) or a host int; either way nothing is read
    back on the host.
    """
    code = torch.ones((batch_size, 1, 1, slots + 1), dtype=torch.int32, device=device)
    if attention_mask is not None:
        seen = attention_mask[:, :slots].to(torch.int32)  # the tokens so far; later slots are cut by `filled`
        code[:, 0, 0, : seen.shape[-1]] = seen
    code[:, 0, 0, slots] = filled
    return code


def decode_static_cache(mask: torch.Tensor, kv_len: int):
    """(key_padding_mask (B, kv_len) int32, kv_lens (B,) int32) from ``encode_static_cache``'s tensor,
    or None when ``mask`` is not one. Views, no kernel: the attention kernels read an int32 padding
    mask as it is (nonzero: a real key), so no layer converts it."""
    if mask.dim() != 4 or mask.dtype != torch.int32 or mask.shape[1:] != (1, 1, kv_len + 1):
        return None
    return mask[:, 0, 0, :kv_len], mask[:, 0, 0, kv_len]


def packed_marker(batch_size: int, device) -> torch.Tensor:
    """The mask function's answer when transformers asks for packed sequences' mask: an empty
    (B, 1, 1, 0) int8 tensor that tells the attention function to find the sequences itself."""
    return torch.empty((batch_size, 1, 1, 0), dtype=torch.int8, device=device)


def is_packed_marker(mask: torch.Tensor) -> bool:
    return mask.dim() == 4 and mask.dtype == torch.int8 and mask.shape[-1] == 0
