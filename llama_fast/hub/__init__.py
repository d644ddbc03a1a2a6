"""llama_fast's layers through Hugging Face's hub-kernel mechanism, the ecosystem's own extension point:
transformers' ``use_kernels=True`` (which TRL 1.16 recommends over Liger, ``model_init_kwargs={"use_kernels":
True}``) and the ``kernels`` package's ``kernelize``, loading llama_fast's layers from the kernel repository in
this package (``repository/``), so nothing is downloaded::

    import llama_fast.hub
    llama_fast.hub.register()                    # once per process, before the model is loaded
    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True)

What it can serve is what transformers marks for hub kernels (5.25): the RMSNorms of Llama, Qwen2, Qwen3
(q_norm and k_norm too), Mistral and Phi-3 (``use_kernel_forward_from_hub("RMSNorm")``; Gemma's are not
marked) and the rotation of Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3
(``use_kernelized_func(apply_rotary_pos_emb)``, "rotary_pos_emb"; Phi-3's is not marked). Attention, the
MLPs and the loss carry no mark, so ``llama_fast.patch(model)`` remains the way to run all of llama_fast.
Each layer checks the module it replaced computes what the kernel does (the verified sources of
``patch.families``) and raises ``NotImplementedError`` naming it otherwise: the marks name a role, and
models that share one need not compute the same thing.

Why a registration and not transformers' ``KernelConfig`` (transformers 5.25, kernels 0.19.1):
``KernelConfig`` refuses the CPU device (``KERNELS_SUPPORTED_DEVICE_TYPES`` in
``transformers/utils/kernel_config.py``); with ``use_local_kernel=True``, ``from_pretrained`` fails on every
device (it rewrites each entry as a ``(repository, options)`` tuple, which ``add_to_mapping_local`` then
splits as a string); and the mapping it builds holds the mode the model was loaded in only, so
``model.train()``, which kernelizes again in training mode, restores the original forwards. A global
registration (``kernels.register_kernel_mapping``, every mode) survives all three.
"""

import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).parent / "repository"
# transformers' mark -> the class of repository/torch-universal/llama_fast_layers/layers.py serving it
# (the kernels package reads a repository's build variants from its build/ folder or, as here, from itself:
# build/ is a name packaging and .gitignore leave out)
LAYERS = {"RMSNorm": "RMSNorm", "rotary_pos_emb": "RotaryPosEmb"}
# On CUDA, GPUs of compute capability 8.0 up (the kernels' tiles are those of sm_80 and sm_90a). As a
# capability range, not all of "cuda": the kernels package serves a device from the narrowest range that
# holds it, and transformers registers its own default layers (kernels-community's, from the Hub) for all of
# "cuda" each time it loads a model with use_kernels=True, after this registration; a range of its own
# keeps llama_fast's in place whatever the order.
MIN_CUDA_CAPABILITY = 80

# class -> what it computes, checked once per class (the check reads the class's source; a layer runs once
# per module and step)
_KINDS: dict[type, str | None] = {}


def kernel_mapping() -> dict:
    """The mapping for ``kernels.register_kernel_mapping`` / ``kernels.use_kernel_mapping``: each mark of
    ``LAYERS`` to llama_fast's layer on the CPU and on CUDA GPUs of compute capability 8.0 and up, in every
    mode (``Mode.FALLBACK``: training and inference, with or without torch.compile)."""
    from kernels import CUDAProperties, Device, LocalLayerRepository

    cuda = Device(type="cuda", properties=CUDAProperties(min_capability=MIN_CUDA_CAPABILITY,
                                                         max_capability=sys.maxsize))

    def layer(name):
        # check_arch=False: the layers are Python and Triton (a "torch-universal" build), no compiled arch list
        return LocalLayerRepository(repo_path=REPOSITORY, layer_name=name, check_arch=False)

    return {mark: {"cpu": layer(name), cuda: layer(name)} for mark, name in LAYERS.items()}


def register() -> None:
    """Add ``kernel_mapping()`` to the ``kernels`` package's global mapping, which ``from_pretrained(...,
    use_kernels=True)`` and every later ``kernelize`` (``model.train()``, ``model.eval()``) read. Needs the
    ``kernels`` package (transformers 5.25 requires it)."""
    from kernels import register_kernel_mapping

    register_kernel_mapping(kernel_mapping())


# torch.compile calls these while it traces and keeps the result as a constant: tracing them would reach
# inspect.getsource, which Dynamo cannot follow (a graph break, an error under fullgraph).
@torch.compiler.assume_constant_result
def _norm_kind(norm_class: type) -> str | None:
    from ..patch import families

    if norm_class not in _KINDS:
        _KINDS[norm_class] = families.norm_kind(norm_class)
    return _KINDS[norm_class]


@torch.compiler.assume_constant_result
def _rotation_kind(func_class: type) -> str | None:
    from ..patch import families

    if func_class not in _KINDS:
        _KINDS[func_class] = families.rotation_of(families.hub_function(func_class))
    return _KINDS[func_class]


def rms_norm(module, hidden_states):
    """The forward of llama_fast's "RMSNorm" layer, bound to the transformers module it replaced."""
    from .. import ops

    kind = _norm_kind(type(module))
    if kind == "llama":
        return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)
    if kind == "gemma":
        return ops.rms_norm(hidden_states, module.weight, module.eps, unit_offset=True)
    raise NotImplementedError(
        f"llama_fast.hub: {type(module).__qualname__} is marked \"RMSNorm\" for hub kernels but computes neither "
        "Llama's RMSNorm nor Gemma's (its forward is not a source llama_fast verified); register the other marks "
        "only (kernels.register_kernel_mapping of llama_fast.hub.kernel_mapping() without \"RMSNorm\") or use "
        "llama_fast.patch(model), which refuses it by name")


def apply_rotary_pos_emb(module, q, k, cos, sin, unsqueeze_dim=1):
    """The forward of llama_fast's "rotary_pos_emb" layer, bound to the ``kernels`` module made from
    transformers' ``apply_rotary_pos_emb``, with that function's arguments."""
    from .. import ops
    from ..patch.rope import partial_rotation

    kind = _rotation_kind(type(module))
    if kind == "whole":
        return ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    if kind == "partial":
        return partial_rotation(q, k, cos, sin, unsqueeze_dim)
    raise NotImplementedError(
        "llama_fast.hub: an apply_rotary_pos_emb marked \"rotary_pos_emb\" for hub kernels is neither Llama's "
        "rotation nor Phi-3's partial one (its source is not one llama_fast verified); register the other marks only "
        "(kernels.register_kernel_mapping of llama_fast.hub.kernel_mapping() without \"rotary_pos_emb\") or use "
        "llama_fast.patch(model)")
