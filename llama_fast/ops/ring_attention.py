"""``ring_attention``: flash attention over a sequence sharded across a process group (context
parallelism), and ``ZigzagShards``, the layout it shards the sequence in.

Each rank holds its shard's queries, keys and values. The ranks pass their keys and values around the
ring, one neighbour to the next, world − 1 times; at each step a rank attends its queries to the block
it holds (``flash_attention(..., return_lse=True)``) while the next block is on its way (asynchronous
send/recv), and folds the partial result into its running one (``merge_attention``). A rank thus holds
two K/V blocks at a time, never the whole sequence's: P2P rather than an all-gather, which would keep
world blocks per layer for the backward.

Why zigzag: split the sequence into 2·world chunks and give rank r chunks r and 2·world − 1 − r. Under a
causal mask a rank's pair of chunks, against any other rank's pair, is then one full (unmasked) attention
of half the work, and against its own one causal attention over its shard (its chunks are in sequence
order), so every rank does the same work at every step and no kernel needs a causal offset across
shards: the chunk pair decides what is seen, the kernels' own causal rule serves the diagonal. Contiguous
shards would leave rank 0 idle while the last rank attends to everything.

The backward is autograd's through those same calls: each pass of K/V around the ring is an autograd
function whose backward passes the gradient of the block back the other way, so dK and dV reach the
rank that owns the keys, and each partial attention's backward (through out and its lse, which the
merge differentiates) runs llama_fast's backward kernels. The price is memory: autograd keeps every
block a rank received, world blocks per layer, until the backward (a hand-written backward that
re-passes K/V would keep two). The backward's passes wait for each transfer rather than overlapping it.
"""

import torch

from ._checks import check_dtype, check_same_device, check_same_dtype
from .attention import flash_attention
from .merge_attention import merge_attention


class ZigzagShards:
    """A sequence of ``seq_len`` tokens sharded over the ranks of ``group`` (None: the default group)
    for ``ring_attention``: 2·world chunks as even as possible (the first seq_len mod 2·world chunks one
    token longer), rank r holding chunks r and 2·world − 1 − r, in that order. Any seq_len of at least
    2·world tokens.

    ``shard(x, dim)`` takes this rank's tokens from a whole-sequence tensor (input_ids, position_ids,
    labels shifted once over the whole sequence), ``positions()`` are their places in the sequence (the
    position_ids to give the model) and ``gather(x, dim)`` puts the ranks' shards back together.
    """

    def __init__(self, seq_len: int, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZigzagShards: torch.distributed is not initialised (init_process_group first)")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f"ZigzagShards: seq_len must be an int, got {seq_len!r}")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        chunks = 2 * self.world
        if seq_len < chunks:
            raise ValueError(f"ZigzagShards: seq_len {seq_len} is shorter than 2 x {self.world} ranks = {chunks} "
                             "chunks; shard a longer sequence or use fewer ranks")
        self.seq_len = seq_len
        base, extra = divmod(seq_len, chunks)
        bounds = [0]
        for chunk in range(chunks):
            bounds.append(bounds[-1] + base + (chunk < extra))
        self._bounds = bounds
        # P2P ops name peers by their rank in the default group
        self._peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world)]

    def chunks(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (start, end) of rank ``rank``'s two chunks in the sequence."""
        first, second = rank, 2 * self.world - 1 - rank
        return ((self._bounds[first], self._bounds[first + 1]), (self._bounds[second], self._bounds[second + 1]))

    def length(self, rank: int) -> int:
        """How many tokens rank ``rank`` holds."""
        return sum(end - start for start, end in self.chunks(rank))

    def positions(self, device=None) -> torch.Tensor:
        """This rank's tokens' places in the sequence, (length,) int64."""
        (a, b), (c, d) = self.chunks(self.rank)
        return torch.cat((torch.arange(a, b, device=device), torch.arange(c, d, device=device)))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``x``, whose dimension ``dim`` is the whole sequence. Differentiable."""
        if x.dim() == 0 or x.shape[dim] != self.seq_len:
            raise ValueError(f"ZigzagShards.shard: dimension {dim} of {tuple(x.shape)} must be the whole sequence, "
                             f"{self.seq_len} tokens")
        (a, b), (c, d) = self.chunks(self.rank)
        return torch.cat((x.narrow(dim, a, b - a), x.narrow(dim, c, d - c)), dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's shard ``x`` (dimension ``dim`` this rank's tokens), on
        every rank: a collective. Not differentiable (for outputs and evaluation)."""
        import torch.distributed as dist

        dim = dim % x.dim()
        if x.shape[dim] != self.length(self.rank):
            raise ValueError(f"ZigzagShards.gather: dimension {dim} of {tuple(x.shape)} must be this rank's "
                             f"{self.length(self.rank)} tokens")
        longest = max(self.length(r) for r in range(self.world))
        padded = torch.nn.functional.pad(x.detach().movedim(dim, -1), (0, longest - x.shape[dim])).contiguous()
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded, group=self.group)
        whole = [None] * (2 * self.world)
        for rank, piece in enumerate(pieces):
            (a, b), (c, d) = self.chunks(rank)
            whole[rank], whole[2 * self.world - 1 - rank] = piece[..., :b - a], piece[..., b - a:b - a + d - c]
        return torch.cat(whole, -1).movedim(-1, dim)

    def __repr__(self) -> str:
        return f"ZigzagShards(seq_len={self.seq_len}, rank={self.rank}, world={self.world})"


def _exchange(shards: ZigzagShards, send: torch.Tensor, receive: torch.Tensor, towards: int) -> list:
    """Post the send of ``send`` to the neighbour ``towards`` (+1 or −1) and the receive into ``receive``
    from the other one; the works to wait for."""
    import torch.distributed as dist

    world, rank = shards.world, shards.rank
    ops = [dist.P2POp(dist.isend, send, shards._peers[(rank + towards) % world], shards.group),
           dist.P2POp(dist.irecv, receive, shards._peers[(rank - towards) % world], shards.group)]
    return dist.batch_isend_irecv(ops)


class _PassOn(torch.autograd.Function):
    """``block`` to the next rank of the ring; returns the block the previous rank passed on, whose
    transfer is still under way: wait for the works added to ``pending`` before reading it. The
    backward passes the gradient the other way, back to the block's sender."""

    @staticmethod
    def forward(ctx, block, shards, incoming_length, pending):
        ctx.shards, ctx.shape = shards, block.shape
        received = block.new_empty((*block.shape[:-2], incoming_length, block.shape[-1]))
        pending.extend(_exchange(shards, block, received, +1))
        return received

    @staticmethod
    def backward(ctx, grad):
        sent = grad.new_empty(ctx.shape)
        for work in _exchange(ctx.shards, grad.contiguous(), sent, -1):
            work.wait()
        return sent, None, None, None


def _check(q, k, v, shards) -> None:
    op = "ring_attention"
    if not isinstance(shards, ZigzagShards):
        raise TypeError(f"{op}: shards must be a ZigzagShards (how the sequence is split), got {type(shards).__name__}")
    check_dtype(op, q=q, k=k, v=v)
    check_same_dtype(op, q=q, k=k, v=v)
    check_same_device(op, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"{op}: q must be (batch, q_heads, shard_len, head_dim) and k, v one (batch, kv_heads, "
                         f"shard_len, head_dim) shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    mine = shards.length(shards.rank)
    if q.shape[2] != mine or k.shape[2] != mine or q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: rank {shards.rank} holds {mine} tokens of {shards.seq_len} (its zigzag shard), so "
                         f"q and k must be (batch, heads, {mine}, head_dim), got q {tuple(q.shape)}, k "
                         f"{tuple(k.shape)}; queries and keys are the same tokens (no KV cache)")


def ring_attention(q, k, v, shards: ZigzagShards, *, causal: bool = True, softmax_scale: float | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence's keys, the sequence sharded by ``shards``.

    q: (batch, q_heads, shard_len, head_dim), k, v: (batch, kv_heads, shard_len, head_dim), this rank's
    tokens in ``shards``' order (``shards.shard``), GQA as in ``flash_attention``. causal: each token sees
    the tokens before it in the whole sequence and itself; False: every token sees every token.
    Every rank of ``shards.group`` must call it with the same shapes but the sequence dimension (a
    collective). Returns this rank's output, q's shape and dtype (the partial results merge in float32
    and round once). Differentiable in q, k and v; eager only (torch.compile does not trace the
    transfers).
    """
    _check(q, k, v, shards)
    world, rank = shards.world, shards.rank
    if world == 1:
        return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)
    first = shards.chunks(rank)[0]
    first = first[1] - first[0]  # queries of this rank's first chunk: the rows that see no later rank's keys
    block = torch.stack((k, v))  # one message a step: (2, batch, kv_heads, tokens, head_dim)
    out = lse = None
    for step in range(world):
        source = (rank - step) % world  # whose keys ``block`` holds
        pending = []
        if step + 1 < world:
            incoming = _PassOn.apply(block, shards, shards.length((source - 1) % world), pending)
        keys, values = block[0], block[1]
        rows = 0
        if causal and step == 0:
            part = flash_attention(q, keys, values, causal=True, softmax_scale=softmax_scale, return_lse=True,
                                   backend=backend)
        elif causal and source < rank:  # all our queries come after its first chunk and before its second
            length = shards.chunks(source)[0]
            length = length[1] - length[0]
            part = flash_attention(q, keys[:, :, :length], values[:, :, :length], causal=False,
                                   softmax_scale=softmax_scale, return_lse=True, backend=backend)
        elif causal:  # source > rank: only our second chunk's queries, and they come after both of its chunks
            rows = first
            part = flash_attention(q[:, :, first:], keys, values, causal=False, softmax_scale=softmax_scale,
                                   return_lse=True, backend=backend)
        else:
            part = flash_attention(q, keys, values, causal=False, softmax_scale=softmax_scale, return_lse=True,
                                   backend=backend)
        if out is None:
            out, lse = part[0].float(), part[1]
        elif rows:
            tail, tail_lse = merge_attention(out[:, :, rows:], lse[:, :, rows:], *part)
            out, lse = torch.cat((out[:, :, :rows], tail), 2), torch.cat((lse[:, :, :rows], tail_lse), 2)
        else:
            out, lse = merge_attention(out, lse, *part)
        for work in pending:
            work.wait()
        if step + 1 < world:
            block = incoming
    return out.to(q.dtype)
