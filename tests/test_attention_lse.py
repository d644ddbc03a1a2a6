"""The attention log-sum-exp and the merge of partial attention, what ring attention is built from:
``flash_attention(..., return_lse=True)`` and ``flash_attention_varlen(..., return_lse=True)`` against
the reference's lse, and ``merge_attention`` of attention over two (or three) key sets against
attention over their union. All by the error-ratio rule against float64, forward and backward, with
gradients through out and lse both: causal and not, GQA, decode shapes, rows that see no key (lse
-inf, zero gradients), padding, the window and the soft-cap, every dtype, ``torch.compile``, bad input.
"""

import pytest
import torch

from helpers import DTYPES, check_op, check_packed_attention
from llama_fast import ops, references

# fp32 products in TF32 on a GPU, eager included (conftest.py)
pytestmark = pytest.mark.usefixtures("tf32_for_fp32_on_gpu")


def _qkv(device, batch, heads, q_len, kv_len, head_dim=32):
    q_heads, kv_heads = heads
    return (torch.randn(batch, q_heads, q_len, head_dim, device=device),
            torch.randn(batch, kv_heads, kv_len, head_dim, device=device),
            torch.randn(batch, kv_heads, kv_len, head_dim, device=device))


def _floor(q, k):
    return 4 * q.shape[-3] // k.shape[-3] * q.shape[-1] ** 0.5  # as tests/test_attention.py's


def _check(q, k, v, dtype, name, **options):
    def ours(q, k, v):
        return ops.flash_attention(q, k, v, return_lse=True, **options)

    def ref(q, k, v):
        return references.attention(q, k, v, return_lse=True, **options)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=(name, ("q", "k", "v")),
             floor_scale=_floor(q, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,causal", [
    ((4, 4), 33, 33, True), ((4, 2), 17, 50, True), ((3, 1), 40, 24, False),
    ((4, 2), 30, 20, True),  # causal, more queries than keys: the first 10 rows see none (lse -inf)
    ((4, 2), 1, 70, True),  # a decode shape: the split-KV forward's lse
])
def test_lse(device, dtype, heads, q_len, kv_len, causal):
    q, k, v = _qkv(device, 2, heads, q_len, kv_len)
    _check(q, k, v, dtype, "attention lse", causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_with_padding_window_and_softcap(device, dtype):
    q, k, v = _qkv(device, 2, (4, 2), 24, 24)
    mask = torch.ones(2, 24, dtype=torch.bool, device=device)
    mask[0] = False  # a batch row whose every key is padding: all its rows see none
    mask[1, :5] = False
    _check(q, k, v, dtype, "padded attention lse", key_padding_mask=mask)
    _check(q, k, v, dtype, "windowed attention lse", window=7)
    _check(q, k, v, dtype, "capped attention lse", softcap=3.0, softmax_scale=0.5)


# q_len 9, kv_len 13: bottom-right is offset 4. Offsets from every row blind (-9) to every row seeing every key (12+)
@pytest.mark.parametrize("offset", [-12, -9, -3, 0, 2, 4, 7, 11, 12, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_offset(device, dtype, offset):
    """Query i sees keys j <= i + causal_offset: shards of one sequence, as a ring across shards would meet them.
    Against the reference's mask of that rule, out and lse, forward and backward."""
    q, k, v = _qkv(device, 2, (4, 2), 9, 13)
    _check(q, k, v, dtype, f"attention causal_offset={offset}", causal_offset=offset)


def test_causal_offset_with_padding_and_softcap(device):
    q, k, v = _qkv(device, 2, (2, 1), 8, 12)
    mask = torch.ones(2, 12, dtype=torch.bool, device=device)
    mask[1, :3] = False
    for offset in (-2, 1, 6):
        _check(q, k, v, torch.float32, f"padded attention causal_offset={offset}", key_padding_mask=mask,
               causal_offset=offset, softcap=4.0)


def test_causal_offset_is_the_bottom_right_rule_where_they_agree(device):
    q, k, v = _qkv(device, 1, (2, 2), 5, 8)
    assert torch.equal(ops.flash_attention(q, k, v, causal_offset=3), ops.flash_attention(q, k, v))
    out = ops.flash_attention(q, k, v, causal_offset=-5)  # every row blind: zeros
    assert out.shape == q.shape and not out.any()


def test_lse_is_float32_natural_log_and_minus_inf_where_no_key_is_seen(device):
    q, k, v = _qkv(device, 1, (2, 1), 6, 4)
    out, lse = ops.flash_attention(q.half(), k.half(), v.half(), return_lse=True)  # rows 0, 1 see no key
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 6)
    assert torch.equal(lse[..., :2], torch.full_like(lse[..., :2], float("-inf")))
    assert not out[..., :2, :].any()
    scores = (q[..., 5:, :] @ k.transpose(-1, -2)) * 32 ** -0.5  # the last row sees every key
    torch.testing.assert_close(lse[..., 5], torch.logsumexp(scores.float(), -1)[..., 0], rtol=2e-3, atol=2e-3)
    assert ops.flash_attention(q, k, v).shape == q.shape  # without return_lse: out alone


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_lse(device, dtype):
    check_packed_attention(device, dtype, "varlen attention lse", return_lse=True)
    q, k, v = (torch.randn(5, heads, 16, device=device) for heads in (4, 2, 2))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    _, lse = ops.flash_attention_varlen(q, k, v, cu, cu, 3, 3, return_lse=True)
    assert lse.shape == (4, 5) and lse.dtype == torch.float32  # flash-attn's varlen layout: (heads, total)


def _merged(q, k, v, split, causal, mask=None):
    """Attention of q over k, v as a ring computes it: over keys [0, split) (all of them before q's own
    chunk, so no causal mask there) and over [split, end) (q's own chunk: causal), merged."""
    masks = (None, None) if mask is None else (mask[:, :split], mask[:, split:])
    first = ops.flash_attention(q, k[:, :, :split], v[:, :, :split], causal=False, key_padding_mask=masks[0],
                                return_lse=True)
    second = ops.flash_attention(q, k[:, :, split:], v[:, :, split:], causal=causal, key_padding_mask=masks[1],
                                 return_lse=True)
    return ops.merge_attention(*first, *second)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_merge_is_attention_over_the_union(device, dtype, causal):
    # q is the last 24 positions; the union, bottom-right causal, is what those queries see
    q, k, v = _qkv(device, 2, (4, 2), 24, 24 + 40)

    def ref(q, k, v):
        return references.attention(q, k, v, causal=causal, return_lse=True)

    check_op(lambda q, k, v: _merged(q, k, v, 40, causal), ref, [(q, True), (k, True), (v, True)], dtype,
             names=("merged attention", ("q", "k", "v")), floor_scale=_floor(q, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_rows_empty_in_one_set_or_both(device, dtype):
    """Batch row 0 sees no key of the first set, row 1 none of either (zeros, lse -inf, zero gradients)."""
    q, k, v = _qkv(device, 3, (4, 2), 9, 30)
    mask = torch.ones(3, 30, dtype=torch.bool, device=device)
    mask[0, :12] = False
    mask[1] = False

    def ref(q, k, v):
        return references.attention(q, k, v, causal=False, key_padding_mask=mask, return_lse=True)

    check_op(lambda q, k, v: _merged(q, k, v, 12, False, mask), ref, [(q, True), (k, True), (v, True)], dtype,
             names=("merged attention, empty rows", ("q", "k", "v")), floor_scale=_floor(q, k))
    out, lse = _merged(q, k, v, 12, False, mask)
    assert not out[1].any() and bool((lse[1] == float("-inf")).all())


def test_merge_keeps_a_float32_running_result(device):
    """Three key sets folded into a float32 running result, as a ring over three ranks does; bf16 partials."""
    q, k, v = (t.bfloat16() for t in _qkv(device, 1, (4, 2), 16, 48))
    parts = [ops.flash_attention(q, k[:, :, i:i + 16], v[:, :, i:i + 16], causal=False, return_lse=True)
             for i in (0, 16, 32)]
    out, lse = parts[0][0].float(), parts[0][1]
    for part in parts[1:]:
        out, lse = ops.merge_attention(out, lse, *part)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
    want_out, want_lse = references.attention(q.double(), k.double(), v.double(), causal=False, return_lse=True)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-2)


def test_merge_and_lse_compile_whole(device):
    """torch.compile(fullgraph=True) traces return_lse and the merge: eager's values and gradients."""
    q, k, v = _qkv(device, 1, (4, 2), 12, 28)

    def ring_step(q, k, v):
        out, lse = _merged(q, k, v, 16, True)
        return out.sum() + lse.sum()

    compiled = torch.compile(ring_step, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    twins = [t.clone().requires_grad_() for t in (q, k, v)]
    want = ring_step(*inputs)
    got = compiled(*twins)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, twins), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b)


def test_bad_input_is_refused(device):
    q, k, v = _qkv(device, 1, (2, 1), 4, 4)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        ops.flash_attention(q, k, v, return_lse=1)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        ops.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 4, 4,
                                   return_lse="yes")
    with pytest.raises(TypeError, match="causal_offset must be an int or None"):
        ops.flash_attention(q, k, v, causal_offset=1.0)
    with pytest.raises(ValueError, match="it needs causal=True"):
        ops.flash_attention(q, k, v, causal=False, causal_offset=1)
    with pytest.raises(ValueError, match="causal_offset is not implemented with a window"):
        ops.flash_attention(q, k, v, causal_offset=1, window=2)
    with pytest.raises(ValueError, match="causal_offset is not implemented with kv_lens"):
        ops.flash_attention(q, k, v, causal_offset=1, kv_lens=torch.tensor([4], device=device))
    out, lse = ops.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="must have one shape"):
        ops.merge_attention(out, lse, out[..., :2, :], lse)
    with pytest.raises(ValueError, match="out's shape without head_dim"):
        ops.merge_attention(out, lse, out, lse[..., :2])
    with pytest.raises(TypeError, match="lse_b must be float32 or float64"):
        ops.merge_attention(out, lse, out, lse.half())
    with pytest.raises(TypeError, match="out_a must be floating point"):
        ops.merge_attention(out.long(), lse, out, lse)
