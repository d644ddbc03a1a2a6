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
    """A separate model with the same weights (and its own config object)."""
    import copy

    twin = copy.deepcopy(model)
    return twin if dtype is None else twin.to(dtype)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g).to(DEVICE)
