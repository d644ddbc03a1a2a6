"""The fused loss (``patch(cross_entropy=True)``) where users run it: transformers' Trainer with its
default arguments (``remove_unused_columns=True`` keeps only the columns named in the model's
forward signature), packed batches from ``DataCollatorWithFlattening``, PEFT models, evaluation and
``Trainer.predict`` (logits, never losses, reach ``compute_metrics``), and the per-call choice
``skip_logits``. Each against the unpatched model (error-ratio rule, float64 reference)."""

import inspect

import pytest
import torch

import llama_fast
from helpers import assert_error_ratio
from models import DEVICE, clone, tiny_model, tokens

# The fused loss alone: the interpreter runs it fast, and the other kernels have their own tests.
LOSS_ONLY = dict(rms_norm=False, rope=False, swiglu=False, attention=False)


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of calls of llama_fast's fused loss, as a one-element list."""
    from llama_fast import ops

    calls = [0]
    fused = ops.linear_cross_entropy

    def counted(*args, **kwargs):
        calls[0] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(ops, "linear_cross_entropy", counted)
    return calls


def test_forward_keeps_the_signature_the_trainer_reads():
    """transformers' Trainer keeps the dataset columns named in ``inspect.signature(model.forward)``
    and passes ``num_items_in_batch`` only to a forward with ``**kwargs``."""
    model = tiny_model()
    expected = inspect.signature(model.forward)
    assert "input_ids" in expected.parameters
    llama_fast.patch(model, cross_entropy=True)
    assert inspect.signature(model.forward) == expected
    assert model.forward.__name__ == "forward"
    llama_fast.unpatch(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)


def test_peft_model_keeps_the_signature():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    expected = inspect.signature(lora.get_base_model().forward)
    llama_fast.patch(lora, cross_entropy=True)
    assert inspect.signature(lora.get_base_model().forward) == expected


def test_labels_passed_by_position_are_fused():
    """``labels`` is the class's sixth positional parameter: given there, it is the fused loss too."""
    base = tiny_model()
    ids = tokens(2, 9)
    names = list(inspect.signature(base.forward).parameters)
    position = names.index("labels")
    args = [ids] + [None] * (position - 1) + [ids]
    patched = llama_fast.patch(clone(base), cross_entropy=True, **LOSS_ONLY).train()
    out = patched(*args)
    assert out.logits is None
    want = base.train()(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    as_tuple = patched(input_ids=ids, labels=ids, return_dict=False)  # transformers' tuple, without the logits
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0
    torch.testing.assert_close(as_tuple[0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="given twice"):
        patched(ids, input_ids=ids)


def test_a_head_replaced_after_patch_is_refused():
    """resize_token_embeddings puts in a new lm_head, which would return logits where the loss belongs."""
    from models import VOCAB

    model = llama_fast.patch(tiny_model(), cross_entropy=True, **LOSS_ONLY).train()
    model.resize_token_embeddings(VOCAB + 8)
    ids = tokens(1, 7)
    with pytest.raises(RuntimeError, match="lm_head was replaced after patch"):
        model(input_ids=ids, labels=ids)
    llama_fast.patch(model, cross_entropy=True, **LOSS_ONLY)
    assert model(input_ids=ids, labels=ids).logits is None


def test_eval_with_labels_gives_logits_and_the_loss():
    """In eval mode (``Trainer.evaluate``/``predict``, ``model.eval()``) the caller gets what the unpatched
    model gives: the logits and the loss; in training the loss without logits. ``skip_logits`` chooses
    explicitly either way."""
    base = tiny_model()
    ids = tokens(2, 9)
    patched = llama_fast.patch(clone(base), cross_entropy=True, **LOSS_ONLY)
    ref = clone(base, torch.float64)
    with torch.no_grad():
        want = base.eval()(input_ids=ids, labels=ids)
        out = patched.eval()(input_ids=ids, labels=ids)
        assert out.logits is not None and out.logits.shape == want.logits.shape
        torch.testing.assert_close(out.logits, want.logits)
        torch.testing.assert_close(out.loss, want.loss)
        fused = patched(input_ids=ids, labels=ids, skip_logits=True)
        assert fused.logits is None
        assert_error_ratio(fused.loss, want.loss, ref.eval()(input_ids=ids, labels=ids).loss, name="eval fused loss",
                           floor_scale=8)
    patched.train()
    assert patched(input_ids=ids, labels=ids).logits is None
    assert patched(input_ids=ids, labels=ids, skip_logits=False).logits is not None
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        patched(input_ids=ids, skip_logits=True)


def _dataset(rows=8, length=11, seed=5):
    import datasets

    ids = tokens(rows, length, seed=seed).cpu()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _train(tmp_path, name, model, callbacks, collator=None, steps=2):
    """A Trainer as users call it: default TrainingArguments but for the run's length and the CPU.
    Returns each step's loss."""
    from transformers import Trainer, TrainingArguments

    losses = []

    class Recording(Trainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(loss.detach().double().cpu())
            return loss

    args = TrainingArguments(str(tmp_path / name), max_steps=steps, per_device_train_batch_size=4,
                             use_cpu=DEVICE.type == "cpu", report_to=[], disable_tqdm=True)
    assert args.remove_unused_columns  # the default the fused loss must work with
    trainer = Recording(model=model, args=args, train_dataset=_dataset(), data_collator=collator,
                        callbacks=callbacks)
    trainer.train()
    return torch.stack(losses)


@pytest.mark.parametrize("packed,lora", [(False, False), (True, False), (False, True)],
                         ids=["padded", "flattening_collator", "peft_lora"])
def test_trainer_defaults_train_with_the_fused_loss(tmp_path, fused_calls, packed, lora):
    """The issue's repro: ``Trainer(model, TrainingArguments(out, ...), train_dataset=ds,
    callbacks=[LlamaFastCallback(cross_entropy=True)]).train()``, with the default collator, with
    ``DataCollatorWithFlattening`` (one packed row, position_ids restarting) and on a PEFT model (the
    Trainer reads the base model's signature)."""
    from transformers import DataCollatorWithFlattening

    from llama_fast.integrations import LlamaFastCallback

    collator = DataCollatorWithFlattening() if packed else None
    base = tiny_model()
    if lora:
        peft = pytest.importorskip("peft")
        torch.manual_seed(3)
        base = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "lm_head"]))
    curves = {}
    for name, model, callbacks in (("ours", clone(base), [LlamaFastCallback(cross_entropy=True)]),
                                   ("eager", clone(base), []), ("ref", clone(base, torch.float64), [])):
        curves[name] = _train(tmp_path, name, model, callbacks, collator)
        assert llama_fast.is_patched(model) == (name == "ours")
        if name == "ours":
            assert fused_calls[0] == len(curves[name]) == 2  # one fused loss per training step
    assert_error_ratio(curves["ours"], curves["eager"], curves["ref"], name="Trainer loss curve", floor_scale=8)


def test_trainer_predict_gives_logits_to_compute_metrics(tmp_path, fused_calls):
    """``Trainer.predict`` / ``evaluate`` on a model patched with the fused loss: the predictions are the
    logits (eager's shape and values) and ``compute_metrics`` sees them, with the eval loss of the
    unpatched model."""
    from transformers import Trainer, TrainingArguments

    from llama_fast.integrations import LlamaFastCallback

    base = tiny_model()
    results = {}
    for name, callbacks in (("ours", [LlamaFastCallback(cross_entropy=True)]), ("eager", [])):
        seen = []

        def metrics(prediction, seen=seen):
            seen.append(prediction.predictions.shape)
            return {"mean_logit": float(prediction.predictions.mean())}

        args = TrainingArguments(str(tmp_path / name), per_device_eval_batch_size=4, use_cpu=DEVICE.type == "cpu",
                                 report_to=[], disable_tqdm=True)
        trainer = Trainer(model=clone(base), args=args, compute_metrics=metrics, callbacks=callbacks)
        assert llama_fast.is_patched(trainer.model) == (name == "ours")
        results[name] = trainer.predict(_dataset(rows=6)), seen
    (ours, our_seen), (eager, eager_seen) = results["ours"], results["eager"]
    assert fused_calls[0] == 0  # evaluation forms the logits, which it returns
    assert ours.predictions.shape == eager.predictions.shape == (6, 11, base.config.vocab_size)
    assert our_seen == eager_seen == [(6, 11, base.config.vocab_size)]
    torch.testing.assert_close(torch.as_tensor(ours.predictions), torch.as_tensor(eager.predictions))
    assert ours.metrics["test_loss"] == pytest.approx(eager.metrics["test_loss"], rel=1e-5)
    assert ours.metrics["test_mean_logit"] == pytest.approx(eager.metrics["test_mean_logit"], rel=1e-5)
