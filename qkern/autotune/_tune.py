"""`qkern.autotune(...)`: time each kernel config on this machine and cache the winners."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import itertools
import math
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._bench.timing import interleaved_medians, median_time
from .._core import quaxify
from ..formats import get_format
from ..formats._quantize import make_layout
from ..pallas import _config
from ..pallas._backend import backend as use_backend
from ..pallas._backend import resolve
from ..pallas._config import KERNELS, MatmulConfig, Problem
from ..pallas._operand import stored_operand
from ..recipes import quantize
from .._bench.progress import bar
from ..pallas.qmatmul import _native
from . import _cache, _space


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What tuning one problem found.

    config: the fastest config (None: the kernel's own default won, or nothing ran).
    time_s / default_time_s: median seconds of the winner and of the shipped default.
    timings: (config, seconds) of every candidate timed (None: the kernel's default);
    failed: (config, error) for candidates that did not compile or run;
    pruned: (config, reason) for those never timed; written: whether it went to the cache.
    """

    problem: Problem
    config: MatmulConfig | None
    time_s: float
    default_time_s: float
    timings: tuple = ()
    failed: tuple = ()
    pruned: tuple = ()
    written: bool = False

    @property
    def speedup(self) -> float:
        """Default time / tuned time (1.0 when the default won)."""
        if not (self.time_s > 0 and math.isfinite(self.default_time_s)):
            return float("nan")
        return self.default_time_s / self.time_s

    def as_dict(self) -> dict:
        cfg = lambda c: None if c is None else dataclasses.asdict(c)  # noqa: E731
        return {**dataclasses.asdict(self.problem), "config": cfg(self.config),
                "time_ms": self.time_s * 1e3, "default_ms": self.default_time_s * 1e3,
                "speedup": self.speedup, "timed": len(self.timings),
                "failed": [[cfg(c), e] for c, e in self.failed],
                "pruned": len(self.pruned), "written": self.written}


class SpecError(ValueError):
    """A `--from package.module:function` target that cannot be used."""


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def _as_tuple(v) -> tuple:
    if v is None:
        return (None,)
    if isinstance(v, (str, int, np.integer)) or not isinstance(v, Iterable):
        return (v,)
    return tuple(v)


def _dtype_name(d) -> str:
    try:
        name = jnp.dtype(d).name
    except TypeError:
        raise ValueError(f"unknown dtype {d!r}; use float32, bfloat16 or float16") from None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"activation dtype {name} is not supported; use float32, bfloat16 "
                         "or float16")
    return name


def default_dtype(backend: str = "xla") -> str:
    """The activation dtype qkern bench uses: float32 on CPU, bfloat16 on GPU/TPU (and
    for the GPU/TPU kernels when planning them from a CPU host)."""
    if backend == "xla" and jax.default_backend() == "cpu":
        return "float32"
    return "bfloat16"


def _weight_problem(backend, kernel, m, k, n, dtype, fmt, block_size, zeros,
                    rank=0) -> Problem:
    f = get_format(fmt)
    if block_size is None:          # as qkern.quantize picks it (shrunk to a shorter K)
        block_size = make_layout((int(k), int(n)), f, None, -2, default_axis=False).block_size
    rank = int(rank) if KERNELS[kernel] == "lora_qmatmul" else 0
    return Problem(backend, kernel, int(m), int(k), int(n), dtype, f.name, int(block_size),
                   bool(zeros), rank)


def load_function(spec) -> tuple[Callable, tuple]:
    """Resolve a `--from` target to (fn, args).

    `spec` is "package.module:function" (or a callable): a zero-argument callable that
    returns `(fn, args)`, where `fn(*args)` is the computation to tune, args holding its
    quantised weights (QArrays) and example inputs of the real shapes and dtypes.
    The current directory is importable, as with `python -m`.
    """
    if callable(spec):
        target, name = spec, getattr(spec, "__qualname__", repr(spec))
    else:
        if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
            raise SpecError(f"expected package.module:function, got {spec!r}")
        mod_name, attr = spec.split(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            target = importlib.import_module(mod_name)
        except Exception as err:  # noqa: BLE001  (any import failure is the user's spec)
            raise SpecError(f"cannot import {mod_name!r}: {type(err).__name__}: {err}") from None
        for part in attr.split("."):
            if not hasattr(target, part):
                raise SpecError(f"{mod_name!r} has no attribute {attr!r}")
            target = getattr(target, part)
        name = spec
        if not callable(target):
            raise SpecError(f"{spec} is not callable")
    try:
        inspect.signature(target).bind()
    except TypeError as err:              # it needs arguments
        raise SpecError(f"{name} must take no arguments and return (fn, args): {err}") from None
    except ValueError:                    # no signature to read (a builtin): just call it
        pass
    try:
        got = target()
    except Exception as err:  # noqa: BLE001  (an error inside the user's own function)
        raise SpecError(f"{name}() raised {type(err).__name__}: {err}") from None
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and callable(got[0])
            and isinstance(got[1], (tuple, list))):
        raise SpecError(f"{name}() must return (fn, args) with fn callable and args a tuple; "
                        f"got {type(got).__name__}")
    return got[0], tuple(got[1])


def find_problems(function, *, backend: str | None = None) -> list[Problem]:
    """The quantised matmuls `function` runs (see `load_function`), in order of first use.

    Traces `quaxify(fn)(*args)` abstractly (`jax.make_jaxpr`; nothing is computed) and
    records every problem the kernels ask a config for: exactly the keys they will look
    up in the cache. Gradients inside fn (jax.grad) bring in the transposed kernel.
    """
    fn, args = load_function(function)
    found: list[Problem] = []

    def observe(p: Problem) -> None:
        if p not in found:
            found.append(p)

    _cache._retrace()  # jits that quaxify traced before would not ask for configs again
    _config.OBSERVERS.append(observe)
    try:
        with use_backend(backend) if backend else contextlib.nullcontext():
            jax.make_jaxpr(quaxify(fn))(*args)
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001
        raise SpecError(f"tracing the function failed: {type(err).__name__}: {err}") from err
    finally:
        _config.OBSERVERS.remove(observe)
    return found


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _operand(k: int, n: int, fmt: str, block_size: int, zeros: bool):
    """A random quantised weight of the problem's shape and format, as a kernel operand."""
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n), jnp.float32)
    qw = quantize(w, fmt, block_size=block_size,
                  calibration="minmax" if zeros else "absmax")
    op = stored_operand(qw)
    if op is None or op.block_size != block_size:
        raise ValueError(f"cannot build a [{k}, {n}] {fmt} operand with block_size "
                         f"{block_size}")
    return op


def _compile(problem: Problem, op, config: MatmulConfig | None):
    f = jax.jit(_space.function(problem, config))
    args = _space.inputs(problem, op)
    with _cache.bypassed():  # config=None must mean the shipped default, not the cache
        compiled = f.lower(op, *args).compile()
    return lambda: compiled(op, *args)


def _default_measure(repeats: int, warmup: int) -> Callable[[Callable[[], Any]], float]:
    return lambda fn: median_time(fn, repeats=repeats, warmup=warmup)


def _default_repeats(backend: str) -> int:
    return 10 if backend == "xla" else 50


@dataclasses.dataclass
class _Plan:
    """What tuning one problem will time: known before any timing starts, so that the
    progress bar's total is fixed up front."""

    op: Any
    cands: list
    pruned: list
    default: MatmulConfig | None
    pool: list            # every config compiled and timed: the candidates and the default

    @property
    def steps(self) -> int:
        """Progress steps: one per config of the pool, and one for the final round."""
        return len(self.pool) + 1


def _plan(problem: Problem, *, space: dict | None = None,
          configs: Sequence[MatmulConfig] | None = None, max_configs="default") -> _Plan:
    op = _operand(problem.k, problem.n, problem.fmt, problem.block_size, problem.zeros)
    if configs is None:
        cands, pruned = _space.candidates(problem, op, space=space, max_configs=max_configs,
                                          device_kind=_cache.device_kind())
    else:
        cands, pruned = list(configs), []
    # The shipped default: the xla heuristic (as the kernel really runs it), or the Pallas
    # kernel's own choice.
    default = _space.shipped_default(problem, op)
    pool = list(dict.fromkeys(list(cands) + [default]))
    return _Plan(op, list(cands), list(pruned), default, pool)


def tune_problem(problem: Problem, *, space: dict | None = None,
                 configs: Sequence[MatmulConfig] | None = None, max_configs="default",
                 measure: Callable | None = None, repeats: int | None = None, warmup: int = 2,
                 finalists: int = 3, progress=None, plan: _Plan | None = None) -> TuneResult:
    """Time the candidates for one problem (not written to the cache; see `autotune`).

    Two rounds: every candidate and the default with `repeats`, then the `finalists`
    fastest and the default again with twice as many, taking turns call by call; the
    second round decides, so one lucky sample on a busy machine does not.
    `progress`: a tqdm bar, advanced by `_plan(...).steps` (one per config timed, one for
    the final round).
    """
    plan = plan or _plan(problem, space=space, configs=configs, max_configs=max_configs)
    op, cands, pruned, default, pool = plan.op, plan.cands, plan.pruned, plan.default, plan.pool
    repeats = repeats or _default_repeats(problem.backend)
    measure1 = measure or _default_measure(repeats, warmup)
    eligible = set(cands) | ({default} if configs is None else set())
    runners, failed, first = {}, [], {}
    native = progress is not None and native_runs(problem)
    for cfg in pool:
        if progress is not None:
            what = "native CPU kernel" if native and cfg is not None else _short(cfg)
            progress.set_postfix_str(f"{_describe(problem)} {what}", refresh=False)
        try:
            runners[cfg] = _compile(problem, op, cfg)
            first[cfg] = measure1(runners[cfg])
        except Exception as err:  # noqa: BLE001  (a config that fails is pruned, not fatal)
            runners.pop(cfg, None)
            failed.append((cfg, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
        if progress is not None:
            progress.update(1)
    ranked = sorted((t, i) for i, (c, t) in enumerate(first.items()) if c in eligible)
    order = list(first)
    final_cfgs = [order[i] for _, i in ranked[:finalists]]
    if default in runners and default not in final_cfgs:
        final_cfgs.append(default)
    if progress is not None:
        progress.set_postfix_str(f"{_describe(problem)} final round", refresh=False)
    if measure is not None:
        second = {c: measure(runners[c]) for c in final_cfgs}
    else:
        second = interleaved_medians({c: runners[c] for c in final_cfgs},
                                     repeats=2 * repeats, warmup=1)
    if progress is not None:
        progress.update(1)
    timings = tuple((c, second.get(c, t)) for c, t in first.items())
    best = min((c for c in second if c in eligible), key=second.get, default=None)
    return TuneResult(
        problem=problem, config=best,
        time_s=second[best] if best in second else float("nan"),
        default_time_s=second.get(default, float("nan")),
        timings=timings, failed=tuple(failed), pruned=tuple(pruned))


def _short(cfg: MatmulConfig | None) -> str:
    if cfg is None:
        return "default"
    base = MatmulConfig()
    diff = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name) or f.name == "block_k"]
    return ",".join(diff)


NATIVE = "native CPU kernel (no block fields)"


def describe_config(cfg: MatmulConfig | None, backend: str,
                    problem: Problem | None = None) -> str:
    """A config in the fields its backend reads. Given its `problem`, one that the native
    CPU kernel runs (qkern/pallas/qmatmul/_native: xla forward at small M, which reads no
    config field) is described as such."""
    if cfg is None:
        return "kernel default"
    if cfg.dequantize:
        return "dequantise + XLA dot"
    if backend == "xla":
        if problem is not None and native_runs(problem):
            return NATIVE
        return f"block_k={cfg.block_k}"
    if backend == "mosaic_tpu":
        return f"bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k}"
    return (f"bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k} w={cfg.num_warps} "
            f"s={cfg.num_stages} split={cfg.split_k}")


def native_runs(problem: Problem) -> bool:
    """Whether the native CPU kernel runs `problem` here (then no config field is read):
    the xla forward matmul on a CPU, at an M and a weight format it takes
    (`_native.runs_for`). Decided on the weight's shapes alone (abstract evaluation: no
    weight is quantised)."""
    if (problem.backend, problem.kernel) != ("xla", "qmatmul") or jax.default_backend() != "cpu":
        return False
    found = []

    def probe():
        w = jnp.zeros((problem.k, problem.n), jnp.float32)
        qw = quantize(w, problem.fmt, block_size=problem.block_size,
                      calibration="minmax" if problem.zeros else "absmax")
        op = stored_operand(qw)
        found.append(op is not None and _native.runs_for(problem.m, op, problem.x_dtype))

    try:
        jax.eval_shape(probe)
    except Exception:  # noqa: BLE001  (a problem no weight fits: not the native kernel's)
        return False
    return bool(found and found[0])


def _describe(p: Problem) -> str:
    rank = f" r={p.rank}" if p.rank else ""
    return f"{p.kernel} {p.fmt} M={p.m} K={p.k} N={p.n}{rank} {p.x_dtype}"


# --------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------


def autotune(m=(1, 16), k=4096, n=4096, *, formats=("int8", "int4", "nf4"), dtypes=None,
             kernels=("qmatmul",), block_size=None, zeros=False, rank=16, function=None,
             problems: Sequence[Problem] | None = None, backend: str | None = None,
             space: dict | None = None, configs: Sequence[MatmulConfig] | None = None,
             max_configs="default", repeats: int | None = None, warmup: int = 2,
             write: bool = True, dry_run: bool = False, check_lowering: bool = False,
             progress: bool | None = None,
             measure: Callable | None = None) -> list[TuneResult]:
    """Autotune the quantised-matmul kernels on this machine; cache and return the winners.

        results = qkern.autotune(m=(1, 16, 256), k=4096, n=(4096, 14336),
                                 formats=("int4", "nf4"))
        results = qkern.autotune(function="mymodel.bench:decode_step")   # its matmuls
        for r in results:
            print(r.problem, r.config, r.speedup)

    Problems are the product of m, k, n, formats, dtypes (default: float32 on CPU,
    bfloat16 elsewhere) and kernels ("qmatmul": x @ W; "qmatmul_t": dy @ W.T, the
    gradient; "w8a8": x @ W with int8 activations, int8 weights only; "lora" / "lora_t":
    the fused QLoRA matmul with factors of rank `rank`), for weights of `block_size`
    (default: the format's) with zero points when `zeros`; or those found in `function` ("package.module:function" or a zero-argument
    callable returning (fn, args); see `find_problems`); or `problems` given directly.

    backend: "xla" (CPUs: tunes block_k), "triton" (NVIDIA GPUs) or "mosaic_tpu" (TPUs);
    default: the device's. Each candidate is compiled ahead of time and timed (warm-up,
    median of `repeats`, blocking on the result); failures are recorded, never fatal.
    `space` overrides per-field values of the search space, `configs` replaces it (then
    only those compete; the default is still timed as the baseline), `max_configs` caps
    it. write=False keeps the cache untouched; dry_run=True times nothing and returns
    each problem's pruned space (config None, times NaN); with check_lowering=True it
    also lowers every Triton/Mosaic candidate for its target (from any host) and prunes
    those that fail. progress: draw a progress bar (tqdm) on stderr: None (default) when
    stderr is a terminal, True always, False never; its total (one step per config timed
    and one per problem's final round) is known before timing starts. `measure(fn) ->
    seconds` replaces the timer (tests).

    Kernels read the cache when they are traced: functions jitted before tuning keep the
    config they were compiled with.
    """
    name = resolve(backend).name
    if problems is not None:
        todo = list(problems)
    elif function is not None:
        todo = [p for p in find_problems(function, backend=name)]
    else:
        for kern in _as_tuple(kernels):
            if kern not in KERNELS:
                raise ValueError(f"unknown kernel {kern!r}; choose from {', '.join(KERNELS)}")
        dts = tuple(_dtype_name(d) for d in _as_tuple(dtypes or default_dtype(name)))
        todo = [_weight_problem(name, kern, mm, kk, nn, dt, fmt, block_size, zeros, rank)
                for kern, fmt, dt, kk, nn, mm in itertools.product(
                    _as_tuple(kernels), _as_tuple(formats), dts, _as_tuple(k), _as_tuple(n),
                    _as_tuple(m))
                # W8A8 runs symmetric int8 weights only: others are not its problems
                if KERNELS[kern] != "w8a8" or (get_format(fmt).name == "int8" and not zeros)]
        if not todo:
            raise ValueError("no problems to tune: the w8a8 kernel takes symmetric int8 "
                             "weights (no zero points); add 'int8' to formats"
                             + (" and drop zeros" if zeros else ""))
    todo = list(dict.fromkeys(todo))
    for p in todo:
        if p.backend != "xla" and not dry_run:
            platform = jax.default_backend()
            want = "gpu" if p.backend == "triton" else "tpu"
            if platform != want:
                raise ValueError(f"the {p.backend} kernels run on {want.upper()}s, and this "
                                 f"machine's jax platform is {platform}: tune backend 'xla' "
                                 "here, or use dry_run (`qkern tune --dry-run`) to see the pruned space")
    if dry_run:
        out = []
        for p in todo:
            op = _operand(p.k, p.n, p.fmt, p.block_size, p.zeros)
            cands, pruned = _space.candidates(p, op, space=space, max_configs=max_configs,
                                              device_kind=_cache.device_kind())
            if check_lowering:
                errors = {c: _space.lowering_error(p, op, c) for c in cands}
                pruned = pruned + [(c, e) for c, e in errors.items() if e]
                cands = [c for c in cands if not errors[c]]
            out.append(TuneResult(p, None, float("nan"), float("nan"),
                                  timings=tuple((c, float("nan")) for c in cands),
                                  pruned=tuple(pruned)))
        return out

    plans = [_plan(p, space=space, configs=configs, max_configs=max_configs) for p in todo]
    results = []
    with bar(sum(pl.steps for pl in plans), "qkern tune", enabled=progress,
             unit="config") as b:
        for i, p in enumerate(todo):
            r = tune_problem(p, space=space, configs=configs, max_configs=max_configs,
                             measure=measure, repeats=repeats, warmup=warmup, progress=b,
                             plan=plans[i])
            plans[i] = None                   # the weight operand can go
            if write and r.config is not None:
                _cache.write_entries([_cache.make_entry(
                    p, r.config, time_s=r.time_s, default_time_s=r.default_time_s,
                    timed=len(r.timings))])
                r = dataclasses.replace(r, written=True)
            results.append(r)
    return results
