"""llama_fast.patch on tiny Llama models, against the same model unpatched: logits and loss,
every parameter's gradient, greedy generation with the KV cache, left-padded batches, gradient
checkpointing, PEFT LoRA, a short training run, unpatch, isolation, and refusals."""

import contextlib
from unittest import mock

import pytest
import torch
from transformers import LlamaForSequenceClassification, LlamaModel

import llama_fast
from helpers import assert_error_ratio
from llama_fast.kernels import attention as attention_kernel
from llama_fast.kernels import rms_norm as rms_norm_kernel
from llama_fast.kernels import rope as rope_kernel
from llama_fast.kernels import swiglu as swiglu_kernel
from models import DEVICE, clone, tiny_model, tokens


def _forward_loss(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_backward_match(dtype):
    """Points 1 and 2: logits, loss and the gradient of every parameter, by the error-ratio rule
    against the unpatched model in float64."""
    base = tiny_model()
    patched = llama_fast.patch(clone(base, dtype))
    eager, ref = clone(base, dtype), clone(base, torch.float64)
    ids = tokens(2, 13)
    results = {}
    for name, model in (("patched", patched), ("eager", eager), ("ref", ref)):
        logits, loss = _forward_loss(model, ids)
        loss.backward()
        results[name] = (logits, loss, {n: p.grad for n, p in model.named_parameters()})
    (lp, sp, gp), (le, se, ge), (lr, sr, gr) = results["patched"], results["eager"], results["ref"]
    assert_error_ratio(lp, le, lr, name="logits", floor_scale=8)
    assert_error_ratio(sp, se, sr, name="loss", floor_scale=8)
    assert set(gp) == set(gr) and all(g is not None for g in gp.values())
    for n in gp:
        assert_error_ratio(gp[n], ge[n], gr[n], name=f"grad {n}", floor_scale=8)


def test_every_kernel_runs():
    """The patched model really runs each Triton kernel (forward and backward)."""
    model = llama_fast.patch(tiny_model())
    spies = {name: mock.patch.object(module, fn, wraps=getattr(module, fn)) for name, module, fn in [
        ("rms_norm", rms_norm_kernel, "rms_norm_fwd"), ("rms_norm_bwd", rms_norm_kernel, "rms_norm_bwd"),
        ("add_rms_norm", rms_norm_kernel, "add_rms_norm_fwd"),
        ("add_rms_norm_bwd", rms_norm_kernel, "add_rms_norm_bwd"),
        ("rope", rope_kernel, "rope_fwd"), ("rope_bwd", rope_kernel, "rope_bwd"),
        ("swiglu", swiglu_kernel, "swiglu_fwd"),
        ("swiglu_bwd", swiglu_kernel, "swiglu_bwd"), ("attention", attention_kernel, "attention_fwd"),
        ("attention_bwd", attention_kernel, "attention_bwd"),
    ]}
    mocks = {name: spy.start() for name, spy in spies.items()}
    try:
        _, loss = _forward_loss(model, tokens(1, 9))
        loss.backward()
    finally:
        for spy in spies.values():
            spy.stop()
    layers = 2
    # each layer's input norm and the final norm; the post-attention norms run fused with the residual add
    assert mocks["rms_norm"].call_count == mocks["rms_norm_bwd"].call_count == layers + 1
    assert mocks["add_rms_norm"].call_count == mocks["add_rms_norm_bwd"].call_count == layers
    assert mocks["rope"].call_count == mocks["rope_bwd"].call_count == layers
    assert mocks["swiglu"].call_count == mocks["swiglu_bwd"].call_count == layers
    assert mocks["attention"].call_count == mocks["attention_bwd"].call_count == layers


def _generate(model, ids, attention_mask=None, new=10):
    return model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def test_greedy_generation_matches():
    """Point 3: greedy generate() with the KV cache gives the same tokens (prefill, then decode
    through the split-KV path)."""
    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    ids = tokens(2, 7)
    want = _generate(base, ids, new=12)
    got = _generate(patched, ids, new=12)
    assert torch.equal(got, want)


def _decode(model, cache, ids, steps):
    """Greedy steps on ``cache`` from the last token of ``ids``: (tokens, each step's logits)."""
    out, logits = [], []
    step = ids[:, -1:]
    for _ in range(steps):
        position = torch.full((ids.shape[0], 1), cache.get_seq_length(), device=ids.device)
        logit = model(input_ids=step, past_key_values=cache, use_cache=True, position_ids=position).logits[:, -1]
        step = logit.argmax(-1, keepdim=True)
        out.append(step)
        logits.append(logit)
    return torch.cat(out, 1), logits


def test_cache_written_in_place_matches_through_crop_and_reorder(monkeypatch):
    """Decoding with a DynamicCache writes the rotated keys and the values straight into the cache
    (``ops.rope_into_cache``, once per layer and token), into buffers with spare room; a crop (what
    assisted generation does) and a beam reorder replace the layer's tensors, and decoding after them
    gives eager's logits: rows another tensor may still show are never overwritten."""
    from transformers import DynamicCache

    from llama_fast import ops

    writes = []
    write = ops.rope_into_cache
    monkeypatch.setattr(ops, "rope_into_cache", lambda *a, **kw: writes.append(1) or write(*a, **kw))
    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    ids = tokens(2, 7)
    logits, caches = {}, {}
    with torch.no_grad():
        for name, model in (("eager", base), ("patched", patched)):
            cache = caches[name] = DynamicCache(config=model.config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            first, a = _decode(model, cache, ids, 4)
            kept = cache.layers[0].keys
            kept_values = kept.clone()
            cache.crop(-2)
            second, b = _decode(model, cache, first[:, :2], 3)
            cache.reorder_cache(torch.tensor([1, 0], device=DEVICE))
            _, c = _decode(model, cache, second.flip(0), 3)
            logits[name] = a + b + c
            assert torch.equal(kept, kept_values), name  # the keys handed out before the crop are unchanged
    assert len(writes) == 10 * len(patched.model.layers)
    for step, (got, want) in enumerate(zip(logits["patched"], logits["eager"])):
        torch.testing.assert_close(got, want, msg=lambda m, step=step: f"step {step}: {m}")
    for got, want in zip(caches["patched"].layers, caches["eager"].layers):
        torch.testing.assert_close(got.keys, want.keys)
        torch.testing.assert_close(got.values, want.values)


def test_left_padded_batch_generation_matches_each_prompt_alone():
    """Point 4: a left-padded batch gives, row by row, the tokens of each prompt generated alone."""
    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    prompts = [tokens(1, 5, seed=3)[0], tokens(1, 11, seed=4)[0], tokens(1, 8, seed=5)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batch = _generate(patched, ids, attention_mask=mask)[:, width:]
    for row, p in enumerate(prompts):
        alone_eager = _generate(base, p[None])[:, len(p):]
        alone_patched = _generate(patched, p[None])[:, len(p):]
        assert torch.equal(alone_patched, alone_eager), f"prompt {row} alone"
        assert torch.equal(batch[row:row + 1], alone_eager), f"prompt {row} in the padded batch"


def test_gradient_checkpointing():
    """Point 5: with gradient checkpointing, training gradients match the unpatched model's, and
    transformers' checkpointing really runs on the patched layers (their fused forward hands it the call)."""
    base = tiny_model()
    models = {"patched": llama_fast.patch(clone(base)), "eager": clone(base), "ref": clone(base, torch.float64)}
    grads = {}
    for name, model in models.items():
        model.gradient_checkpointing_enable()
        model.train()
        layers = model.model.layers
        spies = [mock.patch.object(layer, "_gradient_checkpointing_func", wraps=layer._gradient_checkpointing_func)
                 for layer in layers]
        checkpoints = [spy.start() for spy in spies]
        try:
            _, loss = _forward_loss(model, tokens(2, 10))
            loss.backward()
        finally:
            for spy in spies:
                spy.stop()
        assert [c.call_count for c in checkpoints] == [1] * len(layers), name
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n in grads["ref"]:
        assert_error_ratio(grads["patched"][n], grads["eager"][n], grads["ref"][n], name=f"grad {n}", floor_scale=8)


@pytest.mark.parametrize("cross_entropy", [False, True], ids=["loss", "fused_loss"])
def test_autocast_bf16_training(cross_entropy):
    """Under bf16 autocast (the HF Trainer's bf16=True): loss and gradients match the unpatched
    model's under the same autocast, by the rule at bf16 against float64 (which autocast leaves
    alone). Autocast runs SDPA in bf16 while RoPE's fp32 tables promote q and k to fp32, so the
    patched attention got fp32 q, k and bf16 v and refused them, until it followed SDPA's rule."""
    base = tiny_model()
    models = {"patched": llama_fast.patch(clone(base), cross_entropy=cross_entropy), "eager": clone(base),
              "ref": clone(base, torch.float64)}
    ids = tokens(2, 10)
    results = {}
    for name, model in models.items():
        model.train()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss, grads), (eager_loss, eager_grads), (ref_loss, ref_grads) = results.values()
    assert_error_ratio(loss.float(), eager_loss.float(), ref_loss, name="loss", dtype=torch.bfloat16, floor_scale=8)
    for n in ref_grads:
        assert_error_ratio(grads[n], eager_grads[n], ref_grads[n], name=f"grad {n}", dtype=torch.bfloat16,
                           floor_scale=8)


def test_peft_lora_gradients_match():
    """Point 6: a PEFT LoRA model trains on the kernels; its LoRA gradients match unpatched LoRA."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    base = tiny_model()
    torch.manual_seed(7)
    lora = peft.get_peft_model(base, config)
    models = {"patched": llama_fast.patch(clone(lora)), "eager": clone(lora), "ref": clone(lora, torch.float64)}
    assert llama_fast.is_patched(models["patched"])
    grads = {}
    for name, model in models.items():
        model.train()
        _, loss = _forward_loss(model, tokens(2, 10))
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["ref"] and all("lora_" in n for n in grads["ref"])
    for n in grads["ref"]:
        assert_error_ratio(grads["patched"][n], grads["eager"][n], grads["ref"][n], name=f"grad {n}", floor_scale=8)


def test_training_loss_curve_matches():
    """Point 7: a few AdamW steps give the eager loss curve: at every step the patched fp32 run is
    no further from the float64 run than twice the eager fp32 run is (plus a floor)."""
    base = tiny_model()
    runs = {"patched": llama_fast.patch(clone(base)), "eager": clone(base), "ref": clone(base, torch.float64)}
    ids = tokens(4, 12)
    curves = {}
    for name, model in runs.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            _, loss = _forward_loss(model, ids)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        curves[name] = torch.stack(losses)
    assert curves["ref"][-1] < curves["ref"][0] - 0.05, "the run must actually train"
    assert_error_ratio(curves["patched"], curves["eager"], curves["ref"], name="loss curve", floor_scale=8)


def test_unpatch_restores_bit_identical_and_other_models_untouched():
    """Point 8: unpatch gives bit-identical outputs; another model built from the same config
    object keeps running transformers' code, bit for bit, while the first is patched."""
    a = tiny_model()
    b = type(a)(a.config).eval()  # shares a's config object
    b.load_state_dict(a.state_dict())
    ids = tokens(2, 9)
    with torch.no_grad():
        a_before, b_before = a(ids).logits, b(ids).logits
        impl = b.config._attn_implementation
        llama_fast.patch(a)
        assert a.config._attn_implementation == "llama_fast" and b.config._attn_implementation == impl
        assert torch.equal(b(ids).logits, b_before)
        a(ids)  # that the kernels run is test_every_kernel_runs's to show
        llama_fast.unpatch(a)
        assert torch.equal(a(ids).logits, a_before)
        assert a.config is b.config and a.config._attn_implementation == impl
    assert not llama_fast.is_patched(a)
    assert all("forward" not in vars(m) for m in a.modules())


def test_patch_twice_and_flags():
    base = tiny_model()
    model = clone(base)
    ids = tokens(1, 9)
    with torch.no_grad():
        once = llama_fast.patch(model)(ids).logits
        assert torch.equal(llama_fast.patch(model)(ids).logits, once)
        llama_fast.patch(model, attention=False, rope=False)
        assert llama_fast.is_patched(model) and model.config._attn_implementation != "llama_fast"
        partial = model(ids).logits
        llama_fast.unpatch(model)
        assert torch.equal(model(ids).logits, base(ids).logits)
    torch.testing.assert_close(partial, base(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [LlamaModel, LlamaForSequenceClassification])
def test_other_heads_on_the_backbone(cls):
    base = tiny_model(cls=cls)
    patched = llama_fast.patch(clone(base))
    ids = tokens(2, 9)
    with torch.no_grad():
        want, got = base(ids), patched(ids)
    first = "last_hidden_state" if cls is LlamaModel else "logits"
    torch.testing.assert_close(got[first], want[first], rtol=1e-4, atol=1e-5)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="has no decoder layer of the Llama design"):
        llama_fast.patch(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="or GELU with the tanh approximation \\(GeGLU\\), this model uses 'gelu'"):
        llama_fast.patch(tiny_model(hidden_act="gelu"))
    llama_fast.patch(tiny_model(hidden_act="gelu"), swiglu=False)
    training = tiny_model(attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="attention dropout 0.1 in training"):
        llama_fast.patch(training)
    assert not llama_fast.is_patched(training), "a refused patch changes nothing"
    with pytest.raises(ValueError, match="head_dim 24 is not supported"):
        llama_fast.patch(tiny_model(head_dim=24, hidden_size=96))
    with pytest.raises(ValueError, match="float64"):
        llama_fast.patch(tiny_model(dtype=torch.float64))


def test_rope_rebinding_that_would_not_take_effect_is_refused(monkeypatch):
    """A transformers whose attention forward no longer reads apply_rotary_pos_emb as a global (renamed,
    inlined, or bound another way) is refused at patch(), naming its version, rather than patched with
    eager RoPE still running; without RoPE the patch goes ahead."""
    import transformers
    from transformers.models.llama import modeling_llama

    model = tiny_model()
    real = modeling_llama.LlamaAttention.forward

    def renamed(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        return real(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", renamed)
    with pytest.raises(ValueError, match=f"transformers {transformers.__version__} does not call apply_rotary_pos_emb"):
        llama_fast.patch(model)
    assert not llama_fast.is_patched(model)
    assert llama_fast.patched_backends(llama_fast.patch(model, rope=False)).keys() == {"rms_norm", "swiglu",
                                                                                        "attention"}


def test_unsupported_inputs_raise_at_call_time():
    model = llama_fast.patch(tiny_model())
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        model(tokens(1, 5), output_attentions=True)
    # Keys from an offset in a layer without a window, and a cache that lost tokens the queries must see:
    # refused, never computed wrongly. (Static caches work: tests/test_compile.py; sliding-window caches,
    # whose mask comes with local_size: tests/test_families.py.)
    from llama_fast.patch.masks import make_mask

    with pytest.raises(NotImplementedError, match="in a layer without a sliding window"):
        make_mask(batch_size=1, q_length=1, kv_length=8, q_offset=20, kv_offset=13)
    with pytest.raises(NotImplementedError, match="the cache lost tokens"):
        make_mask(batch_size=1, q_length=2, kv_length=8, q_offset=20, kv_offset=0)


def test_unknown_attention_keywords_are_refused_not_ignored():
    """A keyword that reaches the attention function and could change its result is refused by name
    (ignoring the packed-sequence keywords once let tokens attend across documents with no error;
    those are implemented now, tests/test_packing.py); the Trainer's loss normaliser passes."""
    model = llama_fast.patch(tiny_model())
    ids = tokens(1, 6)
    with pytest.raises(NotImplementedError, match="does not implement s_aux"):
        model(input_ids=ids, s_aux=torch.zeros(4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        normalised = model(input_ids=ids, num_items_in_batch=torch.tensor(5, device=DEVICE)).logits
    assert torch.equal(expected, normalised)


@pytest.mark.parametrize("cross_entropy", [False, True], ids=["logits", "fused"])
def test_shift_labels_pass_through_to_the_loss(cross_entropy):
    """transformers' ForCausalLMLoss takes labels already shifted (``shift_labels``, what a sharded
    sequence needs: docs/context-parallel.md); the keyword goes down the model to the attention function
    too, which once refused it. The loss is the one from the same labels unshifted."""
    model = llama_fast.patch(tiny_model(), cross_entropy=cross_entropy).train()
    ids = tokens(2, 7)
    labels = ids.clone()
    labels[0, 2] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        # labels must be given for a loss; shift_labels replaces them
        loss = model(input_ids=ids, labels=torch.zeros_like(ids), shift_labels=shifted).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def _count_reference_attention():
    return mock.patch.object(llama_fast.references, "attention", wraps=llama_fast.references.attention)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path without Triton's interpreter")
def test_cpu_attention_without_padding_is_transformers_sdpa_call(monkeypatch):
    """On a CPU without the interpreter, a patched model's attention with no key padded (prefill of an
    unpadded batch, decode steps, an all-ones attention_mask as generate() passes) makes the call
    transformers' own "sdpa" attention makes: attention alone patched, logits are bit-identical to
    the unpatched model's, and the reference's explicit score matrix is not built."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = tiny_model()
    patched = llama_fast.patch(clone(base), rms_norm=False, rope=False, swiglu=False)
    ids = tokens(2, 9)
    with torch.no_grad(), _count_reference_attention() as reference:
        assert torch.equal(patched(input_ids=ids).logits, base(input_ids=ids).logits)
        ones = torch.ones_like(ids)
        assert torch.equal(patched(input_ids=ids, attention_mask=ones).logits,
                           base(input_ids=ids, attention_mask=ones).logits)
        got = patched.generate(input_ids=ids, attention_mask=ones, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
        want = base.generate(input_ids=ids, attention_mask=ones, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    assert reference.call_count == 0
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path without Triton's interpreter")
def test_cpu_attention_with_padding_or_a_partial_query_block_runs_the_reference(monkeypatch):
    """Padding, and queries fewer than the keys but more than one (SDPA's is_causal is top-left
    aligned, ours bottom-right), go to the reference: a left-padded batch still gives each prompt's
    tokens, and a two-token step over a cache matches the unpatched model."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    short, long = tokens(1, 4, seed=3)[0], tokens(1, 9, seed=4)[0]
    ids = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long, device=DEVICE), short]), long])
    mask = (torch.arange(9, device=DEVICE) >= torch.tensor([[5], [0]], device=DEVICE)).long()
    with torch.no_grad(), _count_reference_attention() as reference:
        batch = _generate(patched, ids, attention_mask=mask, new=6)[:, 9:]
        assert reference.call_count > 0
        for row, prompt in enumerate((short, long)):
            assert torch.equal(batch[row:row + 1], _generate(base, prompt[None], new=6)[:, len(prompt):])
        reference.reset_mock()
        from transformers import DynamicCache

        caches = {}
        for name, model in (("patched", patched), ("eager", base)):
            caches[name] = DynamicCache(config=model.config)
            model(input_ids=long[None, :7], past_key_values=caches[name], use_cache=True)
        step = {name: model(input_ids=long[None, 7:], past_key_values=caches[name], use_cache=True).logits
                for name, model in (("patched", patched), ("eager", base))}
        assert reference.call_count == 2  # one per layer, for the two-token step
    torch.testing.assert_close(step["patched"], step["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path without Triton's interpreter")
def test_cpu_attention_takes_any_head_dim(monkeypatch):
    """The Triton kernel's head_dim limit (a multiple of 16) does not apply where attention runs the
    eager reference: a model with head_dim 24 is patched on a CPU without the interpreter and generates
    what the unpatched model does; under the interpreter (Triton) it is refused, by name."""
    base = tiny_model(head_dim=24, hidden_size=96)
    with pytest.raises(ValueError, match="head_dim 24 is not supported by the Triton attention kernel"):
        llama_fast.patch(clone(base))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    patched = llama_fast.patch(clone(base))
    ids = tokens(2, 7)
    assert torch.equal(_generate(patched, ids, new=8), _generate(base, ids, new=8))


def _fused_calls():
    return mock.patch.object(rms_norm_kernel, "add_rms_norm_fwd", wraps=rms_norm_kernel.add_rms_norm_fwd)


def test_decoder_layer_keeps_transformers_signature_and_submodule_calls():
    """The fused layer forward takes transformers' keywords (the deprecated past_key_values too) and calls
    input_layernorm, self_attn and mlp as modules: their forward hooks fire, once per layer."""
    import inspect

    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llama_fast.patch.layer import cache_keyword

    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    layer = patched.model.layers[0]
    assert "forward" in vars(layer)
    assert list(inspect.signature(layer.forward).parameters) == list(
        inspect.signature(LlamaDecoderLayer.forward).parameters)[1:]
    seen = []
    for each in patched.model.layers:
        for module in (each.input_layernorm, each.self_attn, each.mlp):
            module.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    ids = tokens(1, 7)
    keyword = cache_keyword(LlamaDecoderLayer.forward)  # "cache" from transformers 5.24, "past_key_values" in 5.17
    with torch.no_grad(), _fused_calls() as fused:
        caches = {name: DynamicCache(config=m.config) for name, m in (("patched", patched), ("eager", base))}
        got = patched(input_ids=ids, **{keyword: caches["patched"]}, use_cache=True).logits
        want = base(input_ids=ids, **{keyword: caches["eager"]}, use_cache=True).logits
        assert fused.call_count == 2
        # a layer called directly with past_key_values, deprecated from 5.24, as transformers' own layer accepts it
        hidden = torch.randn(1, 3, 64, device=DEVICE)
        cos_sin = patched.model.rotary_emb(hidden, torch.arange(3, device=DEVICE)[None])
        with pytest.warns(FutureWarning, match="past_key_values") if keyword == "cache" else contextlib.nullcontext():
            out = layer(hidden, position_embeddings=cos_sin, past_key_values=None)
        assert out.shape == hidden.shape
    # two layers in the model's call, then the first layer called alone
    assert seen == ["LlamaRMSNorm", "LlamaAttention", "LlamaMLP"] * 3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_hooks_on_the_post_attention_norm_run_unfused():
    """A hook on post_attention_layernorm (which the fused op does not call) sends the layer through
    transformers' forward, so the hook sees every call; without hooks the layer fuses again."""
    model = llama_fast.patch(tiny_model())
    calls = []
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: calls.append(1))
    ids = tokens(1, 5)
    with torch.no_grad(), _fused_calls() as fused:
        model(ids)
        assert calls == [1] and fused.call_count == 1  # layer 0 still fused
        handle.remove()
        model(ids)
        assert fused.call_count == 3


def test_decoder_layer_fusion_only_where_it_applies():
    """Not fused: with rms_norm=False, on the extension's or the reference backend (no fused kernel), and a
    layer already given an instance forward by someone else (left as it is). unpatch restores all."""
    from llama_fast.patch.layer import fused_layer_forward

    for options in (dict(rms_norm=False), dict(backend="reference")):
        model = llama_fast.patch(tiny_model(), **options)
        assert not any("forward" in vars(layer) for layer in model.model.layers), options
    model = tiny_model()
    theirs = fused_layer_forward(type(model.model.layers[0]), None).__get__(model.model.layers[0])  # not ours
    model.model.layers[0].forward = theirs
    llama_fast.patch(model)
    assert model.model.layers[0].forward is theirs and "forward" in vars(model.model.layers[1])
    llama_fast.unpatch(model)
    assert model.model.layers[0].forward is theirs and "forward" not in vars(model.model.layers[1])


def test_changed_decoder_source_falls_back_unfused(monkeypatch):
    """A transformers whose LlamaDecoderLayer.forward is not the source layer.py replaces: a warning naming the
    version, the layers keep transformers' forward, every norm still runs our rms_norm kernel."""
    import transformers

    from llama_fast.patch import layer

    monkeypatch.setattr(layer, "VERIFIED_SOURCES", {"0" * 64: ("5.24.0",)})
    base = tiny_model()
    with pytest.warns(UserWarning, match=f"LlamaDecoderLayer.forward in transformers {transformers.__version__} is "
                                         "not the code llama_fast's fused decoder layer replaces"):
        patched = llama_fast.patch(clone(base))
    assert not any("forward" in vars(m) for m in patched.model.layers)
    ids = tokens(1, 6)
    with torch.no_grad(), mock.patch.object(rms_norm_kernel, "rms_norm_fwd", wraps=rms_norm_kernel.rms_norm_fwd) as rms:
        got = patched(ids).logits
    assert rms.call_count == 5
    torch.testing.assert_close(got, base(ids).logits, rtol=1e-4, atol=1e-5)


def test_verified_decoder_source_is_the_installed_one():
    """The hash layer.py pins is this transformers' (a bump that changes the layer must be re-verified)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llama_fast.patch import layer

    assert transformers.__version__ in layer.VERIFIED_SOURCES.get(layer.source_hash(LlamaDecoderLayer), ())


def test_verified_attention_and_cache_sources_are_the_installed_ones():
    """The attention forward rope.py writes out and the cache updates kv_cache.py reproduces are this
    transformers' own (a bump that changes them must be re-verified)."""
    import transformers
    from transformers import cache_utils
    from transformers.models.llama.modeling_llama import LlamaAttention

    from llama_fast.patch import kv_cache, layer, rope

    assert transformers.__version__ in rope.VERIFIED_SOURCES.get(layer.source_hash(LlamaAttention), ())
    assert kv_cache.verified_layers().static == {cache_utils.DynamicLayer: False, cache_utils.StaticLayer: True}


def test_changed_attention_or_cache_source_keeps_transformers_cache_update(monkeypatch):
    """An attention forward or a cache update that is not the verified source: transformers' own forward
    (its name apply_rotary_pos_emb rebound to ours) or its own cache update runs, never the fused write,
    and generation still gives eager's tokens."""
    from llama_fast import ops
    from llama_fast.patch import kv_cache, rope

    base = tiny_model()
    ids = tokens(2, 7)
    want = _generate(base, ids, new=6)
    for target, name in ((rope, "VERIFIED_SOURCES"), (kv_cache, "VERIFIED_UPDATES")):
        with monkeypatch.context() as m:
            m.setattr(target, name, {"Cache": set(), "DynamicLayer": set(), "StaticLayer": set()}
                      if name == "VERIFIED_UPDATES" else {})
            m.setattr(ops, "rope_into_cache", mock.Mock(side_effect=AssertionError("fused write")))
            patched = llama_fast.patch(clone(base))
            assert torch.equal(_generate(patched, ids, new=6), want), name


def test_down_projection_adds_the_residual_in_its_gemm_only_for_a_plain_linear():
    """``layer.down_with_residual``: a plain bias-free nn.Linear adds the residual in one addmm (with its
    gradients); anything else (a stand-in module without a weight, a linear with a hook or a bias, autocast)
    is called as a module, then added, as eager does."""
    from llama_fast.patch import layer

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 8, bias=False)
    act, residual = torch.randn(2, 3, 12, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)
    with mock.patch.object(torch, "addmm", wraps=torch.addmm) as addmm:
        out = layer.down_with_residual(linear, act, residual)
    assert addmm.call_count == 1 and out.shape == residual.shape
    want = residual + linear(act)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), [act, residual, linear.weight])
    want_grads = torch.autograd.grad(want.square().sum(), [act, residual, linear.weight])
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)

    class StandIn(torch.nn.Module):  # no weight at all, as bench/overhead.py's fixed projections
        def forward(self, x):
            return torch.ones(*x.shape[:-1], 8)

    hooked = torch.nn.Linear(12, 8, bias=False)
    calls = []
    hooked.register_forward_hook(lambda *a: calls.append(1))
    biased = torch.nn.Linear(12, 8)
    with mock.patch.object(torch, "addmm", wraps=torch.addmm) as addmm:
        torch.testing.assert_close(layer.down_with_residual(StandIn(), act, residual), residual + 1)
        layer.down_with_residual(hooked, act, residual)
        torch.testing.assert_close(layer.down_with_residual(biased, act, residual), residual + biased(act))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.down_with_residual(linear, act, residual).dtype == torch.float32
    assert calls == [1]
    assert addmm.call_count == 0  # each went through the module (F.linear), then an add


def test_a_hook_on_the_mlp_sees_the_mlp_output_not_the_residual_sum():
    """With a forward hook on ``mlp`` the layer calls it without the residual (the add stays outside),
    so the hook sees what transformers' MLP returns; the logits are eager's either way."""
    base = tiny_model()
    patched = llama_fast.patch(clone(base))
    seen = {}
    for name, model in (("patched", patched), ("eager", base)):
        model.model.layers[0].mlp.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, out))
    ids = tokens(1, 6)
    with torch.no_grad():
        got, want = patched(ids).logits, base(ids).logits
    torch.testing.assert_close(seen["patched"], seen["eager"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
