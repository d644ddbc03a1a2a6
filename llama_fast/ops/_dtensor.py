"""DTensor inputs to the public ops: the checks and wrapping every op's placement rule shares.

Our kernels are ``torch.library`` custom ops with no DTensor sharding rule, so a DTensor reaching one
would fail inside DTensor's dispatch with a generic error. Instead each op, given DTensors, checks the
placements against what the op is independent along (its ``_on_dtensors``, beside the op), runs itself
on the local tensors (``to_local``), and wraps its outputs back (``wrap``, ``DTensor.from_local``) with
the global shape. The helpers here import no op.

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


def refuse(op: str, name: str, t, why: str, fix: str | None = None) -> ValueError:
    fix = _FIX if fix is None else fix
    return ValueError(f"{op}: {name} is a DTensor with placements {tuple(t.placements)} on {t.device_mesh}: {why}. "
                      + fix.format(name=name, op=op))


def mesh_of(op: str, **tensors):
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
                raise refuse(op, name, t, "a Partial placement holds a pending reduction, and the op is not linear",
                              "Reduce it first ({name}.redistribute(placements=[Replicate()]) or {name}.full_tensor())")
            if type(p) is Shard:
                normal.append(Shard(p.dim % t.dim()))
            elif type(p) is Replicate:
                normal.append(p)
            else:
                raise refuse(op, name, t, f"placement {p!r} is not supported (only Shard and Replicate)")
        placements[name] = tuple(normal)
    return mesh, placements


def sharded_dims(placements) -> set:
    return {p.dim for p in placements if p.is_shard()}


def global_stride(local: torch.Tensor, shape) -> tuple:
    """Contiguous strides for the global ``shape`` in the dim order of ``local``'s layout, so an output
    that is a transposed view (attention's, RoPE's of transposed projections) is described as one."""
    order = sorted(range(local.dim()), key=lambda d: -local.stride(d))
    stride, step = [0] * local.dim(), 1
    for d in reversed(order):
        stride[d] = step
        step *= max(shape[d], 1)
    return tuple(stride)


def wrap(local: torch.Tensor, mesh, placements, shape):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=global_stride(local, shape))


def partial_where_sharded(placements):
    """Gradient placements of a replicated parameter used with activations of ``placements``."""
    from torch.distributed.tensor import Partial, Replicate

    return [Partial() if p.is_shard() else Replicate() for p in placements]


def require_replicated(op: str, name: str, t, placements, why: str) -> None:
    if any(p.is_shard() for p in placements):
        raise refuse(op, name, t, why)


def check_head_split(op: str, q, k, placements, head_axis: int) -> None:
    """A split of the heads keeps every query head on the rank of its KV head (GQA group h // G): true
    when K/V heads split evenly over the mesh dims that split them (then query heads do too, G per KV
    head), or when there are as many KV heads as query heads (identical splits)."""
    q_heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    ranks = 1
    for mesh_dim, p in enumerate(placements):
        if p.is_shard(head_axis):
            ranks *= q.device_mesh.size(mesh_dim)
    if ranks > 1 and q_heads != kv_heads and kv_heads % ranks:
        raise refuse(op, "k", k, f"its {kv_heads} KV heads do not split evenly over {ranks} ranks, so a rank would "
                                  f"hold query heads (of {q_heads}) whose KV head is on another rank",
                      "Shard the heads over a number of ranks that divides the KV heads, or replicate them")


def same_placements(op: str, first: str, placements: dict, tensors: dict, why: str) -> None:
    for name in placements:
        if placements[name] != placements[first]:
            raise ValueError(f"{op}: {first} and {name} must be split alike ({why}); got placements "
                             f"{tuple(tensors[first].placements)} and {tuple(tensors[name].placements)}")


def attention_placements(op, tensors, placements, allowed: dict) -> None:
    """q, k, v split alike, each split one of ``allowed`` (dim: description of what it splits)."""
    same_placements(op, "q", {n: placements[n] for n in ("q", "k", "v")}, tensors,
                     "attention pairs each query head with its KV head")
    for p in placements["q"]:
        if p.is_shard() and p.dim not in allowed:
            supported = "; ".join(f"Shard({d}), the {what}" for d, what in allowed.items())
            raise refuse(op, "q", tensors["q"], f"{p!r} splits a dim attention mixes over (supported: {supported})")
