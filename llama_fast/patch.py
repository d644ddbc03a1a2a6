"""``patch(model)`` / ``unpatch(model)``: llama_fast's kernels in a transformers Llama model.

Per instance, reversible, and through transformers' own extension points:

- RMSNorm and the MLP: each ``LlamaRMSNorm`` / ``LlamaMLP`` *instance* gets a ``forward``
  attribute that shadows the class method (deleting it restores the class's).
- RoPE: ``LlamaAttention.forward`` calls the module-level ``apply_rotary_pos_emb`` of its modeling
  file. Each attention instance gets a copy of transformers' own forward whose global namespace
  maps that one name to ``llama_fast.ops.apply_rotary_pos_emb``; the code that runs, the cache
  update included, is transformers' own, and the modeling module itself is left untouched.
  cos and sin still come from the model's rotary module, so every rope type works unchanged.
- Attention: a function and a mask function are registered under the name "llama_fast" in
  transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (additions: no existing
  entry changes), and this model's attention implementation is set to it. The mask function hands
  the 2-D padding mask through as ``key_padding_mask`` (as transformers does for FlashAttention-2),
  so the model's cache, masks, ``generate()`` and its logits processors keep working.
  The implementation is a field of the config, and models built from one config object share it,
  so the patched model's modules are first given their own shallow copy of the config; unpatch
  hands the original object back.

What was replaced is recorded on the model, so ``unpatch`` restores it exactly and patching twice
is harmless. A model the kernels cannot serve is refused at ``patch()`` time with a
``ValueError`` naming what is unsupported, before anything is changed.
"""

import copy
import dataclasses
import functools
import types

import torch

ATTENTION_NAME = "llama_fast"
_RECORD = "_llama_fast_patch"


@dataclasses.dataclass
class _Record:
    """What ``patch`` changed on one model, for ``unpatch``."""

    options: dict
    forwards: list = dataclasses.field(default_factory=list)  # modules given an instance forward
    config: object = None  # the config object the modules held before, when attention was patched
    config_holders: list = dataclasses.field(default_factory=list)  # modules given the copy


def _llama_classes():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside ``model`` (a PEFT ``PeftModel`` is unwrapped)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and get_base() is not model else model


def _validate(model: torch.nn.Module, options: dict) -> None:
    llama = _llama_classes()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"llama_fast.patch: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, llama.LlamaDecoderLayer)]
    if not layers:
        raise ValueError(
            f"llama_fast.patch: {type(model).__name__} is not a Llama-family model (no LlamaDecoderLayer in it); "
            "llama_fast supports transformers' LlamaForCausalLM, LlamaModel and the other Llama heads"
        )
    config = layers[0].self_attn.config
    if options["swiglu"]:
        act = getattr(config, "hidden_act", None)
        if act not in ("silu", "swish"):
            raise ValueError(f"llama_fast.patch: swiglu=True needs the SiLU activation, this model uses {act!r}; "
                             "pass swiglu=False")
    if options["attention"]:
        dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        if dropout > 0 and model.training:
            raise ValueError(f"llama_fast.patch: attention dropout {dropout} in training is not supported by the "
                             "flash attention kernel; set config.attention_dropout = 0, call model.eval(), or pass "
                             "attention=False")
        head_dim = layers[0].self_attn.head_dim
        if head_dim % 16 or head_dim > 256:
            raise ValueError(f"llama_fast.patch: head_dim {head_dim} is not supported by the attention kernel "
                             "(a multiple of 16 up to 256); pass attention=False")
        if not getattr(config, "is_causal", True):
            raise ValueError("llama_fast.patch: the model is configured for bidirectional attention "
                             "(config.is_causal = False); pass attention=False")
    if options["rope"] and layers[0].self_attn.head_dim % 2:
        raise ValueError("llama_fast.patch: RoPE needs an even head_dim")
    if options["backend"] is not None:
        _check_backend_serves(model, options["backend"])
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unsupported = dtypes - {torch.float32, torch.float16, torch.bfloat16}
    if unsupported:
        raise ValueError(f"llama_fast.patch: parameters of dtype {sorted(map(str, unsupported))} are not supported "
                         "(float32, float16, bfloat16)")


def _check_backend_serves(model: torch.nn.Module, backend: str) -> None:
    """Refuse a backend that cannot run on the devices the model's parameters are on (a model still on the
    meta device, not yet materialised, is judged when it runs)."""
    from .backend import backend_on

    for device in sorted({p.device for p in model.parameters()} - {torch.device("meta")}, key=str):
        try:
            backend_on(device, backend)
        except ValueError as exc:
            raise ValueError(f"llama_fast.patch: backend {backend!r} cannot run this model, whose parameters are on "
                             f"{device}: {str(exc).removeprefix('llama_fast: ')}") from None


def _rms_norm_forward(backend):
    """The forward patched RMSNorm instances get. A plain function per backend, not a partial: Dynamo
    traces a method only when its function has a name (torch.compile failed on partials)."""

    def forward(self, hidden_states):
        from . import ops

        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend)

    return forward


def _mlp_forward(backend):
    def forward(self, x):
        from . import ops

        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))

    return forward


def _with_globals(fn, replacements: dict):
    """A copy of ``fn`` that resolves the names in ``replacements`` to new values.

    Decorators that wrap with functools.wraps (transformers' ``deprecate_kwarg``) are copied too,
    so the wrapper keeps calling the rebound inner function. ``fn``'s module is not touched.
    """
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    if inner is not None and closure is not None:
        new_inner = _with_globals(inner, replacements)
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in closure)
    namespace = {**fn.__globals__, **replacements} if fn.__code__.co_names else fn.__globals__
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    if inner is not None and closure is not None:
        copy.__wrapped__ = new_inner
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return copy


def _attention_forward_with_our_rope(attention_module, backend):
    from . import ops

    forward = type(attention_module).forward
    return _with_globals(forward, {"apply_rotary_pos_emb": functools.partial(ops.apply_rotary_pos_emb, backend=backend)})


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """The mask function registered as "llama_fast": what the attention function needs besides the
    causal rule. With a cache that holds exactly the tokens seen so far (DynamicCache, or none), the
    (B, kv_len) key padding mask, or None. With a static cache (its query offset is a tensor on
    the device, or its slots outnumber the tokens seen), ``_static_cache_mask``'s encoding of the
    padding over the cache's slots and the number of slots filled.

    Nothing here reads a tensor's value on the host: no sync, and nothing for torch.compile to
    break its graph on. So an all-True padding mask is handed over as it is (the kernel's padded
    path costs one byte load per key block) rather than checked and dropped. Anything else a model
    might ask for (packed sequences, sliding windows, a custom mask function) is refused here, at
    mask creation, rather than computed wrongly.
    """
    from transformers import masking_utils

    if mask_function is not None and mask_function is not masking_utils.causal_mask_function:
        raise NotImplementedError(
            "llama_fast attention: this forward asks for a mask other than plain causal + padding "
            f"({getattr(mask_function, '__name__', mask_function)}; e.g. packed sequences or a custom "
            "mask function); patch with attention=False for such inputs"
        )
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:  # transformers versions that pass the query positions instead
        q_offset, q_length = cache_position[0], cache_position.shape[0]
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        raise NotImplementedError(f"llama_fast attention: keys from offset {kv_offset} (a sliding-window cache) are "
                                  "not supported; use DynamicCache or StaticCache")
    static = isinstance(q_offset, torch.Tensor)
    if not static and kv_length < q_offset + q_length:
        raise NotImplementedError(f"llama_fast attention: {kv_length} keys for queries at [{q_offset}, "
                                  f"{q_offset} + {q_length}): the cache lost tokens the queries must see")
    if not static and kv_length == q_offset + q_length:  # the cache holds exactly the tokens seen so far
        return None if attention_mask is None else attention_mask[:, -kv_length:].bool()
    device = q_offset.device if static else attention_mask.device if attention_mask is not None else kwargs.get("device")
    if device is None:
        raise NotImplementedError("llama_fast attention: a static cache's mask needs its device, and transformers "
                                  "passed none (no attention_mask, no device argument)")
    return _static_cache_mask(batch_size, kv_length, q_offset + q_length, attention_mask, device)


def _static_cache_mask(batch_size, slots, filled, attention_mask, device) -> torch.Tensor:
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


def _decode_static_cache_mask(mask: torch.Tensor, kv_len: int):
    """(key_padding_mask (B, kv_len) bool, kv_lens (B,) int32) from ``_static_cache_mask``'s tensor,
    or None when ``mask`` is not one."""
    if mask.dim() != 4 or mask.dtype != torch.int32 or mask.shape[1:] != (1, 1, kv_len + 1):
        return None
    return mask[:, 0, 0, :kv_len].bool(), mask[:, 0, 0, kv_len]


# Keywords transformers hands the attention function that do not change what it computes here (the
# cache and positions act before attention: RoPE, the cache update, the mask function). Any other
# keyword with a value is refused: e.g. the cu_seq_lens_q/k and max_length_q/k of packed batches
# (DataCollatorWithFlattening(return_flash_attn_kwargs=True)), which ignored would let tokens attend
# across document boundaries, or a sliding window, softcap or attention sinks.
_NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values", "cache_position", "layer_idx",
                             "output_attentions"})


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as "llama_fast" (transformers' AttentionInterface).

    query (B, Hq, Sq, D), key/value (B, Hk, Skv, D) as the attention module hands them over;
    returns (out (B, Sq, Hq, D), None), as transformers' sdpa and flash functions do.
    """
    from . import ops

    if dropout:
        raise NotImplementedError(f"llama_fast attention: attention dropout {dropout} is not supported; set "
                                  "config.attention_dropout = 0 or patch with attention=False")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("llama_fast attention never forms the attention matrix: output_attentions=True "
                                  "needs the eager implementation (patch with attention=False)")
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL_KWARGS and v is not None)
    if unknown:
        raise NotImplementedError(
            f"llama_fast attention: does not implement {', '.join(unknown)}; refusing rather than ignoring them "
            "(cu_seq_lens_* / max_length_* come with packed sequences, e.g. DataCollatorWithFlattening with "
            "return_flash_attn_kwargs=True); patch with attention=False for such inputs"
        )
    kv_lens = None
    if attention_mask is not None and (static := _decode_static_cache_mask(attention_mask, key.shape[-2])):
        attention_mask, kv_lens = static
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"llama_fast attention: expected the (batch, kv_len) padding mask made by llama_fast's mask function, "
            f"got a {attention_mask.dim()}-D mask (was the attention implementation changed after patch()?)"
        )
    out = ops.flash_attention(query, key, value, causal=getattr(module, "is_causal", True), softmax_scale=scaling,
                              key_padding_mask=attention_mask, kv_lens=kv_lens)
    return out.transpose(1, 2), None


def _register_attention() -> None:
    """Add "llama_fast" to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"llama_fast.patch: {type(model).__name__} did not accept attention implementation {name!r}")


def patch(model, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, attention: bool = True,
          backend: str | None = None):
    """Put llama_fast's kernels into ``model`` in place and return it.

    ``model``: a transformers Llama model (``LlamaForCausalLM``, ``LlamaModel`` or another head on
    the Llama backbone), or a PEFT ``PeftModel`` wrapping one. Each flag turns one kernel on or
    off. ``backend`` ("triton", "cuda", "cpu", "reference"; default: chosen per tensor, see
    ``llama_fast.backend``) applies to RMSNorm, RoPE and SwiGLU; attention always runs the Triton
    kernel (or, on a CPU without the interpreter, the reference). Raises ``ValueError`` naming what
    is unsupported, before changing anything. Patching a patched model re-patches it.
    """
    from .backend import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"llama_fast.patch: unknown backend {backend!r}; choose one of {BACKENDS}")
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, backend=backend)
    backbone = _backbone(model)
    _validate(backbone, options)
    if getattr(backbone, _RECORD, None) is not None:
        unpatch(backbone)
    llama = _llama_classes()
    record = _Record(options=options)

    def give_forward(module, forward):
        module.forward = types.MethodType(forward, module)
        record.forwards.append(module)

    for module in backbone.modules():
        if rms_norm and isinstance(module, llama.LlamaRMSNorm):
            give_forward(module, _rms_norm_forward(backend))
        elif swiglu and isinstance(module, llama.LlamaMLP):
            give_forward(module, _mlp_forward(backend))
        elif rope and isinstance(module, llama.LlamaAttention):
            give_forward(module, _attention_forward_with_our_rope(module, backend))
    if attention:
        _register_attention()
        record.config = backbone.config
        own = copy.copy(record.config)
        for module in model.modules():
            if vars(module).get("config") is record.config:
                module.config = own
                record.config_holders.append(module)
        _set_attn_implementation(backbone, ATTENTION_NAME)
    setattr(backbone, _RECORD, record)
    return model


def unpatch(model):
    """Undo ``patch``: the model runs transformers' code again, bit for bit. Returns ``model``."""
    backbone = _backbone(model)
    record = getattr(backbone, _RECORD, None)
    if record is None:
        return model
    for module in record.forwards:
        del module.forward
    for module in record.config_holders:
        module.config = record.config
    delattr(backbone, _RECORD)
    return model


def is_patched(model) -> bool:
    return getattr(_backbone(model), _RECORD, None) is not None


def patched_options(model) -> dict | None:
    record = getattr(_backbone(model), _RECORD, None)
    return None if record is None else dict(record.options)


def patched_backends(model) -> dict[str, str] | None:
    """The backend each patched kernel runs for this model where its parameters are now, e.g.
    ``{"rms_norm": "cpu", "rope": "cpu", "swiglu": "cpu", "attention": "reference"}``; None when unpatched.

    The same choice the ops make at each call (``llama_fast.backend.backend_for``): follow the model
    to another device and the answer follows it.
    """
    from .backend import backend_on

    backbone = _backbone(model)
    record = getattr(backbone, _RECORD, None)
    if record is None:
        return None
    device = next(backbone.parameters()).device
    chosen = {op: backend_on(device, record.options["backend"])
              for op in ("rms_norm", "rope", "swiglu") if record.options[op]}
    if record.options["attention"]:
        chosen["attention"] = backend_on(device, extension_op=False)
    return chosen


__all__ = ["ATTENTION_NAME", "is_patched", "patch", "patched_backends", "patched_options", "unpatch"]
