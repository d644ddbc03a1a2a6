"""The context-parallel runs of tests/test_context_parallel.py, run by torchrun (``python -m
torch.distributed.run --standalone --nproc_per_node N tests/context_parallel_run.py OUT SCENARIO...``) on
the CPU with gloo.

"attention": ``ops.ring_attention`` on each of ATTENTION_CASES, the whole sequence's q, k, v and output
gradient made alike on every rank from one seed and sharded (``ZigzagShards``); rank 0 saves the output
and the gradients of q, k and v put back together (``shards.gather``).

"model": one forward and backward of a patched tiny Llama (fused loss) on this rank's shard of each
sequence, as docs/training.md's recipe: ids and labels shifted once over the whole sequence then
sharded, the shard's positions, the whole batch's count of labelled tokens as ``num_items_in_batch``;
the loss and every gradient summed over the ranks (the ring gives each rank its keys' gradients, the
parameters' gradients are partial sums, as across a data-parallel group).

"fsdp2_2d" (4 processes): STEPS AdamW steps under FSDP2 on a 2 x 2 (data, context) mesh, HSDP: the
parameters sharded over the context ranks and replicated over the data ranks, each data rank taking
half of every batch and each context rank its shard of those rows.

The test process computes the single-process comparisons (``one_process``) and applies the rule.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import clone, tiny_model, tokens  # noqa: E402

# (name, batch, q_heads, kv_heads, seq_len, head_dim, causal, dtype): lengths that 2 and 4 ranks do not
# divide into even chunks (23 over 4 or 8 chunks) and ones they do; GQA and MHA; causal and full
ATTENTION_CASES = (("causal_gqa_23", 2, 4, 2, 23, 16, True, torch.float32),
                   ("causal_mha_32", 1, 2, 2, 32, 16, True, torch.float32),
                   ("full_gqa_19", 1, 4, 1, 19, 16, False, torch.float32),
                   ("causal_gqa_37_bf16", 1, 4, 2, 37, 16, True, torch.bfloat16))
BATCH, LENGTH, STEPS, LR = 4, 23, 3, 3e-3


def attention_inputs(case) -> dict[str, torch.Tensor]:
    """The whole sequence's q, k, v (leaves) and output gradient of a case, alike on every rank."""
    _, batch, q_heads, kv_heads, seq_len, head_dim, _, dtype = case
    gen = torch.Generator().manual_seed(sum(map(ord, case[0])))
    shapes = dict(q=(batch, q_heads, seq_len, head_dim), k=(batch, kv_heads, seq_len, head_dim),
                  v=(batch, kv_heads, seq_len, head_dim), dout=(batch, q_heads, seq_len, head_dim))
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}


def labelled(ids: torch.Tensor) -> torch.Tensor:
    """Labels with some positions ignored (-100), unevenly across rows and shards: the token count matters."""
    labels = ids.clone()
    labels[0, 3:9] = -100
    labels[-1, -5:] = -100
    return labels


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids, labelled(ids)) for ids in (tokens(BATCH, LENGTH, seed=200 + step) for step in range(STEPS))]


def base_model(dtype=torch.float32) -> torch.nn.Module:
    return clone(tiny_model(seed=0), dtype).train()


def one_process(dtype=torch.float32) -> dict:
    """The comparison: the unpatched model on whole sequences in one process, the "model" scenario's first
    batch's loss and gradients, and the "fsdp2_2d" scenario's training."""
    model = base_model(dtype)
    ids, labels = batches()[0]
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    first = dict(loss=loss.detach().double(), gradients={n: p.grad.double().clone()
                                                         for n, p in model.named_parameters()})
    model = base_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, labels in batches():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(model=first, fsdp2_2d=dict(losses=losses, parameters={n: p.detach().double().clone()
                                                                     for n, p in model.named_parameters()}))


def attention(rank: int) -> dict:
    from llama_fast import ops
    from llama_fast.backend import interpreting

    results = {}
    for case in ATTENTION_CASES:
        if interpreting() and case[7] == torch.bfloat16:
            continue  # the interpreter's bf16 rounding differs from a GPU's; the test process fixes it, not this one
        inputs = attention_inputs(case)
        shards = ops.ZigzagShards(case[4])
        q, k, v = (shards.shard(inputs[n], 2).detach().requires_grad_() for n in "qkv")
        out = ops.ring_attention(q, k, v, shards, causal=case[6])
        out.backward(shards.shard(inputs["dout"], 2))
        results[case[0]] = {name: shards.gather(t, 2) for name, t in
                            (("out", out), ("q", q.grad), ("k", k.grad), ("v", v.grad))}
    return results


def sharded_step(model, ids, labels, shards, count):
    """The local loss of one forward on this rank's shard of ``ids`` (labels shifted over whole rows)."""
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    mine = shards.shard(shift)
    positions = shards.positions().expand(ids.shape[0], -1)
    return model(input_ids=shards.shard(ids), position_ids=positions, labels=mine, shift_labels=mine,
                 num_items_in_batch=count, context_parallel=shards).loss


def counting(op, name: str, counts: dict):
    def counted(*args, **kwargs):
        counts[name] += 1
        return op(*args, **kwargs)

    return counted


def model_step(rank: int) -> dict:
    import torch.distributed as dist

    import llama_fast
    from llama_fast import ops

    model = base_model()
    llama_fast.patch(model, cross_entropy=True)
    ids, labels = batches()[0]
    shards = ops.ZigzagShards(LENGTH)
    count = (labels[:, 1:] != -100).sum()
    counts = dict.fromkeys(("ring_attention", "flash_attention", "linear_cross_entropy"), 0)
    for name in counts:  # this process's ops counted: the attention ran as the ring, the loss fused
        setattr(ops, name, counting(getattr(ops, name), name, counts))
    loss = sharded_step(model, ids, labels, shards, count)
    loss.backward()
    dist.all_reduce(loss := loss.detach().double())
    gradients = {}
    for name, p in model.named_parameters():
        dist.all_reduce(grad := p.grad.double())
        gradients[name] = grad
    return dict(loss=loss, gradients=gradients, counts=counts)


def fsdp2_2d(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import llama_fast
    from llama_fast import ops

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "context"))
    model = base_model()
    llama_fast.patch(model, cross_entropy=True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)  # 2-D: replicated over "data", sharded over "context" (HSDP)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    shards = ops.ZigzagShards(LENGTH, mesh.get_group("context"))
    rows = BATCH // mesh.size(0)
    data_rank = mesh.get_local_rank("data")
    losses = []
    for ids, labels in batches():
        count = (labels[:, 1:] != -100).sum()  # the whole batch's, over both data ranks
        mine = slice(data_rank * rows, (data_rank + 1) * rows)
        loss = sharded_step(model, ids[mine], labels[mine], shards, count)
        # FSDP2 averages the gradients over its 4 ranks; the batch's gradient is their sum
        (loss * dist.get_world_size()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss := loss.detach().double())
        losses.append(loss.item())
    parameters = {name: p.full_tensor().detach().double().clone() for name, p in model.named_parameters()}
    return dict(losses=losses, parameters=parameters)


def layout(rank: int) -> dict:
    """Each rank's positions, and a whole sequence sharded and gathered back, for several lengths."""
    from llama_fast import ops

    found = {}
    for seq_len in (8, 23, 37, 64):
        shards = ops.ZigzagShards(seq_len)
        whole = torch.arange(seq_len * 3).view(3, seq_len)
        found[seq_len] = dict(positions=shards.gather(shards.positions()[None], 1)[0],
                              round_trip=shards.gather(shards.shard(whole, -1), -1),
                              lengths=[shards.length(r) for r in range(shards.world)])
    return found


def refusals(rank: int) -> dict:
    """The message of each misuse's error, by name (None where nothing was raised)."""
    import llama_fast
    from llama_fast import ops
    from models import family_model

    shards = ops.ZigzagShards(LENGTH)
    mine = shards.length(rank)
    q = torch.randn(1, 2, mine, 16)
    attempts = dict(
        short_sequence=lambda: ops.ZigzagShards(2 * shards.world - 1),
        length_not_int=lambda: ops.ZigzagShards(23.0),
        not_shards=lambda: ops.ring_attention(q, q, q, LENGTH),
        wrong_shard_length=lambda: ops.ring_attention(q[:, :, 1:], q[:, :, 1:], q[:, :, 1:], shards),
        mixed_dtypes=lambda: ops.ring_attention(q, q.half(), q.half(), shards),
        shard_not_whole=lambda: shards.shard(torch.zeros(2, LENGTH - 1)),
        gather_not_mine=lambda: shards.gather(torch.zeros(2, mine + 1)))
    ids = tokens(2, LENGTH, seed=7)
    llama = llama_fast.patch(base_model())
    padding = torch.ones(2, mine, dtype=torch.long)
    padding[0, 0] = 0
    attempts["padding_mask"] = lambda: llama(input_ids=shards.shard(ids), attention_mask=padding,
                                             position_ids=shards.positions()[None], context_parallel=shards)
    mistral = llama_fast.patch(family_model("mistral"))  # every layer a sliding window
    attempts["sliding_window"] = lambda: mistral(input_ids=shards.shard(ids), position_ids=shards.positions()[None],
                                                 context_parallel=shards)
    found = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            found[name] = None
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as error:
            found[name] = f"{type(error).__name__}: {error}"
    return found


SCENARIOS = dict(attention=attention, model=model_step, fsdp2_2d=fsdp2_2d, layout=layout, refusals=refusals)


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the ranks share the CI machine's two cores
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for scenario in args.scenarios:
        result = SCENARIOS[scenario](rank)
        if rank == 0:
            result["world"] = dist.get_world_size()
            torch.save(result, os.path.join(args.out, f"{scenario}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
