"""The `qkern` command.

    qkern demo            quantise a small transformer in several formats and compare it
                          with float32 (the real all-MiniLM-L6-v2 demo when installed)
    qkern bench           quantised matmul and dispatch-trace cost against the dense
                          computation, measured on this machine (--json, --plot out.png)
    qkern tune            autotune kernel configs for given shapes (--m 1,16 --k 4096 ...)
                          or for the matmuls of a function (--from package.module:function)
                          and cache the winners
    qkern info            versions, devices, the backend qkern will use, the tuning cache

`qkern --version` prints the version; `qkern` alone prints this usage and exits with code 2.
demo, bench and tune draw progress bars on stderr when it is a terminal (--progress: always,
--no-progress: never). Bad arguments print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import platform
import sys
import warnings

import jax

from . import _version
from .autotune import SpecError, _cache, autotune, cache_path, clear, device_kind
from .autotune._tune import describe_config
from .formats import FORMATS
from .pallas._backend import ENV_VAR, env_backend, resolve, unavailable_here
from .pallas._config import KERNELS, MatmulConfig, Problem
from .pallas.qmatmul import _native


class UsageError(Exception):
    """Bad input found after parsing: one line on stderr, exit code 2."""


def _env_backend_unavailable() -> str | None:
    """Why the backend QKERN_BACKEND names cannot run this machine's matmuls, or None."""
    name = env_backend()
    why = None if name is None else unavailable_here(name)
    return None if why is None else f"{ENV_VAR}={name}, but {why}"


def _require_runnable_backend() -> None:
    """For the commands that run matmuls: a QKERN_BACKEND this machine cannot compile is
    one line and exit code 2 (not a traceback from inside Pallas)."""
    why = _env_backend_unavailable()
    if why is not None:
        raise UsageError(f"{why}; unset {ENV_VAR} or set it to xla")


def _problem_of(entry: dict) -> Problem | None:
    try:
        return Problem(**{f: entry[f] for f in Problem.__dataclass_fields__ if f in entry})
    except TypeError:
        return None


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------


def _cmd_info(args) -> int:
    print(f"qkern   {_version.__version__}")
    print(f"jax     {jax.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()})")
    print(f"jax platform   {jax.default_backend()}")
    bad_env = None
    try:
        with warnings.catch_warnings():    # the same warning is printed below, on stdout
            warnings.simplefilter("ignore")
            name = resolve().name
        source = f"from {ENV_VAR}" if env_backend() else "the device's"
        print(f"qkern backend  {name}  ({source}; override: {ENV_VAR} or qkern.backend(...))")
        why = _env_backend_unavailable()
        if why is not None:
            print(f"  warning: {why}: quantised matmuls will fail to compile here; unset "
                  f"{ENV_VAR} or set it to xla")
    except ValueError as err:              # a bad QKERN_BACKEND: shown, and exit code 2
        bad_env = str(err)
        print(f"qkern backend  error: {bad_env}")
    if jax.default_backend() == "cpu":
        print(f"native CPU kernels  {_native.status()}  (off: {_native.ENV_VAR}=0)")
    for d in jax.devices():
        print(f"device  {d.platform}:{d.id} {getattr(d, 'device_kind', '')}")
    path = _cache.cache_path()
    entries = list(_cache.read_entries(path).values())
    kind, ver = _cache.device_kind(), jax.__version__
    here = sorted((e for e in entries if e["device_kind"] == kind and e["jax"] == ver),
                  key=lambda e: (e["backend"], e["kernel"], e["fmt"], e["k"], e["n"],
                                 e["x_dtype"], e["m"]))
    state = "" if _cache.enabled() else f"  (lookups off: {_cache.ENV_ENABLE}=0)"
    print(f"tuning cache   {path}  (set {_cache.ENV_DIR} to move it){state}")
    print(f"               {len(entries)} entries, {len(here)} for this device ({kind}) "
          f"and jax {ver}")
    limit = None if args.all else 20
    for e in here[:limit]:
        print(f"  {e['backend']:<10} {e['kernel']:<9} M={e['m']:<5} K={e['k']:<6} "
              f"N={e['n']:<6} {e['x_dtype']:<8} {e['fmt']:<8} B={e['block_size']:<5} -> "
              f"{describe_config(MatmulConfig(**e['config']), e['backend'], _problem_of(e))}"
              f"  ({e.get('time_ms', float('nan')):.3f} ms, default "
              f"{e.get('default_ms', float('nan')):.3f} ms)")
    if limit is not None and len(here) > limit:
        print(f"  ... {len(here) - limit} more (qkern info --all)")
    if bad_env is not None:
        print(f"qkern info: error: {bad_env}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def _cmd_bench(args) -> int:
    from ._bench import conv, decode, qmatmul, trace_compile

    _require_runnable_backend()
    if args.plot:  # fail before the (long) measurements, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'qkern[bench]'") from None
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--plot {args.plot}: cannot write there ({folder} is not a "
                             "writable folder)")
    mm_rows = qmatmul.run(formats=args.formats, ms=args.m, k=args.k, n=args.n,
                          repeats=args.repeats, bandwidth_gbps=args.bandwidth,
                          progress=args.progress)
    tc_rows = [] if args.skip_trace else trace_compile.run(
        layers=args.layers, width=args.width, rank=args.rank, progress=args.progress)
    dec_rows = [] if not args.decode else decode.run(
        formats=args.formats, layers=args.decode_layers, width=args.decode_width,
        repeats=args.decode_repeats, progress=args.progress)
    conv_rows = [] if not args.conv else conv.run(
        formats=args.formats, shapes=args.conv_shapes, repeats=args.conv_repeats,
        progress=args.progress)
    if args.plot:
        qmatmul.plot(mm_rows, args.plot)
    if args.json:
        print(_json({"device": str(jax.devices()[0].device_kind),
                     "jax": jax.__version__, "native_cpu_kernels": _native.status(),
                     "qmatmul": mm_rows, "trace_compile": tc_rows, "decode": dec_rows,
                     "conv": conv_rows},
                    indent=2))
        return 0
    dense = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    print(f"Quantised x @ W against the dense {dense} matmul, K={args.k}, N={args.n}, on "
          f"{mm_rows[0]['device'] if mm_rows else ''} ({jax.default_backend()}, jax "
          f"{jax.__version__}):")
    print(qmatmul.format_table(mm_rows))
    if jax.default_backend() == "cpu":
        print(f"(native CPU kernels for small M: {_native.status()})")
    if mm_rows and mm_rows[0]["peak_gbps"] is None:
        print("(% roofline: this device's bandwidth is not known; give it with --bandwidth "
              "GBPS)")
    if tc_rows:
        print()
        print(f"Dispatch-trace cost: {args.layers}-layer width-{args.width} MLP whose weights "
              f"are a user-defined low-rank Value type (rank {args.rank}), vs dense weights.")
        print(trace_compile.format_table(tc_rows))
    if dec_rows:
        mb = dec_rows[0]["weight_bytes"] / 1e6
        print()
        print(f"Decode: one token through {args.decode_layers} layers of {args.decode_width} x "
              f"{args.decode_width} weights ({mb:.0f} MB in float32), each format against the "
              f"same stack in float32 and bfloat16:")
        print(decode.format_table(dec_rows))
    if conv_rows:
        print()
        print("Convolution: ResNet-style 3x3, stride 1, SAME, NHWC; each quantised kernel "
              "against the dense float32 convolution and against dequantising it first:")
        print(conv.format_table(conv_rows))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


# --------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------


def _cmd_tune(args) -> int:
    try:
        if args.clear:
            had = clear()
            print(f"{'removed' if had else 'no cache at'} {cache_path()}")
            return 0
        if not args.no_write and not args.dry_run:   # before the measurements, not after
            _writable_cache_folder()
    except OSError as err:
        raise _cache_error(err) from None
    if args.backend is None and not args.dry_run:
        _require_runnable_backend()
    try:
        results = autotune(
            m=args.m, k=args.k, n=args.n, formats=args.formats, dtypes=args.dtypes,
            kernels=args.kernels, block_size=args.block_size, zeros=args.zeros,
            rank=args.rank, function=args.from_, backend=args.backend,
            max_configs=args.max_configs or "default",
            repeats=args.repeats, write=not args.no_write, dry_run=args.dry_run,
            check_lowering=args.check_lowering,
            progress=args.progress)
    except SpecError as err:
        raise UsageError(f"--from {args.from_}: {err}") from None
    except ValueError as err:  # impossible requests (a GPU kernel on a CPU, a bad shape)
        raise UsageError(str(err).splitlines()[0]) from None
    except OSError as err:     # the cache could not be written after all
        raise _cache_error(err) from None
    if args.json:
        print(_json({"cache": str(cache_path()), "device_kind": device_kind(),
                     "results": [r.as_dict() for r in results]}, indent=2))
        return 0
    if not results:
        print("no quantised matmuls found" + (f" in {args.from_}" if args.from_ else ""))
        return 0
    if args.dry_run:
        _print_space(results, verbose=args.verbose)
        return 0
    print(_tune_table(results))
    written = sum(r.written for r in results)
    if written:
        print(f"\n{written} entr{'y' if written == 1 else 'ies'} written to {cache_path()}")
    for r in results:
        for cfg, err in r.failed:
            print(f"  failed: {r.problem.kernel} {r.problem.fmt} M={r.problem.m}: {cfg}: {err}")
    return 0


def _json(obj, **kw) -> str:
    """Strict JSON: a time that was not measured (NaN, inf) is null, not the NaN token that
    JSON does not have."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), allow_nan=False, **kw)


def _cache_error(err: OSError) -> UsageError:
    return UsageError(f"the autotune cache {cache_path()}: {err.strerror or err} "
                      "(set QKERN_CACHE_DIR to a writable folder)")


def _writable_cache_folder() -> None:
    """Raise OSError unless the cache's folder exists (made if needed) and can be written."""
    folder = cache_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(13, "permission denied", str(folder))


def _tune_table(results) -> str:
    lines = ["| backend | kernel | M | K | N | dtype | format | best config | time (ms) | "
             "default (ms) | vs default | timed / pruned |", "|" + "---|" * 12]
    for r in results:
        p = r.problem
        sp = "" if math.isnan(r.speedup) else f"{r.speedup:.2f}x"
        lines.append(
            f"| {p.backend} | {p.kernel} | {p.m} | {p.k} | {p.n} | {p.x_dtype} | {p.fmt} | "
            f"{describe_config(r.config, p.backend, p)} | {r.time_s * 1e3:.3f} | "
            f"{r.default_time_s * 1e3:.3f} | {sp} | {len(r.timings)} / {len(r.pruned)} |")
    return "\n".join(lines)


def _print_space(results, *, verbose: bool) -> None:
    for r in results:
        p = r.problem
        print(f"{p.backend} {p.kernel} M={p.m} K={p.k} N={p.n} {p.x_dtype} {p.fmt} "
              f"(block {p.block_size}): {len(r.timings)} configs to time, "
              f"{len(r.pruned)} pruned")
        for cfg, _ in r.timings:
            print(f"  time   {describe_config(cfg, p.backend, p)}")
        for cfg, why in (r.pruned if verbose else r.pruned[:5]):
            print(f"  pruned {describe_config(cfg, p.backend)}: {why}")
        if not verbose and len(r.pruned) > 5:
            print(f"  ... {len(r.pruned) - 5} more pruned (--verbose)")


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    from ._demo import main

    _require_runnable_backend()
    return main(random=args.random, progress=args.progress)


# --------------------------------------------------------------------------------------
# argument types: each raises ArgumentTypeError, which argparse turns into one line + exit 2
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 1,16,256), got {text!r}")
    return tuple(_positive_int(t) for t in parts)


def _conv_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """"8:28:128,1:7:512" -> ((8, 28, 128), (1, 7, 512)): batch, spatial size, channels."""
    shapes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated BATCH:SIZE:CHANNELS (e.g. 8:28:128,1:7:512), got {text!r}")
        shapes.append(tuple(_positive_int(f) for f in fields))
    return tuple(shapes)


def _names(text: str, choices, what: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    unknown = [n for n in names if n not in choices]
    if unknown or not names or not all(names):
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(repr(u) for u in unknown) or repr(text)}; choose "
            f"from {', '.join(choices)}")
    return names


def _formats(text: str) -> tuple[str, ...]:
    return _names(text, tuple(FORMATS), "format(s)")


def _kernels(text: str) -> tuple[str, ...]:
    return _names(text, KERNELS, "kernel(s)")


def _dtypes(text: str) -> tuple[str, ...]:
    return _names(text, ("float32", "bfloat16", "float16"), "dtype(s)")


def _spec(text: str) -> str:
    mod, sep, attr = text.partition(":")
    if not sep or not mod or not attr or ":" in attr:
        raise argparse.ArgumentTypeError(
            f"expected package.module:function, got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse prints usage first by default)
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0]}\n")


def _add_progress(parser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr: --progress always, --no-progress "
                             "never (default: only when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qkern", description="Quantised JAX weights and their kernels: "
                     "a demo, benchmarks, autotuning, and what qkern sees on this machine.",
                     epilog="`qkern COMMAND --help` describes a command's options.")
    parser.add_argument("--version", action="version", version=f"qkern {_version.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                title="commands", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, devices, backend and the tuning cache")
    info.add_argument("--all", action="store_true", help="list every cache entry")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="quantise a small model and compare it with float32")
    demo.add_argument("--random", action="store_true",
                      help="always run the built-in random-weight demo")
    _add_progress(demo)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench", help="benchmarks against the dense computation",
        description="Time the quantised matmul x[M, K] @ W[K, N] against the dense one for "
                    "each format and M, then the dispatch-trace cost of a user-defined "
                    "weight type in an MLP.")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--plot", metavar="OUT.png",
                       help="save speed-up against M per format (needs qkern[bench])")
    bench.add_argument("--formats", type=_formats, default=("int8", "int4", "nf4"),
                       help="comma-separated formats (default: int8,int4,nf4)")
    bench.add_argument("--m", type=_int_list, default=(1, 16),
                       help="comma-separated batch sizes M, the rows of x (default: 1,16)")
    bench.add_argument("--k", type=_positive_int, default=4096,
                       help="K, the weight's input dimension (rows of W) (default: 4096)")
    bench.add_argument("--n", type=_positive_int, default=4096,
                       help="N, the weight's output dimension (columns of W) (default: 4096)")
    bench.add_argument("--repeats", type=_positive_int, default=20,
                       help="timed calls per measurement, median taken (default: 20)")
    bench.add_argument("--bandwidth", type=_positive_float, metavar="GBPS",
                       help="peak memory bandwidth for %% roofline (default: the device's, "
                            "when it is in the known table)")
    bench.add_argument("--skip-trace", action="store_true",
                       help="skip the dispatch-trace (trace+compile) benchmark")
    bench.add_argument("--layers", type=_positive_int, default=24,
                       help="dispatch-trace benchmark: layers of the MLP (default: 24)")
    bench.add_argument("--width", type=_positive_int, default=512,
                       help="dispatch-trace benchmark: width of the MLP (default: 512)")
    bench.add_argument("--rank", type=_positive_int, default=8,
                       help="dispatch-trace benchmark: rank of the low-rank weight type "
                            "(default: 8)")
    bench.add_argument("--decode", action="store_true",
                       help="also time one decode token through a stack of weights larger than "
                            "the last-level cache, per format against float32 and bfloat16 "
                            "(needs ~4x the float32 stack in memory: 8 GB by default)")
    bench.add_argument("--conv", action="store_true",
                       help="also time ResNet-style 3x3 convolutions with quantised kernels "
                            "(each format and int8 W8A8) against the dense convolution")
    bench.add_argument("--conv-shapes", type=_conv_shapes,
                       default=((8, 28, 128), (8, 14, 256), (1, 7, 512)),
                       help="convolution benchmark: BATCH:SIZE:CHANNELS of each input, comma-"
                            "separated (default: 8:28:128,8:14:256,1:7:512)")
    bench.add_argument("--conv-repeats", type=_positive_int, default=10,
                       help="convolution benchmark: timed calls per entry, median taken "
                            "(default: 10)")
    bench.add_argument("--decode-layers", type=_positive_int, default=32,
                       help="decode benchmark: layers in the stack (default: 32)")
    bench.add_argument("--decode-width", type=_positive_int, default=4096,
                       help="decode benchmark: width of each square layer (default: 4096)")
    bench.add_argument("--decode-repeats", type=_positive_int, default=5,
                       help="decode benchmark: timed tokens per entry, median taken "
                            "(default: 5)")
    _add_progress(bench)
    bench.set_defaults(func=_cmd_bench)

    tune = sub.add_parser("tune", help="autotune kernel configs and cache the winners")
    tune.add_argument("--m", type=_int_list, default=(1, 16), help="M values (default: 1,16)")
    tune.add_argument("--k", type=_int_list, default=(4096,), help="K values (default: 4096)")
    tune.add_argument("--n", type=_int_list, default=(4096,), help="N values (default: 4096)")
    tune.add_argument("--formats", type=_formats, default=("int8", "int4", "nf4"),
                      help="comma-separated formats (default: int8,int4,nf4)")
    tune.add_argument("--dtypes", type=_dtypes, default=None,
                      help="activation dtypes (default: float32 on CPU, bfloat16 elsewhere)")
    tune.add_argument("--kernels", type=_kernels, default=("qmatmul",),
                      help="comma-separated: qmatmul (x @ W), qmatmul_t (dy @ W.T, the "
                           "gradient), w8a8 (int8 activations, int8 weights), lora / lora_t "
                           "(the fused QLoRA matmul and its transpose) (default: qmatmul)")
    tune.add_argument("--rank", type=_positive_int, default=16,
                      help="LoRA rank of the lora / lora_t problems (default: 16)")
    tune.add_argument("--block-size", type=_positive_int, default=None,
                      help="weight block size (default: the format's)")
    tune.add_argument("--zeros", action="store_true", help="weights with zero points (minmax)")
    tune.add_argument("--from", dest="from_", type=_spec, metavar="PACKAGE.MODULE:FUNCTION",
                      help="tune the quantised matmuls of a function: a zero-argument "
                           "callable returning (fn, args); see docs/autotuning.md")
    tune.add_argument("--backend", choices=("xla", "triton", "mosaic_tpu"), default=None,
                      help=f"(default: {ENV_VAR}, else the device's)")
    tune.add_argument("--max-configs", type=_positive_int, default=None,
                      help="time at most this many configs per problem (default: 48 for "
                           "triton, 32 for mosaic_tpu, no cap for xla)")
    tune.add_argument("--repeats", type=_positive_int, default=None,
                      help="timed calls per config, median taken (default: 10 on CPU, 50 "
                           "elsewhere)")
    tune.add_argument("--dry-run", action="store_true",
                      help="show the pruned search space, time nothing")
    tune.add_argument("--check-lowering", action="store_true",
                      help="with --dry-run: lower each Triton/Mosaic candidate for its target "
                           "(works on a CPU host) and prune those that fail")
    tune.add_argument("--verbose", action="store_true", help="with --dry-run: every pruned config")
    tune.add_argument("--no-write", action="store_true", help="leave the cache untouched")
    _add_progress(tune)
    tune.add_argument("--json", action="store_true", help="print the results as JSON")
    tune.add_argument("--clear", action="store_true", help="delete the cache file and exit")
    tune.set_defaults(func=_cmd_tune)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"qkern: warning: {message}\n".replace("qkern: warning: qkern: ", "qkern: warning: ")


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # as argparse programs do for a missing command: usage on stderr, code 2
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)  # bad arguments: one-line error, exit code 2
    # A bad QKERN_BACKEND: every command that resolves the backend would trip on it. `info`
    # reports it (it is where one looks), and `tune --backend`/`--clear` do not read it.
    skips = args.command == "info" or (args.command == "tune" and (args.backend or args.clear))
    if not skips:
        try:
            env_backend()
        except ValueError as err:
            print(f"qkern {args.command}: error: {err}", file=sys.stderr)
            return 2
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except UsageError as err:
        print(f"qkern {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqkern {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:               # `qkern tune ... | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
