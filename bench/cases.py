"""What a bench case is, and how one is turned into result rows.

A case is one op, one pass (``fwd``, ``bwd``, ``fwdbwd``, ``decode``, ``train_step``,
``generate``) at one shape, with the work it does (bytes or FLOPs from ``formulas``) and one
setup function per provider. A setup allocates that provider's inputs and returns the callable
to time, so only one provider's tensors are alive at a time.
"""

import dataclasses
from collections.abc import Callable

import torch

OURS = "llama_fast"


@dataclasses.dataclass
class Case:
    suite: str
    op: str
    mode: str
    shape: str
    size: int  # the x axis of the plots: tokens, sequence length or KV length
    dtype: str
    bytes: int | None = None
    flops: int | None = None
    tokens: int | None = None  # for e2e: tokens processed per call
    providers: dict[str, Callable[[], Callable[[], object]]] = dataclasses.field(default_factory=dict)


def passes(fn, make_inputs, mode: str):
    """A setup for ``mode`` of ``fn``: make_inputs(requires_grad) returns (inputs, grad_inputs)."""

    def setup():
        inputs, wrt = make_inputs(mode != "fwd")
        if mode == "fwd":
            return lambda: fn(*inputs)
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = tuple(torch.randn_like(o) for o in outs)
        if mode == "bwd":
            return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)

        def forward_backward():
            again = fn(*inputs)
            return torch.autograd.grad(again if isinstance(again, tuple) else (again,), wrt, grads)

        return forward_backward

    return setup


def is_noisy(timing: dict) -> bool:
    """A timing too unsteady to quote: its p20-p80 spread is wider than its median (a shared CPU's slow
    spells do this; a 0.46 ms median with a 0.46-36.9 ms spread was seen on the 2-core dev VM)."""
    return timing["p80_ms"] - timing["p20_ms"] > timing["ms"]


def rows_for(case: Case, provider: str, timing: dict, peaks: dict | None) -> dict:
    seconds = timing["ms"] / 1e3
    row = dict(suite=case.suite, op=case.op, mode=case.mode, shape=case.shape, size=case.size, dtype=case.dtype,
               provider=provider, **timing, noisy=is_noisy(timing))
    if case.bytes:
        row["gb_per_s"] = case.bytes / seconds / 1e9
        if peaks:
            row["pct_peak"] = 100 * case.bytes / seconds / peaks["bytes_per_s"]
    if case.flops:
        row["tflop_per_s"] = case.flops / seconds / 1e12
        if peaks:
            row["pct_peak"] = 100 * case.flops / seconds / peaks["bf16_flops"]
    if case.tokens:
        row["tokens_per_s"] = case.tokens / seconds
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = provider's time / ours, on our row, for every other provider of the same case.

    ``speedup_noisy`` lists the providers whose speed-up rests on a noisy timing (theirs or ours).
    """
    key = lambda r: (r["suite"], r["op"], r["mode"], r["shape"], r["dtype"])  # noqa: E731
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(key(r), []).append(r)
    for group in by_case.values():
        ours = [r for r in group if r["provider"].startswith(OURS)]
        for r in ours:
            others = [o for o in group if o is not r and o.get("ms")]
            r["speedup_over"] = {o["provider"]: o["ms"] / r["ms"] for o in others}
            r["speedup_noisy"] = [o["provider"] for o in others if o["noisy"] or r["noisy"]]
