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
- The fused loss (``cross_entropy=True``): the causal LM and its lm_head get instance forwards; in
  training with labels the first asks the second, through a request object, for the loss fused
  with lm_head instead of the logits (``_fused_loss_forwards``).

What was replaced is recorded on the model, so ``unpatch`` restores it exactly and patching twice
is harmless. A model the kernels cannot serve is refused at ``patch()`` time with a
``ValueError`` naming what is unsupported, before anything is changed.
"""

import copy
import dataclasses
import functools
import inspect
import types

import torch

ATTENTION_NAME = "llama_fast"
_RECORD = "_llama_fast_patch"


@dataclasses.dataclass
class _Record:
    """What ``patch`` changed on one model, for ``unpatch``."""

    options: dict
    # (module, the instance forward it had before or None): transformers' tensor-parallel plans, for
    # one, set instance forwards of their own, which unpatch must give back rather than delete
    forwards: list = dataclasses.field(default_factory=list)
    config: object = None  # the config object the modules held before, when attention was patched
    config_holders: list = dataclasses.field(default_factory=list)  # modules given the copy


def _llama_classes():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _fsdp2_shards(model: torch.nn.Module, head: torch.nn.Module, weight) -> bool:
    """Whether ``weight``, a sharded DTensor, is FSDP2's to gather (the model or lm_head went through
    ``fully_shard``, on a one-dimensional mesh): then lm_head's own call sees it whole."""
    from torch.distributed.fsdp import FSDPModule

    sharded_by_fsdp2 = isinstance(head, FSDPModule) or isinstance(model, FSDPModule)
    return sharded_by_fsdp2 and weight.device_mesh.ndim == 1


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside ``model``: a DDP (or DataParallel) wrapper and a PEFT
    ``PeftModel`` are unwrapped. The wrappers' forward calls the model's, so patching the model
    inside patches what they run; FSDP2's ``fully_shard`` wraps nothing (it changes the modules in
    place), so a sharded model is patched as it is. FSDP1's ``FullyShardedDataParallel`` is refused:
    it needs a GPU even to wrap (so it is untested here), and torch deprecates it for FSDP2."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    if torch.distributed.is_available() and _is_fsdp1(model):
        raise ValueError("llama_fast.patch: the model is wrapped in FSDP1's FullyShardedDataParallel, which llama_fast "
                         "does not support; patch the model before wrapping it, and shard it with FSDP2's "
                         "torch.distributed.fsdp.fully_shard (tested)")
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
        if (head_dim % 16 or head_dim > 256) and _attention_runs_triton(model):
            raise ValueError(f"llama_fast.patch: head_dim {head_dim} is not supported by the Triton attention kernel "
                             "(a multiple of 16 up to 256); pass attention=False")
        if not getattr(config, "is_causal", True):
            raise ValueError("llama_fast.patch: the model is configured for bidirectional attention "
                             "(config.is_causal = False); pass attention=False")
    if options["cross_entropy"]:
        head = getattr(model, "lm_head", None)
        if head is None or not isinstance(_head_linear(head), torch.nn.Linear):
            raise ValueError(f"llama_fast.patch: cross_entropy=True needs a causal LM with a linear lm_head "
                             f"({type(model).__name__} has {type(head).__name__})")
        from .ops._dtensor import has_dtensor

        weight = _head_linear(head).weight
        vocabulary_split = has_dtensor(weight) and any(p.is_shard() for p in weight.placements)
        if vocabulary_split and not _fsdp2_shards(model, head, weight):
            raise ValueError("llama_fast.patch: cross_entropy=True with lm_head split by tensor parallelism: its "
                             "weight is a DTensor sharded over the vocabulary, and the fused loss has no log-sum-exp "
                             "across ranks; pass cross_entropy=False")
    if options["rope"] and layers[0].self_attn.head_dim % 2:
        raise ValueError("llama_fast.patch: RoPE needs an even head_dim")
    if options["backend"] is not None:
        _check_backend_serves(model, options["backend"])
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unsupported = dtypes - {torch.float32, torch.float16, torch.bfloat16}
    if unsupported:
        raise ValueError(f"llama_fast.patch: parameters of dtype {sorted(map(str, unsupported))} are not supported "
                         "(float32, float16, bfloat16)")


def _attention_runs_triton(model: torch.nn.Module) -> bool:
    """Whether attention would run the Triton kernel where the model's parameters are (a GPU, or the
    CPU under Triton's interpreter); elsewhere it runs the eager reference, which takes any head_dim.
    A model moved to a GPU after patch() with such a head_dim is refused by the op when it runs."""
    from .backend import backend_on

    def triton_on(device) -> bool:
        try:
            return backend_on(device, extension_op=False) == "triton"
        except ValueError:  # a device llama_fast has no backend for: its ops will say so when they run
            return True

    devices = {p.device for p in model.parameters()} - {torch.device("meta")}
    return not devices or any(triton_on(d) for d in devices)


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


def _head_linear(head):
    """The nn.Linear of an lm_head: itself, or the base layer PEFT wraps it in."""
    return getattr(head, "base_layer", head)


def _head_weight(head):
    """lm_head's weight and bias as its forward would use them: with a LoRA adapter on lm_head, the
    base weight plus each active adapter's delta (differentiable in the adapter), which is only the
    same as the adapter's forward without LoRA dropout."""
    linear = _head_linear(head)
    if linear is head or getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return linear.weight, linear.bias
    weight = linear.weight
    for name in head.active_adapters:
        if name not in getattr(head, "lora_A", {}):
            continue
        dropout = head.lora_dropout[name]
        if not isinstance(dropout, torch.nn.Identity) and dropout.p > 0 and head.training:
            raise NotImplementedError("llama_fast cross_entropy: LoRA dropout on lm_head in training cannot be fused "
                                      "(patch with cross_entropy=False, or lora_dropout=0 for lm_head)")
        weight = weight + head.get_delta_weight(name)
    return weight, linear.bias


@dataclasses.dataclass
class _LossRequest:
    """What the patched causal-LM forward asks of lm_head's next call, for one forward: the fused
    loss's arguments, or None for lm_head's own output; ``served`` says whether lm_head computed it."""

    arguments: tuple | None = None
    served: bool = False


def _fused_loss_forwards(model: torch.nn.Module):
    """(the causal LM's forward, lm_head's forward) that patch(cross_entropy=True) installs, once, at
    patch time.

    The causal LM's forward keeps the signature of the forward it replaces (transformers' Trainer
    keeps only the dataset columns named there: with ``(*args, **kwargs)`` its default
    ``remove_unused_columns=True`` dropped ``input_ids``) and calls that forward, transformers' own
    (or one a library installed before, such as TRL's fused-head wrapper). Where the fused loss pays,
    in training with ``labels`` (or when the call passes ``skip_logits=True``), it first leaves a
    ``_LossRequest`` for lm_head, whose forward then computes the fused loss from the hidden states
    (no logits) and returns it as lm_head's output; otherwise (evaluation, ``Trainer.predict``,
    ``model.eval()``, ``skip_logits=False``) the call is transformers' own and returns the logits
    and the loss, so no metric ever receives losses where it expects logits (Liger decides the same
    way, by ``self.training``).

    Both halves matter under sharded data parallelism: the weight is read inside lm_head's own call,
    so the hooks FSDP2 and DeepSpeed ZeRO-3 put on lm_head gather it first; and the loss is what
    lm_head returns, so the hooks they put on a module's output to gather the weight again before its
    backward fire on the loss's gradient. (Returning a placeholder and keeping the loss aside, as this
    did first, ran the backward on a resharded, empty weight under FSDP2: the failure Liger's fused
    loss had, Liger-Kernel #332 and #631.) The loss is read back from the class's output, since such
    hooks may hand on a new tensor. lm_head's forward is installed at patch time and the request is an
    attribute of a plain object, because swapping lm_head's forward per call (deleting the instance
    attribute afterwards) cannot be traced: torch.compile failed on it with every backend."""
    head = model.lm_head
    request = _LossRequest()
    previous = vars(model).get("forward")  # e.g. TRL's fused-head wrapper, which calls the class's forward
    previous_head = vars(head).get("forward")  # e.g. a tensor-parallel plan's
    signature = inspect.signature(model.forward)
    positional = []  # the leading parameters a caller may pass by position, as the replaced forward names them
    for name, parameter in signature.parameters.items():
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        positional.append(name)

    def call_previous(self, *args, **kwargs):
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)

    def forward(self, *args, labels=None, skip_logits=None, **kwargs):
        if args:  # by name from here on, so that labels given by position are found too
            named = dict(zip(positional, args))
            if len(args) > len(positional) or "labels" in named and labels is not None or named.keys() & kwargs:
                raise TypeError(f"{type(self).__name__}.forward: too many positional arguments, or one given twice")
            labels = named.pop("labels", labels)
            kwargs.update(named)
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if not skip_logits or kwargs.get("fused_lm_head"):
            # fused_lm_head=True asks TRL's own fused head (for its loss, entropy and accuracy metrics), which reads
            # lm_head's weight itself: left to it. SFTTrainer installs it after patching, around this forward; where
            # it was installed first, it is the previous forward called here, and needs the labels
            return call_previous(self, labels=labels, **kwargs)
        if labels is None:
            raise ValueError("llama_fast cross_entropy: skip_logits=True needs labels (the fused loss is all such a "
                             "call returns)")
        if self.lm_head is not head:
            raise RuntimeError("llama_fast cross_entropy: lm_head was replaced after patch() (resize_token_embeddings "
                               "does that); call llama_fast.patch(model, cross_entropy=True) again")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        request.arguments = (labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"),
                             getattr(self.config, "final_logit_softcapping", None))
        request.served = False
        try:
            out = call_previous(self, return_dict=True, **kwargs)
        finally:
            request.arguments = None
        if not request.served or out.logits is None or out.logits.dim() != 0:
            raise RuntimeError(f"llama_fast cross_entropy: {type(self).__name__}.forward did not return lm_head's "
                               "output as its logits; patch with cross_entropy=False")
        out.loss, out.logits = out.logits, None
        return out if return_dict else out.to_tuple()

    forward.__signature__ = signature.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                                                          *signature.parameters.values()])
    forward.__doc__ = getattr(model.forward, "__doc__", None)

    def head_forward(self, hidden, *args, **kwargs):
        arguments = request.arguments
        if arguments is None:
            if previous_head is not None:
                return previous_head(hidden, *args, **kwargs)
            return type(self).forward(self, hidden, *args, **kwargs)
        request.arguments, request.served = None, True
        return _fused_causal_lm_loss(self, hidden, *arguments)

    return forward, head_forward


def _fused_causal_lm_loss(head, hidden, labels, num_items_in_batch, shift_labels, softcap):
    """transformers' ForCausalLMLoss (labels shifted left, -100 ignored, num_items_in_batch) by
    ops.linear_cross_entropy on lm_head's weights."""
    from . import ops

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    tokens = hidden.reshape(-1, hidden.shape[-1])
    if tokens.shape[0] != shift_labels.shape[0]:
        raise ValueError(f"llama_fast cross_entropy: {tokens.shape[0]} positions (after logits_to_keep) but "
                         f"{shift_labels.shape[0]} labels")
    weight, bias = _head_weight(head)
    return ops.linear_cross_entropy(tokens, weight, shift_labels, bias=bias, num_items_in_batch=num_items_in_batch,
                                    logit_softcap=softcap)


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
    namespace = fn.__globals__
    if fn.__code__.co_names:
        # Without "__name__": torch 2.11's dynamo takes a namespace that has one for that module's
        # globals and guards on sys.modules[name].apply_rotary_pos_emb, the original function, so a
        # compiled patched model failed building its guards. With none it guards this dict itself,
        # as torch 2.14 does for any namespace that is not its module's.
        namespace = {key: value for key, value in fn.__globals__.items() if key != "__name__"} | replacements
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
    # `from transformers.masking_utils import ...`, not `from transformers import masking_utils`:
    # the latter's import statement yields transformers' _LazyModule, on which torch 2.11's dynamo
    # breaks the graph ("Bad import result"); 2.14's traces either.
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        if attention_mask is None and q_offset == 0 and kv_offset == 0 and kv_length == q_length:
            # For a Llama, transformers asks for another mask without a cache or padding only when
            # position_ids show packed sequences: the attention function finds the same sequences
            # (or refuses, if it cannot).
            return _packed_marker(batch_size, kwargs.get("device"))
        raise NotImplementedError(
            "llama_fast attention: this forward asks for a mask other than plain causal + padding "
            f"({getattr(mask_function, '__name__', mask_function)}; e.g. a custom mask function); patch with "
            "attention=False for such inputs"
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


def _packed_marker(batch_size: int, device) -> torch.Tensor:
    """The mask function's answer when transformers asks for packed sequences' mask: an empty
    (B, 1, 1, 0) int8 tensor that tells the attention function to find the sequences itself."""
    return torch.empty((batch_size, 1, 1, 0), dtype=torch.int8, device=device)


def _is_packed_marker(mask: torch.Tensor) -> bool:
    return mask.dim() == 4 and mask.dtype == torch.int8 and mask.shape[-1] == 0


_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _packed_sequences(query, key, attention_mask, kwargs):
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
    """
    given = {name: kwargs.get(name) for name in _PACKED_KWARGS}
    marker = attention_mask is not None and _is_packed_marker(attention_mask)
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise NotImplementedError(f"llama_fast attention: packed sequences need all of {', '.join(_PACKED_KWARGS)}; "
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
    if marker:
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


# Keywords transformers hands the attention function that do not change what it computes here (the
# cache and positions act before attention: RoPE, the cache update, the mask function; position_ids
# also show packed sequences, read by _packed_sequences with the _PACKED_KWARGS). Any other keyword
# with a value is refused rather than ignored: e.g. a sliding window, softcap or attention sinks.
_NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values", "cache_position", "layer_idx",
                             "output_attentions", "output_hidden_states", "output_router_logits",
                             # the loss's normaliser, which transformers' Trainer passes down the whole model
                             "num_items_in_batch",
                             "is_causal"})  # honoured by _attention
# TRL's padding-free collator adds ``seq_idx`` (each token's sequence number) beside the cu_seq_lens_*
# it makes from the same lengths: with those it says nothing new. Alone it is refused, like any other.


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
    packed = _packed_sequences(query, key, attention_mask, kwargs)
    if packed is not None:
        return _packed_attention(query, key, value, packed, causal, scaling), None
    if attention_mask is not None and _is_packed_marker(attention_mask):
        attention_mask = None  # traced: each row is one sequence (asserted on the device)
    kv_lens = None
    if attention_mask is not None and (static := _decode_static_cache_mask(attention_mask, key.shape[-2])):
        attention_mask, kv_lens = static
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"llama_fast attention: expected the (batch, kv_len) padding mask made by llama_fast's mask function, "
            f"got a {attention_mask.dim()}-D mask (was the attention implementation changed after patch()?)"
        )
    if _sdpa_serves(query, key, attention_mask, kv_lens, causal):
        return _sdpa(query, key, value, causal, scaling), None
    out = ops.flash_attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
                              kv_lens=kv_lens)
    return out.transpose(1, 2), None


def _sdpa_serves(query, key, attention_mask, kv_lens, causal: bool) -> bool:
    """Whether ``_sdpa`` computes this call: ops.flash_attention would run the eager reference (a CPU
    tensor without Triton's interpreter: llama_fast has no CPU attention kernel), no key is masked
    (no static cache, and no padding mask or one that masks nothing), and SDPA's top-left
    ``is_causal`` is our bottom-right rule (a single query, which sees every key, or as many
    queries as keys). Plain tensors in eager mode only: the mask is read on the host (on a CPU no
    sync, but a graph break under torch.compile), and tensor subclasses (DTensor) keep the op's
    own checks and placement rules."""
    from .backend import backend_for

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


def _packed_attention(query, key, value, packed, causal, scaling):
    """Attention over packed sequences: the (B, H, S, D) views the module hands over, which are
    (B, S, H, D) projections transposed, as flash-attn's (B·S, H, D) layout (views, no copy), and
    the result back as (B, S, H, D)."""
    from . import ops

    batch, heads, q_len, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (query, key, value))
    out = ops.flash_attention_varlen(q, k, v, *packed, causal=causal, softmax_scale=scaling)
    return out.view(batch, q_len, heads, head_dim)


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
          cross_entropy: bool = False, backend: str | None = None):
    """Put llama_fast's kernels into ``model`` in place and return it.

    ``model``: a transformers Llama model (``LlamaForCausalLM``, ``LlamaModel`` or another head on
    the Llama backbone), or a PEFT ``PeftModel`` wrapping one. Each flag turns one kernel on or
    off. ``backend`` ("triton", "cuda", "cpu", "reference"; default: chosen per tensor, see
    ``llama_fast.backend``) applies to RMSNorm, RoPE and SwiGLU; attention always runs the Triton
    kernel (or, on a CPU without the interpreter, the reference). Raises ``ValueError`` naming what
    is unsupported, before changing anything. Patching a patched model re-patches it.

    ``cross_entropy=True`` (off by default: it changes the output) makes a causal LM's forward in
    training with ``labels`` compute the loss fused with lm_head (``ops.linear_cross_entropy``): the
    logits are never formed and the output's ``logits`` is None. In eval mode (``model.eval()``, the
    Trainer's evaluate and predict) and without labels the output is transformers' own, logits
    included. A call's ``skip_logits`` keyword chooses explicitly: True for the fused loss (labels
    needed), False for the logits. The forward keeps the signature transformers' Trainer reads.
    """
    from .backend import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"llama_fast.patch: unknown backend {backend!r}; choose one of {BACKENDS}")
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy,
                   backend=backend)
    backbone = _backbone(model)
    _validate(backbone, options)
    if getattr(backbone, _RECORD, None) is not None:
        unpatch(backbone)
    llama = _llama_classes()
    record = _Record(options=options)

    def give_forward(module, forward):
        record.forwards.append((module, vars(module).get("forward")))
        module.forward = types.MethodType(forward, module)

    if cross_entropy:
        causal_lm_forward, head_forward = _fused_loss_forwards(backbone)
        give_forward(backbone, causal_lm_forward)
        give_forward(backbone.lm_head, head_forward)
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
    for module, previous in reversed(record.forwards):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
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
