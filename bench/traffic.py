"""Memory traffic of eager PyTorch, counted op by op, against what a fused kernel must move.

The eager reference of each op runs on meta tensors (no memory, no arithmetic) under a
``TorchDispatchMode`` that adds up, for every ATen operation that is not a view, the bytes of its
tensor inputs (read) and outputs (written). Each such operation is a separate kernel on a GPU
and a separate trip through memory, so the ratio eager bytes / fused bytes is the gain fusion can
give a memory-bound op, measured without a GPU.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_fast import references

from . import formulas
from .shapes import MODELS


def _tensor_bytes(t: torch.Tensor) -> int:
    # an expanded (stride-0) tensor is read from its storage, not once per logical element
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class ByteCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.name() not in ("aten::detach", "aten::lift_fresh"):
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(map(_tensor_bytes, inputs)) + sum(map(_tensor_bytes, outputs))
            self.kernels += 1
        return out


def _count(fn, inputs, wrt, mode):
    counter = ByteCounter()
    if mode == "fwd":
        with counter:
            fn(*inputs)
        return counter
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = tuple(torch.empty_like(o) for o in outs)
    with counter:
        torch.autograd.grad(outs, wrt, grads)
    return counter


def traffic(models=None, tokens: int = 4096, dtype=torch.bfloat16) -> list[dict]:
    meta = torch.device("meta")
    e = torch.finfo(dtype).bits // 8
    rows = []
    for name in models or MODELS:
        m = MODELS[name]
        x = torch.empty(tokens, m.hidden, device=meta, dtype=dtype, requires_grad=True)
        w = torch.empty(m.hidden, device=meta, dtype=dtype, requires_grad=True)
        q = torch.empty(1, tokens, m.q_heads, m.head_dim, device=meta, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.empty(1, tokens, m.kv_heads, m.head_dim, device=meta, dtype=dtype).transpose(1, 2).requires_grad_()
        cos = torch.empty(1, tokens, m.head_dim, device=meta, dtype=dtype)
        g = torch.empty(tokens, m.intermediate, device=meta, dtype=dtype, requires_grad=True)
        u = torch.empty(tokens, m.intermediate, device=meta, dtype=dtype, requires_grad=True)
        specs = [
            ("rms_norm", references.rms_norm, (x, w), (x, w),
             lambda mode: formulas.rms_norm_bytes(tokens, m.hidden, e, e, mode)),
            ("apply_rotary_pos_emb", references.apply_rotary_pos_emb, (q, k, cos, cos), (q, k),
             lambda mode: formulas.rope_bytes(1, tokens, m.q_heads, m.kv_heads, m.head_dim, e, mode)),
            ("swiglu", references.swiglu, (g, u), (g, u),
             lambda mode: formulas.swiglu_bytes(tokens, m.intermediate, e, mode)),
        ]
        for op, fn, inputs, wrt, fused in specs:
            for mode in ("fwd", "bwd"):
                counter = _count(fn, inputs, wrt, mode)
                ours = fused(mode)
                rows.append(dict(op=op, mode=mode, shape=f"{name} tokens={tokens}",
                                 dtype=str(dtype).removeprefix("torch."),
                                 eager_bytes=counter.bytes, eager_kernels=counter.kernels, fused_bytes=ours,
                                 ratio=counter.bytes / ours))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<22} {'pass':<4} {'shape':<28} {'eager MB':>9} {'kernels':>7} {'fused MB':>9} {'eager/fused':>11}"]
    for r in rows:
        lines.append(f"{r['op']:<22} {r['mode']:<4} {r['shape']:<28} {r['eager_bytes'] / 1e6:>9.1f} "
                     f"{r['eager_kernels']:>7} {r['fused_bytes'] / 1e6:>9.1f} {r['ratio']:>10.2f}x")
    return "\n".join(lines)
