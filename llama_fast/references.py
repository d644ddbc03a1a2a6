"""Eager PyTorch references: one per op, used by the tests, the benchmarks and the CPU fallback.

Each follows transformers' Llama code operation for operation, including where it rounds, so it
is what a patched model must match.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, unit_offset: bool = False) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: variance in fp32, normalised x cast back, then times weight.
    ``unit_offset``: ``Gemma3RMSNorm.forward``, all in fp32 times (1 + weight), cast to x's dtype at the end.

    (float64 inputs stay float64, so the tests can build a reference more precise than fp32.)
    """
    input_dtype = x.dtype
    compute = torch.promote_types(input_dtype, torch.float32)
    h = x.to(compute)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if unit_offset:
        return (h * (1.0 + weight.to(compute))).to(input_dtype)
    return weight * h.to(input_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``LlamaDecoderLayer``'s ``hidden = residual + attn_out`` then ``post_attention_layernorm(hidden)``:
    (the norm of the sum, the sum), the sum rounded to its dtype before the norm reads it, as in eager."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb`` (rotate_half layout)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The gating of ``LlamaMLP``: act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU; ``activation="gelu_tanh"``:
    Gemma's GeGLU, act_fn = ``gelu(approximate="tanh")`` (transformers' "gelu_pytorch_tanh")."""
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def attention(q, k, v, *, causal: bool = True, softmax_scale: float | None = None, key_padding_mask=None,
              kv_lens=None, window: int | None = None, softcap: float | None = None, return_lse: bool = False,
              causal_offset: int | None = None):
    """Softmax attention over an explicitly masked score matrix, the reference for flash_attention.

    q (B, Hq, Sq, D); k, v (B, Hk, Skv, D), Hq a multiple of Hk. Causal visibility is aligned
    bottom-right: query i sees keys j <= i + Skv - Sq, or j <= i + causal_offset when that is given
    (shards of one sequence: flash_attention's causal_offset). key_padding_mask (B, Skv) bool, True for
    real keys. kv_lens (B,) integers: row b sees only keys j < kv_lens[b], with kv_lens[b] in place
    of Skv in the causal rule (a static cache filled up to there). window (with causal): query i also
    sees only keys j > i + Skv - Sq - window, transformers' sliding window. softcap: the scaled scores
    become softcap·tanh(s / softcap) before the masks (Gemma 2). Rows that see no key give zeros
    (and zero gradients). Scores and softmax are computed in fp32 (float64 for float64 inputs), the
    products in the input dtype, as eager attention in transformers does. return_lse: also the
    natural-log log-sum-exp of each row's visible scores, (B, Hq, Sq) float32 (float64 for float64
    inputs), -inf for a row that sees no key.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(compute) * scale  # (B, Hq, Sq, Skv)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q_len, device=q.device)[None, :, None]
    j = torch.arange(kv_len, device=q.device)[None, None, :]
    valid = torch.full((1, 1, 1), kv_len, device=q.device) if kv_lens is None else kv_lens.view(-1, 1, 1)
    visible = j < valid  # (B or 1, 1, Skv)
    if causal:
        shift = valid - q_len if causal_offset is None else causal_offset
        visible = visible & (j <= i + shift)
        if window is not None:
            visible = visible & (j > i + shift - window)
    visible = visible[:, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    sees_any = visible.any(-1, keepdim=True)
    # Rows with no visible key get finite scores before the softmax (so neither it nor its
    # gradient makes NaN) and are zeroed after it.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~sees_any, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~sees_any, 0.0)
    out = torch.matmul(probs.to(v.dtype), v)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores, dim=-1).masked_fill(~sees_any[..., 0], float("-inf"))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True, softmax_scale: float | None = None,
                     window: int | None = None, softcap: float | None = None, return_lse: bool = False):
    """The reference for flash_attention_varlen: ``attention`` on each packed sequence alone.

    q (total_q, Hq, D); k, v (total_k, Hk, D); cu_seqlens_q/k (batch + 1,) offsets (read on the
    host: this is a reference, not a fast path). Returns (total_q, Hq, D), and with return_lse the
    lse laid out (Hq, total_q).
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = [q.new_zeros((0, *q.shape[1:]))]
    lses = [q.new_zeros((q.shape[1], 0), dtype=torch.promote_types(q.dtype, torch.float32))]
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        seq = [t[lo:hi].transpose(0, 1)[None] for t, lo, hi in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        out, lse = attention(*seq, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                             return_lse=True)
        pieces.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    # the offsets cover q's rows from 0 to the end (checked by the op)
    return (torch.cat(pieces), torch.cat(lses, dim=1)) if return_lse else torch.cat(pieces)


def linear_cross_entropy_rows(hidden, weight, labels, bias=None, *, ignore_index: int = -100,
                              label_smoothing: float = 0.0, softcap: float | None = None):
    """The reference for linear_cross_entropy, unfused: the whole logits matrix, upcast to fp32 as
    transformers' ``ForCausalLMLoss`` does, then PyTorch's cross_entropy per row. Returns (loss per
    row, 0 where ignored; log-sum-exp per row)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    return rows, torch.logsumexp(logits, -1)
