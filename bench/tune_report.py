"""Tune the xla path on this machine and print default vs tuned time per problem.

    python bench/tune_report.py [--m 1,16,256] [--k 4096] [--n 4096] [--formats int8,int4,nf4]

The same as `qkern tune` with --no-write (the cache is left alone); prints the Markdown
table used in docs/autotuning.md and every candidate's time.
"""

import argparse

import qkern
from qkern.autotune._tune import describe_config
from qkern.cli import _tune_table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,256")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--formats", default="int8,int4,nf4")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    results = qkern.autotune(m=tuple(int(v) for v in args.m.split(",")), k=args.k, n=args.n,
                             formats=tuple(args.formats.split(",")), repeats=args.repeats,
                             write=False)
    print(_tune_table(results))
    for r in results:
        p = r.problem
        times = ", ".join(f"{describe_config(c, p.backend)}: {t * 1e3:.2f} ms"
                          for c, t in r.timings)
        print(f"{p.fmt} M={p.m}: {times}")


if __name__ == "__main__":
    main()
