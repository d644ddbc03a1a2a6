"""Sliding-window (local) causal attention, ``flash_attention(window=)`` and ``flash_attention_varlen(window=)``,
against the reference (transformers' rule: query i sees keys j with i + Skv − Sq − window < j <= i + Skv − Sq) by
the error-ratio rule, forward and backward: windows shorter than a block, crossing blocks, as long as the sequence
and longer; Sq < Skv (after a cache), Sq > Skv, decode (the split-KV path, its splits over the window's keys only),
a static cache's kv_lens, padding, packed sequences, Hopper's backward schemes, the deterministic dQ kernel; keys
outside every window never read (NaN there changes nothing); bad windows named."""

import pytest
import torch

from helpers import DTYPES, assert_error_ratio, check_op, check_packed_attention, module_layout_qkv
from llama_fast import ops, references
from llama_fast.kernels import attention as kernel

# fp32 products in TF32 on a GPU, eager included (conftest.py)
pytestmark = pytest.mark.usefixtures("tf32_for_fp32_on_gpu")

GQA, MQA = (4, 2), (3, 1)


def _check(q, k, v, dtype, window, mask=None):
    def ours(q, k, v):
        return ops.flash_attention(q, k, v, window=window, key_padding_mask=mask)

    def ref(q, k, v):
        return references.attention(q, k, v, window=window, key_padding_mask=mask)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=(f"window {window}", ("q", "k", "v")),
             floor_scale=4 * q.shape[1] // k.shape[1] * q.shape[-1] ** 0.5)




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,window", [
    (GQA, 70, 70, 1), (GQA, 70, 70, 5), (GQA, 70, 70, 17), (MQA, 70, 70, 32), (GQA, 70, 70, 70), (GQA, 70, 70, 300),
    (GQA, 33, 70, 20), (MQA, 40, 30, 7), (GQA, 3, 90, 40),
], ids=lambda x: str(x))
def test_window_forward_and_backward(device, dtype, heads, q_len, kv_len, window):
    _check(*module_layout_qkv(device, 2, heads, q_len, kv_len), dtype, window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len", [1, 9, 50])
def test_window_with_left_padding(device, dtype, q_len):
    """Left padding counts as positions, as in transformers' sliding-window mask: a window of 9 over
    a row whose first 13 keys are padding, and a row of nothing but padding (zeros)."""
    q, k, v = module_layout_qkv(device, 3, GQA, q_len, 50)
    mask = torch.ones(3, 50, dtype=torch.bool, device=device)
    mask[0, :13] = False
    mask[2] = False
    _check(q, k, v, dtype, 9, mask)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_window_backward_schemes(device, deterministic, arch, tma):
    """Every backward scheme (atomic dQ, plain and transposed as on Hopper; the dQ kernel) with a window
    that crosses blocks, through pointers and tensor descriptors, against the reference's gradients."""
    q, k, v = (t.half().requires_grad_() for t in module_layout_qkv(device, 2, GQA, 65, 80, 64))
    out, lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=None, splits=0, tma=tma, window=24)
    dout = torch.randn_like(out)
    got = kernel.attention_bwd(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125, pad=None,
                               deterministic=deterministic, tma=tma, arch=arch, window=24)
    ref = references.attention(*(t.double() for t in (q, k, v)), softmax_scale=0.125, window=24)
    want = torch.autograd.grad(ref, [q, k, v], dout.double())
    eager_out = references.attention(q, k, v, softmax_scale=0.125, window=24)
    eager = torch.autograd.grad(eager_out, [q, k, v], dout)
    assert_error_ratio(out, eager_out, ref, name="out", floor_scale=4 * 2 * 8)
    for name, a, e, r in zip("qkv", got, eager, want):
        assert_error_ratio(a, e, r, name=f"d{name}", floor_scale=4 * 2 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,splits", [(1, 1), (1, 3), (4, 2), (1, None)], ids=lambda x: str(x))
def test_window_decode_splits_cover_only_the_window(device, dtype, q_len, splits):
    """The split-KV path with a window: its splits share out the window's keys, and every split
    still gives the reference, left padding included."""
    q, k, v = (t.to(dtype) for t in module_layout_qkv(device, 2, (8, 2), q_len, 150, 64))
    mask = torch.ones(2, 150, dtype=torch.bool, device=device)
    mask[1, :37] = False
    out, _ = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=mask.view(torch.uint8),
                                  splits=splits, window=40)
    eager = references.attention(q, k, v, softmax_scale=0.125, key_padding_mask=mask, window=40)
    ref = references.attention(q.double(), k.double(), v.double(), softmax_scale=0.125, key_padding_mask=mask,
                               window=40)
    assert_error_ratio(out, eager, ref, name=f"decode window splits={splits}", floor_scale=4 * 4 * 8)


@pytest.mark.parametrize("q_len,splits", [(1, None), (1, 3), (5, 0)], ids=lambda x: str(x))
def test_window_with_a_static_cache(device, q_len, splits):
    """kv_lens (a static cache filled to 45 and 12 of 70 slots): the window ends at each row's own fill."""
    q, k, v = module_layout_qkv(device, 2, GQA, q_len, 70, 64)
    kv_lens = torch.tensor([45, 12], dtype=torch.int32, device=device)
    out, _ = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=None, kv_lens=kv_lens, splits=splits,
                                  window=10)
    eager = references.attention(q, k, v, softmax_scale=0.125, kv_lens=kv_lens, window=10)
    ref = references.attention(q.double(), k.double(), v.double(), softmax_scale=0.125, kv_lens=kv_lens, window=10)
    assert_error_ratio(out, eager, ref, name="static cache window", floor_scale=4 * 2 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_packed_sequences(device, dtype):
    """Packed sequences: each sequence's window counts within that sequence only."""
    check_packed_attention(device, dtype, "varlen window", window=12)


@pytest.mark.parametrize("q_len", [1, 16])
def test_keys_outside_every_window_are_never_read(device, q_len):
    """The kernels skip the key blocks no query's window reaches, forward and backward: NaN in them
    leaves the output, dq and the other keys' gradients finite and equal to the clean run's, and the
    skipped keys' gradients exactly zero. The last 16 queries of 100 keys with a window of 20 reach
    back to key 65 (prefill reads from its block, 64; decode from the key itself)."""
    q, k, v = module_layout_qkv(device, 1, GQA, q_len, 100)
    first = 64 if q_len > 1 else 100 - 20
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, :, :first], dirty_v[:, :, :first] = float("nan"), float("nan")
    dout = torch.randn(1, 4, q_len, 32, device=device)
    results = []
    for keys, values in ((k, v), (dirty_k, dirty_v)):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, keys, values))
        out = ops.flash_attention(q_, k_, v_, window=20)
        results.append((out, *torch.autograd.grad(out, [q_, k_, v_], dout)))
    (out, dq, dk, dv), (dirty_out, dirty_dq, dirty_dk, dirty_dv) = results
    torch.testing.assert_close(dirty_out, out, rtol=0, atol=0)
    torch.testing.assert_close(dirty_dq, dq, rtol=0, atol=0)
    for clean, dirty in ((dk, dirty_dk), (dv, dirty_dv)):
        assert torch.equal(dirty[:, :, :first], torch.zeros_like(dirty[:, :, :first]))
        torch.testing.assert_close(dirty[:, :, first:], clean[:, :, first:], rtol=0, atol=0)


def test_a_window_no_query_reaches_past_runs_the_plain_kernels(device, monkeypatch):
    """A window of at least the key length hides no key from any query: the launch runs without it
    (HAS_WINDOW off, no extra loop), bit for bit the causal result; one key shorter, it runs with it."""
    # 80 packed query rows: the ordinary forward, not the decode path
    q, k, v = module_layout_qkv(device, 2, GQA, 40, 40)
    launched = []
    launch = kernel._attn_fwd_kernel.run
    monkeypatch.setattr(kernel._attn_fwd_kernel, "run",
                        lambda *a, **kw: launched.append(kw["HAS_WINDOW"]) or launch(*a, **kw))
    plain = ops.flash_attention(q, k, v)
    assert torch.equal(ops.flash_attention(q, k, v, window=40), plain)
    assert not torch.equal(ops.flash_attention(q, k, v, window=39), plain)
    assert launched == [False, False, True]


@pytest.mark.parametrize("window,causal,match", [
    (0, True, "window must be a positive int"), (-3, True, "window must be a positive int"),
    (2.5, True, "window must be a positive int"), (True, True, "window must be a positive int"),
    (8, False, "a sliding window needs causal=True"),
])
def test_bad_window_is_named(window, causal, match):
    q, k, v = torch.randn(1, 4, 7, 32), torch.randn(1, 2, 7, 32), torch.randn(1, 2, 7, 32)
    with pytest.raises(ValueError, match=match):
        ops.flash_attention(q, k, v, causal=causal, window=window)
    cu = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        ops.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 7, 7,
                                   causal=causal, window=window)
