"""Round trips dequantize(quantize(w)) within each format's error bound.

The bounds are derived here, in NumPy, from each format's definition (not from qkern):
- int (symmetric, absmax): scale = block absmax / qmax, |error| <= scale / 2.
- nf4 / fp4: |error| <= (largest gap between neighbouring codes) / 2 x block absmax.
- fp8: scale = block absmax / (largest finite value); the element is a float with m
  mantissa bits, so |error| <= scale x (|w/scale| 2^-(m+1) + half the smallest subnormal).
- mx: scale 2^(floor(log2 absmax) - emax); elements as fp8 above, plus clipping of
  |w/scale| above the element format's largest value (OCP clamps).
On top: the rounding of the result to the output dtype (bfloat16 / float16) and float32
arithmetic slack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkern

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12

INT_FORMATS = [f"int{b}" for b in (2, 3, 4, 5, 6, 7, 8)]
CODEBOOK_FORMATS = ["nf4", "fp4"]
FP8_FORMATS = ["fp8_e4m3", "fp8_e5m2"]
MX_FORMATS = ["mxfp4", "mxfp8"]
ALL_FORMATS = INT_FORMATS + CODEBOOK_FORMATS + FP8_FORMATS + MX_FORMATS
PACKED = {"int4", "nf4", "fp4", "mxfp4"}
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# (largest finite value, mantissa bits, minimum normal exponent) of the element formats
FLOAT_ELEMENTS = {"e4m3": (448.0, 3, -6), "e5m2": (57344.0, 2, -14), "e2m1": (6.0, 1, 0)}
FP8_ELEMENT = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
MX_ELEMENT = {"mxfp4": "e2m1", "mxfp8": "e4m3"}
OUT_ROUNDING = {np.dtype(jnp.float32): 0.0, np.dtype(jnp.bfloat16): 2.0 ** -8,
                np.dtype(jnp.float16): 2.0 ** -11}


def block_absmax(w: np.ndarray, axis: int | None, block: int) -> np.ndarray:
    """Each element's block absmax (zero-padding along `axis`), broadcast to w's shape."""
    a = np.abs(w.astype(np.float64))
    if axis is None:
        return np.full(w.shape, a.max())
    x = np.moveaxis(a, axis, -1)
    n = x.shape[-1]
    nb = -(-n // block)
    x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    m = x.reshape(x.shape[:-1] + (nb, block)).max(-1, keepdims=True)
    m = np.broadcast_to(m, x.shape[:-1] + (nb, block)).reshape(x.shape)[..., :n]
    return np.moveaxis(m, -1, axis)


def _float_element_error(y: np.ndarray, element: str) -> np.ndarray:
    """Bound on |round(y) - y| for an element float format, with clipping at its max."""
    vmax, m, emin = FLOAT_ELEMENTS[element]
    ay = np.abs(y)
    return np.maximum(ay - vmax, 0) + np.minimum(ay, vmax) * 2.0 ** -(m + 1) + 2.0 ** (emin - m - 1)


def error_bound(w: np.ndarray, fmt: str, axis: int | None, block: int) -> np.ndarray:
    """Per-element bound on |dequantize(quantize(w)) - w| in exact arithmetic."""
    amax = block_absmax(w, axis, block)
    if fmt in INT_FORMATS:
        qmax = 2 ** (int(fmt[3:]) - 1) - 1
        return amax / qmax / 2
    if fmt in CODEBOOK_FORMATS:
        cb = np.sort(NF4 if fmt == "nf4" else FP4)
        return np.max(np.diff(cb)) / 2 * amax
    w64 = w.astype(np.float64)
    if fmt in FP8_FORMATS:
        el = FP8_ELEMENT[fmt]
        scale = amax / FLOAT_ELEMENTS[el][0]
        safe = np.where(scale > 0, scale, 1.0)
        return scale * _float_element_error(w64 / safe, el)
    el = MX_ELEMENT[fmt]
    emax = math.floor(math.log2(FLOAT_ELEMENTS[el][0]))
    exp = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax
    scale = np.exp2(np.clip(exp, -127, 127))
    return np.where(amax > 0, scale * _float_element_error(w64 / scale, el), 0.0)


def check_roundtrip(w: np.ndarray, out, fmt: str, axis: int | None, block: int):
    """`w`: the input as float32 (already rounded to its dtype); `out`: dequantised."""
    out_dtype = np.dtype(out.dtype)
    got = np.asarray(out).astype(np.float64)
    assert np.all(np.isfinite(got)), f"{fmt}: non-finite values in the round trip"
    w64 = w.astype(np.float64)
    bound = error_bound(w, fmt, axis, block)
    tol = (bound * (1 + 1e-5) + 1e-6 * np.abs(w64)
           + (np.abs(w64) + bound) * OUT_ROUNDING[out_dtype] + 1e-30)
    err = np.abs(got - w64)
    bad = err > tol
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{fmt} axis={axis} block={block} dtype={out_dtype}: {bad.sum()} of {w.size} "
            f"elements outside the bound; first at {i}: w={w64[i]!r} got={got[i]!r} "
            f"err={err[i]!r} bound={tol[i]!r}")


def _normal_axis(axis, ndim):
    if axis is None:
        return None
    return axis % ndim


def _weights(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2, size=shape))  # spread scales
    w = jnp.asarray(w, dtype)
    return w, np.asarray(w.astype(jnp.float32))


def _block_for(fmt: str, n: int, want: int) -> int:
    if fmt in MX_FORMATS:
        return 32
    b = min(want, n)
    if fmt in PACKED and b % 2:
        b = b + 1 if b + 1 <= n + (n % 2) else b - 1
    return max(b, 2 if fmt in PACKED else 1)


# (shape, axis, wanted block size): rank 1 to 4, odd shapes, blocks that do not divide.
CASES = [
    ((7,), -2, 4),              # rank 1: the default axis is 0
    ((33, 65), -2, 8),          # 33 = 4 x 8 + 1
    ((33, 65), -1, 16),         # 65 = 4 x 16 + 1
    ((3, 5, 70), 0, 2),         # block axis of length 3
    ((2, 3, 5, 129), -1, 32),   # 129 = 4 x 32 + 1
]


def _quantize_jit(w, fmt, **kw):
    """(qkern.quantize(w), its dequantisation) under one jit: a compile per configuration
    is much cheaper than eager dispatch on a 2-core CPU. The exactness and calibration
    tests run quantize eagerly, and test_eager_and_jit_quantize_agree ties the two."""
    def f(w):
        qw = qkern.quantize(w, fmt, **kw)
        return qw, qkern.dequantize(qw)
    return jax.jit(f)(w)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_roundtrip_within_bound_blocked(fmt):
    """Every case with one of the three dtypes, cycled so each format sees all three.
    All cases of a format run under one jit (one compile)."""
    configs, inputs = [], []
    for k, (shape, axis, want) in enumerate(CASES):
        dtype = DTYPES[(k + ALL_FORMATS.index(fmt)) % len(DTYPES)]
        w, w32 = _weights(shape, dtype, seed=k)
        ax = 0 if len(shape) == 1 else axis % len(shape)
        block = _block_for(fmt, shape[ax], want)
        configs.append((shape, dtype, axis, ax, block, w32))
        inputs.append(w)

    def f(ws):
        out = []
        for w, (_, _, axis, _, block, _) in zip(ws, configs):
            qw = qkern.quantize(w, fmt, block_size=block, axis=axis)
            out.append((qw, qkern.dequantize(qw)))
        return out

    for (qw, out), (shape, dtype, axis, ax, block, w32) in zip(jax.jit(f)(inputs), configs):
        assert qw.shape == shape and qw.dtype == dtype
        assert out.shape == shape and out.dtype == dtype
        check_roundtrip(w32, out, fmt, ax, block)


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if f not in MX_FORMATS])
def test_roundtrip_per_tensor(fmt):
    shapes = [(7,), (3, 33, 9)]
    dtypes = [DTYPES[(k + ALL_FORMATS.index(fmt)) % len(DTYPES)] for k in range(len(shapes))]
    inputs = [_weights(shape, dt, seed=10 + k) for k, (shape, dt) in enumerate(zip(shapes, dtypes))]

    def f(ws):
        qs = [qkern.quantize(w, fmt, axis=None) for w in ws]
        return [(q, qkern.dequantize(q)) for q in qs]

    results = jax.jit(f)([w for w, _ in inputs])
    for (qw, out), (_, w32), shape, dtype in zip(results, inputs, shapes, dtypes):
        assert qw.shape == shape and qw.dtype == dtype
        assert qw.block_axis is None
        assert out.shape == shape and out.dtype == dtype
        check_roundtrip(w32, out, fmt, None, 0)


# Default granularity: per channel for int8 / fp8, 128 for int4 (and the emulated ints),
# 64 for nf4 / fp4, 32 for MX. Per channel is one block spanning the whole axis.
DEFAULT_BLOCK = {**{f: 128 for f in INT_FORMATS}, "int8": None, "nf4": 64, "fp4": 64,
                 "fp8_e4m3": None, "fp8_e5m2": None, "mxfp4": 32, "mxfp8": 32}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_default_granularity(fmt):
    shape = (300, 6)   # 300 = 2 x 128 + 44 = 4 x 64 + 44 = 9 x 32 + 12
    w, w32 = _weights(shape, jnp.float32, seed=3)
    want = DEFAULT_BLOCK[fmt] or shape[0]

    def f(w):
        qw = qkern.quantize(w, fmt)
        explicit = qkern.quantize(w, fmt, block_size=want, axis=-2)
        return qw, qkern.dequantize(qw), qkern.dequantize(explicit)

    qw, out, explicit = jax.jit(f)(w)
    assert qw.block_size == want
    assert qw.block_axis == 0            # default axis -2: the `in` axis of [in, out]
    check_roundtrip(w32, out, fmt, 0, want)
    # the default is the same quantisation as asking for that block size explicitly
    np.testing.assert_array_equal(np.asarray(out), np.asarray(explicit))


def test_int4_default_block_is_128_not_per_channel():
    """Blocks of 128 vs one block per channel are observably different when one block
    holds a large outlier: the other blocks keep their own small scale."""
    w = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    w[0] = 100.0
    out = np.asarray(qkern.dequantize(qkern.quantize(w, "int4")))
    err_second_block = np.abs(out[128:] - w[128:]).max()
    assert err_second_block <= block_absmax(w, 0, 128)[128:].max() / 7 / 2 * (1 + 1e-5)
    assert err_second_block < 100.0 / 7 / 2 / 4


@pytest.mark.parametrize("fmt", ["int4", "mxfp8"])
def test_eager_and_jit_quantize_agree(fmt):
    w, _ = _weights((40, 33), jnp.float32, seed=4)
    eager = qkern.quantize(w, fmt, axis=-1)
    jitted = jax.jit(lambda w: qkern.quantize(w, fmt, axis=-1))(w)
    assert isinstance(jitted, qkern.QArray)
    np.testing.assert_array_equal(np.asarray(qkern.dequantize(eager)),
                                  np.asarray(qkern.dequantize(jitted)))


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3", "mxfp8"])
def test_logical_shape_and_dtype_kept(fmt):
    for dtype in DTYPES:
        w, _ = _weights((5, 37, 3), dtype)
        qw = jax.eval_shape(lambda w: qkern.quantize(w, fmt, axis=1), w)
        assert isinstance(qw, qkern.QArray) and isinstance(qw, qkern.ArrayValue)
        assert qw.shape == (5, 37, 3) and qw.dtype == dtype
        assert qw.ndim == 3 and qw.size == 5 * 37 * 3
        assert qw.aval().shape == (5, 37, 3) and qw.aval().dtype == dtype
        assert qw.block_axis == 1


def test_roundtrip_numpy_input():
    w = np.random.default_rng(5).standard_normal((17, 9)).astype(np.float32)
    out = qkern.dequantize(qkern.quantize(w, "int8"))
    assert out.shape == w.shape and out.dtype == np.float32
    check_roundtrip(w, out, "int8", 0, 17)


def test_bound_check_is_not_vacuous():
    """The checker rejects an answer that is off by more than the bound."""
    w = np.random.default_rng(6).standard_normal((64, 4)).astype(np.float32)
    out = np.asarray(qkern.dequantize(qkern.quantize(w, "int8")))
    bad = out.copy()
    bad[3, 1] = w[3, 1] + 1.05 * error_bound(w, "int8", 0, 64)[3, 1] + 1e-5
    check_roundtrip(w, jnp.asarray(out), "int8", 0, 64)
    with pytest.raises(AssertionError):
        check_roundtrip(w, jnp.asarray(bad), "int8", 0, 64)


@st.composite
def _configs(draw):
    fmt = draw(st.sampled_from(ALL_FORMATS))
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 40)) for _ in range(ndim))
    choices = list(range(-ndim, ndim)) + ([None] if fmt not in MX_FORMATS else [])
    axis = draw(st.sampled_from(choices))
    ax = _normal_axis(axis, ndim)
    n = shape[ax if ax is not None else max(ndim - 2, 0)]
    if axis is None or fmt in MX_FORMATS or draw(st.booleans()):
        block = None
    else:
        limit = n + (n % 2) if fmt in PACKED else n
        block = draw(st.integers(1, limit))
        if fmt in PACKED and block % 2:
            block = block + 1 if block + 1 <= limit else block - 1
        block = max(block, 2 if fmt in PACKED else 1)
        if block > limit:
            block = None
    seed = draw(st.integers(0, 2 ** 16))
    return fmt, dtype, shape, axis, block, seed


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_roundtrip_property(cfg):
    fmt, dtype, shape, axis, block, seed = cfg
    w, w32 = _weights(shape, dtype, seed)
    qw, out = _quantize_jit(w, fmt, axis=axis, block_size=block)
    assert qw.shape == shape and qw.dtype == dtype
    assert out.shape == shape and out.dtype == dtype
    ax = _normal_axis(axis, len(shape))
    if block is None:  # the documented default (a block longer than the axis is one block)
        block = DEFAULT_BLOCK[fmt] or shape[ax if ax is not None else 0]
    check_roundtrip(w32, out, fmt, ax, block)
