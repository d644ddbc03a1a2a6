"""flash_attention_varlen (packed sequences in flash-attn's (total, heads, head_dim) layout) against
the reference of each sequence run alone, in float64, by the error-ratio rule: one pack holding
lengths 0, 1, 7, 63, 65 and 129; MHA/GQA/MQA; head_dim 64, 128 and 80; q and k lengths that differ
per sequence (causal bottom-right in each); forward and backward, both backward modes, the tensor
descriptor path, and bad input."""

import pytest
import torch

from helpers import DTYPES, check_op
from llama_fast import ops, references
from llama_fast.kernels import attention as kernel

# fp32 products in TF32 on a GPU, eager included (conftest.py)
pytestmark = pytest.mark.usefixtures("tf32_for_fp32_on_gpu")

LENGTHS = [0, 1, 7, 63, 65, 129]
MHA, GQA, MQA = (4, 4), (4, 2), (3, 1)


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _packed(device, q_lengths, k_lengths, q_heads, kv_heads, head_dim):
    q = torch.randn(sum(q_lengths), q_heads, head_dim, device=device)
    k = torch.randn(sum(k_lengths), kv_heads, head_dim, device=device)
    v = torch.randn(sum(k_lengths), kv_heads, head_dim, device=device)
    return q, k, v, _cu(q_lengths, device), _cu(k_lengths, device)


def _check(q, k, v, cu_q, cu_k, max_q, max_k, dtype, *, causal=True, backward=True):
    def ours(q, k, v):
        return ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)

    def ref(q, k, v):
        return references.attention_varlen(q, k, v, cu_q, cu_k, causal=causal)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=("varlen attention", ("q", "k", "v")),
             backward=backward, floor_scale=4 * q.shape[1] // k.shape[1] * q.shape[-1] ** 0.5)




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [MHA, GQA, MQA], ids=["mha", "gqa", "mqa"])
def test_varlen_one_pack(device, dtype, heads):
    """Every length of the list in one pack, shuffled so that long and empty sequences neighbour."""
    lengths = [65, 0, 7, 129, 1, 63]
    q, k, v, cu_q, cu_k = _packed(device, lengths, lengths, *heads, 64)
    _check(q, k, v, cu_q, cu_k, max(lengths), max(lengths), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [128, 80])
def test_varlen_head_dims(device, dtype, head_dim):
    lengths = [7, 0, 33, 1]
    q, k, v, cu_q, cu_k = _packed(device, lengths, lengths, 4, 2, head_dim)
    _check(q, k, v, cu_q, cu_k, 33, 33, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_q_and_k_lengths_differ(device, dtype, causal):
    """Per sequence: fewer queries than keys (a chunk after a prefix), more queries than keys (the
    first rows see nothing under the bottom-right rule), no keys at all, no queries at all."""
    q_lengths, k_lengths = [5, 20, 3, 0, 1], [40, 9, 0, 6, 1]
    q, k, v, cu_q, cu_k = _packed(device, q_lengths, k_lengths, *GQA, 64)
    # larger bounds than needed are fine: they only size the grid
    _check(q, k, v, cu_q, cu_k, 24, 40, dtype, causal=causal)


def test_varlen_matches_the_dense_kernel_on_equal_lengths(device):
    """Sequences of one length packed give what the (B, H, S, D) op gives on the same batch."""
    batch, length = 3, 37
    q, k, v, cu_q, cu_k = _packed(device, [length] * batch, [length] * batch, *GQA, 64)
    packed = ops.flash_attention_varlen(q, k, v, cu_q, cu_k, length, length)
    dense = ops.flash_attention(*(t.view(batch, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(packed, dense.transpose(1, 2).reshape(packed.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_both_backward_modes(device, deterministic):
    lengths = [9, 0, 40, 17]
    q, k, v, cu_q, cu_k = _packed(device, lengths, lengths, *MQA, 64)
    out, lse = kernel.attention_fwd(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), causal=True,
                                    softmax_scale=0.125, pad=None, packed=kernel.Packed(cu_q, cu_k, 40, 40))
    dout = torch.randn_like(out)
    grads = kernel.attention_bwd(dout, *(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), out, lse, causal=True,
                                 softmax_scale=0.125, pad=None, deterministic=deterministic,
                                 packed=kernel.Packed(cu_q, cu_k, 40, 40))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = references.attention_varlen(*leaves, cu_q, cu_k, softmax_scale=0.125)
    want = torch.autograd.grad(ref, leaves, dout.transpose(1, 2).squeeze(0).double())
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.transpose(1, 2).squeeze(0).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_through_tensor_descriptors(device, dtype):
    """The TMA path (per-sequence descriptors, zero fill past each sequence's end), forced."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("tensor descriptors need sm_90")
    lengths = [30, 0, 5, 50]
    q, k, v, cu_q, cu_k = _packed(device, lengths, lengths, *GQA, 64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    views = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    packed = kernel.Packed(cu_q, cu_k, 50, 50)
    out, lse = kernel.attention_fwd(*views, causal=True, softmax_scale=0.125, pad=None, packed=packed, tma=True)
    plain, plain_lse = kernel.attention_fwd(*views, causal=True, softmax_scale=0.125, pad=None, packed=packed,
                                            tma=False)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    dout = torch.randn_like(out)
    by_tma = kernel.attention_bwd(dout, *views, out, lse, causal=True, softmax_scale=0.125, pad=None, packed=packed,
                                  tma=True, deterministic=True)
    by_pointer = kernel.attention_bwd(dout, *views, out, lse, causal=True, softmax_scale=0.125, pad=None, packed=packed,
                                      tma=False, deterministic=True)
    for a, b in zip(by_tma, by_pointer):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_varlen_empty_pack(device):
    q, k, v, cu_q, cu_k = _packed(device, [0, 0], [0, 3], 2, 1, 16)
    out = ops.flash_attention_varlen(q.requires_grad_(), k, v, cu_q, cu_k, 0, 3)
    assert out.shape == (0, 2, 16)


# What is checked against the offsets' values (host memory on the CPU, a device-side assert on a GPU).
_VALUE_RULES = {"never decrease", "start at 0", "end at the total", "longer than max_seqlen_q"}


def _offsets(*values):
    return lambda a: torch.tensor(values, dtype=torch.int32, device=a["q"].device)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "cu_seqlens_q": _offsets(0, 5, 7)(a), "cu_seqlens_k": _offsets(0, 5, 7)(a), "max_seqlen_q": 5,
                "max_seqlen_k": 5}, None, None),
    (lambda a: {**a, "cu_seqlens_q": _offsets(0, 4, 3)(a)}, ValueError, "never decrease"),
    (lambda a: {**a, "cu_seqlens_q": _offsets(1, 3, 7)(a)}, ValueError, "start at 0"),
    (lambda a: {**a, "cu_seqlens_k": _offsets(0, 3, 6)(a)}, ValueError, "end at the total"),
    (lambda a: {**a, "max_seqlen_q": 3}, ValueError, "longer than max_seqlen_q"),
    (lambda a: {**a, "max_seqlen_k": -1}, ValueError, "non-negative int"),
    (lambda a: {**a, "max_seqlen_k": 2.5}, ValueError, "non-negative int"),
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "1-D int32"),
    (lambda a: {**a, "cu_seqlens_q": [0, 3, 7]}, TypeError, "1-D int32"),
    (lambda a: {**a, "cu_seqlens_k": _offsets(0, 7)(a)}, ValueError, "one length"),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"].to("meta")}, ValueError, "is on meta"),
    (lambda a: {**a, "q": a["q"][None]}, ValueError, "must be 3-D"),
    (lambda a: {**a, "q": a["q"].repeat(1, 1, 2)}, ValueError, "head_dim"),
    (lambda a: {**a, "k": a["k"].half()}, TypeError, "share one dtype"),
    (lambda a: {**a, "softmax_scale": 0.0}, ValueError, "softmax_scale must be positive"),
], ids=["valid", "decreasing", "not from 0", "total mismatch", "max too small", "max negative", "max float",
        "int64", "a list", "lengths differ", "device", "4-D q", "head_dim", "dtype", "scale"])
def test_varlen_bad_input_is_named(device, change, error, match):
    """Offsets are checked on the host where they are host memory (CPU tensors); on a GPU the value
    rules become a device-side assert, so only the shape, dtype and device rules run here there."""
    q, k, v, cu_q, cu_k = _packed(device, [3, 4], [3, 4], 2, 1, 16)
    args = change(dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4))
    if error is None:
        ops.flash_attention_varlen(**args)
        return
    if device.type == "cuda" and match in _VALUE_RULES:
        pytest.skip("value rules are a device-side assert on a GPU (it would end the CUDA context)")
    with pytest.raises(error, match=match):
        ops.flash_attention_varlen(**args)
