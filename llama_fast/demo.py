"""Demonstrations run by ``python -m llama_fast``.

``ops``: the three fused ops on SmolLM2-135M-shaped inputs against the eager references, with the
largest difference of forward and backward and the backend that ran.

On a machine with no GPU the CLI turns on Triton's interpreter before triton is imported, so the
Triton kernels themselves run (slowly, on the CPU) rather than the references; every timing
printed is labelled with the device it ran on.
"""

import time

import torch


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _grad_diffs(out, ref_out, ours_in, ref_in):
    dy = [torch.randn_like(o) for o in out]
    g = torch.autograd.grad(out, ours_in, dy)
    g_ref = torch.autograd.grad(ref_out, ref_in, dy)
    return max(_max_diff(a, b) for a, b in zip(g, g_ref))


def ops_demo(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Run each op and its reference once on ``device``; return one row per op."""
    from . import ops, references

    torch.manual_seed(0)
    tokens, hidden, inter, n_q, n_k, head_dim = 16, 576, 1536, 9, 3, 64

    def leaves(*shapes):
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

    x, w = leaves((tokens, hidden), (hidden,))
    q = torch.randn(1, tokens, n_q, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, n_k, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    angles = torch.arange(tokens, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
    emb = torch.cat((angles, angles), -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gate, up = leaves((tokens, inter), (tokens, inter))

    cases = [
        ("rms_norm", lambda: (ops.rms_norm(x, w),), lambda: (references.rms_norm(x, w),), [x, w]),
        ("apply_rotary_pos_emb", lambda: ops.apply_rotary_pos_emb(q, k, cos, sin),
         lambda: references.apply_rotary_pos_emb(q, k, cos, sin), [q, k]),
        ("swiglu", lambda: (ops.swiglu(gate, up),), lambda: (references.swiglu(gate, up),), [gate, up]),
    ]
    rows = []
    for name, ours, ref, inputs in cases:
        out, seconds = _timed(ours)
        ref_out, ref_seconds = _timed(ref)
        rows.append(dict(
            op=name, backend=ops.backend_for(inputs[0]),
            forward_diff=max(_max_diff(a, b) for a, b in zip(out, ref_out)),
            backward_diff=_grad_diffs(out, ref_out, inputs, inputs),
            ms=seconds * 1e3, ref_ms=ref_seconds * 1e3,
        ))
    return rows


def print_ops_demo(rows: list[dict], device: torch.device, dtype: torch.dtype) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"llama_fast ops vs eager PyTorch, {dtype}, SmolLM2-135M shapes (16 tokens), on {where}")
    print(f"{'op':<22} {'backend':<10} {'max |fwd diff|':>15} {'max |grad diff|':>16} {'ours ms':>9} {'eager ms':>9}")
    for r in rows:
        print(f"{r['op']:<22} {r['backend']:<10} {r['forward_diff']:>15.3e} {r['backward_diff']:>16.3e} "
              f"{r['ms']:>9.2f} {r['ref_ms']:>9.2f}")
    if device.type != "cuda":
        print("No GPU: the Triton kernels ran in Triton's interpreter on the CPU. The times are CPU times "
              "of a Python interpreter, not a measure of kernel speed.")
