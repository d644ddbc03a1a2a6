"""Peak memory (and speed) of the causal-LM loss step: llama_fast's fused linear + cross-entropy against the
unfused loss (transformers' ForCausalLMLoss: logits, upcast to fp32, cross_entropy), forward and
backward, at Llama-3-8B's shapes (V = 128,256, H = 4,096, 8,192 tokens, bf16).

Measured, not computed by formula: without a GPU, on meta tensors (no memory is touched, every
shape and dtype is real) under a dispatch mode that counts the bytes of every storage an op creates
until the storage is freed, and keeps the peak; the fused loss's Triton launches are stubbed (they
write in place and allocate nothing). With a GPU, on real tensors by the CUDA allocator's peak.
Either way the inputs (hidden states, weight, labels) are allocated before the count starts, and
the gradients the step produces (dhidden, dweight) are part of the peak.

``cases`` times the same step per provider through the bench's usual runner (``report.run``).
"""

import functools
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .compiled import compile_static


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create, while they live, and the peak.

    Storages, not tensors: autograd keeps a saved output through a tensor of its own on the same
    storage, so a count of tensor objects drops it while it still holds memory (that undercounted
    the unfused loss by a third: 7.83 GiB against 11.74, log_softmax's saved output). A storage an
    op's inputs already have (a view, an in-place op, ``to`` returning its input) is not new memory;
    ``to`` to another dtype is. A custom op is entered with the mode on, so its allocations count.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = set()  # the StorageImpl addresses counted and not yet freed

    def _freed(self, key, nbytes):
        self._storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = torch._library.custom_ops._maybe_get_opdef(func)
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._storages:
                continue
            # The storage's Python object lives exactly as long as the storage (PyTorch keeps it
            # alive for the C++ references), so its finalizer runs when the memory is released.
            nbytes = storage.nbytes()
            self._storages.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def _unfused(hidden, weight, labels):
    from transformers.loss.loss_utils import fixed_cross_entropy

    logits = torch.nn.functional.linear(hidden, weight).float()
    return fixed_cross_entropy(logits, labels, None, -100)


def _fused(hidden, weight, labels):
    from llama_fast import ops

    return ops.linear_cross_entropy(hidden, weight, labels)


@functools.cache
def _compiled_unfused():
    return compile_static(_unfused)


def _liger():
    """Liger-Kernel's fused linear cross-entropy, when installed: the module form, whose call
    (weight, input, target) has been the same across its releases."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()

    def liger(hidden, weight, labels):
        out = loss(weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out

    return liger


def cases(device: torch.device, shapes, dtype: torch.dtype, *, compile_too: bool):
    """Speed of one loss step (forward, then the gradients of hidden and weight) per provider:
    transformers' unfused loss (eager), its torch.compile, Liger's fused loss, ours. The work is
    the unfused loss's three GEMMs, 6·N·H·V FLOPs; ours computes the logits twice (8·N·H·V)."""
    from llama_fast import ops

    from .cases import OURS, Case

    runs_triton = ops.backend_on(device, extension_op=False) == "triton"
    ours = f"{OURS}[{'triton' if runs_triton else 'torch'}]"  # else its chunked torch path
    liger = _liger() if device.type == "cuda" else None
    for name, (tokens, hidden_size, vocab) in shapes.items():
        def setup_for(fn, tokens=tokens, hidden_size=hidden_size, vocab=vocab):
            def setup():
                hidden, weight, labels = _inputs(device, tokens, hidden_size, vocab, dtype)
                return lambda: torch.autograd.grad(fn(hidden, weight, labels), (hidden, weight))

            return setup

        providers = {"eager": setup_for(_unfused), ours: setup_for(_fused)}
        if compile_too:
            providers["torch.compile"] = setup_for(_compiled_unfused())
        if liger is not None:
            providers["liger"] = setup_for(liger)
        yield Case(suite="loss", op="linear_cross_entropy", mode="fwdbwd",
                   shape=f"{name} N={tokens} H={hidden_size} V={vocab}", size=tokens,
                   dtype=str(dtype).removeprefix("torch."), flops=6 * tokens * hidden_size * vocab,
                   providers=providers)


def _inputs(device, tokens, hidden_size, vocab, dtype):
    """Hidden states of unit scale and a weight scaled by 1/sqrt(H), so the logits are of unit scale
    as a trained lm_head's are. With a unit-scale weight they spread over ±100 and fp32 softmax
    gradients fall into denormals, which made the CPU's unfused loss step 16x slower (2.3 s against
    0.14 s, SmolLM2's lm_head and 128 tokens in fp32)."""
    if device.type == "meta":
        shapes = ((tokens, hidden_size), (vocab, hidden_size))
        hidden, weight = (torch.empty(*s, device=device, dtype=dtype) for s in shapes)
        labels = torch.zeros(tokens, dtype=torch.long, device=device)
    else:
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=g)
        weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g) * hidden_size ** -0.5
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


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
    how = "CUDA allocator peak" if device.type == "cuda" else "live-storage count on meta tensors"
    return [dict(what=f"loss step peak bytes, N {tokens}, H {hidden_size}, V {vocab}, bf16", how=how,
                 fused_bytes=fused, unfused_bytes=unfused, fused_over_unfused=fused / unfused,
                 gradient_bytes=gradients,
                 fused_over_unfused_beyond_gradients=(fused - gradients) / (unfused - gradients))]


def format_table(result: list[dict]) -> str:
    r = result[0]
    return (f"{r['what']} ({r['how']}):\n  unfused (transformers' loss) {r['unfused_bytes'] / 2**30:.2f} GiB, "
            f"llama_fast fused {r['fused_bytes'] / 2**30:.2f} GiB: {r['fused_over_unfused']:.3f} of the unfused peak "
            f"(goal <= 0.125); beyond the {r['gradient_bytes'] / 2**30:.2f} GiB of gradients both produce: "
            f"{r['fused_over_unfused_beyond_gradients']:.3f}")
