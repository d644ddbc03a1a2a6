"""The real SmolLM2-135M-Instruct (a LlamaForCausalLM with GQA: 9 query heads, 3 KV heads,
head_dim 64, 30 layers), patched vs unpatched on a chat prompt.

CI runs the short form: one greedy generation of 8 new tokens through the kernels (prefill, then
the split-KV decode path), whose per-step logits must agree with eager transformers by the
error-ratio rule and whose tokens must be identical. ``-m slow`` adds the long form: a longer
answer, bf16, and a left-padded batch of two prompts.
"""

import copy
import os

import pytest
import torch

import llama_fast
from helpers import assert_error_ratio, assert_gradients_error_ratio
from llama_fast import demo
from models import clone

pytestmark = pytest.mark.system  # the real SmolLM2 model

PROMPTS = ("What is the capital of France?", "Name three primary colours.")


@pytest.fixture(scope="module")
def smollm2():
    return demo.load_model(None, torch.float32)


def _generate_both(model, tokenizer, prompt, new, dtype):
    inputs = demo.chat_inputs(tokenizer, prompt, "cpu")
    low = copy.deepcopy(model).to(dtype)
    eager_ids, eager_logits, _ = demo.greedy(low, inputs, new)
    ids, logits, _ = demo.greedy(llama_fast.patch(low), inputs, new)
    ref_ids, ref_logits, _ = demo.greedy(copy.deepcopy(model).double(), inputs, new)
    return (ids, logits), (eager_ids, eager_logits), (ref_ids, ref_logits)


def test_real_model_short(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    (ids, logits), (eager_ids, eager_logits), (ref_ids, ref_logits) = _generate_both(
        model, tokenizer, PROMPTS[0], 8, torch.float32)
    assert torch.equal(ids, eager_ids) and torch.equal(ids, ref_ids)
    assert "Paris" in tokenizer.decode(ids[0])
    assert_error_ratio(logits, eager_logits, ref_logits, name="SmolLM2 logits", floor_scale=8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_model_long(smollm2, dtype):
    model, tokenizer = smollm2
    (ids, logits), (eager_ids, eager_logits), (ref_ids, ref_logits) = _generate_both(
        model, tokenizer, PROMPTS[1], 24, dtype)
    steps = min(len(logits), len(eager_logits))
    if dtype == torch.float32:
        assert torch.equal(ids, eager_ids)
    # bf16 rounding may flip a near-tie late in a long answer; compare the steps both runs share.
    shared = int((ids[0, :steps] == eager_ids[0, :steps]).cumprod(0).sum())
    assert shared >= 8
    same = int((ids[0, :steps] == ref_ids[0, :steps]).cumprod(0).sum())
    n = min(shared, same) + 1
    assert_error_ratio(logits[:n], eager_logits[:n], ref_logits[:n], name=f"SmolLM2 logits {dtype}", floor_scale=8)


@pytest.mark.slow
def test_real_model_left_padded_batch(smollm2):
    model, tokenizer = smollm2
    patched = llama_fast.patch(copy.deepcopy(model))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = patched.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for row, prompt in enumerate(PROMPTS):
        alone = demo.chat_inputs(tokenizer, prompt, "cpu")
        want = model.generate(**alone, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = want[0, alone["input_ids"].shape[1]:]
        assert torch.equal(out[row, batch["input_ids"].shape[1]:][: len(new)], new), prompt


def test_real_model_fused_loss(smollm2):
    """SmolLM2 ties lm_head to the embeddings. patch(cross_entropy=True) (the fused loss alone, so the
    interpreter's time goes to it): the training loss and the gradient of every parameter match the
    unpatched model's by the error-ratio rule (the gradients together: helpers.assert_gradients_error_ratio),
    against float64 (its loss in float64 too: see models.float64_loss, without which the patched
    gradients looked 5-10x further off than eager's)."""
    model, tokenizer = smollm2
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = demo.chat_inputs(tokenizer, PROMPTS[0], "cpu")["input_ids"][:, :16]
    runs = {"patched": llama_fast.patch(copy.deepcopy(model), cross_entropy=True, rms_norm=False, rope=False,
                                        swiglu=False, attention=False),
            "eager": copy.deepcopy(model), "ref": clone(model, torch.float64)}
    results = {}
    for name, m in runs.items():
        out = m.train()(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = out.loss, {n: p.grad for n, p in m.named_parameters()}
    assert results["patched"][0].numel() == 1 and results["ref"][0].dtype == torch.float64
    # Loss off float64 by 9.2e-7 against eager's 6.2e-6 (measured 2026-11-30).
    assert_error_ratio(results["patched"][0], results["eager"][0], results["ref"][0], name="loss")
    assert_gradients_error_ratio(results["patched"][1], results["eager"][1], results["ref"][1], name="SmolLM2")


def test_bundled_model_cache_is_the_gguf_conversion(tmp_path, monkeypatch):
    """The converted copy demo.load_model keeps of the bundled GGUF model (written on first use, in a
    fresh cache folder here) loads the same weights, generation settings and tokenizer as a
    conversion of the GGUF file itself."""
    monkeypatch.setenv("LLAMA_FAST_CACHE", str(tmp_path))
    converted, tokenizer = demo.load_model(None, torch.float32)  # converts, and writes the copy
    (folder,) = list(tmp_path.iterdir())  # the copy, and no half-written one left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    cached, cached_tokenizer = demo.load_model(None, torch.float32)  # from the copy
    gguf, gguf_tokenizer = demo.load_model(os.path.join(demo.default_model_dir(), demo.DEFAULT_GGUF), torch.float32)
    for model in (converted, cached):
        state, want = model.state_dict(), gguf.state_dict()
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) for k in want)
        assert model.generation_config.to_dict() == gguf.generation_config.to_dict()
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    chat = demo.chat_inputs(gguf_tokenizer, PROMPTS[0], "cpu")["input_ids"]
    for tok in (tokenizer, cached_tokenizer):
        assert torch.equal(demo.chat_inputs(tok, PROMPTS[0], "cpu")["input_ids"], chat)
        assert tok.decode(chat[0]) == gguf_tokenizer.decode(chat[0])
    assert (cached_tokenizer.eos_token, cached_tokenizer.pad_token) == (gguf_tokenizer.eos_token,
                                                                        gguf_tokenizer.pad_token)
