"""``python -m llama_fast train``: the LoRA fine-tuning example, run as a user runs it.

Two commands, as subprocesses in a new shell's environment (no TRITON_INTERPRET): one process with
``--compare`` (unpatched, then patched, from the same seed and data), and two processes under
torchrun (DDP over gloo) with packed batches and the fused loss. Both start at once: loading the
model is single-threaded Python (about 40 s when the GGUF file is converted, a few seconds from the
copy demo.load_model keeps), which side by side costs the module less on two cores. Then the data
functions on their own: that the labels mask the prompt and the padding, packing, and each rank's share of the data.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import user_env
from llama_fast import train

pytestmark = pytest.mark.system  # torchrun, as the README writes it

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--steps", "3", "--max-length", "96", "--batch-size", "2"]
DDP = ["--steps", "2", "--max-length", "96", "--batch-size", "2", "--packing", "--fused-loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"single": (returncode, log, report), "ddp": ...} of the two commands, run side by side."""
    out = tmp_path_factory.mktemp("train")
    commands = {
        "single": ["-m", "llama_fast", "train", *SHORT, "--compare", "--out", str(out / "single")],
        "ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llama_fast", "train", *DDP, "--out", str(out / "ddp")],
    }
    # Three processes on two cores: one thread each (torchrun sets the same for its ranks), or idle
    # OpenMP threads spin for a core another process needs.
    env = user_env(OMP_NUM_THREADS="1")
    procs = {}
    for name, args in commands.items():
        log = open(out / f"{name}.log", "w")  # a file, not a pipe: neither run can block on a full pipe
        procs[name] = (subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True), log)
    results = {}
    for name, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks with it
            code = proc.wait()
        log.close()
        report = out / name / "train.json"
        results[name] = (code, (out / f"{name}.log").read_text(),
                         json.loads(report.read_text()) if report.exists() else None)
    return results, out


def _finished(runs, name):
    code, log, report = runs[0][name]
    assert code == 0 and report is not None, log[-4000:]
    return log, report


def test_single_process_compare(runs):
    """Both runs trained on the same batches, their figures are written and printed, the patched one
    ran llama_fast's CPU kernels, and it computes the same losses as transformers' code."""
    log, report = _finished(runs, "single")
    assert (runs[1] / "single" / "loss.png").stat().st_size > 10_000
    assert report["world_size"] == 1 and report["device"] == "CPU"
    assert 0 < report["target_tokens"] < report["tokens"], "the prompts must be masked, the responses kept"
    unpatched, patched = report["runs"]["unpatched"], report["runs"]["patched"]
    assert patched["backends"] == {"rms_norm": "cpu", "rope": "cpu", "swiglu": "cpu", "attention": "reference"}
    assert unpatched["backends"] is None
    for run in (unpatched, patched):
        assert len(run["losses"]) == 3 and all(math.isfinite(x) and 0 < x < 20 for x in run["losses"])
        assert run["tokens_per_s"] > 0 and run["peak_memory_bytes"] > run["peak_memory_training_bytes"] > 0
        assert run["parameter_change_norms"][0] > 0, "AdamW steps must move the LoRA weights"
    assert unpatched["step_tokens"] == patched["step_tokens"], "both runs must see the same batches"
    # fp32, the same weights and batches: rounding differences only, a little larger once AdamW has
    # normalised the gradients by their own magnitudes.
    assert abs(patched["losses"][0] - unpatched["losses"][0]) <= 1e-5 * unpatched["losses"][0]
    for a, b in zip(unpatched["losses"], patched["losses"]):
        assert abs(a - b) <= 1e-3 * a, (unpatched["losses"], patched["losses"])
    for text in ("transformers (unpatched)", "llama_fast.patch", "tokens/s (CPU)", "peak memory (CPU: process RSS)",
                 "speed-up of llama_fast.patch", "No GPU: these are CPU figures"):
        assert text in log, log[-4000:]


def test_torchrun_two_processes(runs):
    """DDP on gloo: each rank trained on its own data (different losses), and after the last step both
    hold the same LoRA weights, which moved: what DDP's gradient all-reduce guarantees."""
    log, report = _finished(runs, "ddp")
    assert (runs[1] / "ddp" / "loss.png").stat().st_size > 10_000
    assert report["world_size"] == 2 and report["options"]["packing"] and report["options"]["fused_loss"]
    run = report["runs"]["patched"]
    assert run["fused_loss"] and run["backends"]["attention"] == "reference"
    rank0, rank1 = run["rank_losses"]
    assert len(rank0) == len(rank1) == 2 and all(math.isfinite(x) for x in rank0 + rank1)
    assert rank0 != rank1, "the ranks must train on different shards of the data"
    assert run["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(rank0, rank1)], rel=1e-6)
    digests, moved = run["parameter_digests"], run["parameter_change_norms"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks' LoRA weights differ after DDP training"
    assert min(moved) > 0
    assert run["tokens_per_s"] > 0 and len(run["peak_memory_per_rank"]) == 2
    assert "tokens/s (CPU), 2 processes" in log and "fused with lm_head" in log
    assert log.count("SFT with LoRA") == 1, "only rank 0 prints"


# ---------------------------------------------------------------------------------------------
# The data functions, with a byte-level tokenizer (one token per byte, so decoding gives back the
# exact text) and a ChatML template like SmolLM2's, default system prompt included.

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe helpful."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def test_labels_mask_the_prompt(tokenizer):
    prompt = ("<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
              "<|im_start|>assistant\n")
    e = train.encode(tokenizer, "Name a colour.", "Teal.", max_length=1000)
    ids, labels = e["input_ids"], e["labels"]
    assert len(ids) == len(labels)
    n = labels.index(next(x for x in labels if x != -100))
    assert tokenizer.decode(ids[:n]) == prompt and all(x == -100 for x in labels[:n])
    assert labels[n:] == ids[n:], "every token after the prompt is a target, equal to the input"
    assert tokenizer.decode(ids[n:]) == "Teal.<|im_end|>\n"
    cut = train.encode(tokenizer, "Name a colour.", "Teal.", max_length=n + 2)
    assert cut["input_ids"] == ids[:n + 2] and cut["labels"] == labels[:n + 2]
    assert train.encode(tokenizer, "Name a colour.", "Teal.", max_length=n) is None, "no target left: dropped"


def test_padding_and_packing_keep_the_same_targets(tokenizer):
    examples = [train.encode(tokenizer, q, a, 1000) for q, a in [("Hi?", "Hello there."), ("2+2?", "4")]]
    padded = train.pad_batch(examples, tokenizer.pad_token_id)
    short = len(examples[1]["input_ids"])
    assert padded["attention_mask"][1].tolist() == [1] * short + [0] * (padded["input_ids"].shape[1] - short)
    assert (padded["labels"][1, short:] == -100).all()
    packed = train.pack_batch(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [*range(lengths[0]), *range(lengths[1])]
    targets = torch.cat([row[row != -100] for row in padded["labels"]])
    assert torch.equal(packed["labels"][packed["labels"] != -100], targets)


def test_each_rank_takes_its_own_share():
    """Per step the ranks' examples are disjoint, together they are what one process with the whole
    global batch takes, and no example repeats within an epoch."""
    steps, batch = 7, 3
    ranks = [list(train.batch_indices(20, batch, steps, seed=0, rank=r, world=2)) for r in (0, 1)]
    whole = list(train.batch_indices(20, 2 * batch, steps, seed=0))
    for step in range(steps):
        assert ranks[0][step] + ranks[1][step] == whole[step]
    first_epoch = [i for step in whole[:3] for i in step]
    assert len(set(first_epoch)) == 18
    with pytest.raises(ValueError, match="more than"):
        next(train.batch_indices(5, 3, 1, seed=0, world=2))
