"""The ops suite: rms_norm (Llama's and Gemma's), apply_rotary_pos_emb, swiglu and geglu, forward, backward
and both, at the shapes of SmolLM2-135M, Llama-3-8B and Llama-3-70B over a sweep of token counts.

Providers: eager PyTorch (the references), ``torch.compile`` of the references, Liger-Kernel
when installed, and llama_fast labelled with the backend that ran: Triton on a GPU (plus the C++
extension's CUDA kernels when built), the extension's CPU kernels on a CPU.
"""

import functools

import torch

from llama_fast import ops, references

from . import formulas
from .cases import OURS, Case, passes
from .compiled import compile_static
from .shapes import MODELS


def _liger():
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return dict(
        rms_norm=lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama"),
        # Liger's Gemma norm: offset 1 on the weight, all in fp32 ("gemma" casting), as apply_liger_kernel_to_gemma2
        gemma_rms_norm=lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5, 1.0, "gemma"),
        rope=lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
        swiglu=lambda g, u: LigerSiLUMulFunction.apply(g, u),
        geglu=lambda g, u: LigerGELUMulFunction.apply(g, u),
    )


@functools.cache
def _compiled(fn):
    return compile_static(fn)


def _providers(device, ours, reference, liger, compile_too: bool):
    backend = ops.backend_on(device)
    providers = {"eager": reference, f"{OURS}[{backend}]": ours}
    if device.type == "cuda" and "cuda" in ops.available_backends():
        providers[f"{OURS}[cuda]"] = functools.partial(ours, backend="cuda")
    if compile_too:
        providers["torch.compile"] = _compiled(reference)
    if liger is not None and device.type == "cuda":
        providers["liger"] = liger
    return providers


# Llama's three ops: the headline's (a short lease's first minutes), where Gemma's variants wait for the suite
LLAMA_OPS = ("rms_norm", "apply_rotary_pos_emb", "swiglu")


def cases(device: torch.device, dtype: torch.dtype, models, token_counts, modes, compile_too=True, only=None):
    """The suite's cases; ``only``: the ops to keep (by name), all by default."""
    liger = _liger() or {}
    e = torch.finfo(dtype).bits // 8
    dname = str(dtype).removeprefix("torch.")
    for model_name in models:
        m = MODELS[model_name]
        for tokens in token_counts:
            shape = f"{model_name} tokens={tokens}"

            def norm_inputs(grad, m=m, tokens=tokens):
                x = torch.randn(tokens, m.hidden, device=device, dtype=dtype, requires_grad=grad)
                w = torch.randn(m.hidden, device=device, dtype=dtype, requires_grad=grad)
                return (x, w), (x, w)

            def rope_inputs(grad, m=m, tokens=tokens):
                batch, seq = 1, tokens
                q = torch.randn(batch, seq, m.q_heads, m.head_dim, device=device, dtype=dtype).transpose(1, 2)
                k = torch.randn(batch, seq, m.kv_heads, m.head_dim, device=device, dtype=dtype).transpose(1, 2)
                q.requires_grad_(grad), k.requires_grad_(grad)
                cos = torch.randn(1, seq, m.head_dim, device=device, dtype=dtype)
                return (q, k, cos, torch.randn_like(cos)), (q, k)

            def swiglu_inputs(grad, m=m, tokens=tokens):
                g = torch.randn(tokens, m.intermediate, device=device, dtype=dtype, requires_grad=grad)
                u = torch.randn(tokens, m.intermediate, device=device, dtype=dtype, requires_grad=grad)
                return (g, u), (g, u)

            def rms(x, w, eps=1e-5):
                return references.rms_norm(x, w, eps)

            def gemma_rms(x, w, eps=1e-5):
                return references.rms_norm(x, w, eps, unit_offset=True)

            def gelu_gated(g, u):
                return references.swiglu(g, u, "gelu_tanh")

            specs = [
                ("rms_norm", functools.partial(ops.rms_norm, eps=1e-5), rms, liger.get("rms_norm"), norm_inputs,
                 lambda mode: formulas.rms_norm_bytes(tokens, m.hidden, e, e, mode)),
                ("apply_rotary_pos_emb", ops.apply_rotary_pos_emb, references.apply_rotary_pos_emb,
                 liger.get("rope"), rope_inputs,
                 lambda mode: formulas.rope_bytes(1, tokens, m.q_heads, m.kv_heads, m.head_dim, e, mode)),
                ("swiglu", ops.swiglu, references.swiglu, liger.get("swiglu"), swiglu_inputs,
                 lambda mode: formulas.swiglu_bytes(tokens, m.intermediate, e, mode)),
                # Gemma's two: the same bytes as Llama's, other arithmetic (GeGLU's cubic and its derivative)
                ("rms_norm[unit_offset]", functools.partial(ops.rms_norm, eps=1e-5, unit_offset=True), gemma_rms,
                 liger.get("gemma_rms_norm"), norm_inputs,
                 lambda mode: formulas.rms_norm_bytes(tokens, m.hidden, e, e, mode)),
                ("geglu", ops.geglu, gelu_gated, liger.get("geglu"), swiglu_inputs,
                 lambda mode: formulas.swiglu_bytes(tokens, m.intermediate, e, mode)),
            ]
            for op, ours, reference, lig, make, nbytes in specs:
                if only is not None and op not in only:
                    continue
                for mode in modes:
                    case = Case("ops", op, mode, shape, tokens, dname, bytes=nbytes(mode))
                    for name, fn in _providers(device, ours, reference, lig, compile_too).items():
                        case.providers[name] = passes(fn, make, mode)
                    yield case
