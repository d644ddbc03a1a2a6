"""DTensor inputs to the public ops: run each rank's local shard where that is provably the op on the
full tensor, else refuse with a ``ValueError`` naming the op, the input, its placements and what to do.

Our kernels are ``torch.library`` custom ops with no DTensor sharding rule, so a DTensor reaching one
would fail inside DTensor's dispatch with a generic error. Instead each op, given DTensors, checks the
placements here against what the op is independent along, runs itself on the local tensors
(``to_local``), and wraps its outputs back (``DTensor.from_local``) with the global shape:

  op                      may be sharded along (per mesh dim)         output and gradients
  swiglu                  any dim, gate and up alike                  gate's placements
  rms_norm                x: any dim but the last; weight replicated  x's; dweight Partial where x is sharded
  apply_rotary_pos_emb    q, k: batch, heads, seq (not head_dim);     q's / k's
                          cos, sin follow a batch or seq split
  flash_attention         q, k, v alike: batch, or heads with each    q's
                          rank's query heads the GQA groups of its
                          KV heads; key_padding_mask, kv_lens follow
                          a batch split
  flash_attention_varlen  q, k, v alike: heads (as above);            q's
                          cu_seqlens replicated
  linear_cross_entropy    hidden, labels alike: tokens (dim 0);       rows Shard(0) where hidden is; a reduced loss
                          weight, bias replicated                     is summed over the ranks (Replicate);
                                                                      dweight, dbias Partial there

Replicate is accepted everywhere. Refused: a Partial (pending-sum) input, a shard of a dim the op
reduces or mixes over (the last dim of RMSNorm, head_dim, attention's sequences, the vocabulary of
the loss), placements other than Shard and Replicate (``_StridedShard``), DTensors mixed with plain
tensors or on different meshes (DTensor's own rule), and GQA head splits that would separate a query
head from its KV head. These are refused rather than redistributed: a redistribution is a collective
the caller should see (``x.redistribute(placements=[Replicate()])``), and transformers'
tensor-parallel plans hand our ops plain local tensors anyway.

Why gradients of replicated parameters are Partial where the activations are sharded: each rank's
dweight sums only its own rows, so the true gradient is the sum over ranks, which is what ``Partial``
records (``to_local(grad_placements=...)``); DTensor reduces it when it is used.
"""

import sys

import torch

# Plain tensors, Parameters and absent optional inputs: one type() test each settles them.
_NOT_DTENSOR = (torch.Tensor, torch.nn.Parameter, type(None))


def has_dtensor(*tensors) -> bool:
    """True when one of ``tensors`` is a DTensor. Runs on every call of every op: ~0.2 µs for plain
    tensors (2-core Xeon, torch 2.14). torch.distributed.tensor is looked up only for other tensor
    types (fake, functional, ...), and never imported: no DTensor can exist before it is."""
    for t in tensors:
        if type(t) not in _NOT_DTENSOR:
            module = sys.modules.get("torch.distributed.tensor")
            if module is not None and isinstance(t, module.DTensor):
                return True
    return False


_FIX = ("Redistribute it first (e.g. {name}.redistribute(placements=[Replicate()])), or call {op} on local tensors "
        "({name}.to_local()), as transformers' tensor-parallel plans do")


def _refuse(op: str, name: str, t, why: str, fix: str | None = None) -> ValueError:
    fix = _FIX if fix is None else fix
    return ValueError(f"{op}: {name} is a DTensor with placements {tuple(t.placements)} on {t.device_mesh}: {why}. "
                      + fix.format(name=name, op=op))


def _mesh(op: str, **tensors):
    """The one mesh of ``tensors`` (None entries skipped), after the checks every op shares: all are
    DTensors, on one mesh, with only Shard and Replicate placements. Returns (mesh, {name: placements
    with non-negative Shard dims})."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    given = {name: t for name, t in tensors.items() if t is not None}
    plain = [name for name, t in given.items() if not isinstance(t, DTensor)]
    if plain:
        dtensors = [name for name in given if name not in plain]
        raise ValueError(f"{op}: {', '.join(dtensors)} {'is a DTensor' if len(dtensors) == 1 else 'are DTensors'} "
                         f"but {', '.join(plain)} {'is a plain tensor' if len(plain) == 1 else 'are plain tensors'}; "
                         "pass all of them as DTensors on one device mesh (DTensor.from_local, distribute_tensor), "
                         "or all as local tensors (.to_local())")
    mesh, placements = None, {}
    for name, t in given.items():
        if mesh is None:
            mesh = t.device_mesh
        elif t.device_mesh != mesh:
            raise ValueError(f"{op}: the DTensor inputs are on different device meshes ({mesh} and {name}'s "
                             f"{t.device_mesh}); put them on one mesh")
        normal = []
        for p in t.placements:
            if p.is_partial():
                raise _refuse(op, name, t, "a Partial placement holds a pending reduction, and the op is not linear",
                              "Reduce it first ({name}.redistribute(placements=[Replicate()]) or {name}.full_tensor())")
            if type(p) is Shard:
                normal.append(Shard(p.dim % t.dim()))
            elif type(p) is Replicate:
                normal.append(p)
            else:
                raise _refuse(op, name, t, f"placement {p!r} is not supported (only Shard and Replicate)")
        placements[name] = tuple(normal)
    return mesh, placements


def _sharded_dims(placements) -> set:
    return {p.dim for p in placements if p.is_shard()}


def _global_stride(local: torch.Tensor, shape) -> tuple:
    """Contiguous strides for the global ``shape`` in the dim order of ``local``'s layout, so an output
    that is a transposed view (attention's, RoPE's of transposed projections) is described as one."""
    order = sorted(range(local.dim()), key=lambda d: -local.stride(d))
    stride, step = [0] * local.dim(), 1
    for d in reversed(order):
        stride[d] = step
        step *= max(shape[d], 1)
    return tuple(stride)


def _wrap(local: torch.Tensor, mesh, placements, shape):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_global_stride(local, shape))


def _partial_where_sharded(placements):
    """Gradient placements of a replicated parameter used with activations of ``placements``."""
    from torch.distributed.tensor import Partial, Replicate

    return [Partial() if p.is_shard() else Replicate() for p in placements]


def _require_replicated(op: str, name: str, t, placements, why: str) -> None:
    if any(p.is_shard() for p in placements):
        raise _refuse(op, name, t, why)


def _check_head_split(op: str, q, k, placements, head_axis: int) -> None:
    """A split of the heads keeps every query head on the rank of its KV head (GQA group h // G): true
    when K/V heads split evenly over the mesh dims that split them (then query heads do too, G per KV
    head), or when there are as many KV heads as query heads (identical splits)."""
    q_heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    ranks = 1
    for mesh_dim, p in enumerate(placements):
        if p.is_shard(head_axis):
            ranks *= q.device_mesh.size(mesh_dim)
    if ranks > 1 and q_heads != kv_heads and kv_heads % ranks:
        raise _refuse(op, "k", k, f"its {kv_heads} KV heads do not split evenly over {ranks} ranks, so a rank would "
                                  f"hold query heads (of {q_heads}) whose KV head is on another rank",
                      "Shard the heads over a number of ranks that divides the KV heads, or replicate them")


def _same_placements(op: str, first: str, placements: dict, tensors: dict, why: str) -> None:
    for name in placements:
        if placements[name] != placements[first]:
            raise ValueError(f"{op}: {first} and {name} must be split alike ({why}); got placements "
                             f"{tuple(tensors[first].placements)} and {tuple(tensors[name].placements)}")


def swiglu(gate, up, backend):
    from .swiglu import swiglu as op

    mesh, placements = _mesh("swiglu", gate=gate, up=up)
    _same_placements("swiglu", "gate", placements, dict(gate=gate, up=up), "the op is elementwise")
    out = op(gate.to_local(), up.to_local(), backend=backend)
    return _wrap(out, mesh, placements["gate"], gate.shape)


def rms_norm(x, weight, eps, backend):
    from .rms_norm import rms_norm as op

    mesh, placements = _mesh("rms_norm", x=x, weight=weight)
    if x.dim() - 1 in _sharded_dims(placements["x"]):
        raise _refuse("rms_norm", "x", x, "its last dim, which RMSNorm reduces over, is sharded")
    _require_replicated("rms_norm", "weight", weight, placements["weight"], "the weight must be replicated")
    local_weight = weight.to_local(grad_placements=_partial_where_sharded(placements["x"]))
    y = op(x.to_local(), local_weight, eps, backend=backend)
    return _wrap(y, mesh, placements["x"], x.shape)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, backend):
    from torch.distributed.tensor import Replicate, Shard

    from .rope import apply_rotary_pos_emb as op

    name = "apply_rotary_pos_emb"
    tensors = dict(q=q, k=k, cos=cos, sin=sin)
    mesh, placements = _mesh(name, **tensors)
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    for t in ("q", "k"):
        if 3 in _sharded_dims(placements[t]):
            raise _refuse(name, t, tensors[t], "head_dim is sharded, and the rotation pairs its two halves")
    _same_placements(name, "cos", {n: placements[n] for n in ("cos", "sin")}, tensors, "they are one table")
    # cos/sin hold one row per (batch, position): where q and k split the batch or the positions, the
    # tables must split the same way; where they split heads or are replicated, the tables are replicated.
    for mesh_dim, (pq, pk, pc) in enumerate(zip(placements["q"], placements["k"], placements["cos"])):
        split_q = pq.dim if pq.is_shard() and pq.dim in (0, seq_axis) else None
        split_k = pk.dim if pk.is_shard() and pk.dim in (0, seq_axis) else None
        if split_q != split_k:
            raise ValueError(f"{name}: q and k must split the batch and the positions alike (they share cos and "
                             f"sin); got placements {tuple(q.placements)} and {tuple(k.placements)}")
        if split_q == seq_axis:
            want = Shard(1)
        elif split_q == 0 and cos.shape[0] > 1:
            want = Shard(0)
        else:
            want = Replicate()
        if pc != want:
            raise _refuse(name, "cos", cos, f"on mesh dim {mesh_dim} q is {pq!r}, so cos and sin (batch or 1, seq, "
                                            f"head_dim) must be {want!r}",
                          "Distribute cos and sin to match q's split of the batch and positions")
    q_embed, k_embed = op(q.to_local(), k.to_local(), cos.to_local(), sin.to_local(), unsqueeze_dim, backend=backend)
    return _wrap(q_embed, mesh, placements["q"], q.shape), _wrap(k_embed, mesh, placements["k"], k.shape)


def _attention_placements(op, tensors, placements, allowed: dict) -> None:
    """q, k, v split alike, each split one of ``allowed`` (dim: description of what it splits)."""
    _same_placements(op, "q", {n: placements[n] for n in ("q", "k", "v")}, tensors,
                     "attention pairs each query head with its KV head")
    for p in placements["q"]:
        if p.is_shard() and p.dim not in allowed:
            supported = "; ".join(f"Shard({d}), the {what}" for d, what in allowed.items())
            raise _refuse(op, "q", tensors["q"], f"{p!r} splits a dim attention mixes over (supported: {supported})")


def flash_attention(q, k, v, causal, softmax_scale, key_padding_mask, kv_lens, backend):
    from torch.distributed.tensor import Replicate, Shard

    from .attention import flash_attention as op

    name = "flash_attention"
    tensors = dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask, kv_lens=kv_lens)
    mesh, placements = _mesh(name, **tensors)
    _attention_placements(name, tensors, placements, {0: "batch", 1: "heads"})
    _check_head_split(name, q, k, placements["q"], 1)
    # The mask and the lengths have one row per batch entry: split as the batch is, else replicated.
    want = tuple(Shard(0) if p.is_shard(0) else Replicate() for p in placements["q"])
    for aux in ("key_padding_mask", "kv_lens"):
        if aux in placements and placements[aux] != want:
            raise _refuse(name, aux, tensors[aux], f"with q split as {tuple(q.placements)} it must be {want}",
                          "Distribute it like q's batch")
    local = [None if t is None else t.to_local() for t in (key_padding_mask, kv_lens)]
    out = op(q.to_local(), k.to_local(), v.to_local(), causal=causal, softmax_scale=softmax_scale,
             key_padding_mask=local[0], kv_lens=local[1], backend=backend)
    return _wrap(out, mesh, placements["q"], q.shape)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                           backend):
    from .attention import flash_attention_varlen as op

    name = "flash_attention_varlen"
    tensors = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    mesh, placements = _mesh(name, **tensors)
    _attention_placements(name, tensors, placements, {1: "heads"})
    _check_head_split(name, q, k, placements["q"], 1)
    for cu in ("cu_seqlens_q", "cu_seqlens_k"):
        _require_replicated(name, cu, tensors[cu], placements[cu], "the sequence offsets must be replicated")
    out = op(q.to_local(), k.to_local(), v.to_local(), cu_seqlens_q.to_local(), cu_seqlens_k.to_local(), max_seqlen_q,
             max_seqlen_k, causal=causal, softmax_scale=softmax_scale, backend=backend)
    return _wrap(out, mesh, placements["q"], q.shape)


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


def linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, label_smoothing,
                         logit_softcap, return_lse, backend):
    from torch.distributed.tensor import DTensor, Replicate

    from .linear_cross_entropy import linear_cross_entropy as op

    name = "linear_cross_entropy"
    tensors = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    mesh, placements = _mesh(name, **tensors)
    if 1 in _sharded_dims(placements["hidden"]):
        raise _refuse(name, "hidden", hidden, "its hidden dim, which the logits sum over, is sharded")
    if placements["labels"] != placements["hidden"]:
        raise ValueError(f"{name}: hidden and labels must split the tokens alike; got placements "
                         f"{tuple(hidden.placements)} and {tuple(labels.placements)}")
    for param in ("weight", "bias"):
        if param in placements:
            _require_replicated(name, param, tensors[param], placements[param],
                                "the loss needs every vocabulary row on each rank (a vocabulary-parallel lm_head needs "
                                "a log-sum-exp across ranks, which this op does not do)")
    grad_placements = _partial_where_sharded(placements["hidden"])
    local_bias = None if bias is None else bias.to_local(grad_placements=grad_placements)
    rows, lse = op(hidden.to_local(), weight.to_local(grad_placements=grad_placements), labels.to_local(),
                   bias=local_bias, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
                   logit_softcap=logit_softcap, return_lse=True, backend=backend)
    if reduction == "none":
        loss = _wrap(rows, mesh, placements["hidden"], (hidden.shape[0],))
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
        loss = _wrap(loss, mesh, [Replicate()] * mesh.ndim, ())
    if not return_lse:
        return loss
    return loss, _wrap(lse, mesh, placements["hidden"], (hidden.shape[0],))
