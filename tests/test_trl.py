"""TRL's SFTTrainer with LlamaFastCallback: padding-free batches (``padding_free=True``: one row,
position_ids restarting, cu_seq_lens_*, seq_idx) on the patched model train as the same examples
padded on the unpatched model do (each step's loss, by the error-ratio rule against float64), with
and without ``cross_entropy=True``. SFTTrainer (TRL 1.16) computes its loss with its own fused LM
head (``model(..., fused_lm_head=True)``, which also gives its entropy and accuracy metrics),
installed after the Trainer's construction patched the model: its wrapper calls the patched forward
only without ``fused_lm_head``, so llama_fast's fused loss is not called there. Patched the other way
round (TRL's head first, then ``patch``), such calls are still TRL's, and the others get the fused loss.

DPOTrainer and GRPOTrainer (TRL 1.16) install the same head (``add_fused_lm_head``, after the Trainer's
construction, so around the patched forward) and compute every log-probability they train on through it:
DPO for the policy and the reference model, GRPO for the policy's log-probs and entropies (old and new,
``fused_lm_head=True`` with completion-only labels). That head runs the patched backbone (llama_fast's
RMSNorm, RoPE, SwiGLU and attention) and projects through lm_head itself, so llama_fast's fused loss is never
called there, with or without ``cross_entropy=True``, and their losses are TRL's. GRPO's generation
(``model.generate``, no labels) goes through TRL's wrapper to the patched forward, which then is
transformers' and returns the logits the sampler reads. Both trainers' losses, logged metrics and parameter
updates are checked against float64 unpatched runs, by the error-ratio rule."""

import pytest
import torch

import llama_fast
from helpers import assert_error_ratio, assert_gradients_error_ratio
from models import DEVICE, VOCAB, clone, tiny_model, tokens

LENGTHS = (5, 9, 19, 8, 12, 3, 7, 16)


def _tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, words "t0" to "t127" split at spaces:
    SFTTrainer wants one (for the pad token; its examples come tokenized), DPOTrainer and GRPOTrainer
    tokenize text themselves. The special tokens match whole words only: as substrings, "t1" would
    match the start of "t12"."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {role: AddedToken(f"t{i}", single_word=True, special=True)
               for i, role in enumerate(("pad_token", "bos_token", "eos_token", "unk_token"))}
    return PreTrainedTokenizerFast(tokenizer_object=words, **special)


@pytest.mark.parametrize("cross_entropy", [False, True], ids=["kernels", "kernels_and_fused_loss"])
def test_sft_trainer_padding_free(tmp_path, monkeypatch, cross_entropy):
    import datasets  # installed with TRL
    from trl import SFTConfig, SFTTrainer

    from llama_fast import ops
    from llama_fast.integrations import LlamaFastCallback

    fused_calls = []
    fused = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda *a, **kw: fused_calls.append(1) or fused(*a, **kw))

    examples = datasets.Dataset.from_list([{"input_ids": tokens(1, n, seed=20 + i)[0].tolist()}
                                           for i, n in enumerate(LENGTHS)])
    curves, seen = {}, {}
    for name, dtype, padding_free, callbacks in (("ours", torch.float32, True,
                                                  [LlamaFastCallback(cross_entropy=cross_entropy)]),
                                                 ("eager", torch.float32, False, []),
                                                 ("ref", torch.float64, False, [])):
        losses = []

        class Recording(SFTTrainer):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                losses.append(loss.detach().double().cpu())
                return loss

        model = tiny_model(dtype=dtype).train()
        args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=3e-3, padding_free=padding_free, max_length=None, bf16=False,
                         use_cpu=DEVICE.type == "cpu", report_to=[], save_strategy="no", seed=0, logging_steps=1,
                         disable_tqdm=True, dataloader_pin_memory=False)
        trainer = Recording(model=model, args=args, train_dataset=examples, processing_class=_tokenizer(),
                            callbacks=callbacks)
        seen[name] = set(next(iter(trainer.get_train_dataloader())))
        trainer.train()
        assert llama_fast.is_patched(model) == (name == "ours")
        curves[name] = torch.stack(losses)
    assert {"position_ids", "cu_seq_lens_q", "seq_idx"} <= seen["ours"] and "attention_mask" not in seen["ours"]
    assert "attention_mask" in seen["eager"]
    assert fused_calls == []
    assert_error_ratio(curves["ours"], curves["eager"], curves["ref"], name="SFTTrainer loss curve", floor_scale=8)


def test_trl_fused_head_installed_before_patch(monkeypatch):
    from trl.trainer.utils import add_fused_lm_head

    from llama_fast import ops

    base = tiny_model().train()
    ids = tokens(2, 10)
    want = base(input_ids=ids, labels=ids).loss
    model = clone(base)
    add_fused_lm_head(model)
    llama_fast.patch(model, cross_entropy=True, rms_norm=False, rope=False, swiglu=False, attention=False)
    calls = []
    fused = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    trl_out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert calls == [] and trl_out.log_probs.shape == (2, 9)  # TRL's per-token log-probabilities, shifted
    ours = model(input_ids=ids, labels=ids)
    assert calls == [1] and ours.logits is None
    torch.testing.assert_close(trl_out.loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, want, rtol=1e-5, atol=1e-5)


def _text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _spy_heads(monkeypatch):
    """Counters of the calls to llama_fast's fused loss and to TRL's fused head (its chunked log-prob function)."""
    from trl.trainer import utils as trl_utils

    from llama_fast import ops

    calls = {"llama_fast": 0, "trl": 0}
    fused, chunked = ops.linear_cross_entropy, trl_utils._ChunkedLogProbFunction.apply

    def ours(*args, **kwargs):
        calls["llama_fast"] += 1
        return fused(*args, **kwargs)

    def trl(*args):
        calls["trl"] += 1
        return chunked(*args)

    monkeypatch.setattr(ops, "linear_cross_entropy", ours)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", trl)
    return calls


def _train(trainer_class, model, **trainer_kwargs) -> dict:
    """Train ``model`` with ``trainer_class``: each step's loss (as training_step returns it), each step's logged
    metrics (DPO and GRPO add theirs in ``log``) and each parameter's update, final minus initial, in float64
    (the initial values, common to all runs and ~0.1, would hide the updates' errors under the floor)."""
    losses, logs = [], []

    class Recording(trainer_class):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(loss.detach().double().cpu())
            return loss

        def log(self, values, *args, **kwargs):
            super().log(values, *args, **kwargs)
            if "loss" in values:  # a step's log, not the summary at the end of training
                logs.append(dict(values))

    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    trainer = Recording(model=model, **trainer_kwargs)
    trainer.train()
    assert len(logs) == trainer.args.max_steps
    return {"losses": torch.stack(losses), "logs": logs,
            "updates": {n: p.detach().double() - initial[n] for n, p in model.named_parameters()}}


def _compare(runs, ours, what, metrics):
    """Each step's loss, the logged ``metrics`` and the parameter updates of run ``ours`` and "eager" (float32)
    against "ref" (float64), by the error-ratio rule."""
    what = f"{what} ({ours})"
    assert_error_ratio(runs[ours]["losses"].float(), runs["eager"]["losses"].float(), runs["ref"]["losses"],
                       name=f"{what} loss", dtype=torch.float32, floor_scale=8)
    for key in metrics:  # over the steps that log it (GRPO logs rewards at the steps that generate)
        curves = {name: torch.tensor([log[key] for log in run["logs"] if key in log], dtype=torch.float64)
                  for name, run in runs.items()}
        assert curves["ref"].numel(), f"{what}: no step logged {key}"
        assert_error_ratio(curves[ours].float(), curves["eager"].float(), curves["ref"], name=f"{what} {key}",
                           dtype=torch.float32, floor_scale=8)
    assert_gradients_error_ratio(runs[ours]["updates"], runs["eager"]["updates"], runs["ref"]["updates"],
                                 name=f"{what} parameter updates")


# The runs of each trainer test: unpatched in float32 and float64, then patched by LlamaFastCallback with these
# options (one test for both, so that they share the unpatched runs: Triton's interpreter makes each patched
# run take ~10-20 s on two cores)
RUNS = (("eager", torch.float32, None), ("ref", torch.float64, None),
        ("kernels", torch.float32, {}), ("kernels_and_fused_loss", torch.float32, {"cross_entropy": True}))


def _config(config_class, tmp_path, name, **options):
    # Plain SGD: the update is then linear in the gradient, so the updates compare by the rule. Adam's
    # g / sqrt(v) makes an element whose gradient is ~0 move by ~lr in whichever direction its roundings say
    return config_class(output_dir=str(tmp_path / name), optim="sgd", bf16=False, use_cpu=DEVICE.type == "cpu",
                        report_to=[], save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True,
                        dataloader_pin_memory=False, **options)


# (prompt, chosen, rejected) token ids; completions of different lengths, so that the batch is padded on the right
PAIRS = ((5, 17, 40), (60, 9, 33), (81, 2)), ((12, 99), (7, 120, 45, 2), (64, 2))


def test_dpo_trainer(tmp_path, monkeypatch):
    """DPOTrainer on the patched model (and a reference model of other weights, so that the first step's
    log-ratios are not all 0, patched as well) trains as on the unpatched ones, with and without the fused
    loss: losses, DPO's reward and log-prob metrics, and parameter updates, by the rule against float64.
    Every log-prob is TRL's fused head's."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from llama_fast.integrations import LlamaFastCallback

    pairs = datasets.Dataset.from_list([{"prompt": _text(p), "chosen": " " + _text(c), "rejected": " " + _text(r)}
                                        for p, c, r in PAIRS])
    runs = {}
    for name, dtype, options in RUNS:
        model, reference = tiny_model(dtype=dtype).train(), tiny_model(seed=1, dtype=dtype)
        callbacks = []
        if options is not None:
            callbacks = [LlamaFastCallback(**options)]
            # The callback patches the Trainer's model only; a user patches the reference model themselves
            llama_fast.patch(reference, **options)
            calls = _spy_heads(monkeypatch)
        args = _config(DPOConfig, tmp_path, name, per_device_train_batch_size=1, max_steps=2, learning_rate=0.1)
        runs[name] = _train(DPOTrainer, model, ref_model=reference, args=args, train_dataset=pairs,
                            processing_class=_tokenizer(), callbacks=callbacks)
        assert llama_fast.is_patched(model) == llama_fast.is_patched(reference) == (options is not None)
        if options is not None:
            # Two steps, each the policy's forward and the reference's: TRL's head, never llama_fast's fused loss
            assert calls == {"llama_fast": 0, "trl": 4}, name
    margins = [log["rewards/margins"] for log in runs["ref"]["logs"]]
    assert all(abs(m) > 1e-3 for m in margins), margins  # the rewards and their margins carry the policy's log-probs
    for ours in ("kernels", "kernels_and_fused_loss"):
        _compare(runs, ours, "DPOTrainer", ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                            "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                                            "grad_norm"))


def test_grpo_trainer(tmp_path, monkeypatch):
    """GRPOTrainer generating with the patched model (transformers' generate, sampling) and training on its
    completions trains as with the unpatched one, with and without the fused loss. Sampling is seeded (TRL's
    ``set_seed(args.seed)``) and patched, unpatched and float64 models put near-identical probabilities on
    the same draws, so all runs sample the same completions: asserted, so a kernel that changed the
    distribution would show. Two iterations on one generation (``num_iterations=2``): the first step's loss
    is GRPO's with ratio 1 (its value only the advantages', its gradient the log-probs'), the second's is
    clipped ratios of new to old log-probs."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from llama_fast.integrations import LlamaFastCallback

    prompts = datasets.Dataset.from_list([{"prompt": _text(ids)} for ids in ((5, 17, 40), (99, 12))])
    runs, sampled = {}, {}
    for name, dtype, options in RUNS:
        completions = sampled.setdefault(name, [])

        def reward(completion_ids, **kwargs):
            """The mean token id of the completion, scaled to [0, 1): it differs between most completions, so
            that a group's advantages are not all 0."""
            completions.append([list(ids) for ids in completion_ids])
            return [sum(ids) / (VOCAB * max(len(ids), 1)) for ids in completion_ids]

        model = tiny_model(dtype=dtype).train()
        callbacks = []
        if options is not None:
            callbacks = [LlamaFastCallback(**options)]
            calls = _spy_heads(monkeypatch)
        args = _config(GRPOConfig, tmp_path, name, per_device_train_batch_size=4, num_generations=2,
                       max_completion_length=3, num_iterations=2, max_steps=2, learning_rate=0.05)
        runs[name] = _train(GRPOTrainer, model, reward_funcs=reward, args=args, train_dataset=prompts,
                            processing_class=_tokenizer(), callbacks=callbacks)
        assert llama_fast.is_patched(model) == (options is not None)
        if options is not None:
            # Old log-probs at generation, then each step's new ones: TRL's head, never llama_fast's fused loss
            assert calls == {"llama_fast": 0, "trl": 3}, name
        assert sampled[name] == sampled["eager"], name
    assert len(sampled["eager"]) == 1 and len({tuple(ids) for ids in sampled["eager"][0]}) == 4  # four different
    assert abs(runs["ref"]["losses"][1]) > 1e-3  # the second step's loss carries the log-probs
    for ours in ("kernels", "kernels_and_fused_loss"):
        _compare(runs, ours, "GRPOTrainer", ("reward", "reward_std", "entropy", "grad_norm"))
