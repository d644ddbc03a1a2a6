"""``patch(model)`` / ``unpatch(model)``: llama_fast's kernels in a transformers model of the Llama design
(Llama, Qwen2, Qwen3, Mistral, Gemma 2/3, Phi-3), its modules recognised by what they compute (families.py).

Per instance, reversible, and through transformers' own extension points, one contract per file:

- RMSNorm and the MLP (here): each RMSNorm / gated-MLP *instance* (``LlamaRMSNorm``, ``Gemma3RMSNorm``,
  ``Qwen2MLP``, ...)
  gets a ``forward`` attribute that shadows the class method (deleting it restores the class's).
- The decoder layer (layer.py, with rms_norm): each plain decoder layer whose forward is Llama's gets
  transformers' forward with the post-attention residual add fused into ``post_attention_layernorm``
  (``ops.add_rms_norm``).
- RoPE (rope.py): each attention instance gets a copy of transformers' own forward that resolves
  ``apply_rotary_pos_emb`` to ours. cos and sin still come from the model's rotary module, so every
  rope type works unchanged.
- Attention (attention.py, masks.py): a function and a mask function are registered under the name
  "llama_fast" in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (additions: no
  existing entry changes), and this model's attention implementation is set to it. The model's cache,
  masks, ``generate()`` and its logits processors keep working. The implementation is a field of the
  config, and models built from one config object share it, so the patched model's modules are first
  given their own shallow copy of the config; unpatch hands the original object back.
- The fused loss (loss.py, ``cross_entropy=True``): the causal LM and its lm_head get instance forwards;
  in training with labels the first asks the second for the loss fused with lm_head instead of the logits.

What was replaced is recorded on the model, so ``unpatch`` restores it exactly and patching twice
is harmless. A model the kernels cannot serve is refused at ``patch()`` time (validate.py) with a
``ValueError`` naming what is unsupported, before anything is changed.
"""

import copy
import dataclasses
import sys
import types

import torch

from . import layer
from .attention import ATTENTION_NAME, register, set_implementation
from .families import decoder_layers, is_gated_mlp, is_gemma_rms_norm, is_packed_gated_mlp, is_rms_norm, mlp_activation
from .loss import fused_loss_forwards
from .rope import forward_with_our_rope
from .validate import fused_layers, gated_activation, validate

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


def _is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside ``model``: a DDP (or DataParallel) wrapper, DeepSpeed's engine and a
    PEFT ``PeftModel`` are unwrapped. The wrappers' forward calls the model's, so patching the model
    inside patches what they run (ZeRO-3's gathering hooks stay on the modules, which patching keeps);
    FSDP2's ``fully_shard`` wraps nothing (it changes the modules in place), so a sharded model is
    patched as it is. FSDP1's ``FullyShardedDataParallel`` is refused:
    it needs a GPU even to wrap (so it is untested here), and torch deprecates it for FSDP2."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    deepspeed_engine = sys.modules.get("deepspeed.runtime.engine")  # never imported here: it takes seconds
    if deepspeed_engine is not None and isinstance(model, deepspeed_engine.DeepSpeedEngine):
        model = model.module
    if torch.distributed.is_available() and _is_fsdp1(model):
        raise ValueError("llama_fast.patch: the model is wrapped in FSDP1's FullyShardedDataParallel, which llama_fast "
                         "does not support; patch the model before wrapping it, and shard it with FSDP2's "
                         "torch.distributed.fsdp.fully_shard (tested)")
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and get_base() is not model else model


def _rms_norm_forward(backend):
    """The forward patched RMSNorm instances get. A plain function per backend, not a partial: Dynamo
    traces a method only when its function has a name (torch.compile failed on partials)."""

    def forward(self, hidden_states):
        from .. import ops

        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend)

    return forward


def _gemma_rms_norm_forward(backend):
    """The forward patched Gemma RMSNorm instances (``Gemma3RMSNorm``, ``Gemma2RMSNorm``) get."""

    def forward(self, x):
        from .. import ops

        return ops.rms_norm(x, self.weight, self.eps, unit_offset=True, backend=backend)

    return forward


def _mlp_forward(backend, activation):
    """The forward patched gated-MLP instances (``LlamaMLP`` and its copies, Gemma's with ``activation``
    "gelu_tanh") get. ``residual`` (the fused decoder layer passes it): return ``residual + mlp(x)``, the
    add done by the down projection's GEMM (``layer.down_with_residual``)."""

    def forward(self, x, residual=None):
        from .. import ops

        gated = ops.swiglu if activation == "silu" else ops.geglu
        act = gated(self.gate_proj(x), self.up_proj(x), backend=backend)
        if residual is None:
            return self.down_proj(act)
        return layer.down_with_residual(self.down_proj, act, residual)

    forward.takes_residual = True
    return forward


def _packed_mlp_forward(backend, activation):
    """The forward patched packed gated-MLP instances (``Phi3MLP``: one ``gate_up_proj``) get: its two halves
    are row-strided views, which the kernels read in place."""

    def forward(self, hidden_states):
        from .. import ops

        gated = ops.swiglu if activation == "silu" else ops.geglu
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(gated(gate, up, backend=backend))

    return forward


def patch(model, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, attention: bool = True,
          cross_entropy: bool = False, backend: str | None = None):
    """Put llama_fast's kernels into ``model`` in place and return it.

    ``model``: a transformers model of the Llama design (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
    ``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``, and
    ``Gemma2ForCausalLM`` with ``attention=False``, whose soft-capped attention logits the kernel lacks;
    their base models and other heads), or a PEFT ``PeftModel`` wrapping one; sliding-window layers
    included. Each flag turns one kernel on or off; ``rms_norm`` covers Gemma's RMSNorm, ``swiglu``
    Gemma's GeGLU MLP and Phi-3's packed one, ``rope`` Phi-3's rotation of part of each head.
    ``backend`` ("triton", "cuda", "cpu", "reference"; default: chosen per tensor, see
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
    from ..backend import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"llama_fast.patch: unknown backend {backend!r}; choose one of {BACKENDS}")
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy,
                   backend=backend)
    backbone = _backbone(model)
    validate(backbone, options)
    if getattr(backbone, _RECORD, None) is not None:
        unpatch(backbone)
    record = _Record(options=options)
    # decided before any forward changes: a layer or norm with an instance forward of its own is left unfused
    fused = fused_layers(backbone, options)
    attentions = {id(m.self_attn) for m in decoder_layers(backbone)}

    def give_forward(module, forward):
        record.forwards.append((module, vars(module).get("forward")))
        module.forward = types.MethodType(forward, module)

    if cross_entropy:
        causal_lm_forward, head_forward = fused_loss_forwards(backbone)
        give_forward(backbone, causal_lm_forward)
        give_forward(backbone.lm_head, head_forward)
    # validate() has checked that every norm, MLP and attention module of the decoder layers is one these serve
    for module in backbone.modules():
        if rms_norm and is_rms_norm(module):
            give_forward(module, _rms_norm_forward(backend))
        elif rms_norm and is_gemma_rms_norm(module):
            give_forward(module, _gemma_rms_norm_forward(backend))
        elif swiglu and is_gated_mlp(module):
            give_forward(module, _mlp_forward(backend, gated_activation(mlp_activation(module))))
        elif swiglu and is_packed_gated_mlp(module):
            give_forward(module, _packed_mlp_forward(backend, gated_activation(mlp_activation(module))))
        elif rope and id(module) in attentions:
            give_forward(module, forward_with_our_rope(module, backend))
        elif id(module) in fused:
            give_forward(module, layer.fused_layer_forward(type(module), backend))
    if attention:
        register()
        record.config = backbone.config
        own = copy.copy(record.config)
        for module in model.modules():
            if vars(module).get("config") is record.config:
                module.config = own
                record.config_holders.append(module)
        set_implementation(backbone, ATTENTION_NAME)
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
    from ..backend import backend_on

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
