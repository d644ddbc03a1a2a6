"""The HF Trainer runs of tests/test_distributed.py, under ``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/trainer_run.py OUT`` on the CPU (the Trainer picks gloo there).

Three Trainers in turn, in the same two processes, on the same examples in the same order: a tiny
Llama with a PEFT LoRA adapter, ``gradient_checkpointing=True``, patched by ``LlamaFastCallback``
("ours"); the same unpatched ("eager"); and unpatched in float64 ("ref"). Each step's loss (the mean
over both ranks) and the adapter's weights after the last step go to OUT/trainer.pt from rank 0.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import tiny_model, tokens  # noqa: E402

STEPS = 3
PER_DEVICE = 2
LENGTH = 24


def _examples():
    ids = tokens(PER_DEVICE * 2 * STEPS, LENGTH, seed=7)
    return [{"input_ids": row, "labels": row} for row in ids]


def recording(trainer_class, losses: list):
    """``trainer_class`` appending each step's loss, the mean over the ranks, to ``losses``."""
    import torch.distributed as dist

    class Recording(trainer_class):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            total = loss.detach().double().clone()
            dist.all_reduce(total)
            losses.append(total.item() / dist.get_world_size())
            return loss

    return Recording


def run(variant: str, out: str) -> dict:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from llama_fast import is_patched
    from llama_fast.integrations import LlamaFastCallback

    model = tiny_model(seed=0, dtype=torch.float64 if variant == "ref" else torch.float32).train()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    initial = {name: p.detach().double().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses = []

    args = TrainingArguments(output_dir=os.path.join(out, variant), per_device_train_batch_size=PER_DEVICE,
                             max_steps=STEPS, learning_rate=3e-3, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True, report_to=[],
                             save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True,
                             dataloader_pin_memory=False)
    trainer = recording(Trainer, losses)(model=model, args=args, train_dataset=_examples(),
                        callbacks=[LlamaFastCallback()] if variant == "ours" else [])
    trainer.train()
    assert trainer.args.world_size == dist.get_world_size() == 2, "the Trainer did not train on both processes"
    adapter = {name: p.detach().double().clone() for name, p in model.named_parameters() if p.requires_grad}
    moved = max((adapter[name] - initial[name]).abs().max().item() for name in adapter)
    return dict(losses=losses, adapter=adapter, moved=moved, patched=is_patched(model),
                wrapped=type(trainer.model_wrapped).__name__)


def main() -> None:
    import torch.distributed as dist

    out = sys.argv[1]
    torch.set_num_threads(1)
    results = {variant: run(variant, out) for variant in ("ours", "eager", "ref")}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out, "trainer.pt"))


if __name__ == "__main__":
    main()
