"""The ops give transformers' own numbers: LlamaRMSNorm, apply_rotary_pos_emb (with cos/sin from
LlamaRotaryEmbedding, default and llama3 scaling) and LlamaMLP, on the same inputs.

"Match" is the error-ratio rule against the same transformers code run in float64: our kernel in
dtype d may be off by at most twice what transformers itself is off in dtype d.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from helpers import DTYPES, assert_error_ratio, leaf
from llama_fast import ops


def _config(**overrides) -> LlamaConfig:
    base = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                head_dim=64, num_hidden_layers=1, vocab_size=128, rms_norm_eps=1e-5, hidden_act="silu")
    base.update(overrides)
    return LlamaConfig(**base)


def _three_ways(module: torch.nn.Module, dtype, device):
    """The module in dtype (under test and eager) and in float64 (the reference)."""
    return module.to(device=device, dtype=dtype), copy.deepcopy(module).to(device=device, dtype=torch.float64)


def _compare(ours_fn, eager_fn, ref_fn, inputs, params_low, params_ref, dtype, name):
    """Outputs and gradients (inputs and params) of ours and eager (dtype) against ref (float64)."""
    x_low = [leaf(t.to(dtype)) for t in inputs]
    x_eager = [leaf(t.to(dtype)) for t in inputs]
    x_ref = [leaf(t.double()) for t in inputs]
    out, out_eager, out_ref = ours_fn(*x_low), eager_fn(*x_eager), ref_fn(*x_ref)
    outs = out if isinstance(out, tuple) else (out,)
    outs_eager = out_eager if isinstance(out_eager, tuple) else (out_eager,)
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    for a, e, r in zip(outs, outs_eager, outs_ref):
        assert_error_ratio(a, e, r, name=f"{name} output", dtype=dtype)
    dys = [torch.randn_like(r) for r in outs_ref]
    g = torch.autograd.grad(outs, x_low + params_low, [d.to(o.dtype) for d, o in zip(dys, outs)])
    g_eager = torch.autograd.grad(outs_eager, x_eager + params_low, [d.to(o.dtype) for d, o in zip(dys, outs_eager)])
    g_ref = torch.autograd.grad(outs_ref, x_ref + params_ref, dys)
    for i, (a, e, r) in enumerate(zip(g, g_eager, g_ref)):
        assert_error_ratio(a, e, r, name=f"{name} grad {i}", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_llama_rms_norm(device, dtype):
    norm = modeling_llama.LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    low, ref = _three_ways(norm, dtype, device)
    x = torch.randn(2, 7, 576, device=device)
    _compare(lambda x: ops.rms_norm(x, low.weight, low.variance_epsilon), low, ref, [x],
             [low.weight], [ref.weight], dtype, "LlamaRMSNorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 100000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
], ids=["default", "llama3"])
def test_matches_apply_rotary_pos_emb(device, dtype, rope_parameters):
    config = _config(rope_parameters=rope_parameters, max_position_embeddings=256)
    rotary = modeling_llama.LlamaRotaryEmbedding(config).to(device)
    batch, seq = 2, 11
    position_ids = torch.arange(seq, device=device)[None].expand(batch, seq) + torch.tensor([[0], [100]], device=device)
    q = torch.randn(batch, seq, 9, 64, device=device).transpose(1, 2)
    k = torch.randn(batch, seq, 3, 64, device=device).transpose(1, 2)

    def tables(dt):
        return rotary(torch.empty(0, device=device, dtype=dt), position_ids)

    cos, sin = tables(dtype)
    cos64, sin64 = (t.double() for t in rotary(torch.empty(0, device=device, dtype=torch.float32), position_ids))
    hf = modeling_llama.apply_rotary_pos_emb
    _compare(lambda q, k: ops.apply_rotary_pos_emb(q, k, cos, sin), lambda q, k: hf(q, k, cos, sin),
             lambda q, k: hf(q, k, cos64, sin64), [q, k], [], [], dtype, "apply_rotary_pos_emb")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_llama_mlp(device, dtype):
    mlp = modeling_llama.LlamaMLP(_config())
    low, ref = _three_ways(mlp, dtype, device)

    def ours(x):
        return low.down_proj(ops.swiglu(low.gate_proj(x), low.up_proj(x)))

    x = torch.randn(3, 5, 576, device=device)
    params_low = [low.gate_proj.weight, low.up_proj.weight, low.down_proj.weight]
    params_ref = [ref.gate_proj.weight, ref.up_proj.weight, ref.down_proj.weight]
    _compare(ours, low, ref, [x], params_low, params_ref, dtype, "LlamaMLP")
