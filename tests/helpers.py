"""Tolerances by the error-ratio rule, input builders and the torchrun launcher shared by the test modules.

The rule (flash-attention's; docs/testing.md, "The accuracy rule"): against a reference computed in float64 from the
same inputs (more precise than any dtype under test, fp32 included), the kernel's error may be at
most RATIO times the error of eager PyTorch computing the same thing in the same dtype, plus a
floor: one unit in the last place of the dtype at the scale of the values, plus one fp32 unit
at ``floor_scale``, the size of the fp32 intermediates the kernels accumulate (1 for O(1) inputs).
The second term matters where eager's error is zero by structure rather than by precision:
attention over a single key has dq and dk exactly 0 in eager, while a kernel forms them from
P·(dO·v − dO·o), a difference of dot products of size ~sqrt(head_dim) summed over the G heads
of a group, so attention tests pass floor_scale = 4·G·sqrt(head_dim).
"""

import os
import subprocess
import sys

import torch

RATIO = 2.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_ratio(actual, eager_lowp, reference, *, name="", dtype=None, floor_scale=1.0):
    """actual: the kernel's output; eager_lowp: eager PyTorch in the same dtype; reference: float64."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert actual.dtype == eager_lowp.dtype, f"{name}: dtype {actual.dtype} != eager {eager_lowp.dtype}"
    infinite = torch.isinf(reference)
    if infinite.any():  # an attention lse's rows that see no key: -inf, exactly, in every run; the rest by the rule
        for run, label in ((actual, "output"), (eager_lowp, "eager")):
            assert torch.equal(run[infinite].double(), reference[infinite].double()), f"{name}: {label} is not " \
                f"infinite exactly where the reference is"
        actual, eager_lowp, reference = actual[~infinite], eager_lowp[~infinite], reference[~infinite]
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    dtype = dtype or actual.dtype
    scale = reference.double().abs().max().item() if reference.numel() else 0.0
    floor = torch.finfo(dtype).eps * max(scale, 1.0) + torch.finfo(torch.float32).eps * floor_scale
    err = max_err(actual, reference)
    eager = max_err(eager_lowp, reference)
    bound = RATIO * eager + floor
    assert err <= bound, f"{name}: error {err:.3e} > {RATIO} x eager {eager:.3e} + floor {floor:.3e}"


def assert_gradients_error_ratio(actual: dict, eager_lowp: dict, reference: dict, *, name=""):
    """The rule on a model's gradients taken together: {parameter name: gradient}, each gradient
    divided by the largest element of its float64 value, all of them one vector.

    For a deep model's gradients rather than per parameter: there, each parameter's largest error
    (~1e-5 of its scale) is a sum of many roundings, most of them shared with eager's backward, and
    two estimates that close trade places by chance. SmolLM2 with the fused loss, measured
    2026-11-30: over its 272 gradients together ours is 5x closer to float64 than eager's (2.3e-5
    against 1.2e-4), 3x at the median parameter, and 2-3x further on 5 of them. A wrong gradient
    anywhere is off by 1e-3 of its scale or more, far past eager's worst, and fails this."""
    assert actual.keys() == eager_lowp.keys() == reference.keys(), f"{name}: different parameters"
    dtype = next(iter(actual.values())).dtype

    def errors(grads):
        out = {}
        for n, ref in reference.items():
            assert grads[n].shape == ref.shape and torch.isfinite(grads[n]).all(), f"{name}: grad {n}"
            out[n] = max_err(grads[n], ref) / max(ref.double().abs().max().item(), 1e-300)
        return out

    ours, eager = errors(actual), errors(eager_lowp)
    floor = torch.finfo(dtype).eps + torch.finfo(torch.float32).eps  # the floor at scale 1 (errors are relative)
    worst = max(ours, key=ours.get)
    assert ours[worst] <= RATIO * max(eager.values()) + floor, (
        f"{name}: grad {worst} error {ours[worst]:.3e} of its scale > {RATIO} x eager's worst "
        f"{max(eager.values()):.3e} ({max(eager, key=eager.get)}) + floor {floor:.3e}")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad that tolerates a tuple or a single tensor."""
    if isinstance(outputs, torch.Tensor):
        outputs, grad_outputs = (outputs,), (grad_outputs,)
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def check_op(fn, ref_fn, inputs, dtype, *, names, backward=True, floor_scale=1.0):
    """Run fn and ref_fn on ``inputs`` cast to ``dtype``, and ref_fn on them in float64; compare
    outputs and input gradients by the error-ratio rule. ``inputs``: list of (tensor, requires_grad)."""
    low = [leaf(t.to(dtype)) if rg else t.to(dtype) for t, rg in inputs]
    eager = [leaf(t.to(dtype)) if rg else t.to(dtype) for t, rg in inputs]
    fp64 = [leaf(t.double()) if rg else t.double() for t, rg in inputs]
    out = fn(*low)
    out_eager = ref_fn(*eager)
    out_ref = ref_fn(*fp64)
    outs = out if isinstance(out, tuple) else (out,)
    outs_eager = out_eager if isinstance(out_eager, tuple) else (out_eager,)
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    for i, (a, e, r) in enumerate(zip(outs, outs_eager, outs_ref)):
        assert_error_ratio(a, e, r, name=f"{names[0]} output {i}", dtype=dtype, floor_scale=floor_scale)
    if not backward:
        return
    dys = [torch.randn_like(r) for r in outs_ref]
    want = [i for i, (_, rg) in enumerate(inputs) if rg]
    g = torch.autograd.grad(outs, [low[i] for i in want], [d.to(a.dtype) for d, a in zip(dys, outs)])
    g_eager = torch.autograd.grad(outs_eager, [eager[i] for i in want],
                                  [d.to(a.dtype) for d, a in zip(dys, outs_eager)])
    g_ref = torch.autograd.grad(outs_ref, [fp64[i] for i in want], dys)
    for j, i in enumerate(want):
        assert_error_ratio(g[j], g_eager[j], g_ref[j], name=f"{names[0]} grad of {names[1][i]}", dtype=dtype,
                           floor_scale=floor_scale)


def module_layout_qkv(device, batch, heads, q_len, kv_len, head_dim=32):
    """q, k, v as transformers' attention modules hand them over: (B, S, H, D) projections viewed as
    (B, H, S, D); ``heads`` is (query heads, KV heads)."""
    q_heads, kv_heads = heads
    return (torch.randn(batch, q_len, q_heads, head_dim, device=device).transpose(1, 2),
            torch.randn(batch, kv_len, kv_heads, head_dim, device=device).transpose(1, 2),
            torch.randn(batch, kv_len, kv_heads, head_dim, device=device).transpose(1, 2))


def check_packed_attention(device, dtype, name, **options):
    """``flash_attention_varlen`` against the reference over packed sequences of 0, 1, 7, 40 and 65 tokens
    (4 query heads on 2 KV heads, head_dim 32), output and gradients by the error-ratio rule; ``options``
    (window=, softcap=, softmax_scale=) go to both."""
    from llama_fast import ops, references

    lengths = [0, 1, 7, 40, 65]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = sum(lengths)
    q = torch.randn(total, 4, 32, device=device)
    k, v = torch.randn(total, 2, 32, device=device), torch.randn(total, 2, 32, device=device)

    def ours(q, k, v):
        return ops.flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), **options)

    def ref(q, k, v):
        return references.attention_varlen(q, k, v, cu, cu, **options)

    check_op(ours, ref, [(q, True), (k, True), (v, True)], dtype, names=(name, ("q", "k", "v")),
             floor_scale=4 * 2 * 32 ** 0.5)


def user_env(**extra) -> dict:
    """The environment of a new shell on this machine, for commands run as a user runs them: none of
    this test run's own variables (TRITON_INTERPRET above all, which conftest.py sets), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRITON_", "LLAMA_FAST_", "PYTEST_")) and k != "PYTHONPATH"}
    return {**env, **extra}


def torchrun(script: str, out, processes: int, *args, timeout: int = 900, **env) -> None:
    """Run ``script`` (a path) under ``torchrun --standalone`` with ``processes`` processes, its first
    argument ``out``, in a user's environment plus ``env``; fail with the end of its output if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, str(out), *args]
    done = subprocess.run(command, env=user_env(**env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def load_runs(dirs: dict) -> dict:
    """{(name, scenario): result} for every OUT/<scenario>.pt a run wrote, ``dirs`` naming each run's OUT."""
    return {(name, file.removesuffix(".pt")): torch.load(os.path.join(folder, file))
            for name, folder in dirs.items() for file in os.listdir(folder) if file.endswith(".pt")}
