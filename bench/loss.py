"""Peak memory of the causal-LM loss step: llama_fast's fused linear + cross-entropy against the
unfused loss (transformers' ForCausalLMLoss: logits, upcast to fp32, cross_entropy), forward and
backward, at Llama-3-8B's shapes (V = 128,256, H = 4,096, 8,192 tokens, bf16).

Measured, not computed by formula: without a GPU, on meta tensors (no memory is touched, every
shape and dtype is real) under a dispatch mode that counts the bytes of every tensor an op creates
until the tensor is freed, and keeps the peak; the fused loss's Triton launches are stubbed (they
write in place and allocate nothing). With a GPU, on real tensors by the CUDA allocator's peak.
Either way the inputs (hidden states, weight, labels) are allocated before the count starts, and
the gradients the step produces (dhidden, dweight) are part of the peak.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors ops create, while they live, and the peak. A view or an in-place result
    is not new memory; a custom op is entered with the mode on, so its own allocations count."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _freed(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = torch._library.custom_ops._maybe_get_opdef(func)
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {id(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and t._base is None and not func.is_view:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, nbytes)
        return out


def _unfused(hidden, weight, labels):
    from transformers.loss.loss_utils import fixed_cross_entropy

    logits = torch.nn.functional.linear(hidden, weight).float()
    return fixed_cross_entropy(logits, labels, None, -100)


def _fused(hidden, weight, labels):
    from llama_fast import ops

    return ops.linear_cross_entropy(hidden, weight, labels)


def _inputs(device, tokens, hidden_size, vocab, dtype):
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)
    make = (lambda *s: torch.empty(*s, device=device, dtype=dtype)) if g is None else \
        (lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g))
    hidden = make(tokens, hidden_size).requires_grad_()
    weight = make(vocab, hidden_size).requires_grad_()
    labels = torch.zeros(tokens, dtype=torch.long, device=device) if g is None else \
        torch.randint(0, vocab, (tokens,), device=device, generator=g)
    return hidden, weight, labels


def peak_bytes(loss_fn, device, tokens=8192, hidden_size=4096, vocab=128256, dtype=torch.bfloat16) -> int:
    """The peak of memory allocated by one forward + backward of ``loss_fn``, beyond its inputs."""
    import importlib

    from .overhead import stubbed_launches

    hidden, weight, labels = _inputs(device, tokens, hidden_size, vocab, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(hidden, weight, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    lce = importlib.import_module("llama_fast.ops.linear_cross_entropy")
    saved_triton, saved_check = lce._triton, lce._check_labels
    # on meta tensors: the Triton path's allocations with its launches stubbed; labels are not read
    lce._triton, lce._check_labels = (lambda h: True), (lambda *a: None)
    try:
        with stubbed_launches(), LiveBytes() as counter:
            loss_fn(hidden, weight, labels).backward()
    finally:
        lce._triton, lce._check_labels = saved_triton, saved_check
    return counter.peak


def rows(device, tokens=8192, hidden_size=4096, vocab=128256) -> list[dict]:
    """Both peaks, and the same less the gradients the step must produce either way (dweight, bf16,
    ~1 GiB, is most of the fused peak; the issue's goal, 1/8 of the unfused peak, is below it)."""
    sizes = dict(tokens=tokens, hidden_size=hidden_size, vocab=vocab)
    fused, unfused = peak_bytes(_fused, device, **sizes), peak_bytes(_unfused, device, **sizes)
    gradients = (tokens + vocab) * hidden_size * 2
    how = "CUDA allocator peak" if device.type == "cuda" else "live-tensor count on meta tensors"
    return [dict(what=f"loss step peak bytes, N {tokens}, H {hidden_size}, V {vocab}, bf16", how=how,
                 fused_bytes=fused, unfused_bytes=unfused, fused_over_unfused=fused / unfused,
                 gradient_bytes=gradients, fused_over_unfused_beyond_gradients=(fused - gradients) / (unfused - gradients))]


def format_table(result: list[dict]) -> str:
    r = result[0]
    return (f"{r['what']} ({r['how']}):\n  unfused (transformers' loss) {r['unfused_bytes'] / 2**30:.2f} GiB, "
            f"llama_fast fused {r['fused_bytes'] / 2**30:.2f} GiB: {r['fused_over_unfused']:.3f} of the unfused peak "
            f"(goal <= 0.125); beyond the {r['gradient_bytes'] / 2**30:.2f} GiB of gradients both produce: "
            f"{r['fused_over_unfused_beyond_gradients']:.3f}")
