"""The `qkern` command.

    qkern info            versions, devices and the platform JAX will use
    qkern bench [--json]  benchmarks against the dense computation, run on this machine
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def _cmd_info(args) -> int:
    import jax

    import qkern

    print(f"qkern   {qkern.__version__}")
    print(f"jax     {jax.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()})")
    print(f"backend {jax.default_backend()}")
    for d in jax.devices():
        print(f"device  {d.platform}:{d.id} {getattr(d, 'device_kind', '')}")
    return 0


def _cmd_bench(args) -> int:
    from ._bench import trace_compile

    rows = trace_compile.run(layers=args.layers, width=args.width, rank=args.rank)
    if args.json:
        print(json.dumps({"trace_compile": rows}, indent=2))
    else:
        print(f"Dispatch-trace cost: {args.layers}-layer width-{args.width} MLP whose weights "
              f"are a user-defined low-rank Value type (rank {args.rank}), vs dense weights.")
        print(trace_compile.format_table(rows))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backend").set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="benchmarks against the dense computation")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--layers", type=_positive_int, default=24)
    bench.add_argument("--width", type=_positive_int, default=512)
    bench.add_argument("--rank", type=_positive_int, default=8)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: one-line error, exit code 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
