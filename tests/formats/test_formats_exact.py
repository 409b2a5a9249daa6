"""Exactness of the stored codes and dequantised values against independent NumPy
implementations (bitsandbytes' blockwise 4-bit algorithm; symmetric integer rounding
with round-half-to-even).

Nothing here calls qkern's own codebooks, packing or scale code: the references are
written from the published algorithms.
"""

from __future__ import annotations

import numpy as np
import pytest

import qkern

# bitsandbytes `get_4bit_type("nf4")` / `("fp4")`, copied from the bitsandbytes source.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                dtype=np.float32) / np.float32(12)).astype(np.float32)
CODEBOOKS = {"nf4": NF4, "fp4": FP4}

SHAPE = (512, 1024)
BLOCK = 64


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    return np.random.default_rng(20240503).standard_normal(SHAPE).astype(np.float32)


def _blocks_last(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """Move `axis` last, zero-pad it to a multiple of `block`, split it into blocks:
    [..., nblocks, block]. Returns the blocked array and the unpadded length."""
    x = np.moveaxis(w, axis, -1)
    n = x.shape[-1]
    nb = -(-n // block)
    x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)])
    return x.reshape(x.shape[:-1] + (nb, block)), n


def _unblock(xb: np.ndarray, n: int, axis: int) -> np.ndarray:
    x = xb.reshape(xb.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(x, -1, axis)


def _bnb_thresholds(values: np.ndarray) -> np.ndarray:
    """bitsandbytes' decision-tree pivots: the midpoints of neighbouring code values,
    computed in double precision and written as float32 literals."""
    v = np.sort(values.astype(np.float64))
    return ((v[1:] + v[:-1]) / 2).astype(np.float32)


def bnb_4bit_reference(w: np.ndarray, codebook: np.ndarray, axis: int, block: int):
    """bitsandbytes' blockwise 4-bit quantisation (kQuantizeBlockwise): absmax per
    block, y = x / absmax, then the nearest code by bnb's comparison tree.

    NF4 (dQuantizeNF4) compares the signed y against the float32 midpoints with `>`, so an
    exact tie goes to the smaller code value. FP4 (dQuantizeFP4) is sign-magnitude: it
    compares |y| against the midpoints of the magnitudes with `>` and sets the sign bit for
    y < 0, so a tie goes to the smaller magnitude on both sides of zero.
    Returns (code indices, dequantised values)."""
    xb, n = _blocks_last(w.astype(np.float32), axis, block)
    absmax = np.max(np.abs(xb), axis=-1, keepdims=True)
    safe = np.where(absmax > 0, absmax, np.float32(1)).astype(np.float32)
    y = (xb / safe).astype(np.float32)
    if codebook is FP4:
        mags = FP4[:8]                                  # 0, 0.0625, 8, 12, 4, 6, 2, 3 (/12)
        order = np.argsort(mags, kind="stable")
        pos = np.searchsorted(_bnb_thresholds(mags), np.abs(y), side="left")
        idx = order[pos] + np.where(y < 0, 8, 0)
    else:
        order = np.argsort(codebook, kind="stable")
        idx = order[np.searchsorted(_bnb_thresholds(codebook), y, side="left")]
    deq = (codebook[idx] * absmax).astype(np.float32)
    return _unblock(idx, n, axis), _unblock(deq, n, axis)


def symmetric_int_reference(w: np.ndarray, bits: int, axis: int, block: int):
    """q = clip(round_half_even(w / (absmax / qmax)), -qmax, qmax), scale per block."""
    qmax = 2 ** (bits - 1) - 1
    xb, n = _blocks_last(w.astype(np.float32), axis, block)
    absmax = np.max(np.abs(xb), axis=-1, keepdims=True)
    scale = (absmax / np.float32(qmax)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(xb / safe), -qmax, qmax).astype(np.int8)   # rint: half to even
    deq = (q.astype(np.float32) * scale).astype(np.float32)
    return _unblock(q, n, axis), _unblock(deq, n, axis)


def unpack_int4(data: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Issue's packing: byte i holds code i (low nibble) and code i + npad/2 (high
    nibble) along the block axis; nibbles are signed two's complement."""
    data = np.moveaxis(np.asarray(data), axis, -1).astype(np.uint8)
    lo, hi = data & 0xF, data >> 4
    nib = np.concatenate([lo, hi], axis=-1).astype(np.int16)
    codes = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    return np.moveaxis(codes[..., :n], -1, axis)


def _assert_values_close(got, ref):
    """Dequantised integer values: code x scale. XLA computes absmax / qmax as
    absmax * (1 / qmax), so the scale may differ from NumPy's quotient by one ulp; the
    codes themselves are compared exactly."""
    np.testing.assert_allclose(np.asarray(got), ref, rtol=5e-7, atol=0)


# -- reference self-checks (so a broken reference cannot make the tests vacuous) ----------
def test_reference_codebooks_are_bitsandbytes():
    assert NF4[7] == 0.0 and NF4[0] == -1.0 and NF4[-1] == 1.0
    assert np.all(np.diff(NF4) > 0)
    assert sorted(np.abs(FP4 * 12).tolist()) == sorted([0, 0, 0.0625, 0.0625, 2, 2, 3, 3, 4, 4, 6, 6,
                                                         8, 8, 12, 12])


def test_reference_rounding_is_half_to_even():
    w = np.array([[2.5], [-0.5], [0.5], [1.5], [127.0]], np.float32)  # absmax 127 -> scale 1
    q, _ = symmetric_int_reference(w, 8, axis=0, block=5)
    assert q[:, 0].tolist() == [2, 0, 0, 2, 127]


# -- qkern against the references -----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_dequantised_values_identical_to_bitsandbytes(weight, fmt):
    qw = qkern.quantize(weight, fmt, block_size=BLOCK, axis=1)
    assert isinstance(qw, qkern.QArray)
    assert qw.shape == SHAPE and qw.dtype == np.float32
    _, ref = bnb_4bit_reference(weight, CODEBOOKS[fmt], axis=1, block=BLOCK)
    got = np.asarray(qkern.dequantize(qw))
    np.testing.assert_array_equal(got, ref)


def _logical_codes(qw):
    """The stored codes in the weight's own axis order. A 2-D weight blocked along axis 1
    is stored transposed (blocked along axis 0, perm=(1, 0)): the kernels' layout."""
    assert qw.perm == (1, 0) and qw.layout.axis == 0, (qw.perm, qw.layout)
    return np.asarray(qw.data).T


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_indices_identical_to_bitsandbytes(weight, fmt):
    """The packed nibbles are the bitsandbytes code indices (low nibble = code i, high
    nibble = code i + npad/2 along the block axis)."""
    w = weight[:64, :200]  # 200 is not a multiple of 64: exercises the padding as well
    qw = qkern.quantize(w, fmt, block_size=BLOCK, axis=1)
    idx_ref, _ = bnb_4bit_reference(w, CODEBOOKS[fmt], axis=1, block=BLOCK)
    data = _logical_codes(qw).astype(np.uint8)
    assert data.shape[-1] == 256 // 2
    nib = np.concatenate([data & 0xF, data >> 4], axis=-1)[..., :200]
    got_vals = CODEBOOKS[fmt][nib]
    ref_vals = CODEBOOKS[fmt][idx_ref]
    # fp4 has +0 and -0 at two indices; compare the code values (which is what matters)
    np.testing.assert_array_equal(got_vals, ref_vals)
    if fmt == "nf4":
        np.testing.assert_array_equal(nib, idx_ref)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_default_block_is_64(weight, fmt):
    w = weight[:256, :16]
    _, ref = bnb_4bit_reference(w, CODEBOOKS[fmt], axis=0, block=64)
    np.testing.assert_array_equal(np.asarray(qkern.dequantize(qkern.quantize(w, fmt))), ref)


def test_int8_codes_identical_to_numpy_reference(weight):
    qw = qkern.quantize(weight, "int8", block_size=BLOCK, axis=1)
    q_ref, d_ref = symmetric_int_reference(weight, 8, axis=1, block=BLOCK)
    data = _logical_codes(qw)
    assert data.dtype == np.int8
    np.testing.assert_array_equal(data[:, :SHAPE[1]], q_ref)
    _assert_values_close(qkern.dequantize(qw), d_ref)


def test_int4_codes_identical_to_numpy_reference(weight):
    qw = qkern.quantize(weight, "int4", block_size=BLOCK, axis=1)
    q_ref, d_ref = symmetric_int_reference(weight, 4, axis=1, block=BLOCK)
    data = _logical_codes(qw)
    assert data.dtype == np.uint8
    assert data.shape == (SHAPE[0], SHAPE[1] // 2)
    np.testing.assert_array_equal(unpack_int4(data, 1, SHAPE[1]), q_ref)
    _assert_values_close(qkern.dequantize(qw), d_ref)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_emulated_int_codes_identical(weight, bits):
    w = weight[:96, :40]
    qw = qkern.quantize(w, f"int{bits}", block_size=32, axis=0)
    q_ref, d_ref = symmetric_int_reference(w, bits, axis=0, block=32)
    np.testing.assert_array_equal(np.asarray(qw.data).astype(np.int8), q_ref)
    _assert_values_close(qkern.dequantize(qw), d_ref)


def test_int_codes_ragged_block_and_half_even_ties():
    """Blocks that do not divide the axis, and exact .5 ties, which must round to even."""
    rng = np.random.default_rng(1)
    # absmax 7 per block -> scale 1 for int4: values k + 0.5 are exact ties.
    base = rng.integers(-6, 6, size=(45, 6)).astype(np.float32) + np.float32(0.5)
    base[0] = 7.0
    base[32] = -7.0          # second (ragged, 13-long) block of 32 along axis 0
    qw = qkern.quantize(base, "int4", block_size=32, axis=0)
    q_ref, d_ref = symmetric_int_reference(base, 4, axis=0, block=32)
    np.testing.assert_array_equal(unpack_int4(qw.data, 0, 45), q_ref)
    _assert_values_close(qkern.dequantize(qw), d_ref)
    assert qkern.dequantize(qw).shape == (45, 6)


def test_int4_codes_with_an_odd_number_of_blocks():
    """70 rows in blocks of 32: three blocks (the last one ragged). Whatever the padding,
    byte i holds code i and code i + npad/2, npad being twice the stored length."""
    w = np.random.default_rng(2).standard_normal((70, 6)).astype(np.float32)
    qw = qkern.quantize(w, "int4", block_size=32, axis=0)
    q_ref, d_ref = symmetric_int_reference(w, 4, axis=0, block=32)
    data = np.asarray(qw.data)
    assert data.dtype == np.uint8 and 2 * data.shape[0] >= 96 and data.shape[1] == 6
    np.testing.assert_array_equal(unpack_int4(data, 0, 70), q_ref)
    _assert_values_close(qkern.dequantize(qw), d_ref)


def test_int4_packing_layout_on_known_codes():
    """Codes chosen by hand: value k (absmax 7, scale 1) is code k."""
    col = np.array([1, 2, 3, -4, 5, -6, 7, 0], np.float32)[:, None]
    qw = qkern.quantize(col, "int4", block_size=8, axis=0)
    data = np.asarray(qw.data)[:, 0]
    # byte i: low nibble code i, high nibble code i + 4
    expect = [(1 & 0xF) | ((5 & 0xF) << 4), (2 & 0xF) | ((-6 & 0xF) << 4),
              (3 & 0xF) | ((7 & 0xF) << 4), (-4 & 0xF) | ((0 & 0xF) << 4)]
    assert data.tolist() == expect


def test_fp4_exact_ties_follow_bitsandbytes_sign_magnitude():
    """bitsandbytes' FP4 quantiser is sign-magnitude (|y| against the pivots with `>`,
    then the sign bit), so quantising -x gives exactly minus the result for x, ties
    included. Block absmax 12 makes y = x / 12, so x = k + 0.5 etc. sit on the pivots."""
    ties = np.array([2.5, 3.5, 5.0, 7.0, 10.0, 1.03125], np.float32)
    col = np.concatenate([[12.0], ties, -ties, [0.0]]).astype(np.float32)[:, None]
    qw = qkern.quantize(col, "fp4", block_size=col.shape[0], axis=0)
    _, ref = bnb_4bit_reference(col, FP4, axis=0, block=col.shape[0])
    got = np.asarray(qkern.dequantize(qw))
    # sign symmetry: the negative ties are the mirror image of the positive ones
    np.testing.assert_array_equal(got[1 + len(ties):1 + 2 * len(ties)], -got[1:1 + len(ties)])
    np.testing.assert_array_equal(got, ref)
