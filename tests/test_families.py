"""patch() on the families besides Llama (tests/models.py, FAMILIES: Qwen2 and Qwen3 with a global and a local
layer, Mistral with every layer local, Gemma 2 and 3 with a local and a global one, their norms Gemma's, their MLP
a GeGLU, their query scale not head_dim's, Gemma 2's attention logits soft-capped; Phi-3's packed projections and
partial rotation; windows shorter than the sequences) against the same model unpatched:
logits, loss and every gradient by the error-ratio rule (fp32 and bf16); every kernel runs, none falls back to
eager, each local layer's window reaching the attention kernel; greedy generate() token-identical with dynamic
and static caches and a left-padded batch whose prompts are longer than the window; LoRA gradients; packed
batches through DataCollatorWithFlattening; torch.compile fullgraph without graph breaks; Gemma 2's final
soft-cap in the fused loss; and the families, or the parts of them, that llama_fast does not serve refused at
patch() by name."""

from unittest import mock

import pytest
import torch
from transformers import DataCollatorWithFlattening

import llama_fast
from helpers import assert_error_ratio
from llama_fast.kernels import attention as attention_kernel
from llama_fast.kernels import rms_norm as rms_norm_kernel
from llama_fast.kernels import rope as rope_kernel
from llama_fast.kernels import swiglu as swiglu_kernel
from models import DEVICE, FAMILIES, WINDOW, clone, family_config, family_model, tokens

# the window each layer's attention runs with (0: none), as the family's config lays them out
WINDOWS = {"qwen2": [0, WINDOW], "qwen3": [0, WINDOW], "mistral": [WINDOW, WINDOW], "gemma2": [WINDOW, 0],
           "gemma3": [WINDOW, 0], "phi3": [0, 0]}
GEMMA = ("gemma2", "gemma3")
# RMSNorms per decoder layer: input and post-attention (Qwen3 and Gemma 3: q_norm and k_norm too; Gemma's
# layers: a pre- and a post-feedforward norm as well, and no fused residual add: it adds after its own norm)
NORMS = {"qwen2": 2, "qwen3": 4, "mistral": 2, "gemma2": 4, "gemma3": 6, "phi3": 2}


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_loss_and_grads(models, call, what=""):
    """Call each of ``models`` ("patched", "eager", "ref": float64) as ``call(name, model)`` and backpropagate
    its loss: the patched model's loss and every gradient against eager's by the error-ratio rule. Returns
    the reference loss."""
    results = {}
    for name, model in models.items():
        out = call(name, model)
        out.loss.backward()
        results[name] = out.loss, _grads(model)
    (loss, grads), (eager_loss, eager_grads), (ref_loss, ref_grads) = (results[k] for k in ("patched", "eager", "ref"))
    assert_error_ratio(loss, eager_loss, ref_loss, name=f"{what}loss", floor_scale=8)
    for n in ref_grads:
        assert_error_ratio(grads[n], eager_grads[n], ref_grads[n], name=f"{what}grad {n}", floor_scale=8)
    return ref_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_match(family, dtype):
    base = family_model(family)
    models = {"patched": llama_fast.patch(clone(base, dtype)), "eager": clone(base, dtype),
              "ref": clone(base, torch.float64)}
    ids = tokens(2, 13)
    results = {}
    for name, model in models.items():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = out.logits, out.loss, _grads(model)
    (lp, sp, gp), (le, se, ge), (lr, sr, gr) = results.values()
    assert_error_ratio(lp, le, lr, name="logits", floor_scale=8)
    if dtype == torch.float32:
        assert_error_ratio(sp, se, sr, name="loss", floor_scale=8)
    else:
        # The loss is transformers' cross-entropy of the logits checked above, not a kernel's output, and
        # one token's cross-entropy moves by at most 2·max|Δlogit| (its gradient, softmax − one-hot, has an
        # L1 norm of at most 2). In bf16 eager's loss error is a mean of errors that cancel by chance
        # (Qwen3, seed 0: 1.5e-4, while its logits are 7e-3 off and ours, rotated in fp32, 4e-3), so the
        # ratio rule on that one number tests luck; the bound follows from the logits'.
        bound = 2 * (lp.double() - lr).abs().max().item() + torch.finfo(torch.float32).eps * 8
        assert (sp.double() - sr).abs().item() <= bound, (sp.item(), sr.item(), bound)
    assert set(gp) == set(gr) and all(g is not None for g in gp.values())
    for n in gp:
        assert_error_ratio(gp[n], ge[n], gr[n], name=f"grad {n}", floor_scale=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_runs_with_each_layers_window(family):
    """No op falls back to eager: each kernel runs once per layer and way (NORMS per layer), and each layer's
    attention runs with its own window and Gemma 2's with its logit cap."""
    model = llama_fast.patch(family_model(family))
    spied = [("rms_norm", rms_norm_kernel, "rms_norm_fwd"), ("rms_norm_bwd", rms_norm_kernel, "rms_norm_bwd"),
             ("add_rms_norm", rms_norm_kernel, "add_rms_norm_fwd"),
             ("add_rms_norm_bwd", rms_norm_kernel, "add_rms_norm_bwd"),
             ("rope", rope_kernel, "rope_fwd"), ("rope_bwd", rope_kernel, "rope_bwd"),
             ("swiglu", swiglu_kernel, "swiglu_fwd"), ("swiglu_bwd", swiglu_kernel, "swiglu_bwd"),
             ("attention", attention_kernel, "attention_fwd"), ("attention_bwd", attention_kernel, "attention_bwd")]
    spies = {name: mock.patch.object(module, fn, wraps=getattr(module, fn)) for name, module, fn in spied}
    mocks = {name: spy.start() for name, spy in spies.items()}
    try:
        ids = tokens(1, 13)
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        for spy in spies.values():
            spy.stop()
    layers = 2
    # the post-attention norms that run as add_rms_norm: not Gemma's (another layer design) nor Phi-3's (its layer
    # forward, with residual dropout, is not the verified source)
    fused = 0 if family in (*GEMMA, "phi3") else layers
    norms = NORMS[family] * layers + 1 - fused
    assert mocks["rms_norm"].call_count == mocks["rms_norm_bwd"].call_count == norms
    assert mocks["add_rms_norm"].call_count == mocks["add_rms_norm_bwd"].call_count == fused
    for op in ("rope", "swiglu", "attention"):
        assert mocks[op].call_count == mocks[f"{op}_bwd"].call_count == layers, op
    unit_offset = family in GEMMA
    assert all(c.args[3] is unit_offset for c in mocks["rms_norm"].call_args_list)
    activation = "gelu_tanh" if family in GEMMA else "silu"
    assert all(c.args[2] == activation for c in mocks["swiglu"].call_args_list)
    assert [c.kwargs["window"] for c in mocks["attention"].call_args_list] == WINDOWS[family]
    assert [c.kwargs["window"] for c in mocks["attention_bwd"].call_args_list] == WINDOWS[family][::-1]
    softcap = 0.5 if family == "gemma2" else 0.0
    for call in (*mocks["attention"].call_args_list, *mocks["attention_bwd"].call_args_list):
        assert call.kwargs["softcap"] == softcap


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches(family, cache):
    """Token-identical greedy generate() past the window, with transformers' sliding-window cache layers
    (DynamicSlidingWindowLayer, StaticSlidingWindowLayer) on the local layers, and a left-padded batch
    whose prompts (13 and 9 tokens) are longer than the window."""
    base = family_model(family)
    patched = llama_fast.patch(clone(base))
    ids = tokens(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    if cache == "static":
        options["cache_implementation"] = "static"
    want = base.generate(ids, **options)
    got = patched.generate(ids, **options)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_gradients_match(family):
    """LoRA on every linear layer but lm_head (Phi-3's packed qkv_proj and gate_up_proj included)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules="all-linear")
    torch.manual_seed(7)
    lora = peft.get_peft_model(family_model(family), config)
    models = {"patched": llama_fast.patch(clone(lora)), "eager": clone(lora), "ref": clone(lora, torch.float64)}
    grads = {}
    for name, model in models.items():
        model.train()
        ids = tokens(2, 10)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = _grads(model)
    assert grads["ref"] and all("lora_" in n for n in grads["ref"])
    for n in grads["ref"]:
        assert_error_ratio(grads["patched"][n], grads["eager"][n], grads["ref"][n], name=f"grad {n}", floor_scale=8)


@pytest.mark.parametrize("family,flash_kwargs", [("qwen2", False), *((family, True) for family in FAMILIES)],
                         ids=lambda x: {True: "cu_seq_lens", False: "position_ids"}.get(x, x))
def test_packed_batch_with_windows_matches_transformers(family, flash_kwargs):
    """A packed batch (DataCollatorWithFlattening) through each family's layers, its local ones with their
    window: each example sees only itself, and within it only its window; loss and every gradient against
    the unpatched model on the same packed batch (transformers' own block-diagonal sliding mask). Qwen2's also
    with position_ids alone, the sequences found from where they restart."""
    base = family_model(family).train()
    examples = [{"input_ids": tokens(1, n, seed=10 + i)[0].tolist()} for i, n in enumerate((5, 1, 19, 8))]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(examples)
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    unpacked = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    _check_loss_and_grads({"patched": llama_fast.patch(clone(base)), "eager": clone(base),
                           "ref": clone(base, torch.float64)},
                          lambda name, model: model(**(batch if name == "patched" else unpacked), use_cache=False),
                          what="packed ")


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_without_graph_breaks(family):
    torch._dynamo.reset()
    model = llama_fast.patch(family_model(family))
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


def test_sliding_window_cache_masks():
    """What transformers' sliding-window caches ask of the mask function (masks.make_mask, local_size given):
    a full DynamicSlidingWindowLayer holds the last window − 1 keys before the queries, from position
    kv_offset on: those positions' padding, every slot filled (a 4-D encoding, which generate() hands back
    unchanged for a compileable cache); a StaticSlidingWindowLayer not yet full: its slots and how many
    are filled. Another mask function laid over the window is refused."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from llama_fast.patch.masks import decode_static_cache, make_mask

    sliding = sliding_window_causal_mask_function(WINDOW)
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[1, :15] = False
    dropped = make_mask(2, 1, WINDOW, q_offset=20, kv_offset=15, mask_function=sliding, attention_mask=padding,
                        local_size=WINDOW)
    pad, filled = decode_static_cache(dropped, WINDOW)
    assert filled.tolist() == [WINDOW, WINDOW] and torch.equal(pad.bool(), padding[:, 15:21])
    static = make_mask(2, 1, WINDOW, q_offset=torch.tensor(3), kv_offset=0, mask_function=sliding,
                       attention_mask=padding[:, :4], local_size=WINDOW)
    pad, filled = decode_static_cache(static, WINDOW)
    assert filled.tolist() == [4, 4] and pad[:, :4].tolist() == padding[:, :4].int().tolist()
    with pytest.raises(NotImplementedError, match="lays another mask function over the causal mask"):
        make_mask(2, 1, WINDOW, q_offset=20, kv_offset=15, mask_function=sliding, attention_mask=padding,
                  local_size=WINDOW, use_vmap=True)


def test_what_a_family_needs_and_llama_fast_lacks_is_refused_by_name():
    """A packed MLP or partial rotation whose source is not Phi-3's, another norm, another activation: refused
    at patch(), naming the module or setting and what to pass, and nothing changed; with those ops off, the
    rest patches and computes the unpatched model's logits."""
    from llama_fast.patch import families

    relu = family_model("gemma3", hidden_activation="relu")
    layer_norm = family_model("qwen2")
    layer_norm.model.norm = torch.nn.LayerNorm(64)
    for model, match in ((relu, "or GELU with the tanh approximation \\(GeGLU\\), this model uses 'relu'"),
                         (layer_norm, "model.norm is a LayerNorm, which computes neither Llama's RMSNorm nor Gemma's")):
        with pytest.raises(ValueError, match=match):
            llama_fast.patch(model)
        assert not llama_fast.is_patched(model)
    # Phi-3 as a transformers would be whose packed MLP and partial rotation are not the sources verified
    phi3 = family_model("phi3")
    with mock.patch.object(families, "PACKED_GATED_MLP_SOURCES", set()), \
            mock.patch.object(families, "PARTIAL_ROTARY_SOURCES", set()):
        with pytest.raises(ValueError, match="Phi3MLP computes another"):
            llama_fast.patch(phi3)
        with pytest.raises(ValueError, match="Phi3Attention calls an apply_rotary_pos_emb that is neither Llama's"):
            llama_fast.patch(phi3, swiglu=False)
        assert not llama_fast.is_patched(phi3)
        _patched_logits_match(phi3, swiglu=False, rope=False)


def _patched_logits_match(model, **options):
    ids = tokens(2, 13)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = llama_fast.patch(clone(model), **options)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gemma2_attention_cap_changes_what_the_family_tests_check():
    """The tests above check Gemma 2 with its attention logits capped at 0.5 (tests/models.py): a cap its
    scores reach, so an attention that ignored it would be measurably off, well past the rounding they allow."""
    model = llama_fast.patch(family_model("gemma2"))
    uncapped = clone(model)
    uncapped.config.attn_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    ids = tokens(2, 13)
    with torch.no_grad():
        capped, plain = model(input_ids=ids).logits, uncapped(input_ids=ids).logits
    assert (capped - plain).abs().max().item() > 1e-3 * capped.abs().max().item()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
def test_fused_loss_matches(family):
    """cross_entropy=True: lm_head fused with the loss, loss and every gradient against the unpatched model
    (Gemma 2's final soft-cap: the next test)."""
    base = family_model(family).train()
    ids = tokens(2, 13)
    _check_loss_and_grads({"patched": llama_fast.patch(clone(base), cross_entropy=True), "eager": clone(base),
                           "ref": clone(base, torch.float64)}, lambda name, model: model(input_ids=ids, labels=ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma2_fused_loss_takes_its_final_soft_cap(dtype):
    """Gemma 2 with cross_entropy=True: the fused loss soft-caps the logits as Gemma2ForCausalLM does, loss
    and every gradient against the unpatched model; without
    the cap the loss is measurably another (a cap of 5 rather than Gemma 2's 30, which the small logits of a tiny
    random model would barely reach)."""
    base = family_model("gemma2", final_logit_softcapping=5.0).train()
    ids = tokens(2, 13)
    ref_loss = _check_loss_and_grads({"patched": llama_fast.patch(clone(base, dtype), cross_entropy=True),
                                      "eager": clone(base, dtype), "ref": clone(base, torch.float64)},
                                     lambda name, model: model(input_ids=ids, labels=ids))
    uncapped = clone(base)
    uncapped.config.final_logit_softcapping = None
    with torch.no_grad():
        assert abs(uncapped(input_ids=ids, labels=ids).loss.item() - ref_loss.item()) > 1e-3


def test_fused_loss_refuses_a_soft_cap_it_has_not_verified(monkeypatch):
    """A causal LM whose forward is not one known to soft-cap lm_head's output as Gemma's do: the fused loss,
    which comes back through that forward, would be capped twice or not un-capped; refused at patch()."""
    from llama_fast.patch import loss

    monkeypatch.setattr(loss, "SOFT_CAPPING_FORWARDS", set())
    model = family_model("gemma2")
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.forward is not one that llama_fast verified applies it"):
        llama_fast.patch(model, cross_entropy=True)
    assert not llama_fast.is_patched(model)


def test_docs_table_names_every_family():
    """docs/patching.md's family table has a row per family tested here and for the refused ones."""
    from pathlib import Path

    table = (Path(__file__).parents[1] / "docs" / "patching.md").read_text()
    for family in ("Llama", "Qwen2", "Qwen3", "Mistral", "Gemma 2", "Gemma 3", "Phi-3"):
        assert f"| {family} " in table, family


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A tiny Qwen2 model folder with local layers (random weights) and a byte-level tokenizer of single
    printable characters with a chat template: what transformers' Qwen2Tokenizer loads (it rebuilds a
    byte-level BPE from the saved vocabulary, so a word-level one would load as empty)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config("qwen2")).save_pretrained(folder)
    characters = bytes_to_unicode()
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{characters[b]: b - 29 for b in range(32, 127)}}  # 98 < VOCAB
    bpe = Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.system
@pytest.mark.parametrize("command", ["chat", "train"])
def test_main_job_and_train_take_another_family(qwen2_folder, tmp_path, command):
    """``python -m llama_fast chat --model`` and ``train --model`` on a Qwen2 folder, as a user runs them:
    the patched answer is the eager one token for token, and training patched starts from the unpatched
    loss and stays finite."""
    import json
    import subprocess
    import sys

    from helpers import user_env

    extra = (["--max-new-tokens", "8"] if command == "chat" else
             ["--steps", "2", "--max-length", "48", "--batch-size", "2", "--compare", "--out", str(tmp_path / "out")])
    proc = subprocess.run([sys.executable, "-m", "llama_fast", command, "--model", str(qwen2_folder), *extra],
                          cwd=tmp_path, env=user_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if command == "chat":
        assert "identical tokens: True" in proc.stdout, proc.stdout[-3000:]
        return
    report = json.loads((tmp_path / "out" / "train.json").read_text())
    assert "Qwen2ForCausalLM" in report["model"]
    eager, patched = (report["runs"][run]["losses"] for run in ("unpatched", "patched"))
    assert len(patched) == 2 and all(map(torch.isfinite, torch.tensor(patched)))
    assert abs(patched[0] - eager[0]) < 1e-4 * abs(eager[0]), (eager, patched)
