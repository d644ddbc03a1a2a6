"""TRL's SFTTrainer with LlamaFastCallback: padding-free batches (``padding_free=True``: one row,
position_ids restarting, cu_seq_lens_*, seq_idx) on the patched model train as the same examples
padded on the unpatched model do (each step's loss, by the error-ratio rule against float64), with
and without ``cross_entropy=True``. SFTTrainer (TRL 1.16) computes its loss with its own fused LM
head (``model(..., fused_lm_head=True)``, which also gives its entropy and accuracy metrics),
installed after the Trainer's construction patched the model: its wrapper calls the patched forward
only without ``fused_lm_head``, so llama_fast's fused loss is not called there. Patched the other way
round (TRL's head first, then ``patch``), such calls are still TRL's, and the others get the fused loss."""

import pytest
import torch

import llama_fast
from helpers import assert_error_ratio
from models import DEVICE, VOCAB, clone, tiny_model, tokens

LENGTHS = (5, 9, 19, 8, 12, 3, 7, 16)


def _tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: SFTTrainer wants one (for the pad
    token), the examples come tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                   pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


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
