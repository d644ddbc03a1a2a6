"""Patched models under the engines people train with, on the CPU: two processes with gloo, launched by
torchrun (tests/distributed_run.py has the runs). Each scenario's losses and final parameters after
a few AdamW steps are compared, by the error-ratio rule, with the same engine and precision in one
process running transformers' own code ("eager") against a float64 run of the same steps.

The two-process runs use the C++ extension's CPU kernels (the default on a CPU; attention is then
the eager reference) for every scenario, and Triton's interpreter (the kernels a GPU runs, flash
attention and the fused loss's included) for the fused loss with lm_head sharded: the interpreter
makes that run about 25 s, the CPU kernels all six take about 10.
"""

import os

import distributed_run as runs
import pytest
import torch

import llama_fast
from helpers import assert_error_ratio, load_runs, torchrun

pytestmark = pytest.mark.system  # several processes (torchrun)

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter runs one scenario (~25 s): FSDP2 with lm_head its own unit, which goes through every
# Triton kernel (attention and the fused loss's included), patched after sharding.
TRITON_SCENARIOS = ("fsdp2_fused_loss",)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{(variant, scenario): result} for the patched two-process runs and the one-process comparisons."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("cpu_kernels", "triton", "eager")}
    script = os.path.join(HERE, "distributed_run.py")
    torchrun(script, dirs["cpu_kernels"], 2)
    torchrun(script, dirs["triton"], 2, "--scenarios", *TRITON_SCENARIOS, TRITON_INTERPRET="1")
    torchrun(script, dirs["eager"], 1, "--unpatched")
    return load_runs(dirs)


def _reference(scenario: str) -> dict:
    """The same steps in float64, one process, no engine, transformers' code."""
    model = runs.base_model(scenario, torch.float64)
    losses = runs.train(model, model.parameters())
    return dict(losses=losses, parameters=runs.full_parameters(model))


CASES = [("cpu_kernels", s) for s in runs.SCENARIOS] + [("triton", s) for s in TRITON_SCENARIOS]


@pytest.mark.parametrize("variant,scenario", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_two_processes_match_one(results, variant, scenario):
    ours, eager, ref = results[variant, scenario], results["eager", scenario], _reference(scenario)
    assert ours["world"] == 2 and eager["world"] == 1
    dtype = torch.bfloat16 if scenario.endswith("bf16") else torch.float32
    name = f"{variant} {scenario}"
    assert_error_ratio(torch.tensor(ours["losses"]), torch.tensor(eager["losses"]), torch.tensor(ref["losses"]),
                       name=f"{name} losses", dtype=dtype, floor_scale=8)
    # The parameters as one vector: after a few Adam steps (each update divides a gradient by its
    # running size) a single parameter's fp32 error is luck, and eager draws a small one for some:
    # patched or not, one process or two, every fp32 run here lands 1-6e-6 from float64 at worst.
    # A wrong gradient moves a parameter by ~LR per step, a thousand times that.
    assert set(ours["parameters"]) == set(ref["parameters"])
    names = sorted(ref["parameters"])
    assert_error_ratio(*(torch.cat([run["parameters"][n].flatten() for n in names]) for run in (ours, eager, ref)),
                       name=f"{name} parameters", dtype=dtype, floor_scale=8)
    # The steps did train: the loss fell and the parameters moved (so equality is not a no-op).
    assert ours["losses"][-1] < ours["losses"][0]


def test_hf_trainer_on_two_processes(tmp_path):
    """transformers' Trainer under torchrun (DDP on gloo): a PEFT LoRA model with gradient
    checkpointing, patched by LlamaFastCallback, trains as the unpatched model does (loss of each
    step and the adapter's weights, against the float64 run, by the rule)."""
    torchrun(os.path.join(HERE, "trainer_run.py"), tmp_path, 2)
    runs_ = torch.load(tmp_path / "trainer.pt")
    ours, eager, ref = runs_["ours"], runs_["eager"], runs_["ref"]
    assert ours["patched"] and not eager["patched"]
    assert ours["wrapped"] == "DistributedDataParallel"
    assert len(ours["losses"]) == len(ref["losses"]) == 3
    assert_error_ratio(torch.tensor(ours["losses"]), torch.tensor(eager["losses"]), torch.tensor(ref["losses"]),
                       name="Trainer losses", floor_scale=8)
    names = sorted(ref["adapter"])
    assert names and all("lora_" in n for n in names)
    assert_error_ratio(*(torch.cat([run["adapter"][n].flatten() for n in names]) for run in (ours, eager, ref)),
                       name="Trainer LoRA weights", floor_scale=8)
    assert ours["moved"] > 1e-3  # the adapter trained


def test_callback_refuses_what_would_do_nothing():
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState, TrainingArguments

    from llama_fast.integrations import LlamaFastCallback
    from models import tiny_model

    with pytest.raises(ValueError, match="every kernel is switched off"):
        LlamaFastCallback(rms_norm=False, rope=False, swiglu=False, attention=False)
    with pytest.raises(TypeError, match="unknown option"):
        LlamaFastCallback(flash=True)
    args, state, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), TrainerControl()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="has no decoder layer of the Llama design"):
        LlamaFastCallback().on_init_end(args, state, control, model=gpt2)
    callback, model = LlamaFastCallback(cross_entropy=True), tiny_model()
    callback.on_init_end(args, state, control, model=model)
    callback.on_train_begin(args, state, control, model=model)  # patched as asked: trains
    llama_fast.patch(model)  # re-patched without the fused loss
    with pytest.raises(RuntimeError, match="re-patched with other options"):
        callback.on_train_begin(args, state, control, model=model)
    with pytest.raises(RuntimeError, match="is not patched by llama_fast"):
        callback.on_train_begin(args, state, control, model=tiny_model())


def test_patch_of_wrapped_models():
    """A DataParallel wrapper (DDP's is checked in the runs above) is looked inside; FSDP1 needs a GPU
    even to wrap, so an instance is made without its constructor to check the refusal."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from models import tiny_model

    inner = tiny_model()
    wrapper = torch.nn.DataParallel(inner)
    assert llama_fast.patch(wrapper) is wrapper and llama_fast.is_patched(inner) and llama_fast.is_patched(wrapper)
    llama_fast.unpatch(wrapper)
    assert not llama_fast.is_patched(inner)
    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fsdp1)
    with pytest.raises(ValueError, match="FSDP1.*patch the model before wrapping"):
        llama_fast.patch(fsdp1)
