"""``linear_cross_entropy``: the causal-LM loss of ``hidden @ weight.T (+ bias)`` without ever holding
the tokens × vocabulary logits.

Two phases, each over bounded pieces of the logits:
  forward   tokens in chunks: logits of a chunk (cuBLAS, in the inputs' dtype) → per-row loss and
            log-sum-exp (Triton kernel, fp32; kernels/cross_entropy.py); the chunk is dropped.
  backward  vocabulary in blocks: logits of a block of columns for every token → overwritten in
            place by their gradient, given the saved lse → dweight of that block (one product over
            all tokens, so each dweight element is summed in fp32 inside one GEMM and rounded once)
            and its share of dhidden, summed over blocks in an fp32 buffer.
Chunking rule: a chunk or block holds about as many logits as ``hidden`` has elements (chunk =
tokens · H / V rows, at least 32; block = H columns; powers of two), so the loss's extra memory is
about twice ``hidden``'s size plus dhidden's fp32 buffer, whatever V is. The price: the
logits are computed twice (four GEMMs, against three for the unfused loss).

The reduction happens outside the op in plain torch: the op gives each row's loss; ``mean``
divides by the non-ignored rows (on the device, no sync: all rows ignored gives 0, not NaN),
``num_items_in_batch`` replaces that count as in transformers' ``ForCausalLMLoss``, so the op's
backward receives each row's gradient and needs no special case for any reduction.
"""

import torch

from .. import references
from ..backend import backend_for
from . import _dtensor
from ._checks import check_dtype, check_same_device, check_same_dtype, unit_stride_last
from ._dispatch import KernelOp

# The CPU keeps the same two phases in plain torch (the "reference" backend runs the unfused
# reference instead); Triton runs the cross-entropy kernels on CUDA tensors and under the interpreter.


# At least this many rows per chunk: a one-row chunk would be a matrix-vector product, slower and
# rounded unlike the unfused loss's GEMM (8.6e-6 off in the real SmolLM2's loss, where one GEMM over
# its 16 tokens is within 5e-7; measured in fp32 on the CPU).
_MIN_CHUNK_ROWS = 32


def _chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    from ..kernels._launch import next_power_of_2

    return min(max(tokens, 1), max(_MIN_CHUNK_ROWS, next_power_of_2(tokens * hidden // max(vocab, 1))))


def _block_cols(hidden: int, vocab: int) -> int:
    from ..kernels._launch import next_power_of_2

    return min(max(vocab, 1), next_power_of_2(hidden))


def _logits(h, weight, bias):
    return torch.nn.functional.linear(h, weight, bias)


def _softcapped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _torch_loss_rows(logits, labels, ignore_index, smoothing, softcap):
    """The CPU's (and any non-Triton device's) phase-one maths on one chunk, in fp32."""
    z = _softcapped(logits.float(), softcap)
    lse = torch.logsumexp(z, -1)
    ignored = labels == ignore_index
    picked = z.gather(1, labels.masked_fill(ignored, 0)[:, None])[:, 0]
    loss = lse - (1 - smoothing) * picked - smoothing / z.shape[1] * z.sum(-1)
    return loss.masked_fill(ignored, 0.0), lse


def _torch_grad_in_place(logits, labels, lse, grad_rows, col_offset, n_cols, ignore_index, smoothing, softcap):
    z = _softcapped(logits.float(), softcap)
    dz = torch.exp(z - lse[:, None]) - smoothing / n_cols
    cols = torch.arange(col_offset, col_offset + logits.shape[1], device=logits.device)
    dz -= (1 - smoothing) * (cols[None, :] == labels[:, None])
    if softcap is not None:
        dz *= 1 - (z / softcap) ** 2
    g = grad_rows.masked_fill(labels == ignore_index, 0.0)
    return logits.copy_(dz * g[:, None])


def _triton(hidden) -> bool:
    return backend_for(hidden, None, extension_op=False) == "triton"


def _phase_one(hidden, weight, labels, bias, ignore_index, smoothing, softcap):
    tokens, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    step, triton = _chunk_rows(tokens, hidden.shape[1], vocab), _triton(hidden)
    for start in range(0, tokens, step):
        rows = slice(start, start + step)
        logits = _logits(hidden[rows], weight, bias)
        if triton:
            from ..kernels import cross_entropy

            loss[rows], lse[rows] = cross_entropy.loss_rows(logits, labels[rows], ignore_index=ignore_index,
                                                            label_smoothing=smoothing, softcap=softcap)
        else:
            loss[rows], lse[rows] = _torch_loss_rows(logits, labels[rows], ignore_index, smoothing, softcap)
    return loss, lse


def _mm_fp32(a, b):
    """a @ b summed and returned in fp32: on CUDA by cuBLAS with fp32 output (no rounding of the
    16-bit product; meta tensors too, for the memory bench), elsewhere in fp32."""
    if a.device.type in ("cuda", "meta") and a.dtype != torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    return torch.mm(a.float(), b.float())


def _phase_two(grad_rows, hidden, weight, labels, bias, lse, ignore_index, smoothing, softcap, need):
    need_dh, need_dw, need_db = need
    vocab = weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    step, triton = _block_cols(hidden.shape[1], vocab), _triton(hidden)
    grad_rows = grad_rows.float().contiguous()
    for start in range(0, vocab, step):
        cols = slice(start, start + step)
        logits = _logits(hidden, weight[cols], None if bias is None else bias[cols])
        if triton:
            from ..kernels import cross_entropy

            dz = cross_entropy.grad_in_place(logits, labels, lse, grad_rows, start, vocab, ignore_index=ignore_index,
                                             label_smoothing=smoothing, softcap=softcap)
        else:
            dz = _torch_grad_in_place(logits, labels, lse, grad_rows, start, vocab, ignore_index, smoothing, softcap)
        # In fp32 the products go straight into dweight and the dhidden sum: a temporary block and
        # its copy cost about as much as the dweight GEMM itself on the CPU (0.7 ms a 1024 x 576
        # block: fresh pages each time); a SmolLM2 loss step of 128 tokens went 0.24 s -> 0.19-0.22 s.
        if need_dw and dw.dtype == torch.float32:
            torch.mm(dz.t(), hidden, out=dw[cols])
        elif need_dw:
            dw[cols] = _mm_fp32(dz.t(), hidden).to(dw.dtype)
        if need_db:
            db[cols] = dz.float().sum(0).to(db.dtype)
        if need_dh and hidden.dtype == torch.float32:
            dh.addmm_(dz, weight[cols])
        elif need_dh:
            dh += _mm_fp32(dz, weight[cols])
    return (dh.to(hidden.dtype) if need_dh else None), dw, db


# The two phases as custom ops, registered by KernelOp (ops/_dispatch.py): the backward's logits blocks
# are recomputed inside its op, so autograd saves only hidden, weight, labels, bias and the lse.
def _launch_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                ignore_index: int, label_smoothing: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _phase_one(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap)


def _launch_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                softcap: float | None, need_dhidden: bool, need_dweight: bool,
                need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db = _phase_two(grad_rows, hidden, weight, labels, bias, lse, ignore_index, label_smoothing, softcap,
                            (need_dhidden, need_dweight, need_dbias))
    # A custom op returns tensors: an empty one (each its own, outputs may not alias) for "not asked for".
    return tuple(hidden.new_empty(0) if t is None else t for t in (dh, dw, db))


def _fake_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap):
    rows = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows)


def _fake_bwd(grad_rows, hidden, weight, labels, bias, lse, ignore_index, label_smoothing, softcap, need_dhidden,
              need_dweight, need_dbias):
    return (torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_dweight else hidden.new_empty(0),
            torch.empty_like(bias) if need_dbias and bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, label_smoothing, softcap = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.args = ignore_index, label_smoothing, softcap


def _backward_with(bwd_op):
    def backward(ctx, grad_rows, _dlse):
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, dw, db = bwd_op(grad_rows, hidden, weight, labels, bias, lse, *ctx.args, need[0], need[1],
                            bias is not None and need[3])
        return (dh if need[0] else None), (dw if need[1] else None), None, \
            (db if bias is not None and need[3] else None), None, None, None

    return backward


_KERNELS = KernelOp("linear_cross_entropy", _launch_fwd, _launch_bwd, fake_forward=_fake_fwd, fake_backward=_fake_bwd,
                    setup_context=_setup_context, backward_with=_backward_with)


def _check(hidden, weight, labels, bias, reduction, num_items_in_batch, label_smoothing, logit_softcap) -> None:
    op = "linear_cross_entropy"
    tensors = dict(hidden=hidden, weight=weight) | ({} if bias is None else dict(bias=bias))
    check_dtype(op, **tensors)
    check_same_dtype(op, **tensors)
    check_same_device(op, labels=labels, **tensors)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden must be (tokens, H) and weight (V, H) with one H, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: the vocabulary is empty (weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"{op}: labels must be int64 (or int32) of shape ({hidden.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"{op}: num_items_in_batch divides the mean's sum; with reduction={reduction!r} it would be "
                         "ignored")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logit_softcap is not None and not 0.0 < logit_softcap < float("inf"):
        raise ValueError(f"{op}: logit_softcap must be positive and finite, got {logit_softcap}")


def _check_labels(labels, vocab, ignore_index) -> None:
    """Every label is a vocabulary index or ignore_index: on the host for CPU tensors, as a device-side
    assert elsewhere (reading them would sync), as PyTorch's cross_entropy does."""
    bad = ~((labels == ignore_index) | ((labels >= 0) & (labels < vocab)))
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad.any():
            raise ValueError(f"linear_cross_entropy: labels {labels[bad][:5].tolist()} are outside [0, {vocab}) and "
                             f"not ignore_index ({ignore_index})")
    else:
        torch._assert_async(~bad.any(), "linear_cross_entropy: a label is outside the vocabulary")


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch=None, label_smoothing: float = 0.0, logit_softcap: float | None = None,
                         return_lse: bool = False, backend: str | None = None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, without the logits.

    hidden (N, H) float32/float16/bfloat16; weight (V, H) and bias (V,) of the same dtype; labels
    (N,) int64 (or int32), each a vocabulary index or ``ignore_index``. Labels are used as given:
    shift them first for a causal LM (``patch(cross_entropy=True)`` does, as transformers does).

    reduction: "mean" over the rows not ignored (all ignored: 0, with zero gradients, where
    PyTorch and transformers give NaN), "sum", or "none" (per row, 0 where ignored).
    num_items_in_batch: with "mean", divide the sum by this count instead (a tensor or int), as
    transformers' ``ForCausalLMLoss`` does for gradient accumulation.
    label_smoothing: as ``torch.nn.functional.cross_entropy``'s. logit_softcap: c, the logits
    become c·tanh(z / c) first (Gemma 2's final softcap). return_lse: also return each row's
    log-sum-exp (fp32). Differentiable in hidden, weight and bias; a weight that does not require
    grad gets no dweight computed. The loss is fp32.

    backend: "reference" runs the unfused eager computation; otherwise Triton's kernels on CUDA
    tensors (or under the interpreter), and the same chunked phases in torch on a CPU.
    """
    _check(hidden, weight, labels, bias, reduction, num_items_in_batch, label_smoothing, logit_softcap)
    if _dtensor.has_dtensor(hidden, weight, labels, bias):
        return _on_dtensors(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch,
                            label_smoothing, logit_softcap, return_lse, backend)
    rows, lse = _loss_rows(hidden, weight, labels, bias, ignore_index, label_smoothing, logit_softcap, backend)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif num_items_in_batch is not None:
        loss = rows.sum() / torch.as_tensor(num_items_in_batch, device=rows.device, dtype=torch.float32)
    else:
        counted = (labels != ignore_index).sum().clamp(min=1)
        loss = rows.sum() / counted
    return (loss, lse) if return_lse else loss


def _loss_rows(hidden, weight, labels, bias, ignore_index, label_smoothing, logit_softcap, backend):
    """(each row's loss, each row's log-sum-exp), fp32, from checked plain tensors."""
    _check_labels(labels, weight.shape[0], ignore_index)
    if backend is not None and backend_for(hidden, backend, extension_op=False) == "reference":
        return references.linear_cross_entropy_rows(hidden, weight, labels, bias, ignore_index=ignore_index,
                                                    label_smoothing=label_smoothing, softcap=logit_softcap)
    return _KERNELS.forward(unit_stride_last(hidden), unit_stride_last(weight), labels.contiguous(), bias,
                            int(ignore_index), float(label_smoothing),
                            None if logit_softcap is None else float(logit_softcap))


class _SumOverRanks(torch.autograd.Function):
    """The sum of each rank's ``t`` over the process groups ``groups``. Backward is the identity: every
    rank holds the summed value and back-propagates the same gradient into its own term."""

    @staticmethod
    def forward(ctx, t, groups):
        total = t.clone()
        for group in groups:
            torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _on_dtensors(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, label_smoothing,
                 logit_softcap, return_lse, backend):
    """DTensor inputs: hidden and labels split alike along the tokens (dim 0), weight and bias replicated
    (a vocabulary split would need a log-sum-exp across ranks, which this op does not do). Rows come back
    Shard(0) where hidden is; a reduced loss is summed over the ranks (Replicate); dweight and dbias are
    Partial there."""
    from torch.distributed.tensor import DTensor, Replicate

    name = "linear_cross_entropy"
    tensors = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    mesh, placements = _dtensor.mesh_of(name, **tensors)
    if 1 in _dtensor.sharded_dims(placements["hidden"]):
        raise _dtensor.refuse(name, "hidden", hidden, "its hidden dim, which the logits sum over, is sharded")
    if placements["labels"] != placements["hidden"]:
        raise ValueError(f"{name}: hidden and labels must split the tokens alike; got placements "
                         f"{tuple(hidden.placements)} and {tuple(labels.placements)}")
    for param in ("weight", "bias"):
        if param in placements:
            _dtensor.require_replicated(name, param, tensors[param], placements[param],
                                        "the loss needs every vocabulary row on each rank (a vocabulary-parallel "
                                        "lm_head needs a log-sum-exp across ranks, which this op does not do)")
    grad_placements = _dtensor.partial_where_sharded(placements["hidden"])
    local_bias = None if bias is None else bias.to_local(grad_placements=grad_placements)
    rows, lse = _loss_rows(hidden.to_local(), weight.to_local(grad_placements=grad_placements), labels.to_local(),
                           local_bias, ignore_index, label_smoothing, logit_softcap, backend)
    if reduction == "none":
        loss = _dtensor.wrap(rows, mesh, placements["hidden"], (hidden.shape[0],))
    else:
        groups = [mesh.get_group(d) for d, p in enumerate(placements["hidden"]) if p.is_shard()]
        loss = _SumOverRanks.apply(rows.sum(), groups)
        if reduction == "mean":
            if isinstance(num_items_in_batch, DTensor):
                num_items_in_batch = num_items_in_batch.full_tensor()
            if num_items_in_batch is None:
                counted = _SumOverRanks.apply((labels.to_local() != ignore_index).sum(), groups)
                loss = loss / counted.clamp(min=1)
            else:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=torch.float32)
        loss = _dtensor.wrap(loss, mesh, [Replicate()] * mesh.ndim, ())
    if not return_lse:
        return loss
    return loss, _dtensor.wrap(lse, mesh, placements["hidden"], (hidden.shape[0],))
