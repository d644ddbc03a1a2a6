"""``python -m bench``: llama_fast's bench suites and the GPU-free checks.

  python -m bench [all]      every suite that is meaningful on this machine, then a summary
  python -m bench ops        rms_norm / RoPE / SwiGLU vs eager, torch.compile, Liger-Kernel
  python -m bench attention  flash attention prefill and decode vs SDPA and eager
                             (--model-only: the static performance model, no GPU needed)
  python -m bench e2e        training step and generate(), patched vs unpatched
  python -m bench audit      compile every kernel for sm_90a / sm_80: registers, spills, HGMMA, TMA, 128-bit
                             loads, instructions per matrix-loop iteration against a baseline
  python -m bench traffic    bytes eager PyTorch moves per op vs the fused kernel's minimum
  python -m bench overhead   host time per op call and per decode layer step, launches stubbed, vs eager
  python -m bench loss       the fused linear + cross-entropy loss step vs the unfused one: peak memory, speed
  python -m bench headline   the figures a short GPU lease must bring back first: attention fwd/bwd vs SDPA at
                             Llama-3-8B heads, decode at KV 1k/16k/128k, the memory-bound ops (bench/gpu.sh first)

With --out DIR, each suite writes DIR/<suite>.json (every figure, the device, the versions and the
date) and DIR/<suite>.png. The JSON is rewritten after every measurement ("complete": false in its
meta until the suite ends), so a run stopped at a time limit keeps what it measured. On a machine
with no GPU the suites time on the CPU and say so; those figures are CPU timings, never GPU
performance.
"""

import argparse
import dataclasses
import os
import sys

from llama_fast.backend import interpreting

SUITES = ("ops", "attention", "e2e")


def _audit(args) -> int:
    from .audit import audit, check_baseline, format_table, write_baseline
    from .report import write_json

    reports = audit(models=args.model, archs=tuple(args.arch or (90, 80)), groups=args.group)
    if args.update_baseline:
        write_baseline(reports)
        compared = "baseline rewritten from this run"
    else:
        compared = check_baseline(reports)
    print(format_table(reports))
    bad = [r for r in reports if r.problems]
    print(f"\n{len(reports)} compiled, {len(bad)} with problems; {compared}")
    if args.json or args.out:
        write_json(args.json or os.path.join(args.out, "audit.json"), {"what": "ahead-of-time audit, no GPU used"},
                   [dataclasses.asdict(r) for r in reports])
    return 1 if bad else 0


def _attention_model(args) -> int:
    import triton

    from .device import H200
    from .model import ANCHORS, attention_model, calibrate_liger, format_table, summary
    from .report import write_json

    # --quick: SmolLM2's shape only (the CI case: about half the compiles)
    predictions = attention_model(models=["smollm2-135m"] if args.quick else ["llama3-8b", "smollm2-135m"])
    print(format_table(predictions))
    meta = {"what": "static performance model of the attention kernels from their sm_90a SASS "
                    "(compiled ahead of time, no GPU): a model, not a measurement",
            "triton": triton.__version__, "ceilings": dataclasses.asdict(H200),
            "anchors_published_h100": ANCHORS, "summary": summary(predictions)}
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        print("\nliger-kernel is not installed: no calibration against its published H100 figures")
    else:
        from importlib.metadata import version

        meta["liger_kernel_compiled_here"] = version("liger-kernel")
        meta["calibration_liger_h100"] = calibration = calibrate_liger()
        print(f"\nMemory-bound model against Liger-Kernel's published H100 forward medians (fitted: "
              f"{calibration['bandwidth_efficiency_fitted']:.3f} of the assumed copy rate, "
              f"{calibration['launch_ms_fitted'] * 1e3:.1f} us a launch); model, not a measurement:")
        for p in calibration["points"]:
            print(f"  {p['kernel']:<18} x={p['x']:>6} measured {p['ms'] * 1e3:7.1f} us, predicted "
                  f"{p['predicted_h100_ms'] * 1e3:7.1f} us ({p['predicted_over_measured']:.2f}); H200 model: ours / "
                  f"Liger's time {p['ours_over_liger_time']:.2f}")
        for kernel, ratios in calibration["held_out_predicted_over_measured"].items():
            print(f"  fitted on the other kernel only, {kernel}: predicted / measured "
                  + " ".join(f"{r:.2f}" for r in ratios))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "attention_model.json"), meta, [dataclasses.asdict(p) for p in predictions])
    return 0


def _overhead(args) -> int:
    from .overhead import format_table, layer_rows, op_rows

    rows = op_rows(rep_ms=args.rep_ms) + layer_rows(rep_ms=args.rep_ms)
    print(format_table(rows))
    _write_cpu_rows(args.out, "overhead.json", rows,
                    "host time: the Python path of each op with kernel launches stubbed, on CPU tensors; eager ops "
                    "run for real on the same tiny decode tensors")
    return 0


def _write_cpu_rows(out, name: str, rows, what: str) -> None:
    """Rows measured or counted on this machine's CPU, as ``out/name`` with what they are (nothing without --out)."""
    if not out:
        return
    import torch

    from . import device as dev
    from .report import write_json

    meta = dev.describe(torch.device("cpu"))
    meta["what"] = what
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, name), meta, rows)


def _kernels(args) -> int:
    from .kernel_count import format_table, rows

    table = rows(compiled=args.compile)
    print(format_table(table))
    _write_cpu_rows(args.out, "kernel_count.json", table,
                    "non-GEMM kernels per decoder layer of one decoded token (ATen compute ops by a dispatch mode, "
                    "plus Triton launches, stubbed), tiny Llama, 4-layer minus 2-layer count, halved")
    return 0


def _partial_writer(path, meta, results=None, rows_as=None, **extra):
    """For report.run's on_rows: the JSON rewritten with the rows so far, marked incomplete; None without a path.
    ``rows_as`` names the key the rows go under when ``results`` holds something else (the loss's peaks)."""
    from .report import write_json

    if not path:
        return None

    def write(rows):
        if rows_as:
            write_json(path, {**meta, "complete": False}, results, **extra, **{rows_as: rows})
        else:
            write_json(path, {**meta, "complete": False}, rows, **extra)

    return write


# The loss step's speed: Llama-3-8B's lm_head and SmolLM2's on a GPU (8,192 tokens, bf16); on a CPU,
# SmolLM2's at 128 tokens in fp32 (22 GFLOP a step: seconds per provider on two cores).
LOSS_SHAPES_GPU = {"llama3-8b": (8192, 4096, 128256), "smollm2-135m": (8192, 576, 49152)}
LOSS_SHAPES_CPU = {"smollm2-135m": (128, 576, 49152)}


def _loss(args) -> int:
    import torch

    from . import device as dev
    from . import loss
    from .compiled import strict_dynamo
    from .report import format_table, run, write_json

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    # torch.compile is left out of --quick (bench/gpu.sh): a lent machine compiles cold, and the loss step
    # comes late in the lease's few minutes; eager is the baseline the issue measures against.
    cases = loss.cases(device, LOSS_SHAPES_GPU if gpu else LOSS_SHAPES_CPU, torch.bfloat16 if gpu else torch.float32,
                       compile_too=(gpu and not args.quick) or args.compile)
    if args.list:
        return _list_cases(cases)
    memory = loss.rows(torch.device("cuda" if gpu else "meta"))
    print(loss.format_table(memory) + "\n")
    meta = dev.describe(device)
    meta["what"] = ("peak memory of one loss step (forward + backward), " + memory[0]["how"] +
                    "; its speed per provider (speed)")
    path = os.path.join(args.out, "loss.json") if args.out else None
    if path:
        os.makedirs(args.out, exist_ok=True)
        write_json(path, {**meta, "complete": False}, memory, speed=[])
    if not gpu:
        print("Speed below: CPU timings (labelled CPU), not GPU performance; llama_fast[torch] is the fused "
              "loss's chunked torch path, the one a CPU runs.")
    with strict_dynamo():
        speed = run(cases, device, meta.get("peaks"), rep_ms=args.rep_ms, progress=not args.no_progress,
                    on_rows=_partial_writer(path, meta, memory, rows_as="speed"))
    print(f"== loss step on {meta['device']} ==")
    print(format_table(speed), flush=True)
    if path:
        write_json(path, {**meta, "complete": True}, memory, speed=speed)
    return 0


def _traffic(args) -> int:
    from .report import write_json
    from .traffic import format_table, traffic

    rows = traffic(args.model)
    print(format_table(rows))
    if args.out:
        write_json(os.path.join(args.out, "traffic.json"), {"what": "bytes counted on meta tensors, no GPU used"}, rows)
    return 0


def _suite_cases(name, device, args):
    import torch

    from . import attention, e2e, ops

    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if name == "ops":
        models = args.model or (["smollm2-135m", "llama3-8b", "llama3-70b"] if gpu else ["smollm2-135m"])
        if args.tokens:
            tokens = args.tokens
        elif gpu:
            tokens = [2048, 8192] if args.quick else [1024, 4096, 16384]
        else:
            tokens = [256] if args.quick else [256, 2048]
        modes = ["fwd", "bwd", "fwdbwd"] if gpu else ["fwd", "bwd"]
        return ops.cases(device, dtype, models, tokens, modes, compile_too=gpu or args.compile)
    if name == "attention":
        if not gpu:
            return [*attention.prefill_cases(device, [(dtype, 64, 4, 2)], [256], ["fwd"], tokens_total=256),
                    *attention.window_cases(device, [(dtype, 64, 4, 2)], [256], 64, ["fwd"], tokens_total=256),
                    *attention.softcap_cases(device, [(dtype, 64, 4, 2)], [256], 50.0, ["fwd"], tokens_total=256),
                    *attention.decode_cases(device, dtype, [512], [1], head_dim=64, q_heads=4, kv_heads=2,
                                            q_lens=(1, 8))]
        seqs = [1024, 4096, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        configs = [(torch.bfloat16, 128, 32, 8), (torch.bfloat16, 64, 16, 16)]
        if not args.quick:
            configs.append((torch.float16, 128, 32, 8))
        cases = list(attention.prefill_cases(device, configs, seqs, ["fwd", "bwd"]))
        cases += attention.window_cases(device, configs[:1], [s for s in seqs if s > 4096], 4096, ["fwd", "bwd"])
        # Gemma 2 9B's heads (head_dim 256, 16 query heads on 8 KV heads) and its cap of 50, at one length:
        # FlexAttention compiles per shape, tens of seconds each, inside bench/gpu.sh's time
        cases += attention.softcap_cases(device, [(torch.bfloat16, 256, 16, 8)], [4096], 50.0, ["fwd", "bwd"])
        kv_lens = [1024, 16384, 131072] if args.quick else [1024, 4096, 16384, 65536, 131072]
        return cases + list(attention.decode_cases(device, torch.bfloat16, kv_lens, [1, 8], q_lens=(1, 32)))
    return e2e.cases(device, dtype, layers=args.layers, include_smollm2=not args.no_smollm2, quick=args.quick)


def _headline_cases(device, args):
    """The lease's first minutes (bench/gpu.sh first): causal prefill forward and backward at Llama-3-8B heads
    (bf16, batch 4 x 4096) against SDPA, decode at KV 1k, 16k and 128k (batch 1, one query), then the
    memory-bound ops at Llama-3-8B's width and 8,192 tokens against eager, without torch.compile (a lent
    machine compiles cold; the suites time it). On a CPU the same cases at the CPU suites' sizes."""
    import torch

    from . import attention, ops

    if device.type != "cuda":
        dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
        yield from attention.prefill_cases(device, [(dtype, 64, 4, 2)], [128], ["fwd", "bwd"], tokens_total=128)
        yield from attention.decode_cases(device, dtype, [256], [1], head_dim=64, q_heads=4, kv_heads=2)
        yield from ops.cases(device, dtype, ["smollm2-135m"], [64], ["fwd", "bwd"], compile_too=False,
                             only=ops.LLAMA_OPS)
        return
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16
    yield from attention.prefill_cases(device, [(dtype, 128, 32, 8)], [4096], ["fwd", "bwd"])
    yield from attention.decode_cases(device, dtype, [1024, 16384, 131072], [1])
    yield from ops.cases(device, dtype, ["llama3-8b"], args.tokens or [8192], ["fwd", "bwd"], compile_too=False,
                         only=ops.LLAMA_OPS)


def _attention_extras(device, parts=("first_call", "backward_kernels")) -> dict:
    """On a GPU, before the suite tunes anything: the first call's cost against the steady state, and
    the backward's time per kernel. Each part that fails is reported, not fatal."""
    from . import attention

    extra = {}
    functions = {"first_call": attention.first_call_latency, "backward_kernels": attention.backward_kernel_times}
    for key, fn in ((key, functions[key]) for key in parts):
        try:
            extra[key] = fn(device)
        except Exception as exc:  # a lent GPU's minutes are few: report and go on
            extra[key] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    print("attention first call vs steady state:", extra["first_call"])
    kernels = extra.get("backward_kernels", [])
    for row in kernels if isinstance(kernels, list) else [kernels]:
        print("  backward kernel:", row)
    return extra


def _print_spills() -> list[dict] | dict:
    from . import attention

    try:
        rows = attention.driver_spills()
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}"[:300])
    for row in rows:
        print("  loaded kernel:", row)
    spilling = [r for r in rows if r["n_spills"]]
    print(f"attention kernels loaded: {len(rows)}, with spills (driver's n_spills): {len(spilling)}")
    return rows


def _cases(name, device, args):
    return _headline_cases(device, args) if name == "headline" else _suite_cases(name, device, args)


def _list_cases(cases) -> int:
    """--list: the cases a command would time on this machine, built but not run (bench/gpu.sh --dry-run)."""
    count = 0
    for case in cases:
        print(f"{case.suite} {case.op} {case.mode} [{case.shape}] {case.dtype}: {', '.join(case.providers)}")
        count += 1
    print(f"{count} cases")
    return 0 if count else 1


def _suites(args, names) -> int:
    import torch

    from . import device as dev
    from .compiled import strict_dynamo
    from .report import format_table, plot, run, write_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.list:
        return max(_list_cases(_cases(name, device, args)) for name in names)
    meta = dev.describe(device)
    peaks = meta.get("peaks")
    if device.type == "cpu":
        print("No GPU on this machine: timings below are CPU timings (labelled CPU), not GPU performance. "
              "Triton kernels cannot run here except in the interpreter, so llama_fast's rows show the "
              "backend that ran.")
        print(f"CPU: {meta['cpu_model']}; eager PyTorch's kernels use {meta['cpu_capability']}.")
        if "cpu_swiglu_path" in meta:
            print(f"The extension's CPU SwiGLU runs its {meta['cpu_swiglu_path']} loop.")
        print()
    else:
        meta["copy_bytes_per_s"] = dev.copy_bandwidth(device)
        print(f"{meta['device']}: peaks {peaks}, measured copy bandwidth {meta['copy_bytes_per_s'] / 1e9:.0f} GB/s\n")
    for name in names:
        extra = {}
        if device.type == "cuda" and name in ("attention", "headline"):
            parts = ("first_call",) if name == "headline" else ("first_call", "backward_kernels")
            extra = _attention_extras(device, parts)
        path = os.path.join(args.out, f"{name}.json") if args.out else None
        if path:
            os.makedirs(args.out, exist_ok=True)
            write_json(path, {**meta, "complete": False}, [], **extra)
        with strict_dynamo():
            rows = run(_cases(name, device, args), device, peaks, rep_ms=args.rep_ms, progress=not args.no_progress,
                       on_rows=_partial_writer(path, meta, **extra))
        print(f"== {name} on {meta['device']} ==")
        print(format_table(rows) + "\n", flush=True)
        if extra:
            extra["driver_spills"] = _print_spills()
        if path:
            write_json(path, {**meta, "complete": True}, rows, **extra)
            plot(os.path.join(args.out, f"{name}.png"), rows, f"{name} on {meta['device']} ({meta['date']})")
    return 0


COMMANDS = ("all", *SUITES, "audit", "traffic", "overhead", "kernels", "loss", "headline")


def _parser() -> argparse.ArgumentParser:
    """One sub-command per suite, each with only the options it reads (``python -m bench ops --help``)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def options(*names):
        p = argparse.ArgumentParser(add_help=False)
        for name in names:
            _OPTIONS[name](p)
        return p

    helps = {
        "all": ("every suite meaningful on this machine, the traffic count and (without a GPU) the audit",
                ("out", "model", "dtype", "quick", "compile", "layers", "no_smollm2", "rep_ms", "no_progress", "arch",
                 "group")),
        "ops": ("rms_norm / RoPE / SwiGLU vs eager, torch.compile, Liger-Kernel",
                ("out", "model", "dtype", "quick", "compile", "tokens", "rep_ms", "no_progress", "list")),
        "attention": ("flash attention prefill and decode vs SDPA and eager; --model-only: the static "
                      "performance model from the sm_90a SASS (no GPU needed)",
                      ("out", "dtype", "quick", "rep_ms", "no_progress", "model_only", "list")),
        "e2e": ("training step and generate(), patched vs unpatched, dynamic and static cache (and compiled on a GPU)",
                ("out", "dtype", "quick", "layers", "no_smollm2", "rep_ms", "no_progress", "list")),
        "audit": ("compile every kernel for sm_90a / sm_80: registers, spills, HGMMA, 128-bit loads (no GPU needed)",
                  ("out", "model", "arch", "group", "json", "update_baseline")),
        "traffic": ("bytes eager PyTorch moves per op vs the fused kernel's minimum (no GPU needed)",
                    ("out", "model")),
        "overhead": ("host time per op call and per decoder-layer decode step, kernel launches stubbed, vs eager "
                     "(CPU; no GPU needed)", ("out", "rep_ms", "no_progress")),
        "kernels": ("non-GEMM kernels per decoder layer of a decoded token, patched vs eager, dynamic and static cache "
                    "(a dispatch-mode count on the CPU; no GPU needed); --compile: also the static-cache forward "
                    "compiled by Inductor (its CPU code generation)", ("out", "compile")),
        "loss": ("peak memory of the fused linear + cross-entropy loss step vs the unfused loss, Llama-3-8B shapes "
                 "(meta tensors without a GPU), and its speed against eager, torch.compile (left out with --quick) and "
                 "Liger-Kernel",
                 ("out", "compile", "quick", "rep_ms", "no_progress", "list")),
        "headline": ("what a short GPU lease brings back first: attention fwd/bwd vs SDPA at Llama-3-8B heads "
                     "(B=4, 4096, bf16) with its first call against the steady state, decode at KV 1k/16k/128k, "
                     "rms_norm / RoPE / SwiGLU at Llama-3-8B width vs eager (no torch.compile)",
                     ("out", "dtype", "tokens", "rep_ms", "no_progress", "list")),
    }
    for command, (text, names) in helps.items():
        sub.add_parser(command, help=text, description=text, parents=[options(*names)])
    return parser


_OPTIONS = {
    "out": lambda p: p.add_argument("--out", help="folder for JSON files and plots"),
    "model": lambda p: p.add_argument("--model", action="append", help="model shapes (default: all)"),
    "dtype": lambda p: p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"]),
    "quick": lambda p: p.add_argument("--quick", action="store_true", help="fewer sizes (the GPU script uses it)"),
    "compile": lambda p: p.add_argument("--compile", action="store_true",
                                        help="time torch.compile on the CPU too (always on a GPU)"),
    "tokens": lambda p: p.add_argument("--tokens", action="append", type=int,
                                       help="token counts of the ops cases (default: the sweep's)"),
    "layers": lambda p: p.add_argument("--layers", type=int, default=4,
                                       help="layers of the Llama-3-8B-shaped e2e model"),
    "no_smollm2": lambda p: p.add_argument("--no-smollm2", action="store_true",
                                           help="e2e without the real SmolLM2 model"),
    "rep_ms": lambda p: p.add_argument("--rep-ms", type=int, default=100,
                                       help="milliseconds of repetitions per measurement"),
    "no_progress": lambda p: p.add_argument("--no-progress", action="store_true"),
    "list": lambda p: p.add_argument("--list", action="store_true",
                                     help="print the cases this machine would time (built, not run) and exit"),
    "arch": lambda p: p.add_argument("--arch", action="append", type=int,
                                     help="compute capability, 90 or 80 (default both)"),
    "group": lambda p: p.add_argument("--group", action="append",
                                      help="kernel group (memory, attention, pointer, shared-memory; default all)"),
    "json": lambda p: p.add_argument("--json", help="write the reports to this JSON file"),
    "model_only": lambda p: p.add_argument("--model-only", action="store_true",
                                           help="print the static performance model of the attention kernels "
                                                "(compiled for sm_90a, no GPU needed) instead of timing"),
    "update_baseline": lambda p: p.add_argument("--update-baseline", action="store_true",
                                                help="record this run's HGMMA, TMA and loop instruction counts "
                                                     "as bench/audit_baseline.json (after a deliberate change)"),
}
_DEFAULTS = dict(out=None, model=None, dtype=None, quick=False, compile=False, tokens=None, layers=4, no_smollm2=False,
                 rep_ms=100, no_progress=False, list=False, arch=None, group=None, json=None, update_baseline=False,
                 model_only=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]  # no command: every suite, with the options given
    parser = _parser()
    args = argparse.Namespace(**{**_DEFAULTS, **vars(parser.parse_args(argv))})
    if interpreting():
        parser.error("unset TRITON_INTERPRET: the bench compiles and times real kernels")
    if args.command == "audit":
        return _audit(args)
    if args.command == "traffic":
        return _traffic(args)
    if args.command == "overhead":
        return _overhead(args)
    if args.command == "kernels":
        return _kernels(args)
    if args.command == "loss":
        return _loss(args)
    if args.command == "attention" and args.model_only:
        return _attention_model(args)
    if args.command in (*SUITES, "headline"):
        return _suites(args, [args.command])
    import torch

    gpu = torch.cuda.is_available()
    status = _suites(args, list(SUITES))
    # On a GPU the audit, which needs none, is left to CI.
    status |= _traffic(args)
    status |= _loss(args)
    if not gpu:
        status |= _audit(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
