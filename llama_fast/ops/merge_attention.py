"""``merge_attention``: attention over two key sets from the attention over each and its log-sum-exp.

Ring (context-parallel) attention computes each query shard's attention one key shard at a time and
folds the partial results together with this. Attention over the union of key sets A and B is the
two partial outputs weighted by their share of the softmax mass: with lse = log(e^lse_A + e^lse_B),
out = e^(lse_A − lse)·out_A + e^(lse_B − lse)·out_B. A handful of elementwise operations in PyTorch:
no kernel of its own, no host sync, and autograd gives the backward through out and lse both.
"""

import torch

from ._checks import check_same_device


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results of the same queries over disjoint key sets.

    out_a, out_b: (..., head_dim), one shape, floating point (``flash_attention``'s out, or a merged
    one); lse_a, lse_b: out's shape without head_dim, float32 or float64, the natural-log
    log-sum-exp each came with (``flash_attention(..., return_lse=True)``; for
    ``flash_attention_varlen``'s (heads, total) lse pass ``lse.transpose(0, 1)``). A row with
    lse -inf saw no key in that set (its out is ignored); a row -inf in both merges to zeros and -inf,
    with zero gradients.

    Returns (out, lse): out in the wider of the two outs' dtypes (keep a float32 running result and
    merge each new partial into it, as a ring does, and the merged result rounds once, at the end),
    lse in the wider lse dtype. Differentiable in all four inputs.
    """
    op = "merge_attention"
    check_same_device(op, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64 (flash_attention's lse is float32), "
                            f"got {t.dtype}")
    if out_a.dim() < 1 or out_a.shape != out_b.shape:
        raise ValueError(f"{op}: out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have one shape")
    rows = out_a.shape[:-1]
    if lse_a.shape != rows or lse_b.shape != rows:
        raise ValueError(f"{op}: lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must have out's shape "
                         f"without head_dim, {tuple(rows)}")
    lse_dtype = torch.promote_types(lse_a.dtype, lse_b.dtype)
    out_dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    compute = torch.promote_types(out_dtype, lse_dtype)
    # Rows empty in both sets: both -inf make every difference below NaN, and a NaN in a branch that a
    # masked_fill discards still poisons the backward (0 · NaN), so such rows compute with 0 and 0
    # (finite, discarded) and are masked at the end.
    empty = (lse_a == float("-inf")) & (lse_b == float("-inf"))
    a = lse_a.to(lse_dtype).masked_fill(empty, 0.0)
    b = lse_b.to(lse_dtype).masked_fill(empty, 0.0)
    lse = torch.logaddexp(a, b)
    weight_a = torch.exp(a - lse).masked_fill(empty, 0.0).to(compute)[..., None]
    weight_b = torch.exp(b - lse).masked_fill(empty, 0.0).to(compute)[..., None]
    out = weight_a * out_a.to(compute) + weight_b * out_b.to(compute)
    return out.to(out_dtype), lse.masked_fill(empty, float("-inf"))
