"""rms_norm (Llama's and Gemma's), apply_rotary_pos_emb, swiglu and geglu against the eager references, forward
and backward, in every dtype, on odd shapes and non-contiguous inputs, by the error-ratio rule (helpers.py)."""

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


def _gemma_rms_norm(x, w, eps=1e-6, *, backend=None):
    return ops.rms_norm(x, w, eps, unit_offset=True, backend=backend)


def _gemma_reference(x, w, eps=1e-6):
    return references.rms_norm(x, w, eps, unit_offset=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 760), (127, 64), (3, 2304), (2, 3840), (4, 256)])
def test_gemma_rms_norm(device, dtype, rows, cols):
    """Gemma's x̂ · (1 + w) in fp32 (its weight an offset near 0: Gemma initialises it to zeros), also at
    head_dim 256 for Gemma 3's q_norm / k_norm."""
    x = torch.randn(rows, cols, device=device)
    w = 0.1 * torch.randn(cols, device=device)
    check_op(_gemma_rms_norm, _gemma_reference, [(x, True), (w, True)], dtype,
             names=("rms_norm[unit_offset]", ("x", "weight")))


def test_gemma_rms_norm_rounds_once_to_x_dtype(device):
    """Gemma's output takes x's dtype even with an fp32 weight (``type_as(x)``), where Llama's promotes;
    and nothing is rounded before the end, so a bf16 result is the fp32 one rounded, bit for bit."""
    x = torch.randn(5, 640, device=device, dtype=torch.bfloat16)
    w = 0.1 * torch.randn(640, device=device)
    y = _gemma_rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _gemma_reference(x, w), rtol=0, atol=0)
    assert ops.rms_norm(x, w).dtype == torch.float32


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
@pytest.mark.parametrize("start", [None, 0, 5, 9], ids=lambda s: f"start={s}")
def test_rope_into_cache(device, dtype, start):
    """The rotated q, and the rotated k and v written into a cache's rows [start, start + S): exactly
    the rotation ``apply_rotary_pos_emb`` gives (the same arithmetic), the reference's within rounding;
    every other row untouched, including rows past the buffer's end (start 9: 3 rows, 2 fit)."""
    batch, seq, slots = 2, 3, 11
    q, k, cos, sin = (t.to(dtype) for t in _rope_inputs(device, batch, seq, 9, 3, 64))
    v = torch.randn(batch, seq, 3, 64, device=device, dtype=dtype).transpose(1, 2)
    k_cache = torch.randn(batch, 3, slots, 64, device=device, dtype=dtype)
    v_cache = torch.randn(batch, 3, slots, 64, device=device, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    if start is None:  # the rows to fill given as views (a DynamicLayer's spare room)
        k_dst, v_dst, at = k_cache[:, :, 4:4 + seq], v_cache[:, :, 4:4 + seq], 4
        got_q = ops.rope_into_cache(q, k, v, cos, sin, k_dst, v_dst)
    else:
        at = start
        got_q = ops.rope_into_cache(q, k, v, cos, sin, k_cache, v_cache,
                                    torch.tensor(start, device=device))
    want_q, want_k = ops.apply_rotary_pos_emb(q, k, cos, sin)
    ref_q, _ = references.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    rounding = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_q.float(), ref_q.float(), **rounding)
    fits = min(seq, slots - at)
    torch.testing.assert_close(k_cache[:, :, at:at + fits], want_k[:, :, :fits], rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, :, at:at + fits], v[:, :, :fits], rtol=0, atol=0)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[at:at + fits] = False
    assert torch.equal(k_cache[:, :, untouched], k_before[:, :, untouched])
    assert torch.equal(v_cache[:, :, untouched], v_before[:, :, untouched])


@pytest.mark.parametrize("start", [None, 9], ids=lambda s: f"start={s}")
def test_rope_into_cache_reference_backend(device, start):
    """The op's composition on the reference backend (the rotation, then index copies) writes what the
    kernel writes: the same rows, rows past the end dropped."""
    q, k, cos, sin = _rope_inputs(device, 2, 3, 4, 2, 64)
    v = torch.randn_like(k)
    where = None if start is None else torch.tensor(start, device=device)
    out = {}
    for backend in ("triton", "reference"):
        caches = torch.zeros(2, 2, 2, 11, 64, device=device)
        dst = (caches[0], caches[1]) if start is not None else (caches[0][:, :, :3], caches[1][:, :, :3])
        out[backend] = ops.rope_into_cache(q, k, v, cos, sin, *dst, where, backend=backend), caches
    torch.testing.assert_close(out["reference"][0], out["triton"][0])
    torch.testing.assert_close(out["reference"][1], out["triton"][1])


def test_rope_into_cache_refuses_what_it_cannot_write(device):
    q, k, cos, sin = _rope_inputs(device, 2, 3, 4, 2, 64)
    v = torch.randn_like(k)
    cache = torch.zeros(2, 2, 8, 64, device=device)
    with pytest.raises(TypeError, match="cache's buffers must hold"):
        ops.rope_into_cache(q, k, v, cos, sin, cache.half(), cache)
    with pytest.raises(ValueError, match="k_dst, v_dst be"):
        ops.rope_into_cache(q, k, v, cos, sin, torch.zeros(2, 3, 8, 64, device=device), cache)
    with pytest.raises(ValueError, match="unit stride"):
        ops.rope_into_cache(q, k, v, cos, sin, cache.transpose(2, 3).contiguous().transpose(2, 3), cache)
    with pytest.raises(ValueError, match="do not fit"):
        ops.rope_into_cache(q, k, v, cos, sin, cache[:, :, :2], cache[:, :, :2])
    with pytest.raises(ValueError, match="one-element integer"):
        ops.rope_into_cache(q, k, v, cos, sin, cache, cache, torch.tensor([1.0], device=device))
    with pytest.raises(ValueError, match="no gradient"):
        ops.rope_into_cache(q.requires_grad_(), k, v, cos, sin, cache, cache, None)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 576), (3, 1128), (2, 9216), (2, 3, 1536)])
def test_geglu(device, dtype, shape):
    gate = 2 * torch.randn(*shape, device=device)
    up = torch.randn(*shape, device=device)
    check_op(ops.geglu, lambda g, u: references.swiglu(g, u, "gelu_tanh"), [(gate, True), (up, True)], dtype,
             names=("geglu", ("gate", "up")))


def test_geglu_extreme_inputs(device):
    """GELU saturates to 0 and to the identity; its tanh form through σ(2z) keeps both ends finite and right."""
    gate = torch.tensor([[-100.0, -20.0, -3.0, -1.0, 0.0, 1.0, 3.0, 20.0, 100.0]], device=device)
    check_op(ops.geglu, lambda g, u: references.swiglu(g, u, "gelu_tanh"),
             [(gate, True), (torch.ones_like(gate), True)], torch.float32, names=("geglu", ("gate", "up")))


def test_swiglu_extreme_inputs(device):
    """Large |gate| saturates the sigmoid; results and gradients stay finite and right."""
    gate = torch.tensor([[-100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0]], device=device)
    up = torch.ones_like(gate)
    check_op(ops.swiglu, references.swiglu, [(gate, True), (up, True)], torch.float32, names=("swiglu", ("gate", "up")))
