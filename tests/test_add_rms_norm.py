"""ops.add_rms_norm (the residual add fused into the RMSNorm after it) against its eager reference, forward
and backward, in every dtype, by the error-ratio rule (helpers.py): gradients through both outputs and
through each alone, mixed dtypes (autocast's bf16 attention output onto an fp32 residual), empty inputs,
the checks, the backends it refuses, and a torch.compile fullgraph trace."""

from unittest import mock

import pytest
import torch

from helpers import DTYPES, assert_error_ratio, check_op, leaf
from llama_fast import ops, references
from llama_fast.backend import interpreting

NAMES = ("add_rms_norm", ("x", "residual", "weight"))


def _inputs(device, *shape):
    x, residual = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    return x, residual, 1 + 0.1 * torch.randn(shape[-1], device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (7, 760), (127, 64), (3, 4096), (2, 5, 1128)])
def test_add_rms_norm(device, dtype, shape):
    x, residual, w = _inputs(device, *shape)
    check_op(ops.add_rms_norm, references.add_rms_norm, [(x, True), (residual, True), (w, True)], dtype, names=NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_is_eagers_bit_for_bit(device, dtype):
    """The norm is of the sum as eager rounds it: summed equals eager's add exactly, and y its norm."""
    x, residual, w = (t.to(dtype) for t in _inputs(device, 9, 760))
    y, summed = ops.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(summed, residual + x)
    assert_error_ratio(y, references.rms_norm(residual + x, w, 1e-5),
                       references.rms_norm((residual + x).double(), w.double(), 1e-5), name="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("used", ["y", "summed"])
def test_one_output_receives_gradient(device, dtype, used):
    """Only y's gradient (the layer's last residual unused) or only summed's: the other is zero."""
    x, residual, w = _inputs(device, 5, 2, 760)
    results = {}
    for name, fn, cast in (("ours", ops.add_rms_norm, dtype), ("eager", references.add_rms_norm, dtype),
                           ("ref", references.add_rms_norm, torch.float64)):
        inputs = [leaf(t.to(cast)) for t in (x, residual, w)]
        y, summed = fn(*inputs, 1e-5)
        out = y if used == "y" else summed
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, out.dtype)
        results[name] = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    for i, input_name in enumerate(NAMES[1]):
        ours, eager, ref = (results[n][i] for n in ("ours", "eager", "ref"))
        if ref is None:  # the weight, when only summed is used: our backward gives zeros
            assert not ours.any()
            continue
        assert_error_ratio(ours, eager, ref, name=f"grad of {input_name} ({used} only)", dtype=dtype)


def test_mixed_dtypes_promote_as_eager(device):
    """Under bf16 autocast the attention output is bf16 and the residual fp32: the sum is fp32 as eager's add,
    y follows the weight and the sum, and each input's gradient is in its own dtype."""
    x, residual, w = _inputs(device, 6, 760)
    x = leaf(x.bfloat16())
    residual, w = leaf(residual), leaf(w.bfloat16())
    y, summed = ops.add_rms_norm(x, residual, w, 1e-5)
    y_ref, summed_ref = references.add_rms_norm(x, residual, w, 1e-5)
    assert summed.dtype == torch.float32 and y.dtype == y_ref.dtype == torch.float32
    assert torch.equal(summed, summed_ref)
    torch.testing.assert_close(y, y_ref)
    dy, dsummed = torch.randn_like(y), torch.randn_like(summed)
    grads = torch.autograd.grad((y, summed), (x, residual, w), (dy, dsummed))
    want = torch.autograd.grad((y_ref, summed_ref), (x, residual, w), (dy, dsummed))
    for g, e in zip(grads, want):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2)  # bf16 x and w: within bf16 rounding


@pytest.mark.parametrize("backend", ["reference", *(["triton"] if interpreting() else [])])
@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)])
def test_empty(device, backend, shape):
    x, residual, w = (leaf(t) for t in _inputs(device, *shape))
    y, summed = ops.add_rms_norm(x, residual, w, backend=backend)
    assert y.shape == summed.shape == x.shape
    dx, dres, dw = torch.autograd.grad(y.sum() + summed.sum(), (x, residual, w))
    assert dx.shape == dres.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


def test_checks_name_the_problem():
    x, w = torch.randn(3, 64), torch.randn(64)
    with pytest.raises(TypeError, match="add_rms_norm: residual has dtype torch.float64"):
        ops.add_rms_norm(x, x.double(), w)
    with pytest.raises(ValueError, match=r"add_rms_norm: x and residual must have one shape \(no broadcasting\), "
                                         r"got \(3, 64\) and \(1, 64\)"):
        ops.add_rms_norm(x, x[:1], w)
    with pytest.raises(ValueError, match=r"add_rms_norm: weight must have shape \(64,\)"):
        ops.add_rms_norm(x, x, w[:32])
    with pytest.raises(ValueError, match="add_rms_norm: inputs must be on one device, got x on cpu, residual on meta"):
        ops.add_rms_norm(x, x.to("meta"), w)
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.add_rms_norm(x[0, 0], x[0, 0], w[:1])


def test_backends(monkeypatch):
    """No C++ kernel: "cpu" and "cuda" are refused with backend_for's message; a CPU without the
    interpreter runs the reference."""
    x, residual, w = _inputs("cpu", 4, 64)
    for backend in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=f"backend '{backend}' has no kernel for this op"):
            ops.add_rms_norm(x, residual, w, backend=backend)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mock.patch.object(references, "add_rms_norm", wraps=references.add_rms_norm) as reference:
        y, summed = ops.add_rms_norm(x, residual, w)
    assert reference.call_count == 1 and torch.equal(summed, x + residual)
    assert torch.equal(y, references.rms_norm(x + residual, w))


def test_fullgraph_compile(device):
    """torch.compile(fullgraph=True) traces the op (its custom ops, their fakes and autograd) with no graph
    break, and the compiled forward and backward give the eager op's results."""
    torch._dynamo.reset()
    x, residual, w = _inputs(device, 2, 7, 96)

    def step(x, residual, w):
        y, summed = ops.add_rms_norm(x, residual, w, 1e-5)
        return (y * y).sum() + (summed * summed.detach()).sum()

    inputs = [leaf(t) for t in (x, residual, w)]
    want = torch.autograd.grad(step(*inputs), inputs)
    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    for compiler in ("aot_eager",):
        compiled = torch.compile(step, backend=compiler, fullgraph=True)
        got = torch.autograd.grad(compiled(*inputs), inputs)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)
    torch._dynamo.reset()
