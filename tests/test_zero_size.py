"""Empty inputs (0 rows, 0 tokens, batch 0, no keys) forward and backward on every backend that runs
here: data loaders yield empty batches and generate() meets edge cases, and autograd hands empty
gradients over with any strides (an expanded zero-row gradient has stride 0)."""

import pytest
import torch

from llama_fast import extension, ops
from llama_fast.backend import interpreting
from models import DEVICE


def _backends(device: torch.device) -> list[str]:
    found = ["reference"]
    if device.type == "cuda" or interpreting():
        found.append("triton")
    if device.type == "cpu" and extension.available():
        found.append("cpu")
    if device.type == "cuda" and extension.has_cuda_kernels():
        found.append("cuda")
    return found


def _leaf(*shape, device):
    return torch.randn(*shape, device=device, requires_grad=True)


def _backward(outputs, inputs):
    """Gradients of sum(outputs) (an expanded, stride-0 gradient per output, as autograd makes it)."""
    total = sum(o.sum() for o in outputs)
    return torch.autograd.grad(total, inputs, allow_unused=False)


BACKENDS = _backends(DEVICE)
ATTENTION_BACKENDS = [b for b in BACKENDS if b in ("reference", "triton")]  # no C++ attention kernel
backends = pytest.mark.parametrize("backend", BACKENDS)


@backends
@pytest.mark.parametrize("shape", [(0, 64), (0, 5, 64), (3, 0, 64)])
def test_rms_norm_empty(device, backend, shape):
    x, w = _leaf(*shape, device=device), _leaf(shape[-1], device=device)
    y = ops.rms_norm(x, w, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, dw = _backward([y], [x, w])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@backends
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 96)])
def test_swiglu_empty(device, backend, shape):
    gate, up = _leaf(*shape, device=device), _leaf(*shape, device=device)
    out = ops.swiglu(gate, up, backend=backend)
    assert out.shape == gate.shape
    dgate, dup = _backward([out], [gate, up])
    assert dgate.shape == gate.shape and dup.shape == up.shape


@backends
@pytest.mark.parametrize("batch,seq", [(1, 0), (0, 3), (0, 0)])
def test_rope_empty(device, backend, batch, seq):
    q, k = _leaf(batch, 4, seq, 64, device=device), _leaf(batch, 2, seq, 64, device=device)
    cos, sin = torch.randn(batch, seq, 64, device=device), torch.randn(batch, seq, 64, device=device)
    q_embed, k_embed = ops.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    assert q_embed.shape == q.shape and k_embed.shape == k.shape
    dq, dk = _backward([q_embed, k_embed], [q, k])
    assert dq.shape == q.shape and dk.shape == k.shape


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("batch,q_len,kv_len", [(0, 3, 3), (1, 0, 5), (1, 0, 0), (1, 3, 0), (2, 1, 0)])
def test_attention_empty(device, backend, batch, q_len, kv_len):
    q = _leaf(batch, 4, q_len, 64, device=device)
    k, v = _leaf(batch, 2, kv_len, 64, device=device), _leaf(batch, 2, kv_len, 64, device=device)
    out = ops.flash_attention(q, k, v, backend=backend)
    assert out.shape == q.shape
    # Where a query sees no key (none here has one to see) it returns zeros, with zero gradients.
    assert not out.any()
    grads = _backward([out], [q, k, v])
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))
