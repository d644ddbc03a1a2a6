"""Attention logit soft-capping, ``flash_attention(softcap=)`` and ``flash_attention_varlen(softcap=)`` (Gemma 2:
each scaled score s becomes cap·tanh(s / cap) before the masks and the softmax), against the reference by the
error-ratio rule, forward and backward: caps that bend the scores a little and ones that flatten them, causal and
not, GQA and MQA, with a sliding window and left padding, Hopper's backward schemes through pointers and tensor
descriptors, the deterministic dQ kernel, decode's splits, a static cache, packed sequences; a cap that changes
nothing measurable would make these tests vacuous, so each case also checks that the cap moved the result; bad caps
named."""

import pytest
import torch

from helpers import DTYPES, assert_error_ratio, check_op, check_packed_attention, max_err, module_layout_qkv
from llama_fast import ops, references
from llama_fast.kernels import attention as kernel

# fp32 products in TF32 on a GPU, eager included (conftest.py)
pytestmark = pytest.mark.usefixtures("tf32_for_fp32_on_gpu")

GQA, MQA = (4, 2), (3, 1)


def _cap_matters(q, k, v, **kwargs):
    """The capped reference is measurably another attention than the uncapped one (else a kernel that
    ignored the cap would pass): its largest difference is at least 5% of the output's scale."""
    cap = kwargs.pop("softcap")
    capped = references.attention(*(t.double() for t in (q, k, v)), softcap=cap, **kwargs)
    plain = references.attention(*(t.double() for t in (q, k, v)), **kwargs)
    assert max_err(capped, plain) > 0.05 * capped.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,causal,scale,cap", [
    (GQA, 70, 70, True, None, 0.5), (MQA, 70, 70, True, 1.0, 3.0), (GQA, 33, 70, True, 0.5, 2.0),
    (GQA, 40, 30, False, 1.0, 1.0), (MQA, 3, 90, True, None, 0.25),
], ids=lambda x: str(x))
def test_softcap_forward_and_backward(device, dtype, heads, q_len, kv_len, causal, scale, cap):
    """Scale 1 over head_dim 32 gives scores of ~±6, which a cap of 1-3 flattens (tanh saturates);
    the default scale's ~±1 against caps of 0.25-2 bend them less, where tanh's slope matters most."""
    q, k, v = module_layout_qkv(device, 2, heads, q_len, kv_len)
    _cap_matters(q, k, v, causal=causal, softmax_scale=scale, softcap=cap)

    def ours(q, k, v):
        return ops.flash_attention(q, k, v, causal=causal, softmax_scale=scale, softcap=cap)

    def ref(q, k, v):
        return references.attention(q, k, v, causal=causal, softmax_scale=scale, softcap=cap)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=(f"softcap {cap}", ("q", "k", "v")),
             floor_scale=4 * heads[0] // heads[1] * 32 ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_with_a_window_and_left_padding(device, dtype):
    """Gemma 2's local layers: the cap and a window of 9 together, a row with 13 padded keys and a row
    of nothing but padding (zeros, zero gradient)."""
    q, k, v = module_layout_qkv(device, 3, GQA, 50, 50)
    mask = torch.ones(3, 50, dtype=torch.bool, device=device)
    mask[0, :13] = False
    mask[2] = False
    _cap_matters(q, k, v, softmax_scale=1.0, softcap=2.0, window=9, key_padding_mask=mask)

    def ours(q, k, v):
        return ops.flash_attention(q, k, v, softmax_scale=1.0, softcap=2.0, window=9, key_padding_mask=mask)

    def ref(q, k, v):
        return references.attention(q, k, v, softmax_scale=1.0, softcap=2.0, window=9, key_padding_mask=mask)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=("softcap window pad", ("q", "k", "v")),
             floor_scale=4 * 2 * 32 ** 0.5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_softcap_backward_schemes(device, deterministic, arch, tma):
    """Every backward scheme (atomic dQ, plain and transposed as on Hopper; the dQ kernel), through
    pointers and tensor descriptors, against the reference's gradients; with a window, whose masked
    and unmasked loops both compute the capped scores (all of them call one inner function)."""
    window = 24
    q, k, v = (t.half().requires_grad_() for t in module_layout_qkv(device, 2, GQA, 65, 80, 64))
    args = dict(causal=True, softmax_scale=0.5, pad=None, tma=tma, window=window, softcap=2.0)
    out, lse = kernel.attention_fwd(q, k, v, splits=0, **args)
    dout = torch.randn_like(out)
    got = kernel.attention_bwd(dout, q, k, v, out, lse, deterministic=deterministic, arch=arch, **args)
    options = dict(softmax_scale=0.5, window=window or None, softcap=2.0)
    ref = references.attention(*(t.double() for t in (q, k, v)), **options)
    want = torch.autograd.grad(ref, [q, k, v], dout.double())
    eager_out = references.attention(q, k, v, **options)
    eager = torch.autograd.grad(eager_out, [q, k, v], dout)
    assert_error_ratio(out, eager_out, ref, name="out", floor_scale=4 * 2 * 8)
    for name, a, e, r in zip("qkv", got, eager, want):
        assert_error_ratio(a, e, r, name=f"d{name}", floor_scale=4 * 2 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,splits,window", [(1, 1, None), (1, 3, None), (4, 2, 40), (1, None, 40)],
                         ids=lambda x: str(x))
def test_softcap_decode_splits(device, dtype, q_len, splits, window):
    """The split-KV path: each split's partial lse is that of the capped scores, so the combine gives
    the reference, left padding included."""
    q, k, v = (t.to(dtype) for t in module_layout_qkv(device, 2, (8, 2), q_len, 150, 64))
    mask = torch.ones(2, 150, dtype=torch.bool, device=device)
    mask[1, :37] = False
    options = dict(softmax_scale=0.5, key_padding_mask=mask, window=window, softcap=1.5)
    _cap_matters(q, k, v, **options)
    out, _ = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.5, pad=mask.view(torch.uint8),
                                  splits=splits, window=window or 0, softcap=1.5)
    eager = references.attention(q, k, v, **options)
    ref = references.attention(q.double(), k.double(), v.double(), **options)
    assert_error_ratio(out, eager, ref, name=f"decode softcap splits={splits}", floor_scale=4 * 4 * 8)


def test_softcap_with_a_static_cache(device):
    """kv_lens (a static cache filled to 45 and 12 of 70 slots), through the op as generate() calls it."""
    q, k, v = module_layout_qkv(device, 2, GQA, 1, 70, 64)
    kv_lens = torch.tensor([45, 12], dtype=torch.int32, device=device)
    options = dict(softmax_scale=0.5, kv_lens=kv_lens, softcap=1.5)
    _cap_matters(q, k, v, **options)
    out = ops.flash_attention(q, k, v, **options)
    eager = references.attention(q, k, v, **options)
    ref = references.attention(q.double(), k.double(), v.double(), **options)
    assert_error_ratio(out, eager, ref, name="static cache softcap", floor_scale=4 * 2 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_packed_sequences(device, dtype):
    check_packed_attention(device, dtype, "varlen softcap", softmax_scale=1.0, softcap=2.0)


@pytest.mark.parametrize("softcap", [0, 0.0, -1.0, float("inf"), float("nan"), True, "30"], ids=repr)
def test_bad_softcap_is_named(softcap):
    q, k, v = torch.randn(1, 4, 7, 32), torch.randn(1, 2, 7, 32), torch.randn(1, 2, 7, 32)
    match = "softcap must be a positive finite number"
    with pytest.raises(ValueError, match=match):
        ops.flash_attention(q, k, v, softcap=softcap)
    cu = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        ops.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 7, 7,
                                   softcap=softcap)
    with pytest.raises(ValueError, match=match):
        kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=None, softcap=-1.0)
