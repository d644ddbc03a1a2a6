"""The attention function llama_fast registers in transformers' ``AttentionInterface`` as "llama_fast".

Each attention layer hands it (B, H, S, D) query, key and value and the mask that ``masks.make_mask``
built for the forward; it decodes that mask (masks.py), finds packed sequences, refuses what it does
not implement, and runs ``ops.flash_attention`` (or ``ops.flash_attention_varlen``, or on a CPU without
padding the SDPA call transformers' own attention makes).
"""

import torch

from .masks import decode_static_cache, is_packed_marker, make_mask

ATTENTION_NAME = "llama_fast"


# Keywords transformers hands the attention function that do not change what it computes here (the
# cache and positions act before attention: RoPE, the cache update, the mask function; position_ids
# also show packed sequences, read by _packed_sequences with the _PACKED_KWARGS; sliding_window is the
# layer's window and softcap Gemma 2's attention logit cap, both read by attention_forward). Any other
# keyword with a value is refused rather than ignored: e.g. attention sinks.
_NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values", "cache_position", "layer_idx",
                             "output_attentions", "output_hidden_states", "output_router_logits",
                             # the loss's normaliser, which transformers' Trainer passes down the whole model,
                             # and its labels shifted by the caller (ForCausalLMLoss's shift_labels)
                             "num_items_in_batch", "shift_labels",
                             "is_causal", "sliding_window", "softcap",  # honoured by attention_forward
                             "context_parallel"})  # ring attention (_ring_attention)
# TRL's padding-free collator adds ``seq_idx`` (each token's sequence number) beside the cu_seq_lens_*
# it makes from the same lengths: with those it says nothing new. Alone it is refused, like any other.


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as "llama_fast" (transformers' AttentionInterface).

    query (B, Hq, Sq, D), key/value (B, Hk, Skv, D) as the attention module hands them over;
    returns (out (B, Sq, Hq, D), None), as transformers' sdpa and flash functions do.
    """
    from .. import ops

    if dropout:
        raise NotImplementedError(f"llama_fast attention: attention dropout {dropout} is not supported; set "
                                  "config.attention_dropout = 0 or patch with attention=False")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("llama_fast attention never forms the attention matrix: output_attentions=True "
                                  "needs the eager implementation (patch with attention=False)")
    unknown = [k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL_KWARGS and k not in _PACKED_KWARGS
               and not (k == "seq_idx" and kwargs.get("cu_seq_lens_q") is not None)]
    if unknown:
        raise NotImplementedError(f"llama_fast attention: does not implement {', '.join(sorted(unknown))}; refusing "
                                  "rather than ignoring them; patch with attention=False for such inputs")
    # Under autocast (the HF Trainer's bf16=True / fp16=True), SDPA is one of the ops autocast runs in
    # its low precision, while the RoPE before it follows type promotion (fp32 cos/sin give fp32 q and k,
    # v stays the projection's bf16): so attention gets the inputs SDPA would, all in autocast's dtype.
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(low), key.to(low), value.to(low)
    # transformers' own attention functions let an is_causal keyword override the module's
    causal = kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)
    # A local layer's window (Mistral, Qwen2 with use_sliding_window): transformers hands it to the attention
    # function as FlashAttention-2 takes it, and the mask function a sliding mask of the same config window.
    window = kwargs.get("sliding_window")
    # Gemma 2's cap·tanh(s / cap) on every score, which its eager attention applies before the mask.
    softcap = kwargs.get("softcap")
    if kwargs.get("context_parallel") is not None:
        return _ring_attention(query, key, value, attention_mask, kwargs, causal, scaling, window, softcap), None
    packed = _packed_sequences(query, key, attention_mask, kwargs, window)
    if packed is not None:
        return _packed_attention(query, key, value, packed, causal, scaling, window, softcap), None
    if attention_mask is not None and is_packed_marker(attention_mask):
        attention_mask = None  # traced: each row is one sequence (asserted on the device)
    kv_lens = None
    if attention_mask is not None and (static := decode_static_cache(attention_mask, key.shape[-2])):
        attention_mask, kv_lens = static
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"llama_fast attention: expected the (batch, kv_len) padding mask made by llama_fast's mask function, "
            f"got a {attention_mask.dim()}-D mask (was the attention implementation changed after patch()?)"
        )
    if window is None and softcap is None and _sdpa_serves(query, key, attention_mask, kv_lens, causal):
        return _sdpa(query, key, value, causal, scaling), None
    out = ops.flash_attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
                              kv_lens=kv_lens, window=window, softcap=softcap)
    return out.transpose(1, 2), None


def _sdpa_serves(query, key, attention_mask, kv_lens, causal: bool) -> bool:
    """Whether ``_sdpa`` computes this call: ops.flash_attention would run the eager reference (a CPU
    tensor without Triton's interpreter: llama_fast has no CPU attention kernel), no key is masked
    (no static cache, and no padding mask or one that masks nothing), and SDPA's top-left
    ``is_causal`` is our bottom-right rule (a single query, which sees every key, or as many
    queries as keys). Plain tensors in eager mode only: the mask is read on the host (on a CPU no
    sync, but a graph break under torch.compile), and tensor subclasses (DTensor) keep the op's
    own checks and placement rules."""
    from ..backend import backend_for

    if torch.compiler.is_compiling() or type(query) is not torch.Tensor or type(key) is not torch.Tensor:
        return False
    if query.device.type != "cpu" or kv_lens is not None or backend_for(query, extension_op=False) != "reference":
        return False
    if causal and query.shape[2] not in (1, key.shape[2]):
        return False
    return attention_mask is None or bool(attention_mask.all())


def _sdpa(query, key, value, causal: bool, scaling) -> torch.Tensor:
    """Attention on the CPU by the kernel transformers' own "sdpa" attention runs there
    (``torch.nn.functional.scaled_dot_product_attention``, GQA by ``enable_gqa``, as transformers
    5.24 calls it on a CPU without a mask), so a patched model computes what the unpatched one does.

    Why not the reference: its explicit score matrix, masks and repeated K/V are a dozen small ops,
    ~120 µs for one layer's decode step at SmolLM2's shapes against ~25 µs for this one call, which
    made a patched SmolLM2's decode step 12% slower than the unpatched one's (68.6 against 61.3 ms
    of thread CPU time, one thread; 60.6 against 60.1 ms with this). CPU timings, shared 2-core
    Xeon, 2026-12-02, medians of 400 calls and of 60 interleaved steps. Returns (B, Sq, Hq, D)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=causal and query.shape[2] > 1, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_sequences(query, key, attention_mask, kwargs, window=None):
    """The packed sequences of this batch as (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
    or None for an ordinary batch.

    From the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords when given (what
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes: no host sync). Else, for a
    batch without a padding mask or a cache (queries and keys alike, more than one token), from
    ``position_ids``: a new sequence starts wherever a position is not the previous one plus one,
    as transformers' mask code decides; that reads the positions on the host once per forward
    (``_sequences_from_positions``), as transformers' FlashAttention-2 path does in every layer.
    Under torch.compile that read would break the graph, so there a row whose positions are not one
    run fails a device-side assert instead (pass the keywords to compile packed batches).
    A sliding layer's mask function answers with the packed marker whether or not the batch is packed
    (``masks.make_mask``): with a ``window``, a marker and no packed sequences is a plain batch.
    """
    given = {name: kwargs.get(name) for name in _PACKED_KWARGS}
    marker = attention_mask is not None and is_packed_marker(attention_mask)
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise NotImplementedError("llama_fast attention: packed sequences need all of "
                                      f"{', '.join(_PACKED_KWARGS)}; "
                                      f"{', '.join(missing)} missing")
        if attention_mask is not None and not marker:
            raise NotImplementedError("llama_fast attention: packed sequences (cu_seq_lens_*) come without a padding "
                                      "mask; got both")
        as_int32 = [t.to(torch.int32) for t in (given["cu_seq_lens_q"], given["cu_seq_lens_k"])]
        return (*as_int32, given["max_length_q"], given["max_length_k"])
    position_ids = kwargs.get("position_ids")
    plain = attention_mask is None or marker
    if plain and position_ids is not None and query.shape[2] > 1 and key.shape[2] == query.shape[2]:
        if torch.compiler.is_compiling():
            # Traced, transformers asks for the packed mask whether or not the positions show packing.
            _assert_one_run_per_row(position_ids)
            return None
        found = _sequences_from_positions(position_ids, query.shape[0])
        if found is not None:
            return found
    if marker and window is None:
        raise NotImplementedError("llama_fast attention: transformers asked for a mask other than causal + padding "
                                  "and position_ids show no packed sequences; patch with attention=False")
    return None


def _sequences_from_positions(position_ids: torch.Tensor, batch: int):
    """(cu_seqlens, cu_seqlens, longest, longest) of the sequences in ``position_ids`` (1 or batch
    rows): each row starts one, and so does every position that is not the previous one plus one.
    None when each row is one sequence. The positions are copied to the host once (a sync) and the
    answer is kept on the tensor itself, which transformers hands every layer of a forward."""
    memo = vars(position_ids).get("_llama_fast_sequences")
    if memo is not None and memo[0] == (position_ids._version, batch):
        return memo[1]
    rows = position_ids.expand(batch, -1).cpu()
    starts = torch.ones(rows.shape, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    edges = starts.flatten().nonzero().flatten().tolist()
    found = None
    if len(edges) > batch:
        bounds = [*edges, rows.numel()]
        cu = torch.tensor(bounds, dtype=torch.int32).to(position_ids.device, non_blocking=True)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        found = (cu, cu, longest, longest)
    position_ids._llama_fast_sequences = ((position_ids._version, batch), found)
    return found


def _assert_one_run_per_row(position_ids: torch.Tensor) -> None:
    """Under torch.compile: fail (device-side) unless each row's positions run up by one, i.e. the
    batch holds no packed sequences that only position_ids describe."""
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    torch._assert_async((steps == 1).all(), "llama_fast attention: position_ids show packed sequences; under "
                        "torch.compile pass cu_seq_lens_q/k and max_length_q/k (DataCollatorWithFlattening("
                        "return_flash_attn_kwargs=True)) so that no host read is needed")


def _ring_attention(query, key, value, attention_mask, kwargs, causal, scaling, window, softcap):
    """``context_parallel=shards`` (an ``ops.ZigzagShards``) handed to the model's forward: this rank's
    zigzag shard of each sequence, attended over the whole sequence by ``ops.ring_attention``. The
    position_ids the forward was given (``shards.positions()``) place RoPE; they jump between the shard's
    two chunks, which transformers reads as packed sequences and answers with the packed marker: the
    shards say the layout instead. What the ring does not implement is refused."""
    from .. import ops

    refused = [name for name, value in (("sliding_window", window), ("softcap", softcap)) if value is not None]
    refused += [name for name in _PACKED_KWARGS if kwargs.get(name) is not None]
    if attention_mask is not None and not is_packed_marker(attention_mask):
        refused.append("a padding mask or a KV cache")
    if refused:
        raise NotImplementedError(f"llama_fast attention: context_parallel (ring attention) does not implement "
                                  f"{', '.join(refused)}; shard unpadded sequences of a model without them")
    out = ops.ring_attention(query, key, value, kwargs["context_parallel"], causal=causal, softmax_scale=scaling)
    return out.transpose(1, 2)


def _packed_attention(query, key, value, packed, causal, scaling, window=None, softcap=None):
    """Attention over packed sequences: the (B, H, S, D) views the module hands over, which are
    (B, S, H, D) projections transposed, as flash-attn's (B·S, H, D) layout (views, no copy), and
    the result back as (B, S, H, D)."""
    from .. import ops

    batch, heads, q_len, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
    out = ops.flash_attention_varlen(q, k, v, *packed, causal=causal, softmax_scale=scaling, window=window,
                                     softcap=softcap)
    return out.view(batch, q_len, heads, head_dim)


def register() -> None:
    """Add "llama_fast" to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, make_mask)


def set_implementation(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"llama_fast.patch: {type(model).__name__} did not accept attention implementation {name!r}")
