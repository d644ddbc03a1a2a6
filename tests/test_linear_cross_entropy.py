"""linear_cross_entropy against the unfused reference in float64 (error-ratio rule, loss and every
gradient) in fp32/fp16/bf16, through the Triton kernels (interpreter) and the CPU's torch phases:
reductions, num_items_in_batch, label smoothing, softcap, bias, ignored rows (all of them: 0, not
NaN), no tokens, a vocabulary that is no multiple of any block, V = 262,144 with fp32
accumulation, transformers' own ForCausalLMLoss, a frozen weight, the custom ops, bad input."""

import importlib

import pytest
import torch

from helpers import DTYPES, check_op
from llama_fast import ops, references

lce = importlib.import_module("llama_fast.ops.linear_cross_entropy")  # the module; ops.linear_cross_entropy is the op


def _inputs(device, tokens=37, hidden=24, vocab=203, ignored_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    b = torch.randn(vocab, generator=g)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    if ignored_every:
        y[::ignored_every] = -100
    return h.to(device), w.to(device), b.to(device), y.to(device)


def _reduce(rows, labels, reduction, num_items=None):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if num_items is not None:
        return rows.sum() / num_items
    return rows.sum() / (labels != -100).sum().clamp(min=1)


OPTIONS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(num_items_in_batch=50),
           dict(label_smoothing=0.1), dict(logit_softcap=4.0), dict(bias=True)]


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch, device):
    """Both implementations of the two phases: the Triton kernels, and the torch maths a CPU runs
    without the interpreter (forced here by answering "not Triton")."""
    if request.param == "torch":
        monkeypatch.setattr(lce, "_triton", lambda hidden: False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mean")
def test_matches_the_reference(device, path, dtype, options):
    h, w, b, y = _inputs(device)
    with_bias = options.pop("bias", False)
    reduction = options.get("reduction", "mean")
    smoothing, softcap = options.get("label_smoothing", 0.0), options.get("logit_softcap")

    def ours(h, w, b):
        return ops.linear_cross_entropy(h, w, y, bias=b if with_bias else None, **options)

    def ref(h, w, b):
        rows, _ = references.linear_cross_entropy_rows(h, w, y, b if with_bias else None, label_smoothing=smoothing,
                                                       softcap=softcap)
        return _reduce(rows, y, reduction, options.get("num_items_in_batch"))

    check_op(ours, ref, [(h, True), (w, True), (b, with_bias)], dtype, names=("linear_cross_entropy", ("h", "w", "b")),
             floor_scale=8)


def test_matches_transformers_causal_lm_loss(device, path):
    """Labels shifted as transformers shifts them, with and without num_items_in_batch."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    h, w, _, labels = _inputs(device, tokens=30, ignored_every=4)
    labels = labels.view(2, 15)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    for num_items in (None, torch.tensor(21, device=device)):
        theirs = ForCausalLMLoss(h @ w.t(), labels, vocab_size=w.shape[0], num_items_in_batch=num_items)
        ours = ops.linear_cross_entropy(h, w, shifted, num_items_in_batch=num_items)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_every_row_ignored_gives_zero_not_nan(device, path):
    """PyTorch's mean (and transformers 5.24's ForCausalLMLoss) give NaN when every label is ignored;
    this loss gives 0 with zero gradients, so one empty micro-batch cannot poison a run."""
    h, w, _, y = _inputs(device)
    y = torch.full_like(y, -100)
    h.requires_grad_(), w.requires_grad_()
    loss = ops.linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()
    assert torch.isnan(torch.nn.functional.cross_entropy(h @ w.t(), y))  # what the unfused loss gives


def test_no_tokens(device, path):
    h, w, _, y = _inputs(device, tokens=0)
    h.requires_grad_(), w.requires_grad_()
    loss = ops.linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 24) and not w.grad.any()


def test_a_frozen_weight_gets_no_dweight(device, path, monkeypatch):
    """A frozen lm_head (LoRA elsewhere): its gradient is neither computed nor stored."""
    h, w, _, y = _inputs(device)
    asked = []
    real = lce._phase_two
    monkeypatch.setattr(lce, "_phase_two", lambda *args: asked.append(args[-1]) or real(*args))
    h.requires_grad_()
    ops.linear_cross_entropy(h, w, y).backward()
    assert asked == [(True, False, False)] and w.grad is None and h.grad is not None


def test_large_vocabulary_accumulates_in_fp32(device, path):
    """V = 262,144, bf16 logits: the log-sum-exp is summed in fp32 and lands within 1e-4 of the
    float64 value. Summed in bf16 block by block (4096 columns at a time, the GPU kernel's block) the
    same logits are off by 0.016-0.028 in every row (computed below): visibly wrong."""
    vocab = 262_144
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, generator=g).bfloat16().to(device)
    w = (torch.randn(vocab, 16, generator=g) / 4).bfloat16().to(device)
    y = torch.tensor([0, vocab - 1, 17], device=device)
    _, lse = ops.linear_cross_entropy(h, w, y, reduction="none", return_lse=True)
    z = (h @ w.t()).double().cpu()
    exact = torch.logsumexp(z, -1)
    torch.testing.assert_close(lse.double().cpu(), exact, rtol=0, atol=1e-4)
    for row in range(3):
        top, running = z[row].max(), torch.zeros((), dtype=torch.bfloat16)
        for start in range(0, vocab, 4096):
            running = running + torch.exp(z[row, start:start + 4096] - top).sum().to(torch.bfloat16)
        assert abs(torch.log(running.double()) + top - exact[row]) > 0.01


@pytest.mark.parametrize("index", range(2))
def test_custom_ops(device, index):
    h, w, b, y = _inputs(device, tokens=9, vocab=40)
    rows, lse = torch.ops.llama_fast.linear_cross_entropy_fwd(h, w, y, b, -100, 0.0, None)
    cases = [
        (torch.ops.llama_fast.linear_cross_entropy_fwd.default,
         (h.requires_grad_(), w.requires_grad_(), y, b.requires_grad_(), -100, 0.1, 3.0)),
        (torch.ops.llama_fast.linear_cross_entropy_bwd.default,
         (torch.randn_like(rows), h.detach(), w.detach(), y, b.detach(), lse, -100, 0.0, None, True, True, True)),
    ]
    op, args = cases[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "hidden": a["hidden"].double()}, TypeError, "float64"),
    (lambda a: {**a, "weight": a["weight"].half()}, TypeError, "share one dtype"),
    (lambda a: {**a, "weight": a["weight"][:, :5]}, ValueError, "one H"),
    (lambda a: {**a, "labels": a["labels"].float()}, ValueError, "labels must be int64"),
    (lambda a: {**a, "labels": a["labels"][:3]}, ValueError, "labels must be int64"),
    (lambda a: {**a, "labels": a["labels"].clamp(min=0) + 500}, ValueError, "outside"),
    (lambda a: {**a, "reduction": "avg"}, ValueError, "reduction must be"),
    (lambda a: {**a, "reduction": "sum", "num_items_in_batch": 4}, ValueError, "would be ignored"),
    (lambda a: {**a, "label_smoothing": 1.5}, ValueError, "label_smoothing"),
    (lambda a: {**a, "logit_softcap": 0.0}, ValueError, "logit_softcap"),
    (lambda a: {**a, "bias": a["weight"][0]}, ValueError, "bias must have shape"),
], ids=["float64", "dtypes", "H", "float labels", "label count", "label range", "reduction", "num_items with sum",
        "smoothing", "softcap", "bias"])
def test_bad_input_is_named(change, error, match):
    h, w, _, y = _inputs("cpu")
    args = change(dict(hidden=h, weight=w, labels=y))
    with pytest.raises(error, match=match):
        ops.linear_cross_entropy(**args)


# Through patch(cross_entropy=True) on tiny Llamas, against the unpatched model (its own loss).


def _train_grads(model, ids, **extra):
    out = model(input_ids=ids, labels=ids, **extra)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _compare_models(base, ids, dtype=torch.float32, every_kernel=False, **extra):
    """Patched with the fused loss alone (so a bf16 comparison measures the loss, not the rounding
    of the other kernels, which tests/test_patch.py checks), or with every kernel."""
    import llama_fast
    from helpers import assert_error_ratio
    from models import clone

    kernels = {} if every_kernel else dict(rms_norm=False, rope=False, swiglu=False, attention=False)
    runs = {"patched": llama_fast.patch(clone(base, dtype), cross_entropy=True, **kernels), "eager": clone(base, dtype),
            "ref": clone(base, torch.float64)}
    results = {name: _train_grads(model.train(), ids, **extra) for name, model in runs.items()}
    (po, pg), (eo, eg), (ro, rg) = results["patched"], results["eager"], results["ref"]
    assert po.logits is None and eo.logits is not None
    assert_error_ratio(po.loss, eo.loss, ro.loss, name="loss", floor_scale=8)
    assert set(pg) == set(rg) and rg
    for n in rg:
        assert_error_ratio(pg[n], eg[n], rg[n], name=f"grad {n}", floor_scale=8)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_patched_causal_lm_loss_and_gradients(dtype, tied):
    """SmolLM2 ties lm_head to the embeddings: the fused loss's dweight lands on the shared matrix."""
    from models import tiny_model, tokens

    _compare_models(tiny_model(tie_word_embeddings=tied), tokens(2, 11), dtype)


def test_patched_with_every_kernel():
    from models import tiny_model, tokens

    _compare_models(tiny_model(tie_word_embeddings=True), tokens(2, 11), every_kernel=True)


def test_patched_loss_with_num_items_in_batch_and_without_labels():
    import llama_fast
    from models import DEVICE, clone, tiny_model, tokens

    base = tiny_model()
    ids = tokens(2, 9)
    _compare_models(base, ids, num_items_in_batch=torch.tensor(11, device=DEVICE))
    patched = llama_fast.patch(clone(base), cross_entropy=True)
    with torch.no_grad():  # without labels (generate, eval) the logits are there, as before
        torch.testing.assert_close(patched(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert importlib.import_module("llama_fast.patch").patched_options(patched)["cross_entropy"]
    llama_fast.unpatch(patched)
    assert patched(input_ids=ids, labels=ids).logits is not None


@pytest.mark.parametrize("on_head", [False, True], ids=["frozen_head", "lora_on_head"])
def test_patched_loss_with_peft_lora(on_head):
    """LoRA elsewhere: lm_head is frozen and gets no gradient; LoRA on lm_head: the adapter's
    gradients come through the fused loss (the weight is the base plus the adapter's delta)."""
    peft = pytest.importorskip("peft")
    from models import tiny_model, tokens

    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if on_head else [])
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(7)
    lora = peft.get_peft_model(tiny_model(), config)
    results = _compare_models(lora, tokens(2, 10))
    grads = results["patched"][1]
    assert all("lora_" in n for n in grads)
    assert any("lm_head" in n for n in grads) == on_head


def test_patched_training_curve_20_steps():
    """20 AdamW steps: the patched loss curve is within the error-ratio rule of the unpatched one
    (against the float64 run)."""
    import llama_fast
    from helpers import assert_error_ratio
    from models import clone, tiny_model, tokens

    base = tiny_model()
    ids = tokens(4, 12)
    curves = {}
    loss_only = dict(rms_norm=False, rope=False, swiglu=False, attention=False)  # fast in the interpreter
    for name, model in (("patched", llama_fast.patch(clone(base), cross_entropy=True, **loss_only)),
                        ("eager", clone(base)), ("ref", clone(base, torch.float64))):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        curves[name] = torch.stack(losses)
    assert curves["ref"][-1] < curves["ref"][0] - 0.1, "the run must actually train"
    assert_error_ratio(curves["patched"], curves["eager"], curves["ref"], name="loss curve", floor_scale=8)


def test_patch_refuses_cross_entropy_without_a_head():
    from transformers import LlamaModel

    import llama_fast
    from models import tiny_model

    with pytest.raises(ValueError, match="cross_entropy=True needs a causal LM"):
        llama_fast.patch(tiny_model(cls=LlamaModel), cross_entropy=True)
