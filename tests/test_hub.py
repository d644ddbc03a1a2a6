"""llama_fast's layers through transformers' own hub-kernel route (``llama_fast.hub``): after
``llama_fast.hub.register()``, ``from_pretrained(..., use_kernels=True)`` (what TRL's
``model_init_kwargs={"use_kernels": True}`` calls) runs llama_fast's RMSNorm and RoPE kernels on every module
transformers marks for them, from the kernel repository inside the package with nothing downloaded: logits,
loss and every gradient against the model loaded without kernels (error-ratio rule), through ``model.train()``
(which kernelizes again), torch.compile fullgraph with no graph break, TRL's SFTTrainer; a marked module that
computes something else refused by name; and on CUDA, llama_fast's layers chosen over transformers' defaults
whichever registers last. Each test registers inside ``kernels.use_kernel_mapping`` so that the rest of the run
keeps the global mapping it had."""

from unittest import mock

import pytest
import torch

import llama_fast
import llama_fast.hub
from helpers import assert_error_ratio
from llama_fast.kernels import rms_norm as rms_norm_kernel
from llama_fast.kernels import rope as rope_kernel
from models import VOCAB, clone, family_model, tiny_model, tokens

kernels = pytest.importorskip("kernels")  # Hugging Face's package; transformers requires it from 5.25

# (RMSNorms per decoder layer that carry the mark, rotations marked): Qwen3's q_norm and k_norm are marked
# RMSNorms too; Gemma's norms are not marked, nor is Phi-3's rotation (transformers 5.25)
MARKED = {"llama": (2, True), "qwen3": (4, True), "mistral": (2, True), "gemma2": (0, True), "phi3": (2, False)}
LAYERS = 2


def _model(family):
    return tiny_model() if family == "llama" else family_model(family)


def _saved(family, folder):
    _model(family).save_pretrained(folder)
    return folder


def _load(folder, dtype=torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


@pytest.fixture
def spies():
    names = {"rms_norm": (rms_norm_kernel, "rms_norm_fwd"), "rms_norm_bwd": (rms_norm_kernel, "rms_norm_bwd"),
             "rope": (rope_kernel, "rope_fwd"), "rope_bwd": (rope_kernel, "rope_bwd")}
    patches = {name: mock.patch.object(module, fn, wraps=getattr(module, fn)) for name, (module, fn) in names.items()}
    yield {name: p.start() for name, p in patches.items()}
    for p in patches.values():
        p.stop()


@pytest.mark.parametrize("family", list(MARKED))
def test_use_kernels_runs_llama_fast_layers(family, tmp_path, spies):
    folder = _saved(family, tmp_path)
    ids = tokens(2, 11)
    with kernels.use_kernel_mapping({}):
        llama_fast.hub.register()
        model = _load(folder, use_kernels=True)
        eager = _load(folder, use_kernels=False)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        norms, rotates = MARKED[family]
        assert spies["rms_norm"].call_count == (norms * LAYERS + 1 if norms else 0)
        assert spies["rope"].call_count == (LAYERS if rotates else 0)

        # model.train() kernelizes again, in training mode: the layers stay llama_fast's, gradients included
        for spy in spies.values():
            spy.reset_mock()
        models = {"ours": model.train(), "eager": eager.train(), "ref": clone(eager, torch.float64).train()}
        results = {}
        for name, m in models.items():
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            results[name] = out.loss, {n: p.grad for n, p in m.named_parameters()}
    assert spies["rms_norm_bwd"].call_count == spies["rms_norm"].call_count == (norms * LAYERS + 1 if norms else 0)
    assert spies["rope_bwd"].call_count == spies["rope"].call_count == (LAYERS if rotates else 0)
    (loss, grads), (eager_loss, eager_grads), (ref_loss, ref_grads) = results.values()
    assert_error_ratio(loss, eager_loss, ref_loss, name="loss", floor_scale=8)
    for n in ref_grads:
        assert_error_ratio(grads[n], eager_grads[n], ref_grads[n], name=f"grad {n}", floor_scale=8)


def test_fullgraph_without_graph_breaks(tmp_path, monkeypatch):
    """torch.compile traces the hub layers whole, the first call included (each class's check runs once,
    outside the graph: torch.compiler.assume_constant_result)."""
    monkeypatch.setattr(llama_fast.hub, "_KINDS", {})
    folder = _saved("llama", tmp_path)
    ids = tokens(2, 12)
    with kernels.use_kernel_mapping({}):
        llama_fast.hub.register()
        model = _load(folder, use_kernels=True)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(input_ids=ids)
        assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
            torch.testing.assert_close(compiled, model(input_ids=ids).logits)
    torch._dynamo.reset()


def test_a_marked_module_that_computes_something_else_is_refused(monkeypatch):
    """The marks name a role, not a computation: a module marked "RMSNorm" whose forward is not Llama's or
    Gemma's, or an apply_rotary_pos_emb that is not a verified rotation, raises NotImplementedError naming it
    at its first call, never a silent wrong answer."""
    from kernels import Mode, kernelize, use_kernel_forward_from_hub
    from llama_fast.patch import families

    @use_kernel_forward_from_hub("RMSNorm")
    class ScaleNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            return hidden_states * self.weight / hidden_states.norm(dim=-1, keepdim=True)

    with kernels.use_kernel_mapping({}):
        llama_fast.hub.register()
        norm = kernelize(torch.nn.Sequential(ScaleNorm()), mode=Mode.INFERENCE, device="cpu")
        with pytest.raises(NotImplementedError, match="ScaleNorm is marked \"RMSNorm\" for hub kernels but computes "
                                                      "neither Llama's RMSNorm nor Gemma's"):
            norm(torch.randn(2, 8))
        monkeypatch.setattr(llama_fast.hub, "_KINDS", {})
        monkeypatch.setattr(families, "ROTARY_SOURCES", set())
        model = kernelize(tiny_model(), mode=Mode.INFERENCE, device="cpu")
        with pytest.raises(NotImplementedError, match="an apply_rotary_pos_emb marked \"rotary_pos_emb\" for hub "
                                                      "kernels is neither Llama's rotation nor Phi-3's"):
            model(input_ids=tokens(1, 5))


def test_cuda_gpus_get_llama_fast_layers_over_transformers_defaults():
    """On CUDA, transformers registers its default hub layers (kernels-community's, downloaded from the
    Hub) for all of "cuda" each time it loads a model with use_kernels=True, after llama_fast.hub.register():
    llama_fast's capability range (8.0 up) is narrower, and the kernels package serves a GPU from the
    narrowest range that holds it, so sm_80 and sm_90 get llama_fast's layers and older GPUs transformers'.
    Read from the kernels package's mapping (kernels 0.19.1's internals: there is no GPU here to kernelize on)."""
    from kernels._internals.layer.globals import _KERNEL_MAPPING
    from transformers.integrations.hub_kernels import register_kernel_mapping_transformers

    from kernels import Mode

    with kernels.use_kernel_mapping({}):
        llama_fast.hub.register()
        register_kernel_mapping_transformers()
        for mark in llama_fast.hub.LAYERS:
            by_capability = _KERNEL_MAPPING.get()[mark]["cuda"].repos_by_capability
            for capability in (80, 90, 100):
                ours = by_capability.find_smallest_interval(capability)[Mode.FALLBACK]
                assert ours._repo_path == llama_fast.hub.REPOSITORY, (mark, capability)
            assert Mode.FALLBACK not in by_capability.find_smallest_interval(75), mark  # transformers' own


def test_trl_use_kernels(tmp_path, spies):
    """TRL's SFTTrainer loading the model itself with ``model_init_kwargs={"use_kernels": True}`` (TRL 1.16's
    replacement for use_liger_kernel) trains on llama_fast's layers: the first step's loss is the one of the
    model loaded without kernels."""
    trl = pytest.importorskip("trl")  # not on every machine the tests run on (a lent GPU's)
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer

    folder = _saved("llama", tmp_path / "model")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    examples = datasets.Dataset.from_list([{"input_ids": tokens(1, n, seed=30 + i)[0].tolist()}
                                           for i, n in enumerate((6, 9, 4, 11))])
    losses = {}
    with kernels.use_kernel_mapping({}):
        llama_fast.hub.register()
        for use_kernels in (True, False):
            args = SFTConfig(output_dir=str(tmp_path / str(use_kernels)), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=1e-3, max_length=None, bf16=False, report_to=[], save_strategy="no",
                             logging_steps=1, model_init_kwargs={"use_kernels": use_kernels, "dtype": torch.float32})
            trainer = SFTTrainer(model=str(folder), args=args, train_dataset=examples, processing_class=tokenizer)
            trainer.train()
            losses[use_kernels] = trainer.state.log_history[0]["loss"]
            if use_kernels:
                assert spies["rms_norm"].call_count and spies["rms_norm_bwd"].call_count
                assert spies["rope"].call_count and spies["rope_bwd"].call_count
                for spy in spies.values():
                    spy.reset_mock()
            else:
                assert not any(spy.call_count for spy in spies.values())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
