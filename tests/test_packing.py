"""Padding-free training through patch(): packed batches from transformers' DataCollatorWithFlattening
(with the flash-attention keywords, and with position_ids alone), against the same examples padded
and against the unpatched model on the packed batch (transformers' own path): per-token logits,
loss and every gradient, with gradient checkpointing and with a PEFT LoRA adapter, under the HF
Trainer, and the refusals."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import llama_fast
from helpers import assert_error_ratio
from models import DEVICE, clone, tiny_model, tokens

# Lengths with a one-token example and one longer than the interpreter's 16-row blocks.
LENGTHS = (5, 1, 19, 8)


def _examples(lengths=LENGTHS):
    return [{"input_ids": tokens(1, n, seed=10 + i)[0].tolist()} for i, n in enumerate(lengths)]


def _on_device(batch):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _packed(examples, flash_kwargs=True):
    """One row, labels -100 at the first token of every example (the collator's separator)."""
    return _on_device(DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(examples))


def _padded(examples):
    """The same examples right-padded, labels -100 on padding: the loss counts the same tokens."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    return _on_device({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})


def _loss_and_grads(model, batch, **extra):
    out = model(**batch, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


def _compare(ours, eager, ref, what):
    (o_out, o_grads), (e_out, e_grads), (r_out, r_grads) = ours, eager, ref
    assert_error_ratio(o_out.loss, e_out.loss, r_out.loss, name=f"{what} loss", floor_scale=8)
    assert set(o_grads) == set(r_grads)
    for n in r_grads:
        assert_error_ratio(o_grads[n], e_grads[n], r_grads[n], name=f"{what} grad {n}", floor_scale=8)


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_packed_batch_matches_padded(flash_kwargs, use_cache):
    """Loss and gradients of the packed batch, patched, against the same examples padded (unpatched,
    in fp32 and float64): one computation, two layouts. use_cache decides whether transformers looks
    for packing itself (without a cache it asks the mask function for a packed mask)."""
    base = tiny_model().train()
    examples = _examples()
    packed, padded = _packed(examples, flash_kwargs), _padded(examples)
    ours = _loss_and_grads(llama_fast.patch(clone(base)), packed, use_cache=use_cache)
    eager = _loss_and_grads(clone(base), padded)
    ref = _loss_and_grads(clone(base, torch.float64), padded)
    _compare(ours, eager, ref, "packed vs padded")


def test_packed_batch_matches_transformers_on_the_packed_batch():
    """The unpatched model on the same packed batch (transformers builds the block-diagonal mask from
    position_ids when it has no cache) gives what the patched one gives."""
    base = tiny_model().train()
    packed = _packed(_examples())
    ours = _loss_and_grads(llama_fast.patch(clone(base)), packed)
    eager = _loss_and_grads(clone(base), packed, use_cache=False)
    ref = _loss_and_grads(clone(base, torch.float64), packed, use_cache=False)
    _compare(ours, eager, ref, "packed, patched vs transformers")


def test_each_packed_example_sees_only_itself():
    """Per-token logits of every example in the pack equal its logits run alone: attention stays
    inside each example and RoPE restarts at each one (the positions come from position_ids)."""
    model = llama_fast.patch(tiny_model())
    examples = _examples()
    packed = _packed(examples)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       **{k: packed[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
                       ).logits[0]
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            alone = model(input_ids=torch.tensor([e["input_ids"]], device=DEVICE)).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_packed_with_gradient_checkpointing():
    base = tiny_model()
    examples = _examples()
    runs = {}
    for name, model, batch in (("ours", llama_fast.patch(clone(base)), _packed(examples)),
                               ("eager", clone(base), _padded(examples)),
                               ("ref", clone(base, torch.float64), _padded(examples))):
        model.gradient_checkpointing_enable()
        model.train()
        runs[name] = _loss_and_grads(model, batch)
    _compare(runs["ours"], runs["eager"], runs["ref"], "checkpointed")


def test_packed_with_peft_lora():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    torch.manual_seed(7)
    lora = peft.get_peft_model(tiny_model(), config)
    examples = _examples()
    runs = {}
    for name, model, batch in (("ours", llama_fast.patch(clone(lora)), _packed(examples)),
                               ("eager", clone(lora), _padded(examples)),
                               ("ref", clone(lora, torch.float64), _padded(examples))):
        model.train()
        runs[name] = _loss_and_grads(model, batch)
    assert all("lora_" in n for n in runs["ref"][1])
    _compare(runs["ours"], runs["eager"], runs["ref"], "LoRA")


def test_position_ids_are_read_once_per_forward(monkeypatch):
    """Without the keywords, the sequences come from position_ids: one host copy per forward, shared
    by the layers (transformers' FlashAttention-2 path reads them in every layer)."""
    import importlib

    patch_module = importlib.import_module("llama_fast.patch.attention")
    model = llama_fast.patch(tiny_model(num_hidden_layers=3))
    packed = _packed(_examples(), flash_kwargs=False)
    reads = []
    real = patch_module._sequences_from_positions

    def counting(position_ids, batch):
        reads.append(vars(position_ids).get("_llama_fast_sequences") is None)
        return real(position_ids, batch)

    monkeypatch.setattr(patch_module, "_sequences_from_positions", counting)
    with torch.no_grad():
        model(**packed)
    assert reads == [True, False, False]


def test_packed_refusals():
    model = llama_fast.patch(tiny_model())
    packed = _packed(_examples())
    partial = {k: v for k, v in packed.items() if k != "max_length_k"}
    with pytest.raises(NotImplementedError, match="max_length_k missing"):
        model(**partial)
    with pytest.raises(NotImplementedError, match="without a padding mask"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))


def test_packed_batch_compiles_without_graph_breaks():
    """With the keywords nothing is read on the host: the packed forward compiles whole (fullgraph);
    with position_ids alone under torch.compile a packed row fails a device-side assert instead of
    being read."""
    import torch._dynamo

    model = llama_fast.patch(tiny_model())
    packed = _packed(_examples())
    with torch.no_grad():
        expected = model(**packed).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(**packed).logits, expected, rtol=1e-5, atol=1e-5)
        if DEVICE.type == "cpu":  # on a GPU the failed device-side assert would end the CUDA context
            positions_only = _packed(_examples(), flash_kwargs=False)
            with pytest.raises(RuntimeError, match="position_ids show packed sequences"):
                compiled(**positions_only)
    torch._dynamo.reset()


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _padding_collator(examples):
    return {k: v.cpu() for k, v in _padded(examples).items()}


class _RecordingTrainer:
    """Built lazily (transformers' Trainer imports much): a Trainer that keeps each step's loss at
    full precision (its logs round to 4 decimals)."""

    @staticmethod
    def make(**kwargs):
        from transformers import Trainer

        class Recording(Trainer):
            losses: list

            def training_step(self, *args, **kw):
                loss = super().training_step(*args, **kw)
                self.losses.append(loss.detach().double().cpu())
                return loss

        trainer = Recording(**kwargs)
        trainer.losses = []
        return trainer


def test_trainer_with_the_flattening_collator(tmp_path):
    """transformers' Trainer, patched, with DataCollatorWithFlattening(return_flash_attn_kwargs=True):
    its loss curve over a few steps matches the unpatched model's on the same examples padded (and
    the float64 run's, by the error-ratio rule)."""
    from transformers import TrainingArguments

    lengths = [5, 1, 19, 8, 12, 3, 7, 16]
    examples = [{"input_ids": tokens(1, n, seed=20 + i)[0].tolist()} for i, n in enumerate(lengths)]
    base = tiny_model()
    curves = {}
    for name, model, collator in (
        ("ours", llama_fast.patch(clone(base)), DataCollatorWithFlattening(return_flash_attn_kwargs=True)),
        ("eager", clone(base), _padding_collator),
        ("ref", clone(base, torch.float64), _padding_collator),
    ):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=4,
                                 learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                                 use_cpu=DEVICE.type == "cpu", dataloader_pin_memory=False, disable_tqdm=True)
        trainer = _RecordingTrainer.make(model=model, args=args, train_dataset=_Examples(examples),
                                         data_collator=collator)
        trainer.train()
        curves[name] = torch.stack(trainer.losses)
    assert len(curves["ours"]) == 4
    assert_error_ratio(curves["ours"], curves["eager"], curves["ref"], name="Trainer loss curve", floor_scale=8)
