"""Tiny Llama models for the patch tests: small enough for Triton's interpreter, shaped like the
real thing (GQA, head_dim a multiple of 16, untied embeddings)."""

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
# The models and tokens live where the kernels run: the CPU under the interpreter, or the GPU
# (LLAMA_FAST_TEST_DEVICE=cuda, as bench/gpu.sh sets).
DEVICE = torch.device(os.environ.get("LLAMA_FAST_TEST_DEVICE", "cpu"))


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                initializer_range=0.1, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float32, cls=LlamaForCausalLM, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides))
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so their gradients mean something
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=DEVICE, dtype=dtype).eval()


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
            if isinstance(module, LlamaForCausalLM):
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
