"""The pipeline-parallel training runs of tests/test_pipeline.py, run by torchrun (``python -m
torch.distributed.run --standalone --nproc_per_node 2 tests/pipeline_run.py OUT``) on the CPU with gloo.

Each scenario trains a tiny Llama (tests/models.py, LAYERS decoder layers) patched by llama_fast for
STEPS AdamW steps under ``torch.distributed.pipelining``: two stages, one per rank, each global batch
of BATCH rows cut by the schedule into MICROBATCHES microbatches, with ``ScheduleGPipe`` or
``Schedule1F1B``. Every example has the same number of tokens and no ignored labels, so the mean of
the microbatches' mean losses is the global batch's loss, and the gradient the schedule accumulates
(each microbatch's divided by MICROBATCHES, its ``scale_grads``) is the global batch's.

The split, transformers' own convention (transformers.distributed.pipeline_parallel,
``apply_pipeline_parallelism``): each rank builds the whole model, patches it, then replaces what its
stage does not own by a ``PipelineIdentityLayer`` in place: the decoder layers of the other stage,
and the final norm and lm_head on the first stage, embed_tokens on the last. The layers keep their
indices, so each parameter keeps its name in the whole model. In that order (patch, then split) the
fused loss works: lm_head is the module patch() gave the fused forward. Two other orders do not (see
tests/test_pipeline.py's docstring): patching a first stage after the split (its norm is then an
identity, which patch() refuses), and splitting by ``copy.deepcopy`` of a model patched with
``cross_entropy=True`` (the copy's causal-LM forward still refers to the original's lm_head).

The first stage runs the backbone (``model.model``, its final norm an identity) on the input ids; the
last stage runs the causal LM's forward with the received hidden states as ``inputs_embeds``:

- fused (``patch(cross_entropy=True)``): the labels must be inside the last stage's forward, where the
  patched causal-LM forward asks lm_head for the fused loss, but ``schedule.step`` gives its positional
  arguments only to the first stage and ``target`` only to ``loss_fn``. So the labels are a second
  input of the first stage, cut into microbatches with the ids, which the first stage hands on
  unchanged as a second output (an integer tensor: no gradient goes back for it). Each microbatch's
  labels thus travel with its own hidden states, whatever order a schedule runs microbatches in. The
  last stage returns the loss and ``loss_fn`` returns its output as it is. The schedule is given the
  labels as ``target`` too, unused: a schedule with a ``loss_fn`` indexes the target's microbatches
  on the last stage (torch 2.14), and fails without one.

Each stage is built with the shapes of one microbatch's inputs and outputs (``example_args``), so the
schedule does not infer them by a forward of placeholder inputs at its first step: a fused last stage
would run that forward's loss on uninitialized labels.
- logits (``patch()``): the last stage returns the logits, and ``loss_fn`` is transformers' causal-LM
  loss of them against ``target``, the labels the schedule cuts into microbatches for it.

Rank 0 saves each scenario's global loss per step, the gradients of the first step and the parameters
after the last step (each rank's stage, gathered by name), and per rank the number of calls of a few
``llama_fast.ops`` entry points (wrapped here: the patched forwards look them up at call time), to
OUT/<scenario>.pt.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import clone, tiny_model, tokens  # noqa: E402

STEPS = 4
BATCH = 8
MICROBATCHES = 4  # two rows each
LENGTH = 24
LAYERS = 4  # two per stage
LR = 3e-3
SCHEDULES = ("gpipe", "1f1b")
SCENARIOS = tuple(f"{schedule}_{loss}" for loss in ("fused", "logits") for schedule in SCHEDULES)
COUNTED = ("linear_cross_entropy", "swiglu", "rms_norm")  # the llama_fast.ops entry points whose calls are counted


def batches() -> list[torch.Tensor]:
    return [tokens(BATCH, LENGTH, seed=200 + step) for step in range(STEPS)]


def base_model(dtype=torch.float32) -> torch.nn.Module:
    """The model every run starts from: identical on every rank and in every comparison run."""
    # clone: a float64 model computes its loss in float64 too (models.float64_loss)
    return clone(tiny_model(seed=0, num_hidden_layers=LAYERS), dtype).train()


def train(model) -> dict:
    """The runs without pipelining (eager and float64, one process, whole batches): the loss of each
    step, the first step's gradients and the parameters after the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first_gradients = [], None
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_gradients is None:
            first_gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, gradients=first_gradients, parameters=parameters(model))


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().clone() for name, p in model.named_parameters()}


def split(model, stage: int, stages: int) -> None:
    """Keep in ``model`` (a whole causal LM) only what pipeline stage ``stage`` of ``stages`` runs,
    as transformers' ``apply_pipeline_parallelism`` does: the rest becomes identities, in place."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    layers = model.model.layers
    per_stage = len(layers) // stages
    for index in range(len(layers)):
        if index // per_stage != stage:
            layers[index] = PipelineIdentityLayer()
    if stage != 0:
        model.model.embed_tokens = PipelineIdentityLayer()
    if stage != stages - 1:
        model.model.norm = PipelineIdentityLayer()
        model.lm_head = PipelineIdentityLayer()


class FirstStage(torch.nn.Module):
    """The backbone up to the stage's last layer (its final norm an identity): the hidden states, and
    the labels handed on where the last stage needs them."""

    def __init__(self, causal_lm, pass_labels: bool):
        super().__init__()
        self.causal_lm, self.pass_labels = causal_lm, pass_labels

    def forward(self, input_ids, labels=None):
        hidden = self.causal_lm.model(input_ids=input_ids).last_hidden_state
        return (hidden, labels) if self.pass_labels else hidden


class LastStage(torch.nn.Module):
    """The rest of the causal LM from the received hidden states: the patched forward's fused loss
    when given the labels, the logits otherwise."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, hidden, labels=None):
        out = self.causal_lm(inputs_embeds=hidden, labels=labels)
        if labels is None:
            return out.logits
        assert out.logits is None, "the patched forward returned logits: the fused loss did not run"
        return out.loss


def example_args(config, first: bool, fused: bool) -> tuple[tuple, tuple]:
    """The inputs and outputs of one microbatch of a stage, as ``PipelineStage`` takes them: with both
    given and no DTensors, the schedule's metadata is static (torch 2.14's ``InferenceMode.STATIC``)
    and no stage runs a forward on placeholder inputs to infer it. Inferred, a fused last stage would
    run its loss on uninitialized labels (``torch.empty``), which the fused loss refuses as outside
    the vocabulary."""
    rows = BATCH // MICROBATCHES
    ids = torch.zeros(rows, LENGTH, dtype=torch.long)
    hidden = torch.zeros(rows, LENGTH, config.hidden_size, requires_grad=True)  # its gradient goes back
    if first:
        return ((ids, ids), (hidden, ids)) if fused else ((ids,), (hidden,))
    if fused:
        return (hidden, ids), (torch.zeros(()),)
    return (hidden,), (torch.zeros(rows, LENGTH, config.vocab_size),)


def count_calls(counts: dict) -> None:
    """Wrap COUNTED in llama_fast.ops, counting their calls in ``counts``."""
    from llama_fast import ops

    for name in COUNTED:
        original = getattr(ops, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(ops, name, counted)


def run(scenario: str, rank: int, world: int, counts: dict) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    import llama_fast

    schedule_name, loss_kind = scenario.split("_")
    fused = loss_kind == "fused"
    model = base_model()
    llama_fast.patch(model, cross_entropy=fused)  # the whole model, then the split: see the docstring
    split(model, rank, world)
    last = rank == world - 1
    module = LastStage(model) if last else FirstStage(model, pass_labels=fused)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), *example_args(model.config, rank == 0, fused))

    def loss_fn(output, target):
        if fused:
            return output  # the last stage's output is the fused loss already
        return model.loss_function(logits=output, labels=target, vocab_size=model.config.vocab_size)

    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = schedule_class(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for key in counts:
        counts[key] = 0
    losses, first_gradients = [], None
    for ids in batches():
        microbatch_losses = []
        if rank == 0:
            schedule.step(*((ids, ids) if fused else (ids,)), return_outputs=False)
        else:
            schedule.step(target=ids, losses=microbatch_losses, return_outputs=False)
        if first_gradients is None:
            first_gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if last:
            assert len(microbatch_losses) == MICROBATCHES
            losses.append(torch.stack([loss.detach().double() for loss in microbatch_losses]).mean().item())
    return dict(losses=losses, gradients=first_gradients, parameters=parameters(model), counts=dict(counts))


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "two stages, one per rank"
    counts = dict.fromkeys(COUNTED, 0)
    count_calls(counts)
    for scenario in args.scenarios:
        mine = run(scenario, rank, world, counts)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            result = dict(world=world, losses=gathered[-1]["losses"], counts=[g["counts"] for g in gathered],
                          gradients={}, parameters={})
            for stage in gathered:  # the stages' own parameters: a stage's identities hold none
                result["gradients"].update(stage["gradients"])
                result["parameters"].update(stage["parameters"])
            torch.save(result, os.path.join(args.out, f"{scenario}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
