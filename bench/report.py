"""Run bench cases and report them: a table on the terminal (with a progress bar while it runs),
one JSON file of every figure with the device and versions, and PNG plots per suite."""

import gc
import json
import os
import sys

import torch

from .cases import OURS, add_speedups, rows_for
from .device import measure, measure_cpu


def run(cases, device: torch.device, peaks: dict | None, *, rep_ms: int = 100, progress: bool = True,
        on_rows=None) -> list[dict]:
    """Every provider of every case, timed. ``on_rows(rows)`` is called with the rows so far (speed-ups
    filled in) after each case on a CPU and each provider on a GPU, so that a run killed at its time
    limit (bench/gpu.sh gives each suite its own) keeps what it measured. Without the progress bar,
    each row is printed as it is measured, for the same reason."""
    from tqdm import tqdm

    rows = []
    cases = list(cases)
    bar = tqdm(total=sum(len(c.providers) for c in cases), disable=not progress, file=sys.stderr, leave=False)

    def measured(new: list[dict]) -> None:
        rows.extend(new)
        if not progress:
            for r in new:
                print(_line(r), flush=True)
        if on_rows is not None:
            add_speedups(rows)
            on_rows(rows)

    for case in cases:
        if device.type != "cuda":
            measured(_run_cpu_case(case, peaks, rep_ms))
            bar.update(len(case.providers))
            continue
        for provider, setup in case.providers.items():
            bar.set_description(f"{case.op} {case.mode} {case.shape} {provider}"[:70])
            fn = None
            try:
                fn = setup()
                row = rows_for(case, provider, measure(fn, device, rep_ms=rep_ms), peaks)
            except Exception as exc:  # one provider failing (OOM, a missing feature) must not end the run
                row = _error_row(case, provider, f"{type(exc).__name__}: {exc}"[:300])
            finally:
                del fn
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            measured([row])
            bar.update()
    bar.close()
    add_speedups(rows)
    return rows


def _error_row(case, provider: str, error: str) -> dict:
    return dict(suite=case.suite, op=case.op, mode=case.mode, shape=case.shape, size=case.size, dtype=case.dtype,
                provider=provider, error=error)


def _run_cpu_case(case, peaks: dict | None, rep_ms: int) -> list[dict]:
    """A case's providers timed in turn (see device.measure_cpu), all set up at once."""
    fns, rows = {}, []
    for provider, setup in case.providers.items():
        try:
            fns[provider] = setup()
        except Exception as exc:  # one provider failing must not end the run
            rows.append(_error_row(case, provider, f"{type(exc).__name__}: {exc}"[:300]))
    for provider, timing in measure_cpu(fns, rep_ms=rep_ms).items():
        if "error" in timing:
            rows.append(_error_row(case, provider, timing["error"]))
        else:
            rows.append(rows_for(case, provider, timing, peaks))
    del fns
    gc.collect()
    return rows


def _throughput(r: dict) -> str:
    if "error" in r:
        return "error"
    parts = []
    if "tflop_per_s" in r:
        parts.append(f"{r['tflop_per_s']:.1f} TFLOP/s")
    if "gb_per_s" in r:
        parts.append(f"{r['gb_per_s']:.0f} GB/s")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("pct_peak") is not None:
        parts.append(f"{r['pct_peak']:.0f}% peak")
    return ", ".join(parts)


def _line(r: dict) -> str:
    if "error" in r:
        timing, mem = r["error"][:60], ""
    else:
        timing = f"{r['ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f})"
        mem = f"{r['peak_bytes'] / 1e6:.0f}" if r.get("peak_bytes") is not None else "-"
    if r.get("noisy"):
        timing += " noisy"
    speed = ", ".join(f"{x:.2f}x{' (noisy)' if p in r.get('speedup_noisy', ()) else ''} vs {p}"
                      for p, x in r.get("speedup_over", {}).items())
    return (f"{r['op']:<20} {r['mode']:<12} {r['shape']:<38} {r['dtype']:<8} {r['provider']:<24} "
            f"{timing:<24} {_throughput(r):<30} {mem:>8}  {speed}")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<20} {'pass':<12} {'shape':<38} {'dtype':<8} {'provider':<24} {'ms (p20-p80)':<24} "
             f"{'throughput':<30} {'mem MB':>8}  speed-up of ours"]
    lines += [_line(r) for r in rows]
    if any(r.get("noisy") for r in rows):
        lines.append("noisy: the p20-p80 spread is wider than the median; such a time, and a speed-up computed from "
                     "it, is not a measurement to quote: run again, or with a larger --rep-ms.")
    return "\n".join(lines)


def write_json(path, meta: dict, rows: list[dict], **extra) -> None:
    """Written to a temporary file and renamed over ``path``: a process killed mid-write (a GPU run's
    time limit) leaves the previous complete file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, **extra, results=rows), f, indent=1, default=str)
    os.replace(tmp, path)


def plot(path, rows: list[dict], title: str) -> bool:
    """One PNG per suite: a panel per (op, pass, dtype, shape family), throughput against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def family(r):
        return (r["op"], r["mode"], r["dtype"], r["shape"].split(" tokens=")[0].split(" B=")[-1].split("=", 1)[-1]
                if r["suite"] != "e2e" else r["shape"])

    good = [r for r in rows if "error" not in r]
    panels: dict = {}
    for r in good:
        panels.setdefault(family(r), []).append(r)
    if not panels:
        return False
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4 * rows_n), squeeze=False)
    for ax, (key, items) in zip(axes.flat, panels.items()):
        metric = next(m for m in ("tflop_per_s", "gb_per_s", "tokens_per_s") if m in items[0])
        for provider in sorted({r["provider"] for r in items}):
            pts = sorted((r["size"], r[metric]) for r in items if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider,
                    linewidth=2.5 if provider.startswith(OURS) else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(" ".join(map(str, key))[:60], fontsize=9)
        ax.set_xlabel("size (tokens / sequence / KV length)")
        ax.set_ylabel({"tflop_per_s": "TFLOP/s", "gb_per_s": "GB/s", "tokens_per_s": "tokens/s"}[metric])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
