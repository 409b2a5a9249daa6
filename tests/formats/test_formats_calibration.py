"""Calibration (absmax, minmax, rms, fixed range), all-zero blocks, scale dtype and
double quantisation. References and bounds are computed here in NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
HALF_GAP = {"nf4": np.max(np.diff(np.sort(NF4))) / 2, "fp4": np.max(np.diff(np.sort(FP4))) / 2}

INT_FORMATS = [f"int{b}" for b in (2, 3, 4, 5, 6, 7, 8)]
ALL_FORMATS = INT_FORMATS + ["nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8"]


def qmax(fmt):
    return 2 ** (int(fmt[3:]) - 1) - 1


def blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[n, c] -> [nblocks, block, c] along axis 0, zero-padded, in float64."""
    n = w.shape[0]
    nb = -(-n // block)
    x = np.pad(w.astype(np.float64), [(0, nb * block - n)] + [(0, 0)] * (w.ndim - 1))
    return x.reshape((nb, block) + w.shape[1:])


def expand(stat: np.ndarray, block: int, n: int) -> np.ndarray:
    """[nblocks, 1, ...] -> [n, ...]: each element gets its block's statistic."""
    return np.repeat(stat[:, 0], block, axis=0)[:n]


_dequantize_jit = jax.jit(qkern.dequantize)


def deq(qw) -> np.ndarray:
    return np.asarray(_dequantize_jit(qw)).astype(np.float64)


def quantize(w, fmt, **kw):
    """qkern.quantize under jit: one compile per configuration costs far less than eager
    dispatch on a 2-core CPU. A few tests below run qkern.quantize eagerly as well."""
    return jax.jit(lambda w: qkern.quantize(w, fmt, **kw))(w)


# -- minmax: asymmetric, zero points ----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "int3"])
def test_minmax_all_positive_uses_whole_range(fmt):
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2.0, size=(128, 8)).astype(np.float32)
    qa = quantize(w, fmt, block_size=64, calibration="absmax")
    qm = quantize(w, fmt, block_size=64, calibration="minmax")
    assert qa.zeros is None
    assert qm.zeros is not None, "minmax must store zero points"
    # bound: the range [min(lo, 0), max(hi, 0)] split into 2^bits - 1 steps
    b = blocks(w, 64)
    lo, hi = np.minimum(b.min(1, keepdims=True), 0), np.maximum(b.max(1, keepdims=True), 0)
    step = expand((hi - lo) / (2 ** int(fmt[3:]) - 1), 64, 128)
    err_m = np.abs(deq(qm) - w)
    assert np.all(err_m <= step / 2 * (1 + 1e-5) + 1e-7)
    # symmetric absmax wastes the negative half of the codes: about twice the error
    err_a = np.abs(deq(qa) - w)
    assert err_m.mean() < 0.65 * err_a.mean()
    assert err_m.max() < err_a.max()


def test_minmax_int8_codes_span_the_full_range():
    """int8 data is the codes. For all-positive data whose block range is [0, max], the
    block's 0 maps to -128 and its max to 127: the whole code range is used, where the
    symmetric codes of the same data stay within [0, 127]."""
    w = np.random.default_rng(1).uniform(0.0, 3.0, size=(96, 5)).astype(np.float32)
    w[7] = 0.0
    qw = qkern.quantize(w, "int8", calibration="minmax")
    codes = np.asarray(qw.data).astype(np.int32)
    assert np.all(codes.max(axis=0) == 127)
    assert np.all(codes.min(axis=0) == -128)
    qa = qkern.quantize(w, "int8")
    assert np.asarray(qa.data).astype(np.int32).min() >= 0


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_minmax_mixed_sign_ragged_blocks(fmt):
    rng = np.random.default_rng(2)
    w = (rng.uniform(-1.0, 3.0, size=(45, 6))).astype(np.float32)
    w[40:] *= 10  # the last (ragged) block has a different range
    qw = quantize(w, fmt, block_size=16, calibration="minmax")
    assert qw.shape == (45, 6)
    b = blocks(w, 16)
    # padding zeros are inside [min(lo,0), max(hi,0)] so they do not change the range
    lo, hi = np.minimum(b.min(1, keepdims=True), 0), np.maximum(b.max(1, keepdims=True), 0)
    step = expand((hi - lo) / (2 ** int(fmt[3:]) - 1), 16, 45)
    err = np.abs(deq(qw) - w)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-6 * np.abs(w))


# -- rms -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_rms_with_factor_clips_outliers(fmt):
    rng = np.random.default_rng(3)
    n, block, factor = 100, 32, 1.5          # 100 = 3 x 32 + 4: a ragged last block
    w = rng.standard_normal((n, 4)).astype(np.float32)
    w[5, 0] = 80.0
    w[97, 2] = -60.0   # in the 4-long ragged block: rms over its 4 real elements, not 32
    qr = quantize(w, fmt, block_size=block, calibration=("rms", factor))
    qa = quantize(w, fmt, block_size=block, calibration="absmax")
    b = blocks(w, block)
    counts = np.minimum(block, n - block * np.arange(b.shape[0]))[:, None, None]
    rms = np.sqrt((b ** 2).sum(1, keepdims=True) / counts)      # over real elements only
    clip = expand(np.minimum(np.abs(b).max(1, keepdims=True), factor * rms), block, n)
    got = deq(qr)
    # the outliers are clipped to about factor x rms of their block
    for (i, j) in [(5, 0), (97, 2)]:
        assert abs(got[i, j]) <= clip[i, j] * (1 + 1e-4)
        assert abs(got[i, j]) >= clip[i, j] * 0.75
        assert abs(got[i, j]) < 0.9 * abs(w[i, j])
    # elements inside the clip range: error bounded by the (smaller) rms-based scale
    inside = np.abs(w) <= clip
    if fmt.startswith("int"):
        bound = clip / qmax(fmt) / 2
    elif fmt == "nf4":
        bound = clip * HALF_GAP["nf4"]
    else:
        bound = np.abs(w) * 2.0 ** -4 + clip / 448 * 2.0 ** -10
    err = np.abs(got - w)
    assert np.all(err[inside] <= bound[inside] * (1 + 1e-5) + 1e-6)
    # and (for scaled-grid formats) the rest of the outlier's block is reproduced better
    # than under absmax, whose scale the outlier inflates
    if fmt != "fp8_e4m3":   # fp8's error is relative to the value, whatever the scale
        err_a = np.abs(deq(qa) - w)
        rest = np.r_[0:5, 6:32]
        assert err[rest, 0].mean() < 0.8 * err_a[rest, 0].mean()


def test_rms_without_factor_is_accepted_and_bounded_by_absmax():
    w = np.random.default_rng(4).standard_normal((64, 3)).astype(np.float32)
    got = deq(quantize(w, "int8", calibration="rms"))
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got).max(0) <= np.abs(w).max(0) * (1 + 1e-6))


# -- fixed ranges ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp4", "fp8_e4m3"])
def test_fixed_symmetric_range(fmt):
    w = (np.random.default_rng(5).standard_normal((64, 6)) * 2).astype(np.float32)
    bound = 1.5
    qw = quantize(w, fmt, calibration=("fixed", bound))
    target = np.clip(w.astype(np.float64), -bound, bound)
    if fmt.startswith("int"):
        tol = bound / qmax(fmt) / 2
    elif fmt in HALF_GAP:
        tol = bound * HALF_GAP[fmt]
    else:
        tol = np.abs(target) * 2.0 ** -4 + bound / 448 * 2.0 ** -10
    err = np.abs(deq(qw) - target)
    assert np.all(err <= tol * (1 + 1e-5) + 1e-6)
    assert np.abs(deq(qw)).max() <= bound * (1 + 1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (0.5, 4.0)])
def test_fixed_lo_hi_range_int(fmt, lo, hi):
    """Values inside [lo, hi] come back within half a step (symmetric range: step
    max(|lo|, |hi|) / qmax; asymmetric with zero points: (hi - lo) / (2^bits - 1) is
    smaller, so the symmetric bound holds either way); values outside are clipped."""
    w = (np.random.default_rng(6).standard_normal((64, 6)) * 3).astype(np.float32)
    qw = quantize(w, fmt, calibration=("fixed", lo, hi))
    got = deq(qw)
    m = max(abs(lo), abs(hi))
    step = m / qmax(fmt)
    inside = (w >= min(lo, 0)) & (w <= hi)
    assert np.all(np.abs(got - w)[inside] <= step / 2 * (1 + 1e-5) + 1e-6)
    assert got.max() <= hi + step / 2 + 1e-6
    assert got.min() >= min(lo, 0) - step / 2 - 1e-6


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8_e4m3"])
def test_fixed_lo_hi_range_non_integer_formats(fmt):
    """("fixed", lo, hi) on a format without zero points: either rejected with a
    ValueError, or honoured as the symmetric range max(|lo|, |hi|) (values inside
    [lo, hi] reproduced within that range's bound). Silently wrong values are neither."""
    w = (np.random.default_rng(7).standard_normal((64, 6))).astype(np.float32)
    lo, hi = -1.0, 2.0
    try:
        qw = quantize(w, fmt, calibration=("fixed", lo, hi))
    except ValueError as e:
        assert fmt in str(e) or "fixed" in str(e)
        return
    m = max(abs(lo), abs(hi))
    got = deq(qw)
    inside = (w >= lo) & (w <= hi)
    tol = m * HALF_GAP[fmt] if fmt in HALF_GAP else np.abs(w) * 2.0 ** -4 + m / 448 * 2.0 ** -10
    tol = np.broadcast_to(tol, w.shape)
    err = np.abs(got - w)
    worst = np.argmax(np.where(inside, err - tol, -np.inf))
    assert np.all(err[inside] <= tol[inside] * (1 + 1e-5) + 1e-6), (
        f"{fmt} with ('fixed', {lo}, {hi}): w={w.flat[worst]} came back as {got.flat[worst]}")
    # a fixed range clips: nothing comes back outside [-max(|lo|, |hi|), max(|lo|, |hi|)]
    assert np.abs(got).max() <= m * (1 + 1e-5), (
        f"{fmt} with ('fixed', {lo}, {hi}): {np.abs(got).max()} is outside the range")


# -- all-zero blocks and arrays ----------------------------------------------------------------
def _zero_configs(fmt):
    """(calibration, extra options, which input) for the format. "block": a weight whose
    first block of 32 along the block axis is all zero; "array": an all-zero weight (the
    per-tensor cases, where the one scale is zero). absmax for every format; every
    calibration and option for one format of each kind (int8, packed int4, emulated int3,
    nf4, fp4, fp8); int2/5/6/7 share int3's code path."""
    out = [("absmax", {}, "block"), ("absmax", {}, "array")]
    if fmt.startswith("mx") or fmt in ("int2", "int5", "int6", "int7"):
        return out
    out += [("rms", {}, "array"), (("rms", 2.0), {}, "block"),
            ("absmax", {"double_quant": True}, "block"),
            ("absmax", {"scale_dtype": jnp.bfloat16}, "block"),
            ("absmax", {"axis": None}, "array")]
    if fmt.startswith("int"):
        out += [("minmax", {}, "block"), (("fixed", -1.0, 3.0), {}, "block"),
                ("minmax", {"axis": None}, "array")]
    return out


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_all_zero_blocks_give_exact_zeros(fmt):
    """Zeros back, never NaN, for every calibration and option."""
    rng = np.random.default_rng(8)
    mixed = rng.standard_normal((70, 5)).astype(np.float32)
    mixed[:32] = 0.0
    zero = np.zeros((33, 4), np.float32)
    configs = _zero_configs(fmt)

    def run(mixed, zero):
        outs = []
        for cal, kw, which in configs:
            kw = dict(kw)
            if kw.get("axis", -2) is not None and not fmt.startswith("mx"):
                kw["block_size"] = 32
            x = mixed if which == "block" else zero
            outs.append(qkern.dequantize(qkern.quantize(x, fmt, calibration=cal, **kw)))
        return outs

    for (cal, kw, which), out in zip(configs, jax.jit(run)(mixed, zero)):
        out = np.asarray(out)
        label = f"{fmt} calibration={cal!r} {kw} ({which})"
        assert not np.isnan(out).any(), f"NaN for {label}"
        if which == "array":
            assert np.all(out == 0), f"all-zero array not zero for {label}"
        else:
            assert np.all(out[:32] == 0), f"all-zero block not zero for {label}"
            assert np.any(out[32:] != 0)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3", "mxfp4", "mxfp8"])
def test_all_zero_eager(fmt):
    """The same, on the eager path, with a ragged zero block."""
    w = np.zeros((3, 40), np.float32)
    out = np.asarray(qkern.dequantize(qkern.quantize(w, fmt, axis=-1)))
    assert out.shape == (3, 40)
    assert not np.isnan(out).any() and np.all(out == 0)


# -- scale dtype -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3"])
def test_scale_dtype_bfloat16(fmt):
    w = np.random.default_rng(9).standard_normal((256, 16)).astype(np.float32)
    q32 = quantize(w, fmt, block_size=64)
    q16 = quantize(w, fmt, block_size=64, scale_dtype=jnp.bfloat16)
    assert q16.scales.dtype == jnp.bfloat16
    assert q32.scales.dtype == jnp.float32
    # 16 fewer bits per block of 64
    assert q32.bits_per_parameter() - q16.bits_per_parameter() == pytest.approx(16 / 64)
    amax = expand(np.abs(blocks(w, 64)).max(1, keepdims=True), 64, 256)
    if fmt.startswith("int"):
        base = amax / qmax(fmt) / 2
    elif fmt == "nf4":
        base = amax * HALF_GAP["nf4"]
    else:
        base = np.abs(w) * 2.0 ** -4 + amax / 448 * 2.0 ** -10
    # a bf16 scale is off by at most 2^-8 relative: values move by that much more at most
    tol = base * (1 + 2.0 ** -7) + amax * 2.0 ** -8 + 1e-6
    assert np.all(np.abs(deq(q16) - w) <= tol)
    assert q16.dtype == jnp.float32


def test_bits_per_parameter_int4_group128():
    w = np.random.default_rng(10).standard_normal((512, 32)).astype(np.float32)
    assert quantize(w, "int4").bits_per_parameter() == pytest.approx(4 + 32 / 128)
    assert quantize(w, "int4", scale_dtype=jnp.bfloat16).bits_per_parameter() == \
        pytest.approx(4 + 16 / 128)
    assert quantize(w, "int8").bits_per_parameter() == pytest.approx(8 + 32 / 512)


# -- double quantisation -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_weight():
    return np.random.default_rng(11).standard_normal((1024, 1024)).astype(np.float32)


def test_double_quant_nf4_bits_and_error(big_weight):
    w = big_weight
    q = quantize(w, "nf4")
    qd = quantize(w, "nf4", double_quant=True)
    # 4 bits + 32-bit scale per 64, versus 4 + 8 bits per 64 + a 32-bit scale per 256 scales
    assert q.bits_per_parameter() == pytest.approx(4.5, abs=1e-3)
    assert qd.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert abs(qd.bits_per_parameter() - 4.127) < 2e-3
    e = np.abs(deq(q) - w).mean()
    ed = np.abs(deq(qd) - w).mean()
    assert ed == pytest.approx(e, rel=0.01)
    # still within the nf4 bound, up to the 8-bit error on the scales
    amax = expand(np.abs(blocks(w, 64)).max(1, keepdims=True), 64, w.shape[0])
    spread = np.abs(amax - amax.mean()).max()
    tol = amax * HALF_GAP["nf4"] + spread / 127 / 2 * (1 + 1e-3) + 1e-6
    assert np.all(np.abs(deq(qd) - w) <= tol)


@pytest.mark.parametrize("fmt", ["int4", "fp4", "fp8_e4m3"])
def test_double_quant_other_formats(fmt):
    w = np.random.default_rng(12).standard_normal((256, 40)).astype(np.float32)
    q = quantize(w, fmt, block_size=32)
    qd = quantize(w, fmt, block_size=32, double_quant=True)
    assert qd.bits_per_parameter() < q.bits_per_parameter()
    e, ed = np.abs(deq(q) - w).mean(), np.abs(deq(qd) - w).mean()
    assert ed <= e * 1.05


@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_minmax_roundtrip_ranks_and_axes(fmt):
    """minmax bound (half a step of the block's [min(lo,0), max(hi,0)] range) for ranks 1
    to 4, axes 0 / -1 / -2 / None, blocks that do not divide the axis."""
    rng = np.random.default_rng(13)
    steps = 2 ** int(fmt[3:]) - 1
    cases = [((37,), 0, 16), ((3, 37, 5), 1, 8), ((3, 37, 5), -1, 2),
             ((3, 37, 5), None, None), ((2, 3, 5, 41), -2, 2)]
    for shape, axis, block in cases:
        w = rng.uniform(-1, 3, size=shape).astype(np.float32)
        got = deq(quantize(w, fmt, axis=axis, block_size=block, calibration="minmax"))
        assert got.shape == shape
        if axis is None:
            lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
            step = np.full(shape, (hi - lo) / steps)
        else:
            x = np.moveaxis(w.astype(np.float64), axis, -1)
            n = x.shape[-1]
            nb = -(-n // block)
            xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
            xb = xb.reshape(x.shape[:-1] + (nb, block))
            rngs = (np.maximum(xb.max(-1, keepdims=True), 0)
                    - np.minimum(xb.min(-1, keepdims=True), 0)) / steps
            step = np.broadcast_to(rngs, xb.shape).reshape(x.shape[:-1] + (nb * block,))[..., :n]
            step = np.moveaxis(step, -1, axis)
        assert np.all(np.abs(got - w) <= step / 2 * (1 + 1e-5) + 1e-6), (shape, axis, block)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_rms_with_an_all_padding_block_gives_no_nan(fmt):
    """Regression: K = 384 in blocks of 128 pads a fourth block for 4-bit packing; its rms
    was 0 / 0 = NaN, and the kernels (which read every stored block) returned NaN."""
    from qkern.pallas import qmatmul, stored_operand
    w = jax.random.normal(jax.random.PRNGKey(0), (384, 64))
    q = qkern.quantize(w, fmt, block_size=128, calibration=("rms", 3.0))
    assert not np.isnan(np.asarray(q.scales)).any()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 384))
    np.testing.assert_allclose(qmatmul(x, stored_operand(q)), x @ qkern.dequantize(q),
                               rtol=1e-4, atol=1e-4)
