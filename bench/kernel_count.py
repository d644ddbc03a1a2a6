"""Kernels per decode layer: how many non-GEMM kernels one decoded token costs each decoder layer,
patched and eager, with a DynamicCache and a StaticCache. Counted on the CPU, no GPU needed.

At batch 1 a GPU finishes each of these kernels in a few microseconds, so their number, each a
launch and a dependent wait, is most of a decode step's time outside the GEMMs. Counted here:

- every ATen op that would be a kernel on a GPU (a ``TorchDispatchMode`` sees each one): not views,
  not allocations (``empty``), not the matrix products (``mm``, ``addmm``, ... the same in both),
  not llama_fast's own custom ops (their Triton launches are counted instead);
- every Triton launch (``JITFunction.run`` / ``Autotuner.run``, stubbed: no kernel runs, so the
  count needs no interpreter time and the values computed are garbage, which a count ignores).

A tiny Llama (hidden 64, 4 query / 2 KV heads) prefills 8 tokens, then decodes one; the count of
that decode forward at 4 layers minus the count at 2, halved, is one layer's (what the embedding,
the final norm, the LM head and the mask cost once per forward cancels out).
"""

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The matrix products: cuBLAS launches, the same patched and eager, not what the fusions change.
_GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"})
# Allocations and metadata: no kernel on a GPU.
_FREE = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
                   "lift_fresh", "promote_types", "is_same_size",
                   "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"})


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        namespace = func.namespace
        if namespace == "aten" and not func.is_view and name not in _GEMMS and name not in _FREE:
            self.ops[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counted_launches(counter: collections.Counter):
    """Triton launches do nothing and are counted by kernel name (the Triton path taken for CPU
    tensors, as ``overhead.triton_path_on_cpu`` sets it up)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from .overhead import triton_path_on_cpu

    def jit_run(self, *args, **kwargs):
        counter[f"triton.{self.fn.__name__}"] += 1

    def tuned_run(self, *args, **kwargs):
        counter[f"triton.{self.base_fn.__name__}"] += 1

    with triton_path_on_cpu():
        saved = (JITFunction.run, Autotuner.run)
        JITFunction.run, Autotuner.run = jit_run, tuned_run
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = saved


def _cache_arg() -> str:
    """transformers 5.24 calls the forward's cache argument ``cache``, earlier 5.x ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _model(layers: int, patched: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama_fast

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    if patched:
        llama_fast.patch(model)
    return model


def _decode_step_ops(layers: int, patched: bool, static: bool) -> collections.Counter:
    """Kernels of one decoded token after an 8-token prefill, by name."""
    from transformers import DynamicCache, StaticCache

    model = _model(layers, patched)
    cache_arg = _cache_arg()
    prompt = torch.randint(3, 128, (1, 8))
    cache = StaticCache(config=model.config, max_cache_len=16) if static else DynamicCache(config=model.config)
    counts = collections.Counter()
    launches = _counted_launches(counts) if patched else contextlib.nullcontext()
    counter = _AtenCounter()
    with torch.no_grad(), launches:
        model(input_ids=prompt, **{cache_arg: cache}, use_cache=True)
        for position in (8, 9):  # the second token is counted: the first may set up what later ones reuse
            counts.clear()
            counter.ops.clear()
            with counter:
                model(input_ids=prompt[:, -1:], **{cache_arg: cache}, use_cache=True,
                      position_ids=torch.tensor([[position]]), cache_position=torch.tensor([position]))
    counts.update(counter.ops)
    return counts


def _compiled_step_kernels(layers: int, patched: bool) -> collections.Counter:
    """Kernels of one decoded token through the forward compiled by Inductor (fullgraph, a StaticCache:
    the CUDA-graph recipe's graph), by name: the kernels Inductor generated for the graph (its own
    count, ``generated_kernel_count``; each runs once per call) and the Triton launches of our ops."""
    from torch._inductor import metrics
    from transformers import StaticCache

    model = _model(layers, patched)
    cache_arg = _cache_arg()
    prompt = torch.randint(3, 128, (1, 8))
    cache = StaticCache(config=model.config, max_cache_len=16)
    counts = collections.Counter()
    torch._dynamo.reset()
    forward = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad(), _counted_launches(counts) if patched else contextlib.nullcontext():
        model(input_ids=prompt, **{cache_arg: cache}, use_cache=True)
        metrics.reset()
        for position in (8, 9):  # compiled on the first token, counted on the second
            counts.clear()
            forward(input_ids=prompt[:, -1:], **{cache_arg: cache}, use_cache=True,
                    position_ids=torch.tensor([[position]]), cache_position=torch.tensor([position]))
    counts["inductor generated"] = metrics.generated_kernel_count
    return counts


def per_layer(patched: bool, static: bool, compiled: bool = False) -> tuple[float, dict]:
    """(kernels per decode layer, that count by kernel name) for one configuration."""
    if compiled:
        four, two = _compiled_step_kernels(4, patched), _compiled_step_kernels(2, patched)
    else:
        four, two = _decode_step_ops(4, patched, static), _decode_step_ops(2, patched, static)
    names = sorted(set(four) | set(two))
    by_name = {n: (four[n] - two[n]) / 2 for n in names if four[n] != two[n]}
    return sum(by_name.values()), by_name


def rows(compiled: bool = False) -> list[dict]:
    """Eager forwards with both caches; with ``compiled``, also the StaticCache forward compiled by
    Inductor, counted on the CPU: Inductor's CPU code generation stands in for its GPU one (both fuse
    the same pointwise and reduction ops, and neither fuses through an opaque custom op)."""
    out = []
    configs = [("dynamic", False), ("static", False)] + ([("static, compiled", True)] if compiled else [])
    for cache, is_compiled in configs:
        for patched in (True, False):
            total, by_name = per_layer(patched, cache != "dynamic", is_compiled)
            out.append(dict(cache=cache, model="patched" if patched else "eager", kernels_per_layer=total,
                            by_kernel=by_name))
    return out


def format_table(table: list[dict]) -> str:
    lines = [f"{'cache':16} {'model':8} {'kernels/layer':>13}  by kernel"]
    for r in table:
        detail = ", ".join(f"{n} {c:g}" for n, c in r["by_kernel"].items())
        lines.append(f"{r['cache']:16} {r['model']:8} {r['kernels_per_layer']:>13g}  {detail}")
    return "\n".join(lines)
