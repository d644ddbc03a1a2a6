"""What ``patch()`` requires of a model: each unsupported configuration is refused with a ``ValueError``
naming it, before anything is changed."""

import warnings

import torch

from . import layer
from .loss import fsdp2_shards, head_linear
from .rope import check_rebinding


def llama_classes():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def validate(model: torch.nn.Module, options: dict) -> None:
    llama = llama_classes()
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
        if head is None or not isinstance(head_linear(head), torch.nn.Linear):
            raise ValueError(f"llama_fast.patch: cross_entropy=True needs a causal LM with a linear lm_head "
                             f"({type(model).__name__} has {type(head).__name__})")
        from ..ops._dtensor import has_dtensor

        weight = head_linear(head).weight
        vocabulary_split = has_dtensor(weight) and any(p.is_shard() for p in weight.placements)
        if vocabulary_split and not fsdp2_shards(model, head, weight):
            raise ValueError("llama_fast.patch: cross_entropy=True with lm_head split by tensor parallelism: its "
                             "weight is a DTensor sharded over the vocabulary, and the fused loss has no log-sum-exp "
                             "across ranks; pass cross_entropy=False")
    if options["rope"]:
        if layers[0].self_attn.head_dim % 2:
            raise ValueError("llama_fast.patch: RoPE needs an even head_dim")
        check_rebinding(type(layers[0].self_attn))
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
    from ..backend import backend_on

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
    from ..backend import backend_on

    for device in sorted({p.device for p in model.parameters()} - {torch.device("meta")}, key=str):
        try:
            backend_on(device, backend)
        except ValueError as exc:
            raise ValueError(f"llama_fast.patch: backend {backend!r} cannot run this model, whose parameters are on "
                             f"{device}: {str(exc).removeprefix('llama_fast: ')}") from None


def fuses_post_attention_add(options: dict) -> bool:
    """Whether ``patch()`` gives the plain decoder layers layer.py's forward, the post-attention residual
    add fused into their norm: with rms_norm on, on the default or the Triton backend (the C++ extension
    has no fused kernel, and the reference would gain nothing), and only when the installed
    ``LlamaDecoderLayer.forward`` is the source layer.py replaces (its hash, verified per version).

    A different source is not refused: it falls back to the unfused layer, each norm patched on its own,
    with a warning naming the version. Refusing would cost users every RMSNorm kernel (rms_norm=False)
    for want of one fused add per layer, while the per-norm patch relies only on the norm module's
    forward, which does not depend on the layer's code; running layer.py's forward over a changed layer
    would silently drop whatever transformers changed."""
    if not options["rms_norm"] or options["backend"] not in (None, "triton"):
        return False
    decoder = llama_classes().LlamaDecoderLayer
    if layer.source_hash(decoder) in layer.VERIFIED_SOURCES:
        return True
    import transformers

    verified = ", ".join(sorted(set(layer.VERIFIED_SOURCES.values())))
    warnings.warn(f"llama_fast.patch: LlamaDecoderLayer.forward in transformers {transformers.__version__} is not "
                  f"the code llama_fast's fused decoder layer replaces (verified for transformers {verified}); the "
                  "post-attention residual add stays unfused, each RMSNorm still runs llama_fast's kernel",
                  stacklevel=3)
    return False
