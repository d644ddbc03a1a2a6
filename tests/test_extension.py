"""The C++/CUDA extension llama_fast._C: built, its CPU kernels (and CUDA kernels on a GPU)
against the references in every dtype, forward and backward, odd shapes; torch.library.opcheck
on every op; sm_90a machine code in the library; clear errors; backend choice; the patch on it."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_fast
from helpers import DTYPES, check_op
from llama_fast import extension, ops, references

ROOT = Path(__file__).resolve().parent.parent
built = pytest.mark.skipif(not extension.available(), reason="llama_fast._C not built (LLAMA_FAST_NO_EXTENSION=1)")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and extension.has_cuda_kernels() else [])


def test_extension_is_built():
    """install.sh builds it; only an explicit opt-out may leave it out."""
    if os.environ.get("LLAMA_FAST_NO_EXTENSION") == "1":
        pytest.skip("opted out")
    assert extension.available(), "llama_fast._C failed to build or load"
    assert "cpu" in ops.available_backends()


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 760), (199, 1128), (3, 4096), (2, 14336), (5, 77)])
def test_rms_norm(device, dtype, rows, cols):
    x = torch.randn(rows, cols, device=device)
    w = 1 + 0.1 * torch.randn(cols, device=device)
    check_op(lambda x, w: ops.rms_norm(x, w, backend=device), references.rms_norm, [(x, True), (w, True)], dtype,
             names=("rms_norm[ext]", ("x", "weight")))


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 760), (3, 2304), (5, 77)])
def test_gemma_rms_norm(device, dtype, rows, cols):
    x = torch.randn(rows, cols, device=device)
    w = 0.1 * torch.randn(cols, device=device)
    check_op(lambda x, w: ops.rms_norm(x, w, unit_offset=True, backend=device),
             lambda x, w: references.rms_norm(x, w, unit_offset=True), [(x, True), (w, True)], dtype,
             names=("rms_norm[ext, unit_offset]", ("x", "weight")))
    xb, wf = x.to(torch.bfloat16), w  # an fp32 weight: y still in x's dtype, Gemma's type_as(x)
    assert ops.rms_norm(xb, wf, unit_offset=True, backend=device).dtype == torch.bfloat16


@built
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_weight_and_views(device):
    x = torch.randn(9, 2 * 760, device=device)[:, ::2]  # a column-strided view: copied
    w = torch.randn(760, device=device)
    check_op(lambda x, w: ops.rms_norm(x, w, backend=device), references.rms_norm, [(x, True), (w, True)],
             torch.float32, names=("rms_norm[ext]", ("x", "weight")))
    xb = torch.randn(4, 3, 576, device=device, dtype=torch.bfloat16)
    wf = torch.randn(576, device=device)
    y = ops.rms_norm(xb, wf, backend=device)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, references.rms_norm(xb, wf), rtol=1e-5, atol=1e-5)


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,n_q,n_k,head_dim", [(1, 1, 1, 1, 64), (2, 7, 9, 3, 64), (1, 5, 32, 8, 128),
                                                        (2, 3, 4, 2, 96), (1, 4, 2, 1, 18)])
def test_rope(device, dtype, batch, seq, n_q, n_k, head_dim):
    q = torch.randn(batch, seq, n_q, head_dim, device=device).transpose(1, 2)
    k = torch.randn(batch, seq, n_k, head_dim, device=device).transpose(1, 2)
    angles = torch.randn(1, seq, head_dim // 2, device=device)
    emb = torch.cat((angles, angles), -1).expand(batch, seq, head_dim)
    check_op(lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c, s, backend=device), references.apply_rotary_pos_emb,
             [(q, True), (k, True), (emb.cos(), False), (emb.sin(), False)], dtype,
             names=("rope[ext]", ("q", "k", "cos", "sin")))


@built
@pytest.mark.parametrize("device", DEVICES)
def test_rope_fp32_tables_promote(device):
    q = torch.randn(2, 4, 5, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 5, 64, device=device, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 5, 64, device=device), torch.randn(2, 5, 64, device=device)
    got = ops.apply_rotary_pos_emb(q, k, cos, sin, backend=device)
    want = references.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b)


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 576), (127, 760), (3, 1131), (2, 14336)])
def test_swiglu(device, dtype, shape):
    gate, up = 2 * torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    check_op(lambda g, u: ops.swiglu(g, u, backend=device), references.swiglu, [(gate, True), (up, True)], dtype,
             names=("swiglu[ext]", ("gate", "up")))
    halves = torch.randn(5, 2 * shape[-1], device=device).chunk(2, dim=-1)  # fused gate_up views
    check_op(lambda g, u: ops.swiglu(g, u, backend=device), references.swiglu, [(h, True) for h in halves], dtype,
             names=("swiglu[ext] views", ("gate", "up")))


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 576), (3, 1131), (2, 3, 1536)])
def test_geglu(device, dtype, shape):
    gate, up = 2 * torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    check_op(lambda g, u: ops.geglu(g, u, backend=device), lambda g, u: references.swiglu(g, u, "gelu_tanh"),
             [(gate, True), (up, True)], dtype, names=("geglu[ext]", ("gate", "up")))


@built
def test_extension_refuses_an_unknown_activation():
    gate = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match='activation must be "silu" or "gelu_tanh", got "relu"'):
        torch.ops.llama_fast.swiglu_fwd(gate, gate, "relu")


@built
def test_swiglu_cpu_sigmoid_over_the_whole_float_range():
    """The CPU kernels' own exp and reciprocal: every magnitude, both signs, inf and NaN, forward
    and backward, against float64, elementwise within twice eager float32's own error plus 4 ulps
    (the backward's 1 + g·(1 - sigmoid) cancels near g = -1.28 in both). Results below float's
    normal range (under 1e-35, where the kernel's exp flushes to 0) may differ by that much."""
    mags = torch.tensor([0.0, 1e-30, 1e-6, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 86, 87, 87.5, 88, 100, 104, 200, 1e4])
    gate = torch.cat([mags, -mags, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    gate = torch.cat([gate, torch.linspace(-90, 90, 1001)]).view(1, -1)
    up, dout = torch.full_like(gate, 1.5), torch.full_like(gate, -0.75)

    def forward_backward(g, u, d):
        g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = references.swiglu(g, u)
        return (out.detach(), *torch.autograd.grad(out, (g, u), d))

    exact = forward_backward(gate.double(), up.double(), dout.double())
    eager = forward_backward(gate, up, dout)
    ours = (torch.ops.llama_fast.swiglu_fwd(gate, up), *torch.ops.llama_fast.swiglu_bwd(dout, gate, up))
    for name, o, e, x in zip(("out", "dgate", "dup"), ours, eager, exact):
        assert torch.equal(o.isnan(), x.isnan()) and torch.equal(o.isinf(), x.isinf()), name
        finite = x.isfinite()
        o, e, x = o[finite].double(), e[finite].double(), x[finite]
        bound = 2 * (e - x).abs() + 4 * torch.finfo(torch.float32).eps * x.abs() + 1e-35
        bad = (o - x).abs() > bound
        where = gate[0][finite[0]][bad].tolist()[:5]
        assert not bad.any(), f"{name} at gate {where}: ours {o[bad].tolist()[:5]}, exact {x[bad].tolist()[:5]}"




@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_swiglu_cpu_16bit_specials(dtype):
    """fp16/bf16 SwiGLU on the CPU (the AVX2 loop converts in registers, the portable one stages):
    zeros, both signs, the edges of the range, inf and NaN; each result within one ulp of the float64
    result rounded to the dtype (or 1e-35 for bf16 results below float's normal range, which the
    kernels' exp flushes to 0), on a row of odd width so that the tail of a row is covered too."""
    big = torch.finfo(dtype).max
    values = torch.tensor([0.0, -0.0, 1e-7, 0.1, 1, 5, 20, 90, 1e4, big, float("inf"), float("nan")])
    gate = torch.cat([values, -values, torch.linspace(-12, 12, 977)]).to(dtype).view(1, -1)
    up, dout = torch.full_like(gate, 1.5), torch.full_like(gate, -0.75)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    out64 = references.swiglu(g64, u64)
    exact = (out64.detach(), *torch.autograd.grad(out64, (g64, u64), dout.double()))
    ours = (torch.ops.llama_fast.swiglu_fwd(gate, up), *torch.ops.llama_fast.swiglu_bwd(dout, gate, up))
    for name, o, x in zip(("out", "dgate", "dup"), ours, exact):
        x = x.to(dtype).double()  # overflow to inf here is the dtype's own
        o = o.double()
        assert torch.equal(o.isnan(), x.isnan()) and torch.equal(o.isinf(), x.isinf()), name
        finite = x.isfinite()
        err = (o - x)[finite].abs()
        assert (err <= torch.finfo(dtype).eps * x[finite].abs() + 1e-35).all(), (name, err.max())

@pytest.mark.system
@built
def test_swiglu_portable_path_without_avx2():
    """On an AVX2 CPU SwiGLU runs intrinsics; LLAMA_FAST_NO_AVX2=1 makes it take the portable path
    of other CPUs (llama_fast._C.swiglu_cpu_path() says which runs), and that path passes the
    SwiGLU tests too."""
    env = {**os.environ, "LLAMA_FAST_NO_AVX2": "1"}
    ask = [sys.executable, "-c", "import torch, llama_fast._C as c; print(c.swiglu_cpu_path())"]
    assert subprocess.run(ask, env=env, capture_output=True, text=True, check=True).stdout.strip() == "portable"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert subprocess.run(ask, capture_output=True, text=True, check=True).stdout.strip() == "avx2"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "swiglu and not portable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factor", [1.0, 1.37, -0.3, 2.0**-10, 3e4])
def test_cpu_16bit_conversions_every_bit_pattern(dtype, factor):
    """The CPU kernels' own fp16/bf16 <-> float conversions, on all 65536 bit patterns (zeros,
    subnormals, normals, inf, NaN): RoPE with cos = factor, sin = 0 computes round(x · factor),
    which must equal torch's own conversion bit for bit (any NaN for NaN). factor 1 is the round
    trip; the others exercise rounding to nearest even, results in the subnormal range, overflow."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    q = torch.stack([x, torch.zeros_like(x)], dim=-1).view(1, 1, -1, 2)  # the partner element stays 0
    cos = torch.tensor([factor, 1.0]).expand(1, x.numel(), 2)
    out, _ = torch.ops.llama_fast.rope_fwd(q, q, cos, torch.zeros_like(cos))
    ours, expected = out[..., 0].flatten(), (x.float() * factor).to(dtype)
    assert torch.equal(ours.isnan(), expected.isnan())
    same = ours.view(torch.int16) == expected.view(torch.int16)
    assert (same | expected.isnan()).all(), f"{(~same & ~expected.isnan()).sum()} patterns differ"


def _op_samples(device):
    x, w = torch.randn(7, 760, device=device), torch.randn(760, device=device)
    y, rstd = torch.ops.llama_fast.rms_norm_fwd(x, w, 1e-6)
    q = torch.randn(2, 7, 4, 64, device=device).transpose(1, 2)
    k = torch.randn(2, 7, 2, 64, device=device).transpose(1, 2)
    cos, sin = torch.randn(2, 7, 64, device=device), torch.randn(2, 7, 64, device=device)
    g, u = torch.randn(5, 1128, device=device), torch.randn(5, 1128, device=device)
    ops_ = torch.ops.llama_fast
    return [
        (ops_.rms_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), 1e-6)),
        (ops_.rms_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd)),
        (ops_.rope_fwd.default, (q.requires_grad_(), k.requires_grad_(), cos, sin)),
        (ops_.rope_bwd.default, (q.detach(), k.detach(), cos, sin)),
        (ops_.swiglu_fwd.default, (g.requires_grad_(), u.requires_grad_())),
        (ops_.swiglu_bwd.default, (torch.randn_like(g), g.detach(), u.detach())),
    ]


@built
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(6),
                         ids=["rms_fwd", "rms_bwd", "rope_fwd", "rope_bwd", "swiglu_fwd", "swiglu_bwd"])
def test_opcheck(device, index):
    """Schema, fake (meta) implementation, autograd registration and dispatch are consistent."""
    op, args = _op_samples(device)[index]
    torch.library.opcheck(op, args)


@built
def test_ops_trace_under_torch_compile():
    def block(x, w, gate, up):
        return ops.rms_norm(x, w, backend="cpu").sum() + ops.swiglu(gate, up, backend="cpu").sum()

    args = (torch.randn(4, 64, requires_grad=True), torch.randn(64), torch.randn(4, 96), torch.randn(4, 96))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), block(*args))
    compiled(*args).backward()
    assert args[0].grad is not None


@built
def test_errors_name_the_problem():
    ops_ = torch.ops.llama_fast
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        ops_.rms_norm_fwd(torch.randn(4, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="x has dtype Double"):
        ops_.rms_norm_fwd(torch.randn(4, 8).double(), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops_.rms_norm_fwd(torch.randn(8, 4).t(), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="weight in x's dtype or float32"):
        ops_.rms_norm_fwd(torch.randn(4, 8).half(), torch.randn(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="gate and up must have one shape"):
        ops_.swiglu_fwd(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops_.swiglu_fwd(torch.randn(4, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        ops_.rope_fwd(torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops_.rope_fwd(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(RuntimeError, match="differ in batch, seq or head_dim"):
        ops_.rope_fwd(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))


@built
def test_backend_choice(monkeypatch):
    x = torch.randn(3, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for(x) == "cpu", "a CPU tensor runs the CPU kernels when the extension is built"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for(x) == "triton", "under the interpreter the Triton kernels are what is tested"
    assert ops.backend_for(x, extension_op=False) == "triton"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.backend_for(x, "cuda")
    with pytest.raises(ValueError, match="'cpu' has no kernel for this op"):
        ops.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), backend="cpu")


@built
def test_patch_on_the_cpu_kernels():
    from models import clone, tiny_model, tokens

    base = tiny_model()
    model = llama_fast.patch(clone(base), backend="cpu", attention=False)
    ids = tokens(2, 9)
    out, want = model(ids, labels=ids), base(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        llama_fast.patch(clone(base), backend="gpu")


@pytest.mark.system
@built
def test_library_holds_sm90a_machine_code():
    """The CUDA kernels are compiled to sm_90a (and sm_80) machine code, not only PTX."""
    if not extension.has_cuda_kernels():
        pytest.skip("built without a CUDA toolkit")
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    (library,) = glob.glob(str(ROOT / "llama_fast" / "_C*.so"))
    listing = subprocess.run([str(cuobjdump), "--list-elf", library], capture_output=True, text=True, check=True).stdout
    # The cuobjdump of triton 3.6 (the lent H200's) lists the same sm_90a cubin as "sm_90"; 3.8's as sm_90a.
    old_cuobjdump = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8)
    assert ("sm_90a" in listing or old_cuobjdump) and "sm_90" in listing and "sm_80" in listing, listing
    sass = subprocess.run([str(cuobjdump), "--dump-sass", "--gpu-architecture", "sm_90a", library],
                          capture_output=True, text=True, check=True).stdout
    kernels = ("rms_norm_fwd_kernel", "rms_norm_dx_kernel", "rope_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel")
    for kernel in kernels:
        assert kernel in sass, kernel
    assert "LDG.E.128" in sass, "the vectorised paths issue 128-bit loads"
