"""The `qkern` command.

    qkern info            versions, devices and the backend qkern will use
    qkern bench [--json]  quantised matmul and dispatch-trace cost against the dense
                          computation, measured on this machine
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
    from .pallas._backend import resolve

    print(f"jax platform   {jax.default_backend()}")
    print(f"qkern backend  {resolve().name}  (override: QKERN_BACKEND or qkern.backend(...))")
    for d in jax.devices():
        print(f"device  {d.platform}:{d.id} {getattr(d, 'device_kind', '')}")
    return 0


def _cmd_bench(args) -> int:
    import jax

    from ._bench import qmatmul, trace_compile

    mm_rows = qmatmul.run(formats=args.formats, ms=args.m, k=args.k, n=args.n)
    tc_rows = [] if args.skip_trace else trace_compile.run(
        layers=args.layers, width=args.width, rank=args.rank)
    if args.json:
        print(json.dumps({"device": str(jax.devices()[0].device_kind),
                          "qmatmul": mm_rows, "trace_compile": tc_rows}, indent=2))
        return 0
    dense = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    print(f"Quantised x @ W against the dense {dense} matmul, K={args.k}, N={args.n}, on "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}):")
    print(qmatmul.format_table(mm_rows))
    if tc_rows:
        print()
        print(f"Dispatch-trace cost: {args.layers}-layer width-{args.width} MLP whose weights "
              f"are a user-defined low-rank Value type (rank {args.rank}), vs dense weights.")
        print(trace_compile.format_table(tc_rows))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(t) for t in text.split(",") if t.strip())


def _formats(text: str) -> tuple[str, ...]:
    from .formats import FORMATS

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown format(s) {', '.join(unknown) or text!r}; choose from {', '.join(FORMATS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backend").set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="benchmarks against the dense computation")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--formats", type=_formats, default=("int8", "int4", "nf4"),
                       help="comma-separated formats (default int8,int4,nf4)")
    bench.add_argument("--m", type=_int_list, default=(1, 16), help="batch sizes, e.g. 1,16,256")
    bench.add_argument("--k", type=_positive_int, default=4096)
    bench.add_argument("--n", type=_positive_int, default=4096)
    bench.add_argument("--skip-trace", action="store_true",
                       help="skip the dispatch-trace (trace+compile) benchmark")
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
