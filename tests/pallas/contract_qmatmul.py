"""The contract of the weight-only quantised matmul, `qkern.pallas.qmatmul`: what every
backend must do, stated once, through the public entry point.

Every backend's test class subclasses `QmatmulContract` and so runs every test below with
`qmatmul(..., backend=self.backend, interpret=self.interpret, config=self.config(m))`:
numerics against the reference (`reference_matmul`, `reference_matmul_t`) for every
format, shape and dtype of the shared cases (a Latin square: every format meets every
shape, and every format and every shape meets every dtype), both directions, the mx
formats, the heuristic config, leading batch dims, M = 0, jit with a traced operand,
vmap, gradients (the backward runs the same backend's transposed kernel) and the frozen
weight's zero cotangent, and the errors every backend gives.

How to add a backend "mine":

    # tests/pallas/test_qmatmul_mine.py
    from .contract_qmatmul import QmatmulContract

    class TestMine(QmatmulContract):
        backend = "mine"
        interpret = True            # False where the tests run on its real device

        def config(self, m):        # optional: a MatmulConfig per M (default: heuristic)
            return None

        # ... then the backend's own tests: its planner's rules, its lowering for the real
        # target (`qkern._compat.export(fn, platform, *args)`), the configs it refuses.

The helpers here (cases, references, `assert_matches`) are shared by the W8A8 and QLoRA
contracts and the backend-specific tests; this module holds no test of its own (pytest
collects only the subclasses).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import qmatmul
from qkern.pallas._config import MatmulConfig
from qkern.pallas._operand import canonical_operand, reference_dequantize

# ---------------------------------------------------------------------------- shared cases

# (format, quantize options)
FORMATS = [
    ("int8", {}),
    ("int8", dict(block_size=128)),
    ("int4", {}),
    ("int4", dict(calibration="minmax")),
    ("nf4", {}),
    ("fp4", {}),
    ("fp8_e4m3", {}),
    ("fp8_e5m2", dict(block_size=128)),
]
FORMAT_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in FORMATS]
MX_FORMATS = [("mxfp4", {}), ("mxfp8", {})]
NONFINITE_FORMATS = [("int8", dict(block_size=64)), ("int4", dict(calibration="minmax")),
                     ("nf4", dict(block_size=64)), ("fp8_e4m3", {}), ("mxfp4", {})]

# (M, K, N): M = 1, 3, 16, 257 and K, N that are not multiples of the block sizes
SHAPES = [(1, 512, 256), (3, 384, 200), (16, 1000, 136), (257, 320, 260)]

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# Relative (to max |reference|) tolerance by activation dtype.
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3}


def make_case(fmt, opts, m, k, n, dtype, seed=0):
    """(x [M, K] dtype, QArray [K, N], QOperand)."""
    kw, kx = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(kw, (k, n), jnp.float32)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    qw = qkern.quantize(w, fmt, **opts)
    return x, qw, canonical_operand(qw)


def random_dy(m, n, dtype, seed=1):
    """A cotangent / transposed-direction input [M, N]."""
    return jax.random.normal(jax.random.PRNGKey(seed), (m, n), jnp.float32).astype(dtype)


def reference_matmul(x, op):
    """x @ dequant(W), float32 accumulation, in x's dtype."""
    y = jnp.dot(x.astype(jnp.float32), reference_dequantize(op),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def reference_matmul_t(dy, op):
    """dy [M, N] @ dequant(W).T -> [M, K]."""
    y = jnp.dot(dy.astype(jnp.float32), reference_dequantize(op).T,
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(dy.dtype)


# jitted once per shape: cheaper than the references' eager op-by-op dispatch
ref = jax.jit(reference_matmul)
ref_t = jax.jit(reference_matmul_t)


def assert_matches(got, want, dtype=None):
    """Max error relative to max |want|, within the tolerance of `dtype` (default: want's)."""
    tol = TOL[jnp.dtype(dtype if dtype is not None else want.dtype)]
    assert jnp.dtype(got.dtype) == jnp.dtype(want.dtype), (got.dtype, want.dtype)
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))), 1.0)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= tol, f"max relative error {err:.3g} > {tol:.3g}"


# A covering subset of FORMATS x SHAPES x DTYPES (interpret mode is slow): every (format,
# shape) pair, the dtype rotating so that every format meets every dtype and every shape
# meets every dtype. The transposed direction gets half of it: every format on two shapes,
# every shape on four formats, every dtype on every shape.
CROSS_INDEX = [(fi, si, (fi + si) % len(DTYPES))
               for fi in range(len(FORMATS)) for si in range(len(SHAPES))]
CROSS_T_INDEX = [c for c in CROSS_INDEX if (c[0] + c[1]) % 2 == 0]


def _params(index):
    return [pytest.param(*FORMATS[fi], SHAPES[si], DTYPES[di],
                         id=f"{FORMAT_IDS[fi]}-{'x'.join(map(str, SHAPES[si]))}-"
                            f"{jnp.dtype(DTYPES[di]).name}")
            for fi, si, di in index]


CROSS = _params(CROSS_INDEX)
CROSS_T = _params(CROSS_T_INDEX)

# jit(vmap(.)) over a batch of x (and of dy), the operand traced: fmt, opts, M, dtype
# (M = 3: the decode kernels; M = 20: the tiled / transposed ones)
JIT_VMAP = [("nf4", {}, 3, jnp.bfloat16), ("int4", dict(calibration="minmax"), 20, jnp.float32),
            ("fp8_e5m2", dict(block_size=128), 3, jnp.float16), ("fp4", {}, 20, jnp.float16)]


# ---------------------------------------------------------------------------- the contract


class QmatmulContract:
    """Subclass with `backend` and `interpret` set (see the module docstring)."""

    backend: str = ""
    interpret: bool | None = None

    def config(self, m: int) -> MatmulConfig | None:
        """The config the numerics tests use at M rows (None: the heuristic's)."""
        return None

    def mm(self, x, op, *, transposed=False, config="auto"):
        m = int(np.prod(x.shape[:-1]))
        cfg = self.config(m) if config == "auto" else config
        return qmatmul(x, op, transposed=transposed, backend=self.backend, config=cfg,
                       interpret=self.interpret)

    # -- numerics ---------------------------------------------------------------------

    @pytest.mark.parametrize("fmt,opts,shape,dtype", CROSS)
    def test_forward_matches_reference(self, fmt, opts, shape, dtype):
        m, k, n = shape
        x, _, op = make_case(fmt, opts, m, k, n, dtype)
        y = self.mm(x, op)
        assert y.dtype == dtype
        assert_matches(y, ref(x, op))

    @pytest.mark.parametrize("fmt,opts,shape,dtype", CROSS_T)
    def test_transposed_matches_reference(self, fmt, opts, shape, dtype):
        """dy @ W.T from the stored (non-transposed) codes."""
        m, k, n = shape
        _, _, op = make_case(fmt, opts, m, k, n, dtype)
        dy = random_dy(m, n, dtype)
        dx = self.mm(dy, op, transposed=True)
        assert dx.shape == (m, k)
        assert_matches(dx, ref_t(dy, op))

    @pytest.mark.parametrize("fmt,opts", MX_FORMATS, ids=[f for f, _ in MX_FORMATS])
    def test_mx_formats(self, fmt, opts):
        x, _, op = make_case(fmt, opts, 3, 384, 200, jnp.bfloat16)
        assert_matches(self.mm(x, op), ref(x, op))
        dy = random_dy(3, 200, jnp.bfloat16)
        assert_matches(self.mm(dy, op, transposed=True), ref_t(dy, op))

    def test_int1_signs(self):
        """int1 (codes -1/+1, one byte each) through the one-byte integer path."""
        x, _, op = make_case("int1", dict(block_size=64), 3, 384, 200, jnp.float32)
        assert_matches(self.mm(x, op), ref(x, op))
        dy = random_dy(3, 200, jnp.float32)
        assert_matches(self.mm(dy, op, transposed=True), ref_t(dy, op))

    @pytest.mark.parametrize("m", [2, 33])
    def test_default_config(self, m):
        """config=None takes the autotune cache's or the heuristic's config, fitted to the
        problem."""
        x, _, op = make_case("int4", {}, m, 320, 72, jnp.bfloat16)
        assert_matches(self.mm(x, op, config=None), ref(x, op))
        dy = random_dy(m, 72, jnp.bfloat16)
        assert_matches(self.mm(dy, op, transposed=True, config=None), ref_t(dy, op))

    def test_leading_dims_flatten_into_m(self):
        x, _, op = make_case("int4", {}, 6, 256, 128, jnp.float32)
        y = self.mm(x.reshape(2, 3, 256), op)
        assert y.shape == (2, 3, 128)
        assert_matches(y.reshape(6, 128), ref(x, op))

    @pytest.mark.parametrize("transposed", [False, True], ids=["fwd", "T"])
    def test_no_rows(self, transposed):
        """M = 0 (an empty batch) gives an empty result instead of a zero-row grid."""
        _, _, op = make_case("nf4", {}, 1, 256, 64, jnp.bfloat16)
        x = jnp.ones((0, 4, 64 if transposed else 256), jnp.bfloat16)
        y = self.mm(x, op, transposed=transposed)
        assert y.shape == (0, 4, 256 if transposed else 64) and y.dtype == jnp.bfloat16

    # -- transformations --------------------------------------------------------------

    @pytest.mark.parametrize("fmt,opts,m,dtype", JIT_VMAP,
                             ids=[f"{c[0]}-m{c[2]}-{jnp.dtype(c[3]).name}" for c in JIT_VMAP])
    def test_jit_and_vmap(self, fmt, opts, m, dtype):
        """jit(vmap(qmatmul)) over a batch of x (and of dy), the operand a traced argument,
        matches the reference per element (through pallas_call's batching rule)."""
        _, _, op = make_case(fmt, opts, m, 640, 192, dtype)
        xs = jax.random.normal(jax.random.PRNGKey(7), (2, m, 640)).astype(dtype)
        dys = jax.random.normal(jax.random.PRNGKey(8), (2, m, 192)).astype(dtype)
        fwd = jax.jit(jax.vmap(lambda x, op: self.mm(x, op), in_axes=(0, None)))
        bwd = jax.jit(jax.vmap(lambda d, op: self.mm(d, op, transposed=True),
                               in_axes=(0, None)))
        ys, dxs = fwd(xs, op), bwd(dys, op)
        assert ys.shape == (2, m, 192) and dxs.shape == (2, m, 640)
        for b in range(2):
            assert_matches(ys[b], ref(xs[b], op))
            assert_matches(dxs[b], ref_t(dys[b], op))

    def test_grad_is_the_transposed_product(self):
        """d/dx through the custom_vjp (the backward runs the backend's transposed kernel),
        under jit."""
        x, _, op = make_case("nf4", {}, 5, 320, 136, jnp.float32)
        g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(self.mm(x, op)))))(x)
        g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(reference_matmul(x, op))))(x)
        assert_matches(g, g_ref)    # relative to max |g|: y's summation order moves cos(y)

    def test_frozen_weight_gets_zero_gradient(self):
        x, _, op = make_case("int8", {}, 2, 64, 32, jnp.float32)
        g = jax.grad(lambda op: jnp.sum(self.mm(x, op)), allow_int=True)(op)
        assert float(jnp.max(jnp.abs(g.scales))) == 0.0
        assert g.data.dtype == jax.dtypes.float0

    @pytest.mark.parametrize("fmt,opts", NONFINITE_FORMATS, ids=[f for f, _ in NONFINITE_FORMATS])
    def test_nonfinite_weight_is_never_a_finite_product(self, fmt, opts):
        """The NaN/inf policy (docs/formats.md): a weight quantised under jit with a NaN and
        an inf in it has NaN scales (MX: the E8M0 NaN code) for their blocks; every backend
        decodes them so the output columns that read them are NaN, the others exact."""
        k, n = 320, 72
        w = jax.random.normal(jax.random.PRNGKey(3), (k, n), jnp.float32)
        w = w.at[5, 7].set(jnp.nan).at[300, 40].set(jnp.inf)
        qw = jax.jit(lambda w: qkern.quantize(w, fmt, **opts))(w)
        op = canonical_operand(qw)
        x = jax.random.normal(jax.random.PRNGKey(4), (3, k), jnp.float32)
        y = self.mm(x, op)
        bad = np.zeros(n, bool)
        bad[[7, 40]] = True
        assert bool(jnp.all(jnp.isnan(y[:, bad]))), y[:, bad]
        assert bool(jnp.all(jnp.isfinite(y[:, ~bad])))
        clean = jnp.where(jnp.isfinite(w), w, 0.0)
        assert_matches(y[:, ~bad], ref(x, canonical_operand(qkern.quantize(clean, fmt, **opts)))[:, ~bad])
        dx = self.mm(jax.random.normal(jax.random.PRNGKey(5), (2, n)), op, transposed=True)
        assert not bool(jnp.all(jnp.isfinite(dx[:, 5]))) and not bool(jnp.all(jnp.isfinite(dx[:, 300])))

    # -- bad input --------------------------------------------------------------------

    def test_wrong_contraction_size(self):
        _, _, op = make_case("int4", {}, 1, 256, 128, jnp.float32)
        with pytest.raises(ValueError, match=r"x has 255 columns .*K is 256"):
            self.mm(jnp.ones((2, 255)), op)
        with pytest.raises(ValueError, match=r"x has 256 columns .*N is 128"):
            self.mm(jnp.ones((2, 256)), op, transposed=True)
