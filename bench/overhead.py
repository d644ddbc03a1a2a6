"""Host overhead: what one call of each op costs the CPU before and around its kernel launches, with
the launches themselves stubbed out, so it runs on any machine and measures only the Python path
(checks, backend choice, the custom op's dispatch, allocations, grid and autotuning lookups).

At decode, batch 1, a GPU finishes most of these kernels in a few microseconds, so host time is what
a patched model's decode step costs unless CUDA graphs replay it. Measured at SmolLM2's decode
shapes (one token, hidden 576, 9 query / 3 KV heads, head_dim 64, 128 cached tokens) on CPU
tensors, through the Triton path with every ``JITFunction.run`` and autotuner run replaced by a
no-op. Beside each op: the eager reference it replaces, running for real on the same tiny tensors
(compute is a few microseconds there, so it is mostly host time too), and one ``torch.mul`` of
two such tensors, the unit: the goal is each op within two of those.

Inference calls each op's launcher directly; the "with grad" column is the same call on inputs
that require grad, through the custom op and its autograd node (ops/_dispatch.py says why).

The layer rows time a whole ``LlamaDecoderLayer`` decode step (one token on a 128-token
DynamicCache) patched with the kernels stubbed, and unpatched (transformers' SDPA attention, run
for real), with the seven projections replaced by fixed outputs in both (``_FixedProjection``):
the same GEMMs either way, whose CPU time would bury the host time compared. The callables of a row
are timed in turn, one call each per round (``bench.device.measure_cpu``), so a slow spell of a
shared CPU slows them alike.
"""

import contextlib
import os

import torch


@contextlib.contextmanager
def stubbed_launches():
    """Triton launches do nothing inside the block (no compile, no autotuning, no kernel)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run = Autotuner.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


@contextlib.contextmanager
def triton_path_on_cpu():
    """The ops take their Triton path for CPU tensors (the interpreter's condition), with the
    launches stubbed. The kernel modules are imported first, while the variable is unset, so their
    kernels are compiled-kernel objects (whose launches the stub replaces), never interpreted ones."""
    from llama_fast.kernels import attention, rms_norm, rope, swiglu  # noqa: F401

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with stubbed_launches():
            yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


class _FixedProjection(torch.nn.Module):
    """Stands in for a projection (nn.Linear) of the layer rows: returns one fixed tensor of the
    output's shape. The seven GEMMs are the same in both rows (one cuBLAS launch each on a GPU) but
    on this CPU they are most of a layer's time (~1.7 ms of ~1.8 with one thread, measured here) and
    their noise hid the host time being compared. They also read the stubbed kernels' uninitialised
    outputs, whose denormals made them several times slower in the patched row only."""

    def __init__(self, linear: torch.nn.Linear, tokens: int):
        super().__init__()
        self.out = torch.randn(1, tokens, linear.out_features)

    def forward(self, x):
        return self.out


def _fix_projections(layer: torch.nn.Module, tokens: int) -> None:
    for name, child in list(layer.named_modules()):
        if isinstance(child, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, _FixedProjection(child, tokens))


def _host_us(fns: dict, rep_ms: int) -> dict:
    """Median microseconds per call of each callable, taken in turn (``device.measure_cpu``)."""
    from .device import measure_cpu

    timings = measure_cpu(fns, rep_ms=rep_ms)
    failed = {name: t["error"] for name, t in timings.items() if "error" in t}
    if failed:
        raise RuntimeError(f"overhead: {failed}")
    return {name: t["ms"] * 1e3 for name, t in timings.items()}


def _decode_tensors(dtype=torch.float32, cached=128):
    hidden, heads, kv_heads, head_dim, inter = 576, 9, 3, 64, 1536
    return dict(
        x=torch.randn(1, 1, hidden, dtype=dtype), w=torch.randn(hidden, dtype=dtype),
        q=torch.randn(1, 1, heads, head_dim, dtype=dtype).transpose(1, 2),
        k=torch.randn(1, 1, kv_heads, head_dim, dtype=dtype).transpose(1, 2),
        cos=torch.randn(1, 1, head_dim, dtype=dtype), sin=torch.randn(1, 1, head_dim, dtype=dtype),
        k_cache=torch.randn(1, kv_heads, cached + 1, head_dim, dtype=dtype),
        v_cache=torch.randn(1, kv_heads, cached + 1, head_dim, dtype=dtype),
        gate=torch.randn(1, 1, inter, dtype=dtype), up=torch.randn(1, 1, inter, dtype=dtype),
        mask=torch.ones(1, cached + 1, dtype=torch.bool),
    )


def op_rows(rep_ms: int = 100) -> list[dict]:
    from llama_fast import ops, references

    t = _decode_tensors()
    g = {name: v.detach().requires_grad_() if v.is_floating_point() else v for name, v in t.items()}

    def calls(t):
        return {
            "rms_norm": (lambda: ops.rms_norm(t["x"], t["w"], 1e-5), lambda: references.rms_norm(t["x"], t["w"], 1e-5)),
            "rope": (lambda: ops.apply_rotary_pos_emb(t["q"], t["k"], t["cos"].detach(), t["sin"].detach()),
                     lambda: references.apply_rotary_pos_emb(t["q"], t["k"], t["cos"], t["sin"])),
            "swiglu": (lambda: ops.swiglu(t["gate"], t["up"]), lambda: references.swiglu(t["gate"], t["up"])),
            "flash_attention decode": (
                lambda: ops.flash_attention(t["q"], t["k_cache"], t["v_cache"], key_padding_mask=t["mask"]),
                lambda: torch.nn.functional.scaled_dot_product_attention(t["q"], t["k_cache"], t["v_cache"],
                                                                         enable_gqa=True)),
        }

    rows = []
    # Each op with its eager twin and one torch.mul, in turn; the eager ones never reach Triton, so
    # the stub and the variable change only our path. "grad": the same call on inputs that require
    # grad, which goes through the custom op and records its autograd node (a training step's path;
    # inference calls the launcher directly, ops/_dispatch.py).
    with triton_path_on_cpu():
        for (name, (ours, eager)), (ours_grad, _) in zip(calls(t).items(), calls(g).values()):
            us = _host_us({"ours": ours, "grad": ours_grad, "eager": eager,
                           "unit": lambda: torch.mul(t["x"], t["x"])}, rep_ms)
            rows.append(dict(what=name, llama_fast_host_us=us["ours"], llama_fast_grad_host_us=us["grad"],
                             eager_us=us["eager"], torch_mul_us=us["unit"], in_torch_muls=us["ours"] / us["unit"]))
    return rows


def layer_rows(rep_ms: int = 100) -> list[dict]:
    import copy
    import inspect

    from transformers import DynamicCache, LlamaConfig, LlamaModel

    import llama_fast

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=1, vocab_size=64, attn_implementation="sdpa")
    model = LlamaModel(config).eval()
    eager_layer = copy.deepcopy(model.layers[0])
    llama_fast.patch(model)
    x = torch.randn(1, 1, 576)
    position_ids = torch.tensor([[128]])
    cos_sin = model.rotary_emb(x, position_ids)
    # transformers 5.24 calls the layer's cache argument `cache`, earlier 5.x `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(eager_layer.forward).parameters else "past_key_values"

    def step(layer, mask):
        cache = DynamicCache(config=config)
        keys, values = torch.randn(1, 3, 128, 64), torch.randn(1, 3, 128, 64)

        def run():
            cache.layers[0].keys, cache.layers[0].values = keys, values  # back to 128 cached tokens each call
            with torch.no_grad():
                layer(x, attention_mask=mask, position_ids=position_ids, use_cache=True, position_embeddings=cos_sin,
                      **{cache_arg: cache})

        cache.update(keys, values, 0)
        return run

    for layer in (eager_layer, model.layers[0]):
        _fix_projections(layer, tokens=1)
    eager, ours = step(eager_layer, None), step(model.layers[0], torch.ones(1, 129, dtype=torch.bool))
    with triton_path_on_cpu():
        us = _host_us({"ours": ours, "eager": eager}, rep_ms)
    return [dict(what="decoder layer decode step", llama_fast_host_us=us["ours"], eager_us=us["eager"])]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'':<28} {'llama_fast host µs':>19} {'with grad':>10} {'eager µs':>9} {'in torch.mul calls':>19}"]
    for r in rows:
        ratio = f"{r['in_torch_muls']:.1f}" if "in_torch_muls" in r else "-"
        grad = f"{r['llama_fast_grad_host_us']:.1f}" if "llama_fast_grad_host_us" in r else "-"
        lines.append(f"{r['what']:<28} {r['llama_fast_host_us']:>19.1f} {grad:>10} {r['eager_us']:>9.1f} {ratio:>19}")
    lines.append("llama_fast: the Python path with kernel launches stubbed (CPU), inference; with grad: the same call "
                 "on inputs that require grad (custom op + autograd node); eager: transformers' ops run for real on "
                 "the same tiny decode tensors (CPU). Host time, not GPU time.")
    return "\n".join(lines)
