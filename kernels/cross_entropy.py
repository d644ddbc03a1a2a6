"""The cross-entropy half of the fused linear + cross-entropy loss (llama_fast.ops.linear_cross_entropy).

For row i with logits z (length V, read in fp32), target y (or ``ignore_index``), optional
softcap c (z ← c·tanh(z/c)) and label smoothing ε:
    lse   = log Σ_j exp(z_j)                                   (fp32, online over blocks of V)
    loss  = lse − (1 − ε)·z_y − (ε / V)·Σ_j z_j
    dz_j  = g_i · (exp(z_j − lse) − (1 − ε)·[j = y] − ε / V)   (times 1 − tanh²(z/c) with a softcap)
with g_i the gradient reaching row i's loss. Ignored rows have loss 0 and gradient 0.

Two kernels, one per phase of the op: ``loss_rows`` (one program per row of a chunk of tokens'
logits: loss and lse) and ``grad_in_place`` (a block of vocabulary columns of every token's logits,
overwritten by dz given the lse found before), so no buffer ever spans tokens × vocabulary.
"""


import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ._launch import next_power_of_2, on_tensor_device

_INTERPRET = interpreting()
# Columns per loop step: 4096 fp32 values over 8 warps on a GPU; small under the interpreter, so
# that test vocabularies cross several blocks.
_BLOCK_V = 64 if _INTERPRET else 4096


@triton.jit
def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # c·tanh(z/c), in fp32
    else:
        return z


@triton.jit
def _loss_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, lse_ptr,
    n_cols, stride_row, ignore_index, smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: the running maximum and sum of exponentials (online softmax), z_y and Σz. The block
    sums are added with Kahan compensation: V / BLOCK_V plain fp32 additions (2,048 for V = 131,072
    under the interpreter's 64-column blocks) left the loss of the real SmolLM2 (V = 49,152) 17 fp32
    ulps from float64 where PyTorch's cascaded sum is within 1; compensated, within ~1."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    s_carry = 0.0  # Kahan compensation of s
    z_label = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        inside = offs < n_cols
        z = _softcapped(tl.load(base + offs, mask=inside, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(inside, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a block of -inf logits: no NaN
        alpha = tl.exp(m - m_safe)
        s = s * alpha
        s_carry = s_carry * alpha
        term = tl.sum(tl.exp(z - m_safe), 0) - s_carry
        total = s + term
        s_carry = (total - s) - term
        s = total
        m = m_new
        z_label += tl.sum(tl.where(offs == label, z, 0.0), 0)
        z_sum += tl.sum(tl.where(inside, z, 0.0), 0)
    lse = m + tl.log(s)
    loss = lse - (1.0 - smoothing) * z_label - smoothing / n_cols * z_sum
    tl.store(loss_ptr + row, tl.where(label == ignore_index, 0.0, loss))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _grad_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_ptr,
    n_block_cols, col_offset, n_cols, stride_row, ignore_index, smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of a block of columns [col_offset, col_offset + n_block_cols): dz over z, in place."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(label == ignore_index, 0.0, tl.load(grad_ptr + row))
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_block_cols, BLOCK_V):
        offs = start + cols
        inside = offs < n_block_cols
        z = _softcapped(tl.load(base + offs, mask=inside, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        dz = tl.exp(z - lse) - (1.0 - smoothing) * (offs + col_offset == label).to(tl.float32) - smoothing / n_cols
        if HAS_SOFTCAP:
            t = z / softcap
            dz = dz * (1.0 - t * t)
        tl.store(base + offs, (dz * g).to(logits_ptr.dtype.element_ty), mask=inside)


def _block(n_cols: int) -> int:
    return min(_BLOCK_V, max(16, next_power_of_2(n_cols)))


@on_tensor_device
def loss_rows(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, label_smoothing: float,
              softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) in fp32 for each row of ``logits`` (rows, V), unit stride along V."""
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _loss_rows_kernel[(rows,)](
            logits, labels, loss, lse, n_cols, logits.stride(0), ignore_index, float(label_smoothing),
            float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, BLOCK_V=_block(n_cols),
            num_warps=1 if _INTERPRET else 8,
        )
    return loss, lse


@on_tensor_device
def grad_in_place(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                  col_offset: int, n_cols: int, *, ignore_index: int, label_smoothing: float,
                  softcap: float | None) -> torch.Tensor:
    """Overwrite ``logits`` (rows, block of columns starting at vocabulary index ``col_offset`` of
    ``n_cols``) by the gradient of Σ_i grad_rows_i · loss_i with respect to them; returns it."""
    rows, block_cols = logits.shape
    if rows and block_cols:
        _grad_kernel[(rows,)](
            logits, labels, lse, grad_rows, block_cols, col_offset, n_cols, logits.stride(0), ignore_index,
            float(label_smoothing), float(softcap or 1.0), HAS_SOFTCAP=softcap is not None,
            BLOCK_V=_block(block_cols), num_warps=1 if _INTERPRET else 8,
        )
    return logits
