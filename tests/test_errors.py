"""Bad input raises an error that names the problem; backend choice is explicit and reported."""

import pytest
import torch

import llama_fast
from llama_fast import ops
from llama_fast.backend import interpreting


def test_backend_for_reports_the_path_taken():
    x = torch.randn(2, 8)
    expected = "triton" if interpreting() else "cpu" if llama_fast.extension.available() else "reference"
    assert ops.backend_for(x) == expected == llama_fast.backend_for(x)
    assert ops.backend_for(x, extension_op=False) == ("triton" if interpreting() else "reference")
    assert ops.backend_for(x, "reference") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        ops.backend_for(x, "tpu")


def test_reference_backend_is_selectable():
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, backend="reference"), llama_fast.references.rms_norm(x, w))


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8)
    assert ops.backend_for(x) == ("cpu" if llama_fast.extension.available() else "reference")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.rms_norm(x, torch.randn(8), backend="triton")


def test_patch_refuses_a_backend_the_model_device_cannot_run(monkeypatch):
    """Refused at patch() time, naming the device, with nothing changed; not at the first forward."""
    from models import tiny_model

    model = tiny_model().cpu()
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run this model, whose parameters are on cpu"):
        llama_fast.patch(model, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run this model, whose parameters are on cpu: "
                                         r"backend 'triton' needs CUDA tensors"):
        llama_fast.patch(model, backend="triton")
    assert not llama_fast.is_patched(model)
    assert llama_fast.patched_backends(model) is None


def test_patched_backends_say_what_runs(monkeypatch):
    from models import tiny_model

    model = tiny_model().cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    llama_fast.patch(model, rope=False, backend="reference")
    assert llama_fast.patched_backends(model) == {"rms_norm": "reference", "swiglu": "reference",
                                                  "attention": "reference"}
    llama_fast.patch(model)
    ext = "cpu" if llama_fast.extension.available() else "reference"
    assert llama_fast.patched_backends(model) == {"rms_norm": ext, "rope": ext, "swiglu": ext,
                                                  "attention": "reference"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what runs follows the conditions at call time
    assert set(llama_fast.patched_backends(model).values()) == {"triton"}


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.randn(8, 1)), ValueError, "weight must have shape"),
    (lambda: ops.rms_norm(torch.randint(0, 3, (4, 8)), torch.randn(8)), TypeError, "x has dtype torch.int64"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.randn(8, dtype=torch.float64)), TypeError,
     "weight has dtype torch.float64"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "one device"),
    (lambda: ops.rms_norm(torch.randn(2, 40000), torch.randn(40000)), ValueError, "hidden size 40000"),
    (lambda: ops.rms_norm(torch.randn(()), torch.randn(1)), ValueError, "at least one dimension"),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 9)), ValueError, "one shape"),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError, "share one dtype"),
    (lambda: ops.swiglu(torch.randn(4, 8).double(), torch.randn(4, 8).double()), TypeError, "float64"),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "one device"),
    (lambda: ops.swiglu(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "non-empty last dim"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _qk(n_q=4, n_k=2, seq=5, d=64):
    return torch.randn(2, n_q, seq, d), torch.randn(2, n_k, seq, d), torch.randn(2, seq, d), torch.randn(2, seq, d)


def test_rope_bad_input_is_named():
    q, k, cos, sin = _qk()
    rope = ops.apply_rotary_pos_emb
    with pytest.raises(ValueError, match="4-D"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        rope(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match="differ in batch, seq or head_dim"):
        rope(q, k[..., :32], cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match=r"must be \(batch or 1, seq, head_dim\)"):
        rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="one shape"):
        rope(q, k, cos, sin[:1])
    with pytest.raises(TypeError, match="share one dtype"):
        rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="one device"):
        rope(q, k, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="gradients with respect to cos and sin"):
        rope(q, k, cos.requires_grad_(), sin)


@pytest.mark.parametrize("head_dim", [8, 40, 72, 320])
def test_reference_attention_takes_any_head_dim_and_triton_names_its_limit(monkeypatch, head_dim):
    """A head_dim the Triton kernel cannot tile (not a multiple of 16, or over 256) runs on the CPU,
    where attention is the eager reference; asking for Triton names the limit."""
    from llama_fast import references

    q, k, v = torch.randn(2, 4, 5, head_dim), torch.randn(2, 2, 5, head_dim), torch.randn(2, 2, 5, head_dim)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(ops.flash_attention(q, k, v), references.attention(q, k, v))
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (5, heads, head_dim)
    assert torch.equal(ops.flash_attention_varlen(*packed, cu, cu, 3, 3),
                       references.attention_varlen(*packed, cu, cu))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=rf"the Triton kernel needs a head_dim that is a multiple of 16 between 16 "
                                         rf"and 256, got {head_dim}"):
        ops.flash_attention(q, k, v)
    with pytest.raises(ValueError, match=rf"flash_attention_varlen: the Triton kernel needs a head_dim .* {head_dim}"):
        ops.flash_attention_varlen(*packed, cu, cu, 3, 3)
