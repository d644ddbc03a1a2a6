"""The DeepSpeed runs of tests/test_deepspeed.py, under ``python -m torch.distributed.run --standalone
--nproc_per_node N tests/deepspeed_run.py OUT [--unpatched]`` on the CPU (DeepSpeed's CPU accelerator,
which picks gloo).

Each scenario trains a tiny Llama for STEPS optimizer steps with transformers' Trainer given a DeepSpeed
config (``TrainingArguments(deepspeed=...)``, the HF Trainer's DeepSpeed integration, as LLaMA-Factory
runs it): ZeRO stage 2 or 3, lm_head tied to the embeddings or not, every weight trained or a PEFT LoRA
adapter (on lm_head too where it is untied), gradient checkpointing with LoRA, bf16 mixed precision.
Patched runs use ``LlamaFastCallback(cross_entropy=True)``: the callback patches the model when the
Trainer is built, before DeepSpeed wraps and partitions it in ``train()``. One scenario instead patches
the model after ``deepspeed.initialize`` partitioned it (``llama_fast.patch`` of the engine).

ZeRO-3 would partition nothing here by default: parameters under ``stage3_param_persistence_threshold``
(1e5 elements) stay whole on every rank, and every weight of the tiny model is smaller. The threshold is
0, so every weight is a shard outside its module's forward, as a real model's are, and the fused loss
must read lm_head's weight inside lm_head's call, where ZeRO-3's hooks gather it (Liger's read it outside
and saw an empty shard: Liger-Kernel #767, #1048). Each run checks the weight is empty outside forward
and records the weight shapes the fused loss was given.

The same file with one process and ``--unpatched`` gives the comparison runs (same engine and precision,
one process, the whole batch: transformers' own code); test_deepspeed.py adds a float64 run without
DeepSpeed. Rank 0 saves each scenario's per-step loss (the mean over ranks: every row has the same number
of tokens and no ignored labels, so that is the global batch's loss) and its trained parameters, gathered
whole, to OUT/<scenario>.pt.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_run import recording  # noqa: E402

from models import clone, tiny_model, tokens  # noqa: E402

STEPS = 3
BATCH = 4  # global: each of two ranks takes two rows
LENGTH = 24
LR = 3e-3
# name: (ZeRO stage, lm_head tied, LoRA, gradient checkpointing, bf16)
SCENARIOS = {
    "zero2": (2, False, False, False, False),
    "zero2_lora_tied": (2, True, True, False, False),
    "zero3": (3, False, False, False, False),
    "zero3_tied": (3, True, False, False, False),
    "zero3_lora_checkpointing": (3, False, True, True, False),
    "zero3_lora_tied": (3, True, True, False, False),
    "zero3_bf16": (3, False, False, False, True),
}
PATCHED_AFTER_INITIALIZE = "zero3_patched_after_initialize"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def examples() -> list[dict]:
    ids = tokens(BATCH * STEPS, LENGTH, seed=7)
    return [{"input_ids": row, "labels": row} for row in ids]


def base_model(tied: bool, lora: bool, dtype=torch.float32):
    """The model a scenario starts from, identical in every run (a LoRA adapter initialised non-zero, so
    that its first step has a gradient through both of its matrices)."""
    model = tiny_model(seed=0, tie_word_embeddings=tied).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = LORA_TARGETS if tied else [*LORA_TARGETS, "lm_head"]
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=targets))
    return model.to(dtype)  # cast after the adapter's initialisation, which draws other values in float64


def reference(scenario: str, out: str) -> dict:
    """A scenario's steps in float64 without DeepSpeed: one process, the whole batch, the same Trainer
    (its AdamW, schedule and clipping), transformers' code. ``clone`` makes the loss float64 too."""
    import llama_fast

    if scenario == PATCHED_AFTER_INITIALIZE:
        model = clone(base_model(tied=False, lora=False), torch.float64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            ids = torch.stack([e["input_ids"] for e in examples()[step * BATCH:(step + 1) * BATCH]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return dict(losses=losses, parameters={n: p.detach().clone() for n, p in model.named_parameters()})
    from transformers import Trainer

    _, tied, lora, checkpointing, _ = SCENARIOS[scenario]
    args = training_arguments(os.path.join(out, scenario), BATCH, gradient_checkpointing=checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False})
    model = clone(base_model(tied, lora), torch.float64)
    losses = []

    class Recording(Trainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(loss.item())
            return loss

    Recording(model=model, args=args, train_dataset=examples()).train()
    assert not llama_fast.is_patched(model)
    return dict(losses=losses, parameters={n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad})


def deepspeed_config(stage: int, bf16: bool) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {"zero_optimization": zero, "bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
            # the Trainer's own torch AdamW: DeepSpeed's CPU Adam is a C++ op it would compile first
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


def training_arguments(out: str, per_device: int, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=per_device, max_steps=STEPS,
                             learning_rate=LR, use_cpu=True, report_to=[], save_strategy="no", seed=0,
                             logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False, **extra)


def trained_parameters(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (ZeRO-3 keeps a shard of each on each rank outside forward)."""
    import deepspeed

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {name: p.detach().double().clone() for name, p in named}


def lm_head_weight(model):
    head = model.get_output_embeddings()
    return getattr(head, "base_layer", head).weight


class FusedLossShapes:
    """Wraps ``llama_fast.ops.linear_cross_entropy`` (the patched model looks it up there at each call)
    to record the shape of the weight each call was given."""

    def __init__(self):
        from llama_fast import ops

        self.shapes, self.inner = [], ops.linear_cross_entropy
        ops.linear_cross_entropy = self

    def __call__(self, hidden, weight, *args, **kwargs):
        self.shapes.append(tuple(weight.shape))
        return self.inner(hidden, weight, *args, **kwargs)


def run_trainer(scenario: str, patched: bool, out: str) -> dict:
    from transformers import Trainer

    from llama_fast import is_patched
    from llama_fast.integrations import LlamaFastCallback

    stage, tied, lora, checkpointing, bf16 = SCENARIOS[scenario]
    world = int(os.environ["WORLD_SIZE"])
    args = training_arguments(os.path.join(out, scenario), BATCH // world, deepspeed=deepspeed_config(stage, bf16),
                              bf16=bf16, gradient_checkpointing=checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False})
    model = base_model(tied, lora)  # after the arguments, as transformers' DeepSpeed integration asks
    losses = []

    trainer = recording(Trainer, losses)(model=model, args=args, train_dataset=examples(),
                        callbacks=[LlamaFastCallback(cross_entropy=True)] if patched else [])
    trainer.train()
    engine = trainer.model_wrapped
    assert type(engine).__name__ == "DeepSpeedEngine" and engine.zero_optimization_stage() == stage
    assert trainer.args.world_size == world
    return dict(losses=losses, parameters=trained_parameters(model), patched=is_patched(model),
                head_numel_outside_forward=lm_head_weight(model).numel())


def run_patched_after_initialize(patched: bool) -> dict:
    """``deepspeed.initialize`` by hand (ZeRO-3, no Trainer), then ``llama_fast.patch`` of the engine it returns:
    the modules are patched in place, their weights already shards."""
    import deepspeed
    import torch.distributed as dist

    import llama_fast

    deepspeed.init_distributed()  # done already where a Trainer ran before
    world = dist.get_world_size()
    model = base_model(tied=False, lora=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    config = {**deepspeed_config(3, False), "train_micro_batch_size_per_gpu": BATCH // world,
              "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "train_batch_size": BATCH}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if patched:
        assert llama_fast.patch(engine, cross_entropy=True) is engine
    rows = BATCH // world
    losses = []
    for step in range(STEPS):
        ids = torch.stack([e["input_ids"] for e in examples()[step * BATCH:(step + 1) * BATCH]])
        mine = ids[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().double().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return dict(losses=losses, parameters=trained_parameters(model), patched=llama_fast.is_patched(model),
                head_numel_outside_forward=lm_head_weight(model).numel())


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--unpatched", action="store_true")
    parser.add_argument("--scenarios", nargs="*", default=[*SCENARIOS, PATCHED_AFTER_INITIALIZE])
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    patched = not args.unpatched
    for scenario in args.scenarios:
        shapes = FusedLossShapes()
        if scenario == PATCHED_AFTER_INITIALIZE:
            result = run_patched_after_initialize(patched)
        else:
            result = run_trainer(scenario, patched, args.out)
        from llama_fast import ops

        ops.linear_cross_entropy = shapes.inner
        if dist.get_rank() == 0:
            result.update(world=dist.get_world_size(), fused_weight_shapes=shapes.shapes)
            torch.save(result, os.path.join(args.out, f"{scenario}.pt"))


if __name__ == "__main__":
    main()
