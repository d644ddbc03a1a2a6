"""Every op is a torch.library custom op with a fake implementation and registered autograd, and
``torch.library.opcheck`` passes on each, forward and backward: the Triton ops (on CPU tensors under
the interpreter, on CUDA tensors on a GPU) and the C++ extension's ops (on the device they were built
for). opcheck runs the op for real, under fake tensors (the fake's shapes, dtypes and strides must
match), through autograd's registration and through AOT dispatch with static and dynamic shapes."""

import pytest
import torch

import llama_fast


def _rope_inputs(device, dtype):
    # q, k as transformers hands them over: (B, S, H, D) projections viewed as (B, H, S, D)
    q = torch.randn(2, 5, 4, 16, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, device=device, dtype=dtype).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 16, device=device, dtype=dtype), torch.randn(2, 5, 16, device=device, dtype=dtype)
    return q, k, cos, sin


def _cases(device, dtype):
    """(name, op, args) for each op of the Triton path."""
    ops = torch.ops.llama_fast
    x, w = torch.randn(6, 32, device=device, dtype=dtype), torch.randn(32, device=device, dtype=dtype)
    _, rstd = ops.triton_rms_norm_fwd.default(x, w, 1e-6)
    residual = torch.randn(6, 32, device=device, dtype=dtype)
    _, summed, summed_rstd = ops.triton_add_rms_norm_fwd.default(x, residual, w, 1e-6)
    gate, up = torch.randn(6, 40, device=device, dtype=dtype), torch.randn(6, 40, device=device, dtype=dtype)
    q, k, cos, sin = _rope_inputs(device, dtype)
    qa = torch.randn(2, 9, 4, 16, device=device, dtype=dtype).transpose(1, 2)
    ka, va = torch.randn(2, 2, 9, 16, device=device, dtype=dtype), torch.randn(2, 2, 9, 16, device=device, dtype=dtype)
    pad = torch.ones(2, 9, dtype=torch.bool, device=device)
    pad[1, :3] = False
    pad = pad.view(torch.uint8)
    out, lse = ops.triton_flash_attention_fwd.default(qa, ka, va, pad, None, True, 0.25, 0, 0.0, False)
    kv_lens = torch.tensor([9, 6], dtype=torch.int32, device=device)
    # packed: sequences of 5, 0 and 12 queries over 7, 3 and 12 keys
    qp, kp, vp = (torch.randn(n, h, 16, device=device, dtype=dtype) for n, h in ((17, 4), (22, 2), (22, 2)))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in ([0, 5, 5, 17], [0, 7, 10, 22]))
    out_p, lse_p = ops.triton_flash_attention_varlen_fwd.default(qp, kp, vp, cu_q, cu_k, 12, 12, True, 0.25, 0, 0.0,
                                                                  False)
    return [
        ("rms_norm_fwd", ops.triton_rms_norm_fwd.default, (x, w, 1e-6)),
        ("rms_norm_bwd", ops.triton_rms_norm_bwd.default, (torch.randn_like(x), x, w, rstd)),
        ("add_rms_norm_fwd", ops.triton_add_rms_norm_fwd.default, (x, residual, w, 1e-6)),
        ("add_rms_norm_bwd", ops.triton_add_rms_norm_bwd.default,
         (torch.randn_like(x), torch.randn_like(x), summed, w, summed_rstd)),
        ("swiglu_fwd", ops.triton_swiglu_fwd.default, (gate, up)),
        ("swiglu_bwd", ops.triton_swiglu_bwd.default, (torch.randn_like(gate), gate, up)),
        ("rope_fwd", ops.triton_rope_fwd.default, (q, k, cos, sin)),
        ("rope_bwd", ops.triton_rope_bwd.default, (torch.randn_like(q), torch.randn_like(k), cos, sin)),
        # inference only (it writes a KV cache): at a static cache's device-held fill count, and into views
        ("rope_into_cache", ops.triton_rope_into_cache.default,
         (q, k, torch.randn_like(k), cos, sin, torch.zeros(2, 2, 9, 16, device=device, dtype=dtype),
          torch.zeros(2, 2, 9, 16, device=device, dtype=dtype), torch.tensor(3, device=device))),
        ("rope_into_cache views", ops.triton_rope_into_cache.default,
         (q, k, torch.randn_like(k), cos, sin, torch.zeros(2, 2, 9, 16, device=device, dtype=dtype)[:, :, 2:7],
          torch.zeros(2, 2, 9, 16, device=device, dtype=dtype)[:, :, 2:7], None)),
        ("flash_attention_fwd", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, pad, None, True, 0.25, 0, 0.0, False)),
        # the caller uses the lse (return_lse=True): its gradient goes into the backward
        ("flash_attention_fwd lse", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, pad, None, True, 0.25, 0, 0.0, True)),
        ("flash_attention_fwd window", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, pad, None, True, 0.25, 4, 0.0, False)),
        # Gemma 2's local layers: a window and the logit soft-cap
        ("flash_attention_fwd window softcap", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, pad, None, True, 0.25, 4, 2.0, False)),
        ("flash_attention_fwd nopad", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, None, None, True, 0.25, 0, 0.0, False)),
        # a static cache: inference only, so no gradients asked for
        ("flash_attention_fwd kv_lens", ops.triton_flash_attention_fwd.default,
         (qa, ka, va, pad, kv_lens, True, 0.25, 0, 0.0, False)),
        ("flash_attention_bwd", ops.triton_flash_attention_bwd.default,
         (torch.randn_like(out), qa, ka, va, out, lse, None, pad, True, 0.25, 0, 0.0, False)),
        ("flash_attention_bwd lse", ops.triton_flash_attention_bwd.default,
         (torch.randn_like(out), qa, ka, va, out, lse, torch.randn_like(lse), pad, True, 0.25, 0, 0.0, False)),
        ("flash_attention_bwd deterministic", ops.triton_flash_attention_bwd.default,
         (torch.randn_like(out), qa, ka, va, out, lse, None, pad, True, 0.25, 0, 0.0, True)),
        ("flash_attention_bwd capped", ops.triton_flash_attention_bwd.default,
         (torch.randn_like(out), qa, ka, va, out, lse, None, pad, True, 0.25, 0, 2.0, False)),
        ("flash_attention_varlen_fwd", ops.triton_flash_attention_varlen_fwd.default,
         (qp, kp, vp, cu_q, cu_k, 12, 12, True, 0.25, 0, 0.0, False)),
        ("flash_attention_varlen_fwd lse", ops.triton_flash_attention_varlen_fwd.default,
         (qp, kp, vp, cu_q, cu_k, 12, 12, True, 0.25, 0, 0.0, True)),
        ("flash_attention_varlen_bwd", ops.triton_flash_attention_varlen_bwd.default,
         (torch.randn_like(out_p), qp, kp, vp, out_p, lse_p, None, cu_q, cu_k, 12, 12, True, 0.25, 0, 0.0, False)),
        ("flash_attention_varlen_bwd lse", ops.triton_flash_attention_varlen_bwd.default,
         (torch.randn_like(out_p), qp, kp, vp, out_p, lse_p, torch.randn_like(lse_p), cu_q, cu_k, 12, 12, True, 0.25,
          0, 0.0, False)),
    ]


CASES = 24  # len(_cases(...)); test_every_triton_op_is_checked holds it to that


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("index", range(CASES))
def test_triton_ops(device, dtype, index):
    if device.type == "cpu" and not llama_fast.backend.interpreting():
        pytest.skip("the Triton ops run on CPU tensors only under the interpreter")
    name, op, args = _cases(device, dtype)[index]
    # the capped forward's and the lse-returning forward's autograd too
    differentiable = "_fwd" in name and name.endswith(("fwd", "nopad", "softcap", "lse"))
    grads = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and differentiable else a
             for a in args]
    torch.library.opcheck(op, tuple(grads))


def test_every_triton_op_is_checked(device):
    if device.type == "cpu" and not llama_fast.backend.interpreting():
        pytest.skip("the Triton ops run on CPU tensors only under the interpreter")
    cases = _cases(device, torch.float32)
    assert len(cases) == CASES, "test_triton_ops runs CASES cases: a case past them would go unchecked"
    names = {name.split()[0] for name, _, _ in cases}  # importing llama_fast registered them
    registered = {n.removeprefix("triton_") for n in dir(torch.ops.llama_fast) if n.startswith("triton_")}
    assert names == registered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extension_ops(dtype):
    """The C++ ops on the CPU (their fake and autograd parts are the same functions as the Triton ops')."""
    if not llama_fast.extension.available():
        pytest.skip(f"the C++ extension is not loaded: {llama_fast.extension.status()}")
    ops = torch.ops.llama_fast
    x, w = torch.randn(6, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    _, rstd = ops.rms_norm_fwd(x, w, 1e-6)
    gate, up = torch.randn(6, 40, dtype=dtype), torch.randn(6, 40, dtype=dtype)
    q, k, cos, sin = _rope_inputs("cpu", dtype)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    for op, args in [
        (ops.rms_norm_fwd, (leaf(x), leaf(w), 1e-6)), (ops.rms_norm_bwd, (torch.randn_like(x), x, w, rstd)),
        (ops.swiglu_fwd, (leaf(gate), leaf(up))), (ops.swiglu_bwd, (torch.randn_like(gate), gate, up)),
        (ops.rope_fwd, (q.requires_grad_(), k.requires_grad_(), cos, sin)),
        (ops.rope_bwd, (torch.randn_like(q), torch.randn_like(k), cos, sin)),
    ]:
        torch.library.opcheck(op, args)


def _op_calls(device, requires_grad):
    """(the op's KernelOp, call) per public op: the custom ops the call may use."""
    import importlib

    def leaf(*shape, **kw):
        return torch.randn(*shape, device=device, **kw).requires_grad_(requires_grad)

    x, w, gate, up = leaf(3, 32), leaf(32), leaf(3, 40), leaf(3, 40)
    q, k = leaf(1, 5, 4, 16).transpose(1, 2), leaf(1, 5, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 16, device=device), torch.randn(1, 5, 16, device=device)
    kv = leaf(1, 2, 5, 16)
    packed_q, packed_kv = leaf(5, 4, 16), leaf(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    module = lambda name: importlib.import_module(f"llama_fast.ops.{name}")  # noqa: E731
    return [
        (module("rms_norm")._KERNELS, lambda: llama_fast.ops.rms_norm(x, w)),
        (module("add_rms_norm")._KERNELS, lambda: llama_fast.ops.add_rms_norm(x, x, w)),
        (module("swiglu")._KERNELS, lambda: llama_fast.ops.swiglu(gate, up)),
        (module("rope")._KERNELS, lambda: llama_fast.ops.apply_rotary_pos_emb(q, k, cos, sin)),
        (module("attention")._KERNELS, lambda: llama_fast.ops.flash_attention(q, kv, kv)),
        (module("attention")._VARLEN_KERNELS,
         lambda: llama_fast.ops.flash_attention_varlen(packed_q, packed_kv, packed_kv, cu, cu, 3, 3)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_eager_inference_skips_the_custom_op(device, monkeypatch, requires_grad):
    """Inference calls the launcher directly (the custom op's dispatch is most of an op's host time,
    ops/_dispatch.py); inputs that need gradients go through the custom op, whose autograd they need.
    Both give the same result."""
    if device.type == "cpu" and not llama_fast.backend.interpreting():
        pytest.skip("the Triton ops run on CPU tensors only under the interpreter")
    for kernels, call in _op_calls(device, requires_grad):
        expected = call()
        custom_op, used = kernels.forward, []
        monkeypatch.setattr(kernels, "forward", lambda *a, op=custom_op: used.append(1) or op(*a))
        got = call()
        assert used == ([1] if requires_grad else []), custom_op
        as_tuple = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
        for e, g in zip(as_tuple(expected), as_tuple(got)):
            assert torch.equal(e, g) and g.requires_grad == requires_grad
        with torch.no_grad():  # no graph to record: direct even for inputs that require grad
            used.clear()
            call()
            assert used == []


def test_direct_call_rule():
    """When an op may skip its custom op: never for tensor subclasses with their own dispatch (fake
    tensors), under a dispatch mode, or for a tensor that needs a graph; a Parameter is plain."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from llama_fast.ops._dispatch import direct_call_ok

    plain, weight = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    assert direct_call_ok(plain, None) and not direct_call_ok(plain, weight)
    with torch.no_grad():
        assert direct_call_ok(plain, weight)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        assert not direct_call_ok(fake)
    assert not direct_call_ok(fake)  # a subclass even outside its mode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not direct_call_ok(plain)
