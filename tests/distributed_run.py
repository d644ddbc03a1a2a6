"""The training runs of tests/test_distributed.py, run by torchrun (``python -m torch.distributed.run
--standalone --nproc_per_node N tests/distributed_run.py OUT [--unpatched]``) on the CPU with gloo.

Each scenario trains a tiny Llama (tests/models.py) for STEPS AdamW steps on the same global batches
through one of the engines users train with: DDP, FSDP2 (``fully_shard`` per decoder layer and at
the root) with and without activation checkpointing and with bf16 mixed precision, and the fused
linear + cross-entropy with lm_head sharded and trainable, untied and tied. Each rank takes its
slice of every batch; every example has the same number of tokens and no ignored labels, so the
mean of the ranks' losses is the global batch's loss and the gradients the engines average are
the global batch's. DDP and the fused-loss scenarios patch with ``cross_entropy=True``. Rank 0
saves each step's global loss and the parameters after the last step (gathered whole) to
OUT/<scenario>.pt.

The same file run with one process and ``--unpatched`` gives the comparison runs: the same engine
and precision in one process, transformers' own code. The test process adds the float64 run
(``train`` below, with no engine) and compares by the error-ratio rule.

The patched runs patch in both orders: before wrapping (FSDP2 except one), and after (DDP's
``patch`` of the wrapped model; FSDP2's fused-loss case, patched after sharding).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import clone, tiny_model, tokens  # noqa: E402

STEPS = 4
BATCH = 4  # global: each of two ranks takes two rows
LENGTH = 24
LR = 3e-3
SCENARIOS = ("ddp", "fsdp2", "fsdp2_checkpointing", "fsdp2_bf16", "fsdp2_fused_loss", "fsdp2_fused_loss_tied")


def batches() -> list[torch.Tensor]:
    return [tokens(BATCH, LENGTH, seed=100 + step) for step in range(STEPS)]


def base_model(scenario: str, dtype=torch.float32) -> torch.nn.Module:
    """The model a scenario starts from: identical on every rank and in every comparison run."""
    # clone: a float64 model computes its loss in float64 too (models.float64_loss)
    return clone(tiny_model(seed=0, tie_word_embeddings=scenario.endswith("_tied")), dtype).train()


def train(model, optimizer_params, rank: int = 0, world: int = 1, all_reduce=None) -> list[float]:
    """STEPS AdamW steps on this rank's rows of each global batch; the global loss of each step."""
    optimizer = torch.optim.AdamW(optimizer_params, lr=LR)
    rows = BATCH // world
    losses = []
    for ids in batches():
        mine = ids[rank * rows:(rank + 1) * rows]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().double()
        if all_reduce is not None:
            all_reduce(value)
        losses.append(value.item() / world)
    return losses


def full_parameters(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().clone()
            for name, p in model.named_parameters()}


def run(scenario: str, patched: bool, rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import llama_fast

    model = base_model(scenario)
    fused = scenario == "ddp" or scenario.startswith("fsdp2_fused_loss")

    def patch(m):
        if patched:
            llama_fast.patch(m, cross_entropy=fused)

    if scenario == "ddp":
        wrapped = DistributedDataParallel(model)
        patch(wrapped)  # patch() of the wrapper patches the model it runs
    else:
        if scenario == "fsdp2_checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not scenario == "fsdp2_fused_loss":
            patch(model)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if scenario == "fsdp2_bf16" else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        if scenario == "fsdp2_fused_loss":
            fully_shard(model.lm_head, mp_policy=policy)  # its own unit: gathered by its own hooks
        fully_shard(model, mp_policy=policy)
        if scenario == "fsdp2_fused_loss":
            patch(model)  # after sharding
        wrapped = model
    losses = train(wrapped, model.parameters(), rank, world, lambda t: dist.all_reduce(t))
    return dict(losses=losses, parameters=full_parameters(model))


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--unpatched", action="store_true")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for scenario in args.scenarios:
        result = run(scenario, not args.unpatched, rank, world)
        if rank == 0:
            result["world"] = world
            torch.save(result, os.path.join(args.out, f"{scenario}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
