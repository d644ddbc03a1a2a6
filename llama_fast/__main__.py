"""``python -m llama_fast``: demonstrations of the library (see ``--help``)."""

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_fast", description="llama_fast demonstrations")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("ops", help="the fused ops against eager PyTorch on small inputs")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on a GPU; float32 on the CPU, where Triton's interpreter "
                        "truncates instead of rounding on casts to bfloat16")
    args = parser.parse_args(argv)
    command = args.command or "ops"

    import torch

    if not torch.cuda.is_available():
        # Before triton is first imported: the kernels then run in the interpreter on the CPU.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from . import demo

    if command == "ops":
        name = getattr(args, "dtype", None) or ("bfloat16" if device.type == "cuda" else "float32")
        dtype = getattr(torch, name)
        demo.print_ops_demo(demo.ops_demo(device, dtype), device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
