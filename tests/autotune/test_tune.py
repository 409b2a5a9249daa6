"""`qkern.autotune`: tuning writes the cache, and the kernels then run the cached config."""

import dataclasses
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import pytest

import qkern

# The backend modules the backend table calls (their `forward` / `transposed` are looked up
# at each call, so patching them reaches the kernels).
xla_module = importlib.import_module("qkern.pallas.qmatmul._xla")
from qkern.autotune import SpecError, _cache, autotune, find_problems, load_function
from qkern.pallas._config import MatmulConfig, Problem


@pytest.fixture
def spy(monkeypatch):
    """Records the config the xla kernel receives each time it is traced."""
    jax.clear_caches()  # traces cached by earlier tests would hide the kernel calls
    seen = []
    for name, label in (("forward", "qmatmul_xla"), ("transposed", "qmatmul_t_xla")):
        real = getattr(xla_module, name)

        def fake(x, op, config, _real=real, _name=label, **kw):
            seen.append((_name, x.shape[0], op.k, op.n, config))
            return _real(x, op, config, **kw)

        monkeypatch.setattr(xla_module, name, fake)
    return seen


def _matmul(m, k=256, n=128, fmt="int8"):
    """A fresh jit (nothing cached) of quaxified x @ qw; returns its output."""
    w = jax.random.normal(jax.random.PRNGKey(0), (k, n))
    x = jnp.ones((m, k))
    return jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, qkern.quantize(w, fmt))


def test_tuned_config_is_written_read_back_and_run_by_the_kernel(spy, cache_dir, monkeypatch):
    from qkern.pallas import _config       # the scan's table entry at prefill, not the
    monkeypatch.setattr(_config, "SMALL_WEIGHT_BYTES", 0)   # dequantise-first small-weight rule
    (r,) = autotune(m=1, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=64)],
                    repeats=2, warmup=1)
    assert r.config == MatmulConfig(block_k=64) and r.written
    assert r.problem == Problem("xla", "qmatmul", 1, 256, 128, "float32", "int8", 256, False)
    assert r.time_s > 0 and r.default_time_s > 0            # the default is the baseline
    assert {c for c, _ in r.timings} == {MatmulConfig(block_k=64), MatmulConfig(block_k=256)}
    assert _cache.read_entries()                              # on disk
    _cache.invalidate()                                       # as a new process would start

    spy.clear()
    _matmul(1)
    assert [c.block_k for *_, c in spy] == [64]              # the cached winner ran
    spy.clear()
    _matmul(3)                                                # nearest M in the decode regime
    assert [c.block_k for *_, c in spy] == [64]
    spy.clear()
    _matmul(64)                                               # prefill: the heuristic
    assert [c.block_k for *_, c in spy] == [512]
    spy.clear()
    _matmul(1, n=64)                                          # another shape: the heuristic
    assert [c.block_k for *_, c in spy] == [256]


def _scan_lengths(m, k=256, n=128):
    """Lengths of the scans in the traced x @ qw: K / block_k chunks for the xla kernel."""
    w = qkern.quantize(jax.random.normal(jax.random.PRNGKey(0), (k, n)), "int8")
    closed = jax.make_jaxpr(qkern.quaxify(lambda x, w: x @ w))(jnp.ones((m, k)), w)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    return found


def test_a_write_in_this_process_reaches_functions_traced_afterwards(monkeypatch):
    # No cache clearing here: jax caches traces of the kernels, and the tuner itself traced
    # the candidate configs; the next trace must still pick up the new winner. The scan:
    # the native CPU kernel, which has no scan to count, is switched off.
    monkeypatch.setenv("QKERN_NATIVE", "0")
    assert _scan_lengths(64) == [1]                            # heuristic: block_k 256 = K
    autotune(m=64, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=64)],
             repeats=2, warmup=1)
    assert _scan_lengths(64) == [4]
    autotune(m=64, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=128)],
             repeats=2, warmup=1)
    assert _scan_lengths(64) == [2]


def test_default_space_on_cpu_tunes_block_k_and_keeps_a_valid_winner(monkeypatch):
    monkeypatch.setenv("QKERN_NATIVE", "0")   # the scan, not the native kernel (one config)
    calls = []

    def measure(fn):          # deterministic "timer": later candidates look faster
        fn()
        calls.append(1)
        return 1.0 / len(calls)

    (r,) = autotune(m=1, k=512, n=128, formats="nf4", measure=measure)
    blocks = [c.block_k for c, _ in r.timings]
    assert blocks == sorted(set(blocks)) and set(blocks) <= {64, 128, 256}
    assert r.config in {c for c, _ in r.timings} and r.written
    assert any("same chunk" in why for _, why in r.pruned)   # 512+ all give one chunk


def test_write_false_leaves_the_cache_alone(cache_dir):
    (r,) = autotune(m=1, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=64)],
                    repeats=2, warmup=1, write=False)
    assert not r.written and not (cache_dir / _cache.FILENAME).exists()


def test_a_config_that_fails_is_recorded_not_fatal(monkeypatch):
    real = xla_module.forward

    def broken(x, op, config, **kw):
        if config.block_k == 64:
            raise RuntimeError("boom")
        return real(x, op, config, **kw)

    monkeypatch.setattr(xla_module, "forward", broken)
    (r,) = autotune(m=1, k=256, n=128, formats="int8",
                    configs=[MatmulConfig(block_k=64), MatmulConfig(block_k=128)],
                    repeats=2, warmup=1)
    assert [c.block_k for c, _ in r.failed] == [64] and "boom" in r.failed[0][1]
    assert r.config == MatmulConfig(block_k=128)


def test_find_problems_in_a_function():
    found = find_problems("tests.autotune.models:tiny_mlp")
    assert found == [Problem("xla", "qmatmul", 3, 256, 128, "float32", "int8", 256, False),
                     Problem("xla", "qmatmul", 3, 128, 64, "float32", "nf4", 64, False)]
    kernels = {(p.kernel, p.fmt) for p in find_problems("tests.autotune.models:tiny_grad")}
    assert kernels == {("qmatmul", "int8"), ("qmatmul", "nf4"),
                       ("qmatmul_t", "int8"), ("qmatmul_t", "nf4")}


def test_autotune_from_a_function_dry_run():
    from tests.autotune import models

    results = autotune(function=models.tiny_mlp, dry_run=True)
    assert [r.problem.fmt for r in results] == ["int8", "nf4"]
    assert all(r.config is None and r.timings for r in results)


@pytest.mark.parametrize("spec, match", [
    ("tests.autotune.models", "package.module:function"),
    ("tests.autotune.no_such_module:f", "cannot import"),
    ("tests.autotune.models:missing", "no attribute"),
    ("tests.autotune.models:not_a_pair", "must return"),
    ("tests.autotune.models:needs_an_argument", "no arguments"),
    ("tests.autotune.models:raises_inside", r"raises_inside\(\) raised TypeError"),
])
def test_bad_function_specs(spec, match):
    with pytest.raises(SpecError, match=match):
        load_function(spec)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="triton"), "GPUs"), (dict(backend="mosaic_tpu"), "TPUs"),
    (dict(kernels="fwd"), "unknown kernel"), (dict(dtypes="int32"), "not supported"),
    (dict(formats="int9"), "Unknown quantisation format"),
])
def test_impossible_requests_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        autotune(**{"m": 1, "k": 256, "n": 128, "formats": "int8", **kwargs})


def test_public_name_is_the_function_and_the_package(monkeypatch):
    """`qkern.autotune(...)` calls the function; the package and its modules import too."""
    import inspect

    assert "autotune" in qkern.__all__
    seen = []
    monkeypatch.setattr(qkern.autotune, "autotune", lambda *a, **kw: seen.append((a, kw)) or [])
    assert qkern.autotune(m=1, k=256) == [] and seen == [((), {"m": 1, "k": 256})]
    cache_module = importlib.import_module("qkern.autotune._cache")
    import qkern.autotune._cache as via_statement
    assert via_statement is cache_module and qkern.autotune.cache_path is cache_module.cache_path
    assert "formats" in inspect.signature(qkern.autotune).parameters


@pytest.mark.parametrize("kernel", ["qmatmul", "w8a8", "lora"])
def test_pallas_backends_get_the_cached_config_or_none(monkeypatch, kernel):
    """Triton/Mosaic kernels of every family receive the cached winner of their own problem
    (rank included for LoRA), else None (their own default)."""
    from qkern.pallas import _backend
    from qkern.pallas._operand import stored_operand
    from qkern.pallas.lora_qmatmul import lora_qmatmul
    from qkern.pallas.w8a8 import w8a8_matmul

    received = []
    family = Problem("triton", kernel, 1, 1, 1, "bfloat16", "int8", 1).family
    module = _backend._TABLE[family]["triton"]

    def fake(x, op, *args, interpret, **kw):
        config = args[-1] if args else kw.get("config")
        received.append((config, interpret))
        y = jnp.zeros((x.shape[0], op.n), x.dtype)
        return (y, jnp.zeros((x.shape[0], 4), jnp.float32)) if kernel == "lora" else y

    monkeypatch.setattr(module, "forward", fake)
    op = stored_operand(qkern.quantize(jax.random.normal(jax.random.PRNGKey(0), (256, 128)),
                                       "int8"))
    x = jnp.ones((2, 256), jnp.bfloat16)
    u, v = jnp.ones((256, 4), jnp.bfloat16), jnp.ones((4, 128), jnp.bfloat16)
    run = {"qmatmul": lambda **kw: qkern.pallas.qmatmul(x, op, backend="triton", **kw),
           "w8a8": lambda **kw: w8a8_matmul(x, op, backend="triton", **kw),
           "lora": lambda **kw: lora_qmatmul(x, op, u, v, 1.0, backend="triton", **kw)}[kernel]
    jax.clear_caches()
    run()
    winner = MatmulConfig(block_m=16, block_n=32, block_k=64, num_warps=8, num_stages=3,
                          split_k=2)
    problem = Problem("triton", kernel, 2, 256, 128, "bfloat16", "int8", 256, False,
                      4 if kernel == "lora" else 0)
    other_rank = dataclasses.replace(problem, rank=8, m=3) if kernel == "lora" else problem
    _cache.write_entries([_cache.make_entry(other_rank, MatmulConfig(block_k=32),
                                            time_s=1e-5),
                          _cache.make_entry(problem, winner, time_s=1e-5)])
    run()
    run(interpret=True)                                            # tests: no cache
    assert received == [(None, False), (winner, False), (None, True)]


def test_w8a8_and_lora_are_tuned_and_written(cache_dir):
    results = autotune(m=(1, 32), k=256, n=128, formats=("int8", "int4"),
                       kernels=("w8a8", "lora", "lora_t"), rank=4, repeats=2, warmup=1)
    kinds = [(r.problem.kernel, r.problem.fmt, r.problem.rank) for r in results]
    assert ("w8a8", "int4", 0) not in kinds and ("w8a8", "int8", 0) in kinds
    assert ("lora", "int4", 4) in kinds and ("lora_t", "int8", 4) in kinds
    written = _cache.read_entries()
    assert {e["kernel"] for e in written.values()} <= {"w8a8", "lora", "lora_t"}
    assert all(e["rank"] == (4 if e["kernel"].startswith("lora") else 0)
               for e in written.values())
    assert all(r.timings for r in results)


# -- progress bar, and what the report calls a config --------------------------------------


def _bar_drawings(err: str) -> list[tuple[int, int]]:
    import re

    return [tuple(map(int, m.groups())) for seg in re.split(r"[\r\n]", err)
            if seg.startswith("qkern tune:")
            for m in [re.search(r"\| *(\d+)/(\d+) \[", seg)] if m]


def test_progress_total_is_known_up_front_and_reached(capsys):
    """Two problems of 2 configs (a candidate and the default) and a final round each: the
    bar shows 6 from its first drawing, never goes back, and ends at 6/6. (It used to start
    at the number of problems and grow as each problem's configs were found.)"""
    measure = lambda fn: (fn(), 1e-3)[1]          # noqa: E731
    results = autotune(m=(1, 12), k=256, n=128, formats="int8", measure=measure,
                       configs=[MatmulConfig(block_k=64)], write=False, progress=True)
    assert len(results) == 2 and all(len(r.timings) == 2 for r in results)
    drawn = _bar_drawings(capsys.readouterr().err)
    assert drawn and {t for _, t in drawn} == {6}, drawn
    counts = [n for n, _ in drawn]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6, drawn


class _Terminal:
    def __init__(self):
        import io

        self.buf = io.StringIO()

    def isatty(self):
        return True

    def write(self, s):
        return self.buf.write(s)

    def flush(self):
        pass


@pytest.mark.parametrize("progress, drawn", [(None, True), (False, False), (True, True)])
def test_progress_argument_on_a_terminal(progress, drawn, monkeypatch):
    """progress=None draws when stderr is a terminal, False never."""
    import contextlib

    term = _Terminal()
    with contextlib.redirect_stderr(term):
        autotune(m=12, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=64)],
                 measure=lambda fn: 1e-3, write=False, progress=progress)
    assert bool(_bar_drawings(term.buf.getvalue())) is drawn


@pytest.mark.parametrize("progress", [None, False])
def test_no_progress_off_a_terminal(progress, capsys):
    autotune(m=12, k=256, n=128, formats="int8", configs=[MatmulConfig(block_k=64)],
             measure=lambda fn: 1e-3, write=False, progress=progress)
    assert capsys.readouterr().err == ""


def test_the_progress_module_is_gone():
    with pytest.raises(ImportError):
        importlib.import_module("qkern.autotune._progress")


def test_describe_config_names_the_native_kernel(monkeypatch):
    from qkern.autotune._tune import NATIVE, describe_config
    from qkern.pallas.qmatmul import _native

    cfg = MatmulConfig(block_k=256)
    p = Problem("xla", "qmatmul", 1, 256, 128, "float32", "int8", 256, False)
    monkeypatch.setattr(_native, "runs_for", lambda m, op, x_dtype: True)
    assert describe_config(cfg, "xla", p) == NATIVE
    assert describe_config(cfg, "xla") == "block_k=256"                 # no problem: no claim
    t = dataclasses.replace(p, kernel="qmatmul_t")                     # the scan: block_k read
    assert describe_config(cfg, "xla", t) == "block_k=256"
    assert describe_config(MatmulConfig(dequantize=True), "xla", p) == "dequantise + XLA dot"
    monkeypatch.setattr(_native, "runs_for", lambda m, op, x_dtype: False)
    assert describe_config(cfg, "xla", p) == "block_k=256"
    seen = []
    monkeypatch.setattr(_native, "runs_for",
                        lambda m, op, x_dtype: seen.append((m, op.fmt.name)) or 1)
    assert describe_config(cfg, "xla", dataclasses.replace(p, m=5, fmt="nf4", block_size=64))
    assert seen == [(5, "nf4")]                                         # the problem's weight
