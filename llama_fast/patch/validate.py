"""What ``patch()`` requires of a model: each unsupported configuration is refused with a ``ValueError``
naming it, before anything is changed."""

import warnings

import torch

from . import families, layer
from .loss import fsdp2_shards, head_linear, soft_caps_head_output
from .rope import check_rebinding

_SUPPORTED = ("transformers' Llama, Qwen2, Qwen3, Mistral, Gemma 3 and Phi-3 models, and Gemma 2's with "
              "attention=False (docs/patching.md, \"Model families\")")


def validate(model: torch.nn.Module, options: dict) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"llama_fast.patch: expected a torch.nn.Module, got {type(model).__name__}")
    layers = families.decoder_layers(model)
    if not layers:
        raise ValueError(
            f"llama_fast.patch: {type(model).__name__} has no decoder layer of the Llama design (a module with "
            f"input_layernorm, self_attn, post_attention_layernorm and mlp); llama_fast supports {_SUPPORTED}"
        )
    attention = layers[0].self_attn
    config = attention.config
    if options["rms_norm"]:
        _check_norms(model)
    if options["swiglu"]:
        _check_mlps(layers)
    if options["attention"]:
        dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        if dropout > 0 and model.training:
            raise ValueError(f"llama_fast.patch: attention dropout {dropout} in training is not supported by the "
                             "flash attention kernel; set config.attention_dropout = 0, call model.eval(), or pass "
                             "attention=False")
        head_dim = attention.head_dim
        if (head_dim % 16 or head_dim > 256) and _attention_runs_triton(model):
            raise ValueError(f"llama_fast.patch: head_dim {head_dim} is not supported by the Triton attention kernel "
                             "(a multiple of 16 up to 256); pass attention=False")
        if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
            raise ValueError("llama_fast.patch: the model is configured for bidirectional attention "
                             "(config.is_causal = False or use_bidirectional_attention); pass attention=False")
    if options["cross_entropy"]:
        head = getattr(model, "lm_head", None)
        if head is None or not isinstance(head_linear(head), torch.nn.Linear):
            raise ValueError(f"llama_fast.patch: cross_entropy=True needs a causal LM with a linear lm_head "
                             f"({type(model).__name__} has {type(head).__name__})")
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap and not soft_caps_head_output(type(model)):
            raise ValueError(f"llama_fast.patch: cross_entropy=True with the final-logit soft-cap of "
                             f"{type(config).__name__} ({softcap}): {type(model).__name__}.forward is not one that "
                             "llama_fast verified applies it as Gemma 2 and 3 do; pass cross_entropy=False")
        from ..ops._dtensor import has_dtensor

        weight = head_linear(head).weight
        vocabulary_split = has_dtensor(weight) and any(p.is_shard() for p in weight.placements)
        if vocabulary_split and not fsdp2_shards(model, head, weight):
            raise ValueError("llama_fast.patch: cross_entropy=True with lm_head split by tensor parallelism: its "
                             "weight is a DTensor sharded over the vocabulary, and the fused loss has no log-sum-exp "
                             "across ranks; pass cross_entropy=False")
    if options["rope"]:
        if attention.head_dim % 2:
            raise ValueError("llama_fast.patch: RoPE needs an even head_dim")
        for attention_class in {type(decoder.self_attn) for decoder in layers}:
            check_rebinding(attention_class)
            if families.rotation(attention_class) is None:
                raise ValueError(f"llama_fast.patch: {attention_class.__name__} calls an apply_rotary_pos_emb that is "
                                 "neither Llama's rotation of whole heads nor Phi-3's of a part of each (its source is "
                                 "not one llama_fast verified); llama_fast's RoPE kernel does not serve it; pass "
                                 "rope=False")
    if options["backend"] is not None:
        _check_backend_serves(model, options["backend"])
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unsupported = dtypes - {torch.float32, torch.float16, torch.bfloat16}
    if unsupported:
        raise ValueError(f"llama_fast.patch: parameters of dtype {sorted(map(str, unsupported))} are not supported "
                         "(float32, float16, bfloat16)")


def _norms(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's normalisation modules: those whose attribute name ends in "norm" (input_layernorm,
    post_attention_layernorm, the final norm, Qwen3's q_norm and k_norm, Gemma's pre_feedforward_layernorm)."""
    return [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1].endswith("norm")]


def _check_norms(model: torch.nn.Module) -> None:
    """Every norm must compute Llama's RMSNorm or Gemma's: one that does not would otherwise run eager
    beside patched ones, or (patched) compute the wrong thing."""
    for name, module in _norms(model):
        if not (families.is_rms_norm(module) or families.is_gemma_rms_norm(module)):
            raise ValueError(f"llama_fast.patch: {name} is a {type(module).__name__}, which computes neither Llama's "
                             "RMSNorm nor Gemma's (its source is not one llama_fast verified); llama_fast has no "
                             "kernel for it; pass rms_norm=False")


def _check_mlps(layers: list[torch.nn.Module]) -> None:
    for decoder in layers:
        mlp = decoder.mlp
        if not (families.is_gated_mlp(mlp) or families.is_packed_gated_mlp(mlp)):
            raise ValueError(f"llama_fast.patch: swiglu=True needs the MLP down_proj(act_fn(gate_proj(x)) * "
                             f"up_proj(x)) or Phi-3's packed gate_up_proj of it; {type(mlp).__name__} computes "
                             "another, which llama_fast does not serve; pass swiglu=False")
        activation = families.mlp_activation(mlp)
        if gated_activation(activation) is None:
            config = decoder.self_attn.config
            name = (getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)  # Gemma's
                    or type(activation).__name__)
            raise ValueError(f"llama_fast.patch: swiglu=True needs the SiLU activation (SwiGLU) or GELU with the tanh "
                             f"approximation (GeGLU), this model uses {name!r}; pass swiglu=False")


_ACTIVATIONS = {"silu": torch.nn.functional.silu,
                "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def gated_activation(act) -> str | None:
    """Which activation ``act`` computes, "silu" or "gelu_tanh" (the ``activation`` of llama_fast's gated-MLP
    kernels), or None, by what it returns on a few points: transformers maps "silu" to its own
    SiLUActivation class, "swish" to torch's nn.SiLU and "gelu_pytorch_tanh" to a GELUTanh class (5.24), and
    any may change."""
    if not callable(act):
        return None
    x = torch.linspace(-6.0, 6.0, 25)
    for name, reference in _ACTIVATIONS.items():
        try:
            with torch.no_grad():
                # to float rounding: another kernel may round differently; erf GELU is 1.5e-4 from tanh's at 1.0,
                # SiLU 0.1 from either
                if torch.allclose(act(x), reference(x), rtol=1e-6, atol=1e-6):
                    return name
        except Exception:  # an activation that does not take a CPU tensor is not one we know
            return None
    return None


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


def fused_layers(model: torch.nn.Module, options: dict) -> set[int]:
    """The ids of the decoder layers ``patch()`` gives layer.py's forward, the post-attention residual add
    fused into their norm: with rms_norm on, on the default or the Triton backend (the C++ extension
    has no fused kernel, and the reference would gain nothing), for the plain layers (``layer.is_plain``)
    whose class's forward is the source layer.py replaces (its hash, verified per version: Llama's,
    Qwen2's, Qwen3's and Mistral's are one source).

    A different source is not refused: it falls back to the unfused layer, each norm patched on its own,
    with a warning naming the class and version. Refusing would cost users every RMSNorm kernel
    (rms_norm=False) for want of one fused add per layer, while the per-norm patch relies only on the
    norm module's forward, which does not depend on the layer's code; running layer.py's forward over a
    changed layer would silently drop whatever transformers changed."""
    if not options["rms_norm"] or options["backend"] not in (None, "triton"):
        return set()
    layers = families.decoder_layers(model)
    # Gemma's layers (post-attention norm not Llama's, and norms around the MLP too) are another design: not warned of
    unverified = sorted({type(m).__name__ for m in layers
                         if layer.is_plain(m) and layer.source_hash(type(m)) not in layer.VERIFIED_SOURCES})
    if unverified:
        import transformers

        verified = ", ".join(sorted({v for versions in layer.VERIFIED_SOURCES.values() for v in versions}))
        warnings.warn(f"llama_fast.patch: {', '.join(unverified)}.forward in transformers {transformers.__version__} "
                      f"is not the code llama_fast's fused decoder layer replaces (verified for transformers "
                      f"{verified}); the post-attention residual add stays unfused, each RMSNorm still runs "
                      "llama_fast's kernel", stacklevel=3)
    return {id(m) for m in layers if layer.source_hash(type(m)) in layer.VERIFIED_SOURCES and layer.is_plain(m)}
