"""Context parallelism on the CPU: ``ops.ring_attention`` over 2 and 4 gloo processes (torchrun runs
tests/context_parallel_run.py), the sequence sharded by ``ZigzagShards``, against attention over the
whole sequence in one process by the error-ratio rule (eager in the same dtype, and float64): output and
the gradients of q, k and v, causal and full, GQA, lengths the ranks do not divide. Then a patched tiny
Llama trained on sharded sequences (fused loss, the batch's token count) against one process on whole
sequences, alone and under FSDP2 on a (data, context) mesh, and the misuses refused.

The ranks run the eager reference attention on the CPU; the "triton" runs repeat the attention cases
with llama_fast's kernels under Triton's interpreter (float32: its bf16 rounding is fixed only in the
test process, conftest.py).
"""

import json
import os
import subprocess
import sys

import context_parallel_run as runs
import pytest
import torch

from helpers import assert_error_ratio, assert_gradients_error_ratio, load_runs, torchrun, user_env
from llama_fast import references

pytestmark = pytest.mark.system  # several processes (torchrun)

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {"cpu_2": (2, ("attention", "model", "layout", "refusals")), "cpu_4": (4, ("attention", "fsdp2_2d", "layout")),
        "triton_2": (2, ("attention",))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in RUNS}
    script = os.path.join(HERE, "context_parallel_run.py")
    for name, (processes, scenarios) in RUNS.items():
        env = dict(TRITON_INTERPRET="1") if name.startswith("triton") else {}
        torchrun(script, dirs[name], processes, *scenarios, **env)
    found = load_runs(dirs)
    found["eager"] = runs.one_process()
    found["ref"] = runs.one_process(torch.float64)
    return found


def one_process_attention(case, dtype) -> dict[str, torch.Tensor]:
    """Eager attention over the whole sequence in ``dtype``: its output and the gradients of q, k and v."""
    inputs = runs.attention_inputs(case)
    q, k, v = (inputs[n].to(dtype).requires_grad_() for n in "qkv")
    out = references.attention(q, k, v, causal=case[6])
    out.backward(inputs["dout"].to(dtype))
    return dict(out=out.detach(), q=q.grad, k=k.grad, v=v.grad)


ATTENTION = [(run, case) for run in RUNS if "attention" in RUNS[run][1] for case in runs.ATTENTION_CASES
             if not (run.startswith("triton") and case[7] == torch.bfloat16)]


@pytest.mark.parametrize("run,case", ATTENTION, ids=[f"{r}-{c[0]}" for r, c in ATTENTION])
def test_ring_attention_matches_one_process(results, run, case):
    ours = results[run, "attention"]
    assert ours["world"] == RUNS[run][0]
    eager, ref = one_process_attention(case, case[7]), one_process_attention(case, torch.float64)
    for name in ("out", "q", "k", "v"):
        assert ours[case[0]][name].dtype == case[7]
        assert_error_ratio(ours[case[0]][name], eager[name], ref[name], name=f"{run} {case[0]} {name}")


@pytest.mark.parametrize("run", ["cpu_2", "cpu_4"])
def test_zigzag_layout(results, run):
    world = RUNS[run][0]
    for seq_len, found in results[run, "layout"].items():
        if seq_len == "world":
            continue
        # every token once, in order, after the round trip; the shards within a token of each other
        assert torch.equal(found["positions"], torch.arange(seq_len)), seq_len
        assert torch.equal(found["round_trip"], torch.arange(3 * seq_len).view(3, seq_len)), seq_len
        assert sum(found["lengths"]) == seq_len and max(found["lengths"]) - min(found["lengths"]) <= 2, found
        assert len(found["lengths"]) == world


def test_patched_model_on_sharded_sequences(results):
    ours, eager, ref = results["cpu_2", "model"], results["eager"]["model"], results["ref"]["model"]
    layers = runs.base_model().config.num_hidden_layers
    # every layer's attention ran as the ring, once a forward; the loss was the fused one
    assert ours["counts"] == dict(ring_attention=layers, flash_attention=0, linear_cross_entropy=1), ours["counts"]
    assert_error_ratio(ours["loss"].float(), eager["loss"].float(), ref["loss"], name="sharded loss",
                       dtype=torch.float32, floor_scale=8)
    assert_gradients_error_ratio({n: g.float() for n, g in ours["gradients"].items()},
                                 {n: g.float() for n, g in eager["gradients"].items()}, ref["gradients"],
                                 name="sharded gradients")


def test_fsdp2_on_a_data_by_context_mesh(results):
    ours, eager, ref = results["cpu_4", "fsdp2_2d"], results["eager"]["fsdp2_2d"], results["ref"]["fsdp2_2d"]
    assert ours["world"] == 4 and len(ours["losses"]) == runs.STEPS
    assert_error_ratio(torch.tensor(ours["losses"]), torch.tensor(eager["losses"]), torch.tensor(ref["losses"]),
                       name="fsdp2 2-D losses", dtype=torch.float32, floor_scale=8)
    names = sorted(ref["parameters"])
    assert_error_ratio(*(torch.cat([r["parameters"][n].flatten() for n in names]).float() for r in (ours, eager)),
                       torch.cat([ref["parameters"][n].flatten() for n in names]), name="fsdp2 2-D parameters",
                       dtype=torch.float32, floor_scale=8)


REFUSED = {"short_sequence": "ValueError: ZigzagShards: seq_len 3 is shorter than 2 x 2 ranks",
           "length_not_int": "TypeError: ZigzagShards: seq_len must be an int",
           "not_shards": "TypeError: ring_attention: shards must be a ZigzagShards",
           "wrong_shard_length": "ValueError: ring_attention: rank 0 holds 11 tokens of 23",
           "mixed_dtypes": "TypeError: ring_attention: inputs must share one dtype",
           "shard_not_whole": "ValueError: ZigzagShards.shard: dimension 1 of (2, 22) must be the whole sequence",
           "gather_not_mine": "ValueError: ZigzagShards.gather: dimension 1 of (2, 12) must be this rank's 11 tokens",
           "padding_mask": "NotImplementedError: llama_fast attention: context_parallel (ring attention) does not "
                           "implement a padding mask",
           "sliding_window": "NotImplementedError: llama_fast attention: context_parallel (ring attention) does not "
                             "implement sliding_window"}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_misuse_is_refused(results, name):
    found = results["cpu_2", "refusals"][name]
    assert found is not None and found.startswith(REFUSED[name]), found


def test_bench_script_runs(tmp_path):
    """bench/context_parallel.py, for a multi-GPU machine, run as its docstring says on two CPU processes:
    it completes and labels its figures CPU."""
    root = os.path.dirname(HERE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "bench.context_parallel", "--out", str(tmp_path), "--device", "cpu", "--seqs", "64", "--heads", "4", "2",
               "32"]
    done = subprocess.run(command, env=user_env(), capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads((tmp_path / "context_parallel.json").read_text())
    assert found["meta"]["kind"] == "cpu" and found["meta"]["complete"] and found["meta"]["ranks"] == 2
    rows = {(r["provider"], r["mode"]): r for r in found["results"]}
    assert set(rows) == {(p, m) for p in ("ring_attention x2", "flash_attention x1") for m in ("fwd", "fwdbwd")}
    assert all(r["ms"] > 0 and r["seq"] == 64 for r in rows.values())
