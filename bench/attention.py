"""The attention suite: causal prefill forward and backward (bf16 and fp16, head_dim 64 and 128,
MHA and GQA, seq 512 to 16k, batch·seq held at 16k tokens), a local layer's sliding window (4,096
keys, Mistral's, against SDPA given the same band as a mask), Gemma 2's logit soft-cap (head_dim 256,
against eager and FlexAttention), and decode (q_len 1, and 32: a chunk
on the cache) over KV lengths from 1k to 128k at batch 1 and 8.

Providers: llama_fast, PyTorch SDPA (``scaled_dot_product_attention`` with ``enable_gqa``), and
the eager reference (which materialises the score matrix) up to 2k.
"""

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from llama_fast import ops, references

from . import formulas
from .cases import OURS, Case, passes

_EAGER_MAX_SEQ = 2048


def _sdpa(q, k, v):
    """SDPA with our causal semantics (bottom-right). SDPA's is_causal is aligned top-left: the same
    mask when q_len == kv_len (prefill); a single decode query sees every key (is_causal=False); a
    chunk on a cache needs the lower-right causal bias."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == kv_len or q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, kv_len), enable_gqa=True)


def _layout(batch, heads, length, head_dim, device, dtype, grad):
    t = torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    return t.requires_grad_(grad)


def _prefill_inputs(device, dtype, batch, seq, head_dim, q_heads, kv_heads):
    """The ``make`` of a prefill case: q, k, v of one length, as the attention module hands them over."""

    def make(grad):
        q = _layout(batch, q_heads, seq, head_dim, device, dtype, grad)
        k = _layout(batch, kv_heads, seq, head_dim, device, dtype, grad)
        v = _layout(batch, kv_heads, seq, head_dim, device, dtype, grad)
        return (q, k, v), (q, k, v)

    return make


def prefill_cases(device, configs, seqs, modes, tokens_total=16384):
    for dtype, head_dim, q_heads, kv_heads in configs:
        dname = str(dtype).removeprefix("torch.")
        for seq in seqs:
            batch = max(1, tokens_total // seq)
            make = _prefill_inputs(device, dtype, batch, seq, head_dim, q_heads, kv_heads)

            heads = "MHA" if q_heads == kv_heads else "GQA"
            shape = f"B={batch} H={q_heads}/{kv_heads} D={head_dim} {heads} causal"
            for mode in modes:
                case = Case("attention", "flash_attention", mode, shape, seq, dname,
                            flops=formulas.attention_flops(batch, q_heads, seq, seq, head_dim, True, mode))
                backend = ops.backend_on(device, extension_op=False)  # no C++ attention kernel
                case.providers[f"{OURS}[{backend}]"] = passes(lambda q, k, v: ops.flash_attention(q, k, v), make, mode)
                case.providers["sdpa"] = passes(_sdpa, make, mode)
                if seq <= _EAGER_MAX_SEQ:
                    case.providers["eager"] = passes(lambda q, k, v: references.attention(q, k, v), make, mode)
                yield case


def window_cases(device, configs, seqs, window, modes, tokens_total=16384):
    """Causal prefill of a local layer (Mistral's, Qwen2's, Gemma's sliding window of ``window`` keys):
    llama_fast's kernel, which reads only the key blocks inside the window, against SDPA given the same
    band as a dense boolean mask (what transformers' sdpa attention hands it for such a layer), which
    computes every pair and masks after. FLOPs count only the pairs inside the window."""
    for dtype, head_dim, q_heads, kv_heads in configs:
        dname = str(dtype).removeprefix("torch.")
        for seq in seqs:
            batch = max(1, tokens_total // seq)
            make = _prefill_inputs(device, dtype, batch, seq, head_dim, q_heads, kv_heads)
            i = torch.arange(seq, device=device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            shape = f"B={batch} H={q_heads}/{kv_heads} D={head_dim} window={window}"
            for mode in modes:
                case = Case("attention", "flash_attention", mode, shape, seq, dname,
                            flops=formulas.attention_flops(batch, q_heads, seq, seq, head_dim, True, mode, window))
                backend = ops.backend_on(device, extension_op=False)
                case.providers[f"{OURS}[{backend}]"] = passes(
                    lambda q, k, v: ops.flash_attention(q, k, v, window=window), make, mode)
                case.providers["sdpa"] = passes(
                    lambda q, k, v, band=band: F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True),
                    make, mode)
                yield case


def softcap_cases(device, configs, seqs, softcap, modes, tokens_total=16384):
    """Causal prefill with Gemma 2's attention logit soft-cap (``softcap`` c: each score s becomes
    c·tanh(s / c)): llama_fast's kernel against what a Gemma 2 user runs instead, which SDPA cannot
    (Gemma2PreTrainedModel sets ``_supports_sdpa = False``): transformers' eager attention (the
    reference, up to 2k) and, on a GPU, FlexAttention with the cap as its ``score_mod``, compiled."""
    for dtype, head_dim, q_heads, kv_heads in configs:
        dname = str(dtype).removeprefix("torch.")
        for seq in seqs:
            batch = max(1, tokens_total // seq)
            make = _prefill_inputs(device, dtype, batch, seq, head_dim, q_heads, kv_heads)
            shape = f"B={batch} H={q_heads}/{kv_heads} D={head_dim} softcap={softcap}"
            for mode in modes:
                case = Case("attention", "flash_attention", mode, shape, seq, dname,
                            flops=formulas.attention_flops(batch, q_heads, seq, seq, head_dim, True, mode))
                backend = ops.backend_on(device, extension_op=False)
                case.providers[f"{OURS}[{backend}]"] = passes(
                    lambda q, k, v: ops.flash_attention(q, k, v, softcap=softcap), make, mode)
                if seq <= _EAGER_MAX_SEQ:
                    case.providers["eager"] = passes(
                        lambda q, k, v: references.attention(q, k, v, softcap=softcap), make, mode)
                if device.type == "cuda":
                    case.providers["flex_attention"] = passes(_flex_softcap(seq, softcap), make, mode)
                yield case


def _flex_softcap(seq, softcap):
    """FlexAttention, compiled, with a causal block mask and the cap as ``score_mod`` (how transformers'
    flex_attention path runs Gemma 2)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seq, seq)

    def cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return lambda q, k, v: compiled(q, k, v, score_mod=cap, block_mask=block_mask, enable_gqa=True)


def decode_cases(device, dtype, kv_lens, batches, head_dim=128, q_heads=32, kv_heads=8, q_lens=(1,)):
    """Queries on a KV cache: one token (decoding), or a chunk of q_len tokens (speculative
    verification, chunked prefill), causal, bottom-right aligned."""
    e = torch.finfo(dtype).bits // 8
    dname = str(dtype).removeprefix("torch.")
    for q_len, batch, kv_len in itertools.product(q_lens, batches, kv_lens):
        def make(grad, kv_len=kv_len, batch=batch, q_len=q_len):
            q = _layout(batch, q_heads, q_len, head_dim, device, dtype, False)
            k = _layout(batch, kv_heads, kv_len, head_dim, device, dtype, False)
            v = _layout(batch, kv_heads, kv_len, head_dim, device, dtype, False)
            return (q, k, v), ()

        shape = f"B={batch} H={q_heads}/{kv_heads} D={head_dim} q_len={q_len}"
        case = Case("attention", "flash_attention", "decode", shape, kv_len, dname,
                    bytes=formulas.attention_decode_bytes(batch, q_heads, kv_heads, q_len, kv_len, head_dim, e))
        backend = ops.backend_on(device, extension_op=False)  # no C++ attention kernel
        case.providers[f"{OURS}[{backend}]"] = passes(lambda q, k, v: ops.flash_attention(q, k, v), make, "fwd")
        case.providers["sdpa"] = passes(_sdpa, make, "fwd")
        yield case


def _compiled_kernels():
    """Every attention kernel this process has compiled, as Triton holds them (per device, per
    specialisation)."""
    from triton.runtime.jit import JITFunction

    from llama_fast.kernels import attention as kernels

    for name in dir(kernels):
        fn = getattr(kernels, name)
        while hasattr(fn, "fn") and not isinstance(fn, JITFunction):  # the autotuner wraps the JIT function
            fn = fn.fn
        if not isinstance(fn, JITFunction):
            continue
        for caches in fn.device_caches.values():
            for compiled in (caches[0] if isinstance(caches, tuple) else caches).values():
                yield name, compiled


def driver_spills() -> list[dict]:
    """Registers and spills of each loaded attention kernel as the CUDA driver reports them."""
    rows = []
    for name, compiled in _compiled_kernels():
        compiled._init_handles()  # loads the module; n_regs and n_spills come from the driver
        meta = compiled.metadata
        rows.append(dict(kernel=name, num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared,
                         n_regs=compiled.n_regs, n_spills=compiled.n_spills))
    return rows


def _llama3_8b(device, batch=4, seq=4096, dtype=torch.bfloat16, grad=True):
    return (_layout(batch, 32, seq, 128, device, dtype, grad), _layout(batch, 8, seq, 128, device, dtype, grad),
            _layout(batch, 8, seq, 128, device, dtype, grad))


def first_call_latency(device) -> dict:
    """The first forward and backward at Llama-3-8B heads (batch 4 x 4096, bf16) in this process
    (autotuning and compiling, or loading from Triton's disk cache), then the steady state: what a
    training job's first step pays. Run before anything else has tuned these shapes."""
    import os
    import time

    from .device import measure

    cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    files = [name for _, _, names in os.walk(cache) for name in names] if os.path.isdir(cache) else []
    q, k, v = _llama3_8b(device)
    dout = torch.randn_like(q)
    # Autotuning results on disk (TRITON_CACHE_AUTOTUNING=1, which bench/gpu.sh sets and restores): a hit skips
    # timing the configs, so a first call with them measures compiling (or loading) the chosen one only.
    result = dict(shape="B=4 H=32/8 D=128 seq=4096 bf16 causal", triton_cache_files_before=len(files),
                  autotune_results_before=sum(name.endswith(".autotune.json") for name in files),
                  autotune_disk_cache=os.environ.get("TRITON_CACHE_AUTOTUNING", "0") not in ("", "0"))
    for mode in ("fwd", "bwd"):
        if mode == "fwd":
            def step():
                return ops.flash_attention(q, k, v)
        else:
            out = ops.flash_attention(q, k, v)

            def step():
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        result[f"{mode}_first_call_s"] = time.perf_counter() - start
        result[f"{mode}_steady_ms"] = measure(step, device, rep_ms=100)["ms"]
    return result


def backward_kernel_times(device) -> list[dict]:
    """Device time of each kernel of one backward at Llama-3-8B heads (batch 4 x 4096, bf16), in both
    dQ modes, from the CUDA profiler (the third of three backward passes; the first two warm up)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _llama3_8b(device)
    dout = torch.randn_like(q)
    rows = []
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            out = ops.flash_attention(q, k, v)
            for _ in range(2):
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                torch.cuda.synchronize()
            for event in prof.key_averages():
                if event.device_type.name == "CUDA" and getattr(event, "device_time_total", 0) > 0:
                    rows.append(dict(mode="deterministic" if deterministic else "atomic dQ", kernel=event.key,
                                     calls=event.count, us=event.device_time_total))
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    return rows
