"""rms_norm, apply_rotary_pos_emb and swiglu against the eager references, forward and backward,
in every dtype, on odd shapes and non-contiguous inputs, by the error-ratio rule (helpers.py)."""

import pytest
import torch

from helpers import DTYPES, check_op
from llama_fast import ops, references


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 760), (127, 64), (199, 1128), (3, 4096), (2, 14336), (1, 16384)])
def test_rms_norm(device, dtype, rows, cols):
    x = torch.randn(rows, cols, device=device)
    w = 1 + 0.1 * torch.randn(cols, device=device)
    check_op(ops.rms_norm, references.rms_norm, [(x, True), (w, True)], dtype, names=("rms_norm", ("x", "weight")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_leading_dims_and_non_contiguous(device, dtype):
    # (seq, batch, hidden) transposed to (batch, seq, hidden): the flattening has to copy.
    x = torch.randn(5, 3, 760, device=device).transpose(0, 1)
    w = torch.randn(760, device=device)
    check_op(ops.rms_norm, references.rms_norm, [(x, True), (w, True)], dtype, names=("rms_norm", ("x", "weight")))
    # A row-strided view (every other row of a buffer) runs without a copy.
    x = torch.randn(14, 576, device=device)[::2]
    check_op(ops.rms_norm, references.rms_norm, [(x, True), (torch.randn(576, device=device), True)], dtype,
             names=("rms_norm", ("x", "weight")))


def test_rms_norm_strided_weight(device):
    """A weight that is a strided view (every other element of a buffer) is read as its values, not
    its storage (the kernels take a unit-stride weight: the op makes it one)."""
    x = torch.randn(6, 576, device=device)
    w = torch.randn(2 * 576, device=device)[::2]
    torch.testing.assert_close(ops.rms_norm(x, w), references.rms_norm(x, w))


def test_rms_norm_weight_promotion(device):
    """A bf16 activation with an fp32 weight gives an fp32 result, as LlamaRMSNorm does."""
    x = torch.randn(7, 760, device=device, dtype=torch.bfloat16)
    w = torch.randn(760, device=device)
    y = ops.rms_norm(x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, references.rms_norm(x, w), rtol=0, atol=1e-6)


def test_rms_norm_eps(device):
    x = 1e-3 * torch.randn(4, 576, device=device)
    w = torch.ones(576, device=device)
    for eps in (1e-6, 1e-5, 0.1):
        torch.testing.assert_close(ops.rms_norm(x, w, eps), references.rms_norm(x, w, eps))


def _rope_inputs(device, batch, seq, n_q, n_k, head_dim, cos_batch=None):
    # Projections come out as (B, S, H·D) and the attention module views them as (B, H, S, D).
    q = torch.randn(batch, seq, n_q, head_dim, device=device).transpose(1, 2)
    k = torch.randn(batch, seq, n_k, head_dim, device=device).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    pos = torch.arange(seq, device=device).float() + 3
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None].expand(cos_batch or batch, seq, head_dim)
    return q, k, emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,seq,n_q,n_k,head_dim",
    [(1, 1, 1, 1, 64), (2, 7, 9, 3, 64), (1, 63, 4, 4, 128), (3, 5, 8, 1, 128), (1, 3, 32, 8, 128), (2, 4, 2, 1, 96)],
)
def test_rope(device, dtype, batch, seq, n_q, n_k, head_dim):
    q, k, cos, sin = _rope_inputs(device, batch, seq, n_q, n_k, head_dim)
    check_op(ops.apply_rotary_pos_emb, references.apply_rotary_pos_emb,
             [(q, True), (k, True), (cos, False), (sin, False)], dtype, names=("rope", ("q", "k", "cos", "sin")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_layouts(device, dtype):
    # unsqueeze_dim=2: q and k as (B, S, H, D); cos shared by the batch (batch 1, broadcast).
    q, k, cos, sin = _rope_inputs(device, 3, 7, 4, 2, 64, cos_batch=1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)

    def op(q, k, cos, sin):
        return ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    def ref(q, k, cos, sin):
        return references.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    check_op(op, ref, [(q, True), (k, True), (cos, False), (sin, False)], dtype,
             names=("rope", ("q", "k", "cos", "sin")))
    # Contiguous (B, H, S, D) inputs keep their layout; transposed ones keep theirs.
    q, k, cos, sin = _rope_inputs(device, 2, 5, 4, 2, 64)
    qe, ke = ops.apply_rotary_pos_emb(q.contiguous().to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype))
    assert qe.is_contiguous() and ke.stride() == k.stride()


def test_rope_one_output_unused(device):
    q, k, cos, sin = _rope_inputs(device, 2, 5, 4, 2, 64)
    q.requires_grad_(), k.requires_grad_()
    qe, _ = ops.apply_rotary_pos_emb(q, k, cos, sin)
    (dq,) = torch.autograd.grad(qe.sum(), [q])
    qe_ref, _ = references.apply_rotary_pos_emb(q, k, cos, sin)
    (dq_ref,) = torch.autograd.grad(qe_ref.sum(), [q])
    torch.testing.assert_close(dq, dq_ref)


def test_rope_fp32_tables_with_half_inputs(device):
    """cos/sin in fp32 with bf16 q/k promote to fp32 as transformers' function does; grads stay bf16."""
    q, k, cos, sin = _rope_inputs(device, 2, 5, 4, 2, 64)
    q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    qe, ke = ops.apply_rotary_pos_emb(q, k, cos, sin)
    qr, kr = references.apply_rotary_pos_emb(q, k, cos, sin)
    assert qe.dtype == qr.dtype == torch.float32
    torch.testing.assert_close(qe, qr)
    dq, dk = torch.autograd.grad((qe.sum() + ke.sum()), [q, k])
    assert dq.dtype == dk.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 576), (127, 760), (3, 1128), (2, 14336), (2, 3, 1536)])
def test_swiglu(device, dtype, shape):
    gate = 2 * torch.randn(*shape, device=device)
    up = torch.randn(*shape, device=device)
    check_op(ops.swiglu, references.swiglu, [(gate, True), (up, True)], dtype, names=("swiglu", ("gate", "up")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_fused_projection_views(device, dtype):
    """A fused gate_up projection split with chunk gives row-strided views: no copy, right answer."""
    gate, up = torch.randn(9, 2 * 760, device=device).chunk(2, dim=-1)
    check_op(ops.swiglu, references.swiglu, [(gate, True), (up, True)], dtype, names=("swiglu", ("gate", "up")))


def test_swiglu_extreme_inputs(device):
    """Large |gate| saturates the sigmoid; results and gradients stay finite and right."""
    gate = torch.tensor([[-100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0]], device=device)
    up = torch.ones_like(gate)
    check_op(ops.swiglu, references.swiglu, [(gate, True), (up, True)], torch.float32, names=("swiglu", ("gate", "up")))
