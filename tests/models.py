"""Tiny Llama models (and Qwen2, Qwen3, Mistral ones) for the patch tests: small enough for Triton's
interpreter, shaped like the real thing (GQA, head_dim a multiple of 16, untied embeddings)."""

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
# The models and tokens live where the kernels run: the CPU under the interpreter, or the GPU
# (LLAMA_FAST_TEST_DEVICE=cuda, as bench/gpu.sh sets).
DEVICE = torch.device(os.environ.get("LLAMA_FAST_TEST_DEVICE", "cpu"))


_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.1, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# The families patch() serves besides Llama, and the window of their local layers: shorter than the test
# sequences (and than a 16-key block of the interpreter), so that it matters.
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
WINDOW = 6


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**_SHAPE, **overrides})


def family_config(family: str, **overrides):
    """A tiny config of ``family`` (FAMILIES or "llama") shaped as ``tiny_config``. Mistral: every
    layer local (window WINDOW). Qwen2, Qwen3: layer 0 global and layer 1 local (``max_window_layers=1``).
    Gemma 2 and 3: layer 0 local and layer 1 global, as they alternate; their query_pre_attn_scalar (256)
    makes a softmax scale other than head_dim's. Gemma 2's attention logit cap 0.5, which the tiny model's
    scores (up to ~0.7) reach, where its default of 50 would leave them as they are; its final-logit cap at its
    default, 30. Phi-3: its
    packed qkv and gate_up projections, RoPE over half of each head (partial_rotary_factor 0.5), no window."""
    import transformers

    shape = {**_SHAPE, **overrides}
    if family == "llama":
        return LlamaConfig(**shape)
    if family == "mistral":
        return transformers.MistralConfig(**{"sliding_window": WINDOW, **shape})
    if family == "phi3":
        return transformers.Phi3Config(**{"partial_rotary_factor": 0.5, **shape})
    if family == "gemma2":
        return transformers.Gemma2Config(**{"sliding_window": WINDOW, "attn_logit_softcapping": 0.5,
                                            "layer_types": ["sliding_attention", "full_attention"], **shape})
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**{"sliding_window": WINDOW,
                                                "layer_types": ["sliding_attention", "full_attention"], **shape})
    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return config_class(**{"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, **shape})


def _perturbed(model, dtype):
    with torch.no_grad():  # RMSNorm weights start at 1 (Gemma's at 0): perturb them so their gradients mean something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=DEVICE, dtype=dtype).eval()


def tiny_model(seed: int = 0, dtype=torch.float32, cls=LlamaForCausalLM, **overrides):
    torch.manual_seed(seed)
    return _perturbed(cls(tiny_config(**overrides)), dtype)


def family_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """The causal LM of ``family_config(family, **overrides)``, its norms perturbed as ``tiny_model``'s."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return _perturbed(AutoModelForCausalLM.from_config(family_config(family, **overrides)), dtype)


def clone(model, dtype=None):
    """A separate model with the same weights (and its own config object). In float64 (a reference),
    each causal LM in it computes its loss in float64 too (``float64_loss``)."""
    import copy

    twin = copy.deepcopy(model)
    if dtype is None:
        return twin
    twin.to(dtype)
    if dtype == torch.float64:
        for module in twin.modules():
            if hasattr(module, "lm_head") and hasattr(module, "loss_function"):  # a causal LM of any family
                module.loss_function = float64_loss
    return twin


def float64_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss (the labels shifted the same way, the same reductions) without
    its first line, ``logits = logits.float()``: that turns a float64 model's logits into float32, so
    ``model.double()(labels=...)`` is no float64 reference for the loss or any gradient. It carries
    fp32 cross-entropy rounding much like eager fp32's own, which then looks closer to it than a more
    exact loss does: on SmolLM2 the fused loss's dhidden is 5x nearer the exact value than eager's,
    yet was 3x further from that "float64" model's (measured 2026-11-30, tests/test_real_model.py)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                               num_items_in_batch, ignore_index, **kwargs)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g).to(DEVICE)
