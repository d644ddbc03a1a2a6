"""flash_attention against the reference (softmax over an explicitly masked score matrix),
forward and backward, by the error-ratio rule: causal and not, q_len == kv_len, q_len < kv_len
(after a cache), q_len == 1 (decode), MHA/GQA/MQA, odd lengths, padding with a fully padded row,
every dtype, non-contiguous inputs, the split-KV decode path, determinism, and bad input."""

import pytest
import torch

from helpers import DTYPES, assert_error_ratio, check_op
from llama_fast import ops, references
from llama_fast.kernels import attention as kernel

# fp32 products in TF32 on a GPU, eager included (conftest.py)
pytestmark = pytest.mark.usefixtures("tf32_for_fp32_on_gpu")


def _qkv(device, batch, q_heads, kv_heads, q_len, kv_len, head_dim, layout="bhsd"):
    if layout == "bshd":  # the attention module's view: projections (B, S, H, D) transposed
        q = torch.randn(batch, q_len, q_heads, head_dim, device=device).transpose(1, 2)
        k = torch.randn(batch, kv_len, kv_heads, head_dim, device=device).transpose(1, 2)
        v = torch.randn(batch, kv_len, kv_heads, head_dim, device=device).transpose(1, 2)
        return q, k, v
    return (torch.randn(batch, q_heads, q_len, head_dim, device=device),
            torch.randn(batch, kv_heads, kv_len, head_dim, device=device),
            torch.randn(batch, kv_heads, kv_len, head_dim, device=device))


def _half_forward(device, heads, q_len, kv_len, head_dim, padded):
    """fp16 (batch 2, bshd) q, k, v, the uint8 padding mask (row 0's first half padded) or None, the
    pointer path's causal forward (scale 0.125) out and lse, and a random output gradient: what the
    backward tests start from."""
    q, k, v = (t.half() for t in _qkv(device, 2, *heads, q_len, kv_len, head_dim, layout="bshd"))
    pad = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.bool, device=device)
        mask[0, : kv_len // 2] = False
        pad = mask.view(torch.uint8)
    out, lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad, splits=0, tma=False)
    return q, k, v, pad, out, lse, torch.randn_like(out)


def _check(q, k, v, dtype, *, causal=True, mask=None, scale=None, backward=True):
    def ours(q, k, v):
        return ops.flash_attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=mask)

    def ref(q, k, v):
        return references.attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=mask)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=("attention", ("q", "k", "v")),
             backward=backward, floor_scale=4 * q.shape[1] // k.shape[1] * q.shape[-1] ** 0.5)


MHA, GQA, MQA = (4, 4), (4, 2), (3, 1)




@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("heads,q_len,kv_len,head_dim,padded", [
    (GQA, 33, 47, 64, True), (MQA, 40, 40, 128, False), (GQA, 20, 9, 64, False),
], ids=lambda x: str(x))
def test_hopper_backward_schemes(device, heads, q_len, kv_len, head_dim, padded, tma):
    """The backward as Hopper runs it (arch=90): at head_dim 64 the atomic dQ computed transposed,
    dQᵀ = Kᵀ·dSᵀ; at 128 dQ from its own kernel in both modes; Q and dO through one descriptor per
    GQA group or through pointers. Every gradient matches the float64 reference. First in the file:
    the GPU run (bench/gpu.sh) stops at the first failure and should meet the new paths first."""
    if device.type == "cuda" and tma and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("tensor descriptors need sm_90")
    q, k, v, pad, out, lse, dout = _half_forward(device, heads, q_len, kv_len, head_dim, padded)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = references.attention(*leaves, softmax_scale=0.125, key_padding_mask=None if pad is None else pad.bool())
    want = torch.autograd.grad(ref, leaves, dout.double())
    for deterministic in (False, True):
        grads = kernel.attention_bwd(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125, pad=pad,
                                     deterministic=deterministic, tma=tma, arch=90)
        for name, got, expected in zip("qkv", grads, want):
            torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2,
                                       msg=lambda m: f"d{name} (deterministic={deterministic}): {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,causal", [
    (MHA, 1, 1, True), (GQA, 1, 1, False), (MQA, 1, 1, True),
    (MHA, 7, 7, True), (GQA, 7, 7, True), (MQA, 7, 7, False),
    (MHA, 63, 63, True), (GQA, 63, 63, False),
    (GQA, 65, 65, True), (MQA, 65, 65, True), (MHA, 65, 65, False),
    (GQA, 7, 129, True), (MQA, 7, 129, False),  # q_len < kv_len: prefill after a cache
    (MHA, 1, 65, True), (GQA, 1, 65, False),  # decode
    (GQA, 20, 9, True),  # q_len > kv_len: the first rows see no key
], ids=lambda x: str(x))
def test_attention(device, dtype, heads, q_len, kv_len, causal):
    q, k, v = _qkv(device, 2 if q_len < 64 else 1, *heads, q_len, kv_len, 64, layout="bshd")
    _check(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 80, 128, 256])
def test_attention_head_dims(device, dtype, head_dim):
    q, k, v = _qkv(device, 1, 2, 1, 17, 33, head_dim)
    _check(q, k, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len", [1, 5, 40])
def test_attention_padding(device, dtype, q_len):
    """Left padding as generate() makes it, plus a batch row whose keys are all padding."""
    kv_len = 40
    q, k, v = _qkv(device, 3, 4, 2, q_len, kv_len, 64, layout="bshd")
    mask = torch.ones(3, kv_len, dtype=torch.bool, device=device)
    mask[0, :13] = False
    mask[2, :] = False
    _check(q, k, v, dtype, mask=mask)
    out = ops.flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=mask)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "a fully padded row must give zeros"


def test_attention_fully_masked_rows_have_zero_gradient(device):
    """Causal with q_len > kv_len: the first queries see no key. Zeros out, zero grads, no NaN."""
    q, k, v = (t.requires_grad_() for t in _qkv(device, 1, 2, 2, 9, 4, 64))
    out = ops.flash_attention(q, k, v)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    dq, dk, dv = torch.autograd.grad(out.square().sum(), [q, k, v])
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_scale_and_non_contiguous(device, dtype):
    q, k, v = _qkv(device, 2, 4, 2, 19, 19, 64)
    # Every other position of a longer buffer, and a head-dim-strided copy that must be made contiguous.
    k = torch.randn(2, 2, 38, 64, device=device)[:, :, ::2]
    v = torch.randn(2, 2, 19, 128, device=device)[..., ::2]
    _check(q, k, v, dtype, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("q_len,heads", [(1, (8, 2)), (4, (4, 1)), (3, (3, 3)), (20, (8, 2)), (33, (4, 1))])
def test_decode_split_kv(device, dtype, splits, q_len, heads):
    """The split-KV path against the reference, causal, with left padding, for a forced number of splits;
    with 80 and 132 packed rows, more than one row tile."""
    kv_len = 150
    q, k, v = (t.to(dtype) for t in _qkv(device, 2, *heads, q_len, kv_len, 64, layout="bshd"))
    mask = torch.ones(2, kv_len, dtype=torch.bool, device=device)
    mask[1, :37] = False
    out, _ = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=mask.view(torch.uint8), splits=splits)
    eager = references.attention(q, k, v, softmax_scale=0.125, key_padding_mask=mask)
    ref = references.attention(q.double(), k.double(), v.double(), softmax_scale=0.125, key_padding_mask=mask)
    assert_error_ratio(out, eager, ref, name=f"decode splits={splits}", floor_scale=4 * heads[0] // heads[1] * 8)


def test_int32_padding_mask_is_the_bool_one(device):
    """An int32 key_padding_mask (nonzero: a real key; how a static cache's mask reaches the kernels, with
    no conversion) gives the bool mask's output and gradients."""
    q, k, v = (t.requires_grad_() for t in _qkv(device, 2, 4, 2, 9, 9, 64))
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, :4] = False
    results = []
    for m in (mask, mask.to(torch.int32) * 7):
        out = ops.flash_attention(q, k, v, key_padding_mask=m)
        results.append((out, *torch.autograd.grad(out.square().sum(), [q, k, v])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_out_and_lse_match_the_forward(device, splits):
    """One split writes out and lse from the decode kernel itself (no combine kernel), several go
    through the combine: both agree with the ordinary forward, out and lse, a batch row that sees
    no key (every key padded: zeros, lse = +inf) and an output that is a strided view included."""
    q, k, v = _qkv(device, 3, 8, 2, 2, 150, 64, layout="bshd")
    mask = torch.ones(3, 150, dtype=torch.bool, device=device)
    mask[1, :37] = False
    mask[2] = False
    pad = mask.view(torch.uint8)
    out, lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad, splits=splits)
    ref_out, ref_lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad, splits=0)
    assert out.stride() == ref_out.stride()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[2]).all() and (lse[2] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,head_dim,padded", [
    (GQA, 65, 65, 64, False), (MQA, 7, 129, 128, True), (GQA, 20, 9, 64, False), (MHA, 33, 47, 48, True),
], ids=lambda x: str(x))
def test_forward_through_tensor_descriptors(device, dtype, heads, q_len, kv_len, head_dim, padded):
    """The Hopper forward (Q, K, V through tensor descriptors: TMA on sm_90) against the reference,
    forced on; the interpreter runs its descriptor loads too, zero fill past the length and past
    head_dim included (48 in a 64-wide block). Its backward is the shared one."""
    q, k, v = (t.to(dtype) for t in _qkv(device, 2, *heads, q_len, kv_len, head_dim, layout="bshd"))
    assert kernel.tma_ready(q, k, v)
    mask = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.bool, device=device)
        mask[1, : kv_len // 3] = False
    pad = None if mask is None else mask.view(torch.uint8)
    out, lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad, splits=0, tma=True)
    plain, plain_lse = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad, splits=0, tma=False)
    eager = references.attention(q, k, v, softmax_scale=0.125, key_padding_mask=mask)
    ref = references.attention(q.double(), k.double(), v.double(), softmax_scale=0.125, key_padding_mask=mask)
    assert_error_ratio(out, eager, ref, name="attention via descriptors", floor_scale=4 * heads[0] // heads[1] * 8)
    torch.testing.assert_close(lse, plain_lse)
    torch.testing.assert_close(out, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,causal,head_dim,padded,trend", [
    (GQA, 50, 50, True, 64, False, 0),  # three unmasked key blocks (16 x 16 tiles here), then a masked one
    (MQA, 16, 80, True, 64, False, 0),  # after a cache: four unmasked blocks, one masked
    (MHA, 33, 33, False, 48, False, 0),  # two unmasked blocks, then a partial one; head_dim < BLOCK_D
    (GQA, 20, 27, True, 64, True, 0),  # no unmasked block, two masked ones; padding
    (GQA, 20, 9, True, 64, False, 0),  # q_len > kv_len: the first rows see no key
    (MHA, 40, 40, True, 64, True, 0),
    (GQA, 20, 70, True, 64, False, 1),  # scores that grow along the keys: the max rises every block
    (GQA, 20, 70, False, 64, False, -1),  # and that fall: the first block holds it
], ids=lambda x: str(x))
def test_forward_overlapped_loop(device, dtype, heads, q_len, kv_len, causal, head_dim, padded, trend):
    """The Hopper forward's software-pipelined loop (through tensor descriptors: one block's P·V issued
    before the next block's softmax; the first block's scores before the loop, the last P·V after
    it) over every way a row's key range splits into unmasked and masked blocks: it must match the
    reference by the error-ratio rule and the one-block-at-a-time loop of the pointer path (in the
    interpreter bit for bit: the same operations in the same order). ``trend`` adds keys whose scores rise (or
    fall) by about 17 (base 2) per 16-key block, so the running max and the rescale of the
    accumulator are exercised."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("tensor descriptors need sm_90")
    q, k, v = _qkv(device, 2, *heads, q_len, kv_len, head_dim, layout="bshd")
    if trend:
        direction = torch.ones(head_dim, device=device) / head_dim ** 0.5
        q = q + 4 * direction
        k = k + trend * 1.5 * torch.arange(kv_len, device=device)[:, None] * direction
    q, k, v = (t.to(dtype) for t in (q, k, v))
    assert kernel.tma_ready(q, k, v)
    mask = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.bool, device=device)
        mask[1, : kv_len // 3] = False
    pad = None if mask is None else mask.view(torch.uint8)
    run = dict(causal=causal, softmax_scale=0.125, pad=pad, splits=0)
    out, lse = kernel.attention_fwd(q, k, v, tma=True, **run)
    plain, plain_lse = kernel.attention_fwd(q, k, v, tma=False, **run)
    eager = references.attention(q, k, v, causal=causal, softmax_scale=0.125, key_padding_mask=mask)
    ref = references.attention(q.double(), k.double(), v.double(), causal=causal, softmax_scale=0.125,
                               key_padding_mask=mask)
    assert_error_ratio(out, eager, ref, name="overlapped forward", floor_scale=4 * heads[0] // heads[1] * 8)
    if device.type == "cpu":  # the interpreter runs both loops' operations in the same order
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, plain)
        torch.testing.assert_close(lse, plain_lse)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("heads,q_len,kv_len,head_dim,padded", [
    (GQA, 65, 65, 64, False), (MQA, 7, 40, 48, True), (MHA, 33, 20, 64, True),
], ids=lambda x: str(x))
def test_backward_through_tensor_descriptors(device, heads, q_len, kv_len, head_dim, padded, deterministic):
    """The Hopper backward (Q and dO, or K and V, through tensor descriptors) gives the gradients of
    the pointer path, in both dQ modes."""
    q, k, v, pad, out, lse, dout = _half_forward(device, heads, q_len, kv_len, head_dim, padded)
    grads = [kernel.attention_bwd(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125, pad=pad,
                                  deterministic=deterministic, tma=tma) for tma in (True, False)]
    for name, via_tma, plain in zip("qkv", *grads):
        torch.testing.assert_close(via_tma, plain, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,splits,padded", [(1, None, False), (1, 3, True), (5, 0, True), (5, 2, False),
                                                 (40, 0, False)], ids=lambda x: str(x))
def test_kv_lens_static_cache(device, dtype, q_len, splits, padded):
    """A static cache: 70 key slots, row 0 filled to 45 and row 1 to 12 (its first 3 left padding);
    kv_lens read on the device must equal the reference over those keys, through the ordinary forward
    and the split-KV path (splits past the length see nothing), fp32/fp16/bf16. Row 1 with 40
    queries and 12 keys has queries that see none: zeros."""
    q, k, v = (t.to(dtype) for t in _qkv(device, 2, 4, 2, q_len, 70, 64, layout="bshd"))
    kv_lens = torch.tensor([45, 12], device=device)
    mask = None
    if padded:
        mask = torch.ones(2, 70, dtype=torch.bool, device=device)
        mask[1, :3] = False
    pad = None if mask is None else mask.view(torch.uint8)
    out, _ = kernel.attention_fwd(q, k, v, causal=True, softmax_scale=0.125, pad=pad,
                                  kv_lens=kv_lens.to(torch.int32), splits=splits)
    eager = references.attention(q, k, v, softmax_scale=0.125, key_padding_mask=mask, kv_lens=kv_lens)
    ref = references.attention(q.double(), k.double(), v.double(), softmax_scale=0.125, key_padding_mask=mask,
                               kv_lens=kv_lens)
    assert_error_ratio(out, eager, ref, name=f"kv_lens splits={splits}", floor_scale=4 * 2 * 8)
    # the reference itself: the same as slicing each row's keys to its length
    for b, n in enumerate(kv_lens.tolist()):
        alone = references.attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                     softmax_scale=0.125, key_padding_mask=None if mask is None else mask[b:b + 1, :n])
        torch.testing.assert_close(ref[b:b + 1], alone)


def test_kv_lens_through_the_op_and_its_refusals(device):
    q, k, v = _qkv(device, 2, 4, 2, 1, 30, 64)
    kv_lens = torch.tensor([30, 7], device=device)
    out = ops.flash_attention(q, k, v, kv_lens=kv_lens)
    torch.testing.assert_close(out[1:], ops.flash_attention(q[1:], k[1:, :, :7], v[1:, :, :7]))
    with pytest.raises(ValueError, match=r"kv_lens must be an int32 or int64 tensor of shape \(batch,\)"):
        ops.flash_attention(q, k, v, kv_lens=kv_lens.float())
    with pytest.raises(ValueError, match="kv_lens must be"):
        ops.flash_attention(q, k, v, kv_lens=kv_lens[:1])
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward with kv_lens"):
        ops.flash_attention(q, k, v, kv_lens=kv_lens).sum().backward()


def test_tensor_descriptors_need_aligned_16_bit_rows():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    assert kernel.tma_ready(q)
    assert not kernel.tma_ready(q.float())  # fp32 stays on the pointer path
    assert not kernel.tma_ready(torch.randn(1, 2, 8, 68, dtype=torch.bfloat16)[..., :64])  # rows 136 bytes apart
    assert not kernel.tma_ready(torch.randn(1, 2, 8, 65, dtype=torch.bfloat16)[..., 1:])  # start off 16 bytes


def test_decode_path_is_chosen_for_decode_shapes():
    h100_target = 2 * 132
    # Llama-3-8B decoding one sequence: 8 KV heads alone would fill 8 of 132 SMs.
    assert kernel.decode_splits(1, 32, 8, 1, 8192, h100_target) == 33
    assert kernel.decode_splits(8, 32, 8, 1, 128 * 1024, h100_target) == 5
    assert kernel.decode_splits(1, 32, 8, 512, 8192, h100_target) == 0  # prefill: the ordinary grid
    assert kernel.decode_splits(1, 9, 3, 1, 16, h100_target) == 1  # one key block: nothing to split
    assert kernel.decode_splits(64, 32, 8, 1, 8192, h100_target) == 1  # the batch fills the GPU
    # A 32-token chunk (speculative verification, chunked prefill) on an 8k cache: 128 packed rows,
    # two row tiles; the ordinary grid would run 32 programs on 132 SMs.
    assert kernel.decode_splits(1, 32, 8, 32, 8192, h100_target) == 17
    assert kernel.decode_splits(1, 32, 8, 32, 64, h100_target) == 0  # short cache: the ordinary grid
    assert kernel.decode_splits(16, 32, 8, 32, 8192, h100_target) == 0  # 512 programs fill the GPU already


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_backward(device, dtype):
    """Gradients through a forward that took the decode path (lse from the combine)."""
    q, k, v = _qkv(device, 1, 4, 2, 2, 100, 64)
    assert kernel.decode_splits(1, 4, 2, 2, 100, target_programs=4) > 1  # 4: the launcher's CPU target
    _check(q, k, v, dtype)


@pytest.fixture
def deterministic_algorithms():
    """Deterministic algorithms on; warn_only, because on a GPU the eager references' cuBLAS matmuls
    would otherwise refuse to run without CUBLAS_WORKSPACE_CONFIG (our kernels only read the flag)."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_backward_is_deterministic_when_asked(device, deterministic_algorithms, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward takes the separate dQ kernel (no
    atomics) and repeats bit for bit."""
    modes = []
    backward = kernel.attention_bwd
    monkeypatch.setattr(kernel, "attention_bwd",
                        lambda *a, **kw: modes.append(kw["deterministic"]) or backward(*a, **kw))
    q, k, v = (t.requires_grad_() for t in _qkv(device, 1, 4, 1, 33, 47, 64))
    dout = torch.randn(1, 4, 33, 64, device=device)
    first = torch.autograd.grad(ops.flash_attention(q, k, v), [q, k, v], dout)
    second = torch.autograd.grad(ops.flash_attention(q, k, v), [q, k, v], dout)
    assert modes == [True, True]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,q_len,kv_len,causal,padded", [
    (GQA, 65, 65, True, False), (MQA, 7, 129, False, False), (GQA, 20, 9, True, False), (MHA, 33, 47, True, True),
    (GQA, 1, 65, True, False),
], ids=lambda x: str(x))
def test_both_backward_modes(device, dtype, heads, q_len, kv_len, causal, padded, request):
    """The atomic-dQ backward (the default) and the deterministic one agree with the reference on the
    cases that stress the block split: key and query tails, the causal diagonal, Sq > Skv, padding."""
    q, k, v = _qkv(device, 2, *heads, q_len, kv_len, 64)
    mask = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.bool, device=device)
        mask[0, : kv_len // 2] = False  # left padding
        mask[1, :] = False  # a row of nothing but padding
    _check(q, k, v, dtype, causal=causal, mask=mask)
    request.getfixturevalue("deterministic_algorithms")
    _check(q, k, v, dtype, causal=causal, mask=mask)


def test_output_layout_makes_transformers_transpose_free(device):
    q, k, v = _qkv(device, 2, 4, 2, 7, 7, 64, layout="bshd")
    out = ops.flash_attention(q, k, v)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: ops.flash_attention(q, k[:, :1].expand(2, 3, 7, 64), v[:, :1].expand(2, 3, 7, 64)),
     ValueError, r"q_heads \(4\) must be a multiple of kv_heads \(3\)"),
    (lambda q, k, v: ops.flash_attention(q, k[..., :32], v[..., :32]), ValueError,
     "head_dim 64 but k and v have head_dim 32"),
    (lambda q, k, v: ops.flash_attention(q, k, v[:, :, :5]), ValueError, "must have one shape"),
    (lambda q, k, v: ops.flash_attention(q, k.half(), v), TypeError, "share one dtype"),
    (lambda q, k, v: ops.flash_attention(q.double(), k.double(), v.double()), TypeError, "float64"),
    (lambda q, k, v: ops.flash_attention(q[0], k, v), ValueError, "must be 4-D"),
    (lambda q, k, v: ops.flash_attention(q[..., :40], k[..., :40], v[..., :40]), ValueError, "multiple of 16"),
    (lambda q, k, v: ops.flash_attention(q[:1], k, v), ValueError, "batch"),
    (lambda q, k, v: ops.flash_attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)),
     ValueError, r"key_padding_mask must have shape \(batch, kv_len\) = \(2, 7\)"),
    (lambda q, k, v: ops.flash_attention(q, k, v, key_padding_mask=torch.ones(2, 7)), TypeError, "must be bool"),
    (lambda q, k, v: ops.flash_attention(q, k.to("meta"), v), ValueError, "one device"),
    (lambda q, k, v: ops.flash_attention(q, k, v, softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
    (lambda q, k, v: ops.flash_attention(q, k, v, softmax_scale=-0.1), ValueError, "softmax_scale must be positive"),
])
def test_bad_input_is_named(call, error, match):
    q, k, v = torch.randn(2, 4, 7, 64), torch.randn(2, 2, 7, 64), torch.randn(2, 2, 7, 64)
    with pytest.raises(error, match=match):
        call(q, k, v)

