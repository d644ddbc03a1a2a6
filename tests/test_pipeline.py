"""Patched models under pipeline parallelism (``torch.distributed.pipelining``) on the CPU: two stages on two
gloo processes launched by torchrun (tests/pipeline_run.py has the runs and the way the model is split),
with GPipe and 1F1B schedules, the loss fused into the last stage or computed from its logits. Each run's
losses, first gradients and final parameters are compared by the error-ratio rule with the same steps
without pipelining in one process, unpatched, in float32 ("eager") and float64.

The order matters, as in tests/pipeline_run.py: patch the whole model, then split it. Two other orders
are refused, loudly, and checked here: patching a first stage after the split (its final norm is an
identity, not an RMSNorm), and running a ``copy.deepcopy`` of a model patched with the fused loss (the
copy's forward belongs to the original's lm_head) without patching the copy again.
"""

import copy
import os

import pipeline_run as runs
import pytest
import torch

import llama_fast
from helpers import assert_error_ratio, assert_gradients_error_ratio, load_runs, torchrun

pytestmark = pytest.mark.system  # several processes (torchrun)

HERE = os.path.dirname(os.path.abspath(__file__))
TRITON_SCENARIOS = ("1f1b_fused",)  # the kernels a GPU runs, under the interpreter


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("cpu_kernels", "triton")}
    script = os.path.join(HERE, "pipeline_run.py")
    torchrun(script, dirs["cpu_kernels"], 2)
    torchrun(script, dirs["triton"], 2, "--scenarios", *TRITON_SCENARIOS, TRITON_INTERPRET="1")
    found = load_runs(dirs)
    found["eager"] = runs.train(runs.base_model())
    found["ref"] = runs.train(runs.base_model(torch.float64))
    return found


CASES = [("cpu_kernels", s) for s in runs.SCENARIOS] + [("triton", s) for s in TRITON_SCENARIOS]


@pytest.mark.parametrize("variant,scenario", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_pipeline_matches_one_process(results, variant, scenario):
    ours, eager, ref = results[variant, scenario], results["eager"], results["ref"]
    name = f"{variant} {scenario}"
    assert ours["world"] == 2 and len(ours["losses"]) == runs.STEPS
    first, last = ours["counts"]
    # Each stage ran llama_fast's kernels on its own layers; the fused loss ran on the last stage only, once per
    # microbatch and step (never with the logits variant)
    assert first["swiglu"] > 0 and last["swiglu"] > 0 and first["linear_cross_entropy"] == 0, ours["counts"]
    fused_calls = runs.STEPS * runs.MICROBATCHES if scenario.endswith("fused") else 0
    assert last["linear_cross_entropy"] == fused_calls, ours["counts"]
    assert_error_ratio(torch.tensor(ours["losses"]), torch.tensor(eager["losses"]), torch.tensor(ref["losses"]),
                       name=f"{name} losses", dtype=torch.float32, floor_scale=8)
    assert set(ours["gradients"]) == set(ref["gradients"]) == set(ours["parameters"])
    assert_gradients_error_ratio(ours["gradients"], eager["gradients"], ref["gradients"], name=f"{name} gradients")
    names = sorted(ref["parameters"])
    assert_error_ratio(*(torch.cat([run["parameters"][n].flatten() for n in names]) for run in (ours, eager, ref)),
                       name=f"{name} parameters", dtype=torch.float32, floor_scale=8)
    assert ours["losses"][-1] < ours["losses"][0]


def test_patching_a_first_stage_after_the_split_is_refused():
    model = runs.base_model()
    runs.split(model, 0, 2)
    with pytest.raises(ValueError, match="norm"):
        llama_fast.patch(model)


def test_deep_copy_of_a_fused_loss_model_is_refused_until_patched_again():
    from models import tokens

    model = runs.base_model()
    llama_fast.patch(model, cross_entropy=True)
    twin = copy.deepcopy(model)
    ids = tokens(2, 8, seed=5)
    with pytest.raises(RuntimeError, match="deepcopy"):
        twin(input_ids=ids, labels=ids)
    llama_fast.patch(twin, cross_entropy=True)
    torch.testing.assert_close(twin(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
