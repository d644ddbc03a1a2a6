"""``python -m bench``: the bench suites and the GPU-free audit."""

import argparse
import dataclasses
import json
import sys


def _audit(args) -> int:
    from .audit import audit, format_table

    reports = audit(models=args.model, archs=tuple(args.arch), groups=args.group)
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    bad = [r for r in reports if r.problems]
    print(f"\n{len(reports)} compiled, {len(bad)} with problems")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("audit", help="compile every kernel for sm_90a/sm_80 and check spills, HGMMA, 128-bit loads")
    p.add_argument("--model", action="append", help="model shapes (default: all)")
    p.add_argument("--arch", action="append", type=int, help="compute capability, 90 or 80 (default: both)")
    p.add_argument("--group", action="append", help="kernel group (default: all)")
    p.add_argument("--json", help="write the reports to this JSON file")
    p.set_defaults(func=_audit)
    args = parser.parse_args(argv)
    if args.command == "audit" and not args.arch:
        args.arch = [90, 80]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
