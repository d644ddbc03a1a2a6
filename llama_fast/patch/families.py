"""Which modules of a transformers model the patch serves, recognised by what they compute, not by class names.

transformers' Llama, Qwen2, Qwen3 and Mistral (and other models of the same design) are built of decoder
layers that hold an ``input_layernorm``, a ``self_attn``, a ``post_attention_layernorm`` and an ``mlp``. Where
two families compute the same thing their modules carry the same code under another class name: modular
transformers copies ``LlamaRMSNorm.forward`` into ``Qwen2RMSNorm`` line for line. So a module is recognised
by the sha256 of its class's ``forward`` source (``layer.function_hash``) in the sets below, each the source
of one computation, verified for the transformers versions named; a release that changes that code changes
the hash, and the module is then refused by name (``validate.py``), never patched on trust.

Why not transformers' own marks: ``use_kernel_forward_from_hub("RMSNorm")`` and ``use_kernelized_func``
decorate these classes for the hub kernels, but without Hugging Face's ``kernels`` package installed both
return the class unchanged (transformers 5.24, integrations/hub_kernels.py), so nothing records them; and
where it is installed (a dependency of transformers from 5.25) the mark says only which hub layer could
replace a module, the same "RMSNorm" for Llama's and Gemma's, which compute different things. So the
source it is. docs/patching.md, "Model families", has the table of what runs.
"""

import inspect

import torch

from .layer import function_hash

# LlamaRMSNorm.forward: hidden * rsqrt(mean(hidden²) + eps) in fp32, cast back, then weight * it. The same
# source in Llama, Qwen2, Qwen3, Mistral, Phi-3 and Granite, transformers 5.17.0, 5.24.0 and 5.25.0.
RMS_NORM_SOURCES = {"790fa612e4fa57acfcbea31da45f92ba91f9016f7260ef539f61c5530ba06a5f"}
# Gemma's RMSNorm, x̂ · (1 + weight) in fp32 (``ops.rms_norm(unit_offset=True)``): Gemma2RMSNorm.forward and
# Gemma3RMSNorm.forward (one computation, their comments name their own model), and the ``_norm`` both call;
# transformers 5.17.0 and 5.25.0.
GEMMA_RMS_NORM_SOURCES = {"f0b8f39a8b2465bece618f4eb6aa08c2ff80b93f4ed77d7d226ccb84e14d7e49",
                          "2a18f679fdfe238c12b3b382b502d9b70b42fff34269836b61212a8eccfdd52a"}
GEMMA_NORM_HELPER_SOURCES = {"a1c27ed5fac56db440a5ff38ad6b04ef79ea341b7100b9e22a6b58e1f1d18aa6"}
# LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), in every family above but Phi-3 and in
# Gemma 2/3 (whose act_fn is a GELU: the activation is checked apart, from the config); 5.17.0, 5.24.0 and 5.25.0.
GATED_MLP_SOURCES = {"03df2d7685cf8446594448cbd33ef676a2b088779d99d9803abe3bed2ec7ad9b"}
# Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2), down_proj(up * act(gate)), one packed projection
# (the chunks are row-strided views, which the gated kernels read in place); 5.25.0's, and 5.17.0's (the
# same lines, its type hints FloatTensor).
PACKED_GATED_MLP_SOURCES = {"5574ea9d1470c190dbdb4e518e62d021d4033f77c36a5b052cfbd06ead8dd638",
                            "42b4de3cc6a5ab01081bf8c8dad9e20f6afa91ff632cfc42adb132a37dcd162e"}
# apply_rotary_pos_emb over the whole head, rotate-half layout (Phi-3's rotates a part of it: another
# source); in Llama, Qwen2, Qwen3, Mistral, Granite and Gemma 2/3, 5.17.0, 5.24.0 and 5.25.0.
ROTARY_SOURCES = {"ea234325c15de475147027ac7da4307167d082b13f4c62a7f2921fef4f9e5e87"}
# Phi-3's apply_rotary_pos_emb: the rotation of the first cos.shape[-1] features of each head
# (partial_rotary_factor), the rest passed through; 5.17.0 and 5.25.0.
PARTIAL_ROTARY_SOURCES = {"0d2d41fdeedae17a61bc3b521d15417d3985429e9b7b9a49f60820f065690db1"}

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``: the modules that hold an input norm, self-attention, a
    post-attention norm and an MLP, as every model of the Llama design does."""
    return [m for m in model.modules() if all(isinstance(getattr(m, part, None), torch.nn.Module)
                                              for part in _LAYER_PARTS)]


def _hash_or_none(fn) -> str | None:
    try:
        return function_hash(fn)
    except (OSError, TypeError):  # no source to read: a function made at run time, a C extension
        return None


def _forward_hash(module: torch.nn.Module) -> str | None:
    return _hash_or_none(type(module).forward)


def norm_kind(norm_class: type) -> str | None:
    """What a norm class's forward computes, by its source: "llama" (Llama's RMSNorm), "gemma" (Gemma's,
    its ``_norm`` helper's source too), or None."""
    source = _hash_or_none(getattr(norm_class, "forward", None))
    if source in RMS_NORM_SOURCES:
        return "llama"
    helper = _hash_or_none(getattr(norm_class, "_norm", None))
    if source in GEMMA_RMS_NORM_SOURCES and helper in GEMMA_NORM_HELPER_SOURCES:
        return "gemma"
    return None


def is_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes Llama's RMSNorm (``ops.rms_norm`` of its weight and variance_epsilon)."""
    return (isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")
            and norm_kind(type(module)) == "llama")


def is_gemma_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes Gemma's RMSNorm (``ops.rms_norm(unit_offset=True)`` of its weight and eps)."""
    return (isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "eps", None), float) and norm_kind(type(module)) == "gemma")


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (its act_fn aside)."""
    return (all(isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj",
                                                                                      "down_proj"))
            and _forward_hash(module) in GATED_MLP_SOURCES)


def is_packed_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes ``down_proj(up * act(gate))`` with gate and up the halves of one
    ``gate_up_proj`` (Phi-3's MLP; its activation_fn aside)."""
    return (all(isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_up_proj", "down_proj"))
            and callable(getattr(module, "activation_fn", None)) and _forward_hash(module) in PACKED_GATED_MLP_SOURCES)


def mlp_activation(module: torch.nn.Module):
    """The activation module of a gated MLP (``act_fn``; Phi-3's ``activation_fn``)."""
    return getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)


def rotary_function(attention_class: type):
    """The ``apply_rotary_pos_emb`` that ``attention_class.forward`` reads as a global of its modeling
    module, under its ``functools.wraps`` decorators (``deprecate_kwarg``, the hub's ``use_kernelized_func``),
    or None when that name is not bound there.

    With Hugging Face's ``kernels`` package installed (transformers requires it from 5.25) that global is
    not the function but an ``nn.Module`` made from it by ``use_kernel_forward_from_hub`` (kernels 0.19.1:
    a ``Func`` class whose forward calls the function, held in its closure as ``func``); the function is
    read from there, so its source is what is recognised."""
    forward = inspect.unwrap(attention_class.forward)
    function = getattr(forward, "__globals__", {}).get("apply_rotary_pos_emb")
    if isinstance(function, torch.nn.Module) and hasattr(function, "kernel_layer_name"):
        function = hub_function(type(function))
    return function


def hub_function(func_class: type):
    """The function a ``kernels`` ``Func`` module class was made from (``use_kernel_forward_from_hub`` on a
    function; kernels 0.19.1 holds it in the closure of the class's forward as ``func``), or None."""
    code = getattr(func_class, "forward", None)
    cells = dict(zip(code.__code__.co_freevars, code.__closure__ or ())) if hasattr(code, "__code__") else {}
    return cells["func"].cell_contents if "func" in cells else None


def rotation(attention_class: type) -> str | None:
    """Which rotation ``attention_class.forward`` calls: "whole" (Llama's rotate-half over the whole head),
    "partial" (Phi-3's, over the first cos.shape[-1] features), or None (another, or none found)."""
    return rotation_of(rotary_function(attention_class))


def rotation_of(function) -> str | None:
    """``rotation`` of an ``apply_rotary_pos_emb`` function itself (None for None)."""
    source = None if function is None else _hash_or_none(function)
    return "whole" if source in ROTARY_SOURCES else "partial" if source in PARTIAL_ROTARY_SOURCES else None
