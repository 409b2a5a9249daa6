"""The xla backend of `qmatmul`: the contract (contract_qmatmul.py), plus what is its own:
every format (the mx, int3, double-quantised and minmax ones too) on every shared shape in
float32, both directions, with K chunks smaller and larger than K (called directly); and
the wiring of QArray's dot_general rule into the kernels. The native CPU kernel this
backend uses at small M is tested in test_native.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import MatmulConfig, qmatmul
from qkern.pallas._config import (DEQUANTIZE_MIN_M, SMALL_WEIGHT_BYTES, Problem, config_for,
                                  default_config)
from qkern.pallas.qmatmul._xla import qmatmul_t_xla, qmatmul_xla

from .contract_qmatmul import (CROSS_INDEX, CROSS_T_INDEX, DTYPES, FORMAT_IDS, FORMATS,
                               MX_FORMATS, SHAPES, QmatmulContract, assert_matches,
                               make_case, random_dy, reference_matmul, reference_matmul_t)

EXTRA = MX_FORMATS + [("int3", {}), ("nf4", dict(double_quant=True)),
                      ("int8", dict(calibration="minmax")), ("fp8_e4m3", dict(block_size=64))]


class TestXla(QmatmulContract):
    backend = "xla"
    interpret = False

    def config(self, m):
        # The scan's table entry, explicitly: the heuristic would dequantise these small
        # test weights first at M > 16 (`heuristic_config`), and the contract is the scan's.
        return default_config("xla", m)

    @pytest.mark.parametrize("fmt,opts", FORMATS + EXTRA,
                             ids=FORMAT_IDS + [f"extra-{f}-{i}" for i, (f, _) in enumerate(EXTRA)])
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    @pytest.mark.parametrize("block_k", [64, 512])
    def test_every_format_and_shape_in_k_chunks(self, fmt, opts, shape, block_k):
        m, k, n = shape
        x, _, op = make_case(fmt, opts, m, k, n, jnp.float32)
        cfg = MatmulConfig(block_k=block_k)
        assert_matches(qmatmul_xla(x, op, cfg), reference_matmul(x, op))
        dy = random_dy(m, n, jnp.float32, seed=3)
        assert_matches(qmatmul_t_xla(dy, op, cfg), reference_matmul_t(dy, op))


def test_unknown_backend_is_refused():
    x, _, op = make_case("int4", {}, 2, 256, 128, jnp.float32)
    with pytest.raises(ValueError, match="Unknown qkern backend"):
        qmatmul(x, op, backend="cuda-magic")


def test_contract_cross_covers_formats_shapes_and_dtypes():
    """The contract's Latin squares (contract_qmatmul.CROSS, CROSS_T) cover what they say."""
    for cross in (CROSS_INDEX, CROSS_T_INDEX):
        assert {fi for fi, _, _ in cross} == set(range(len(FORMATS)))
        assert {si for _, si, _ in cross} == set(range(len(SHAPES)))
        assert {di for _, _, di in cross} == set(range(len(DTYPES)))
    # the forward cross meets every (format, shape), (format, dtype) and (shape, dtype) pair
    assert len({(fi, si) for fi, si, _ in CROSS_INDEX}) == len(FORMATS) * len(SHAPES)
    assert len({(fi, di) for fi, _, di in CROSS_INDEX}) == len(FORMATS) * len(DTYPES)
    assert len({(si, di) for _, si, di in CROSS_INDEX}) == len(SHAPES) * len(DTYPES)


# -- wiring: QArray's dot_general rule -------------------------------------------------------
@pytest.mark.parametrize("expr", ["x @ w", "w.T @ x.T", "y @ w.T", "jnp.einsum('k,kn->n', x[0], w)",
                                  "jnp.dot(x.reshape(1, 2, 3, 320), w)"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_dot_general_layouts_use_kernel_and_match(expr, fmt):
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    w_dense = jax.random.normal(kw, (320, 136))
    qw = qkern.quantize(w_dense, fmt)
    d = qw.materialise()
    x = jax.random.normal(kx, (6, 320))
    y_in = jax.random.normal(kx, (6, 136))
    f = lambda x, y, w: eval(expr, {"jnp": jnp, "x": x, "y": y, "w": w})
    got = qkern.quaxify(f)(x, y_in, qw)
    want = f(x, y_in, d)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The kernel path never materialises the whole dequantised weight: no [320, 136] float
    # value appears in the jaxpr.
    jaxpr = jax.make_jaxpr(qkern.quaxify(f))(x, y_in, qw)
    shapes = {tuple(v.aval.shape) for e in _all_eqns(jaxpr.jaxpr) for v in e.outvars}
    assert (320, 136) not in shapes and (136, 320) not in shapes


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for j in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(j, "jaxpr", None)
                if isinstance(j, jax.extend.core.Jaxpr):
                    yield from _all_eqns(j)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _all_eqns(inner)


def test_batched_layout_falls_back_correctly():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 64))
    qw = qkern.quantize(w, "int8")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 128))
    got = qkern.quaxify(lambda x, w: jnp.einsum("bik,bkn->bin", x, w))(x, qw)
    want = jnp.einsum("bik,bkn->bin", x, qw.materialise())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grad_through_quaxified_layers():
    ws = [qkern.quantize(jax.random.normal(jax.random.PRNGKey(i), (64, 64)) / 8, "nf4")
          for i in range(3)]
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 64))

    def model(x, ws):
        for w in ws:
            x = jnp.tanh(x @ w)
        return jnp.sum(x ** 2)

    g = jax.jit(jax.grad(qkern.quaxify(model)))(x, ws)
    g_ref = jax.grad(model)(x, [w.materialise() for w in ws])
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["qmatmul", "qmatmul_t"])
def test_heuristic_dequantises_small_weights_at_prefill_sizes(kernel, monkeypatch):
    """On xla with nothing tuned, weights up to SMALL_WEIGHT_BYTES in float32 run
    dequantise-then-dot from M = DEQUANTIZE_MIN_M; larger weights and smaller M run the
    scan (or the native kernel); W8A8 keeps its own path."""
    from qkern.pallas import _config
    monkeypatch.setattr(_config, "LOOKUPS", [])          # no autotune cache
    side = int((SMALL_WEIGHT_BYTES // 4) ** 0.5)
    small = lambda m, kern=kernel: Problem("xla", kern, m, side, side, "float32", "nf4", 64)
    big = Problem("xla", kernel, 256, side, 2 * side, "float32", "nf4", 64)
    assert config_for(small(DEQUANTIZE_MIN_M)).dequantize
    assert config_for(small(4096)).dequantize
    assert not config_for(small(DEQUANTIZE_MIN_M - 1)).dequantize
    assert not config_for(small(16)).dequantize           # decode regime
    assert not config_for(big).dequantize
    assert not config_for(small(256, "w8a8")).dequantize
    assert config_for(Problem("triton", kernel, 64, 64, 64, "float32", "nf4", 64)) is None


def test_small_weight_prefill_through_quaxify_matches_scan():
    """The QArray route takes the heuristic's dequantise-first config at M >= 128 and
    agrees with the scan."""
    w = jax.random.normal(jax.random.PRNGKey(0), (96, 80))
    x = jax.random.normal(jax.random.PRNGKey(1), (130, 96))
    q = qkern.quantize(w, "nf4", block_size=32)
    got = jax.jit(qkern.quaxify(lambda x, w: x @ w))(x, q)
    scan = qmatmul(x, qkern.pallas.stored_operand(q), backend="xla",
                   config=default_config("xla", 130))
    np.testing.assert_allclose(got, scan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8"])
@pytest.mark.parametrize("m", [1, 32])
def test_fp8_stack_scanned_over_is_sliced_as_bytes(fmt, m):
    """fp8 codes are stored as uint8 bit patterns: XLA:CPU has no float8 arithmetic and
    converted a whole stacked float8 weight to float16 ahead of a `lax.scan` over its
    layers on every call (8x slower per step); the compiled scan must hold no float16 or
    float8 copy of the stack."""
    layers, k, n = 3, 128, 256
    ws = jax.random.normal(jax.random.PRNGKey(0), (layers, k, n)) / np.sqrt(k)
    q = qkern.quantize(ws, fmt)
    assert q.data.dtype == jnp.uint8
    step = lambda x, ws: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w)[:, :k], None), x, ws)[0]
    f = jax.jit(qkern.quaxify(step))
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k))
    hlo = f.lower(x, q).compile().as_text()
    for dtype in ("f16", "f8e4m3fn", "f8e5m2"):
        assert f"{dtype}[{layers},{k},{n}]" not in hlo, dtype
    np.testing.assert_allclose(f(x, q), step(x, qkern.dequantize(q)), rtol=1e-4, atol=1e-4)
