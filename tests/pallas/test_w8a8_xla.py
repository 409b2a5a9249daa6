"""W8A8 on the xla backend (qkern/pallas/w8a8/_xla.py): the contract (contract_w8a8.py),
plus the xla path on every scale layout x shared shape (block64 too), its K chunking, real
`qkern.quantize` operands, exact integer accumulation, and what the public API does the same
way for every backend (so once): the activation pre-pass, backend selection and the zero
cotangents of the frozen weight and act_scale. The Triton and Mosaic kernels:
test_w8a8_triton.py, test_w8a8_mosaic.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import MatmulConfig, stored_operand
from qkern.pallas.w8a8 import w8a8_matmul
from qkern.pallas.w8a8._xla import w8a8_xla
from qkern.pallas.w8a8.base import check_act_scale, quantize_rows, quantize_static, w8a8_reference

from .contract_qmatmul import DTYPES, SHAPES, assert_matches, make_case, reference_matmul
from .contract_w8a8 import LAYOUTS, W8A8Contract, activation, int8_operand, ref


@jax.jit
def _xla_and_ref(x, op, s):
    """Dynamic and static scales, the xla path and the reference, in one compile."""
    return w8a8_xla(x, op), w8a8_reference(x, op), w8a8_xla(x, op, s), w8a8_reference(x, op, s)


def _cross():
    """Every layout x every shape, the dtype rotating so each meets every dtype."""
    return [pytest.param(b, s, DTYPES[(i + j) % 3],
                         id=f"{name}-{'x'.join(map(str, s))}-"
                            f"{jnp.dtype(DTYPES[(i + j) % 3]).name}")
            for i, (name, b) in enumerate(LAYOUTS.items()) for j, s in enumerate(SHAPES)]


class TestXla(W8A8Contract):
    backend = "xla"
    interpret = False

    @pytest.mark.parametrize("block,shape,dtype", _cross())
    def test_every_layout_and_shape(self, block, shape, dtype):
        m, k, n = shape
        x, op = activation(m, k, dtype), int8_operand(k, n, block)
        y, want, ys, want_s = _xla_and_ref(x, op, jnp.float32(0.03))
        assert y.dtype == ys.dtype == dtype
        assert_matches(y, want)
        assert_matches(ys, want_s)

    def test_chunking_does_not_change_the_result(self):
        """K chunks of 128 rows (per channel: 8 int32 dots; blocks of 64: 2 per chunk), one
        chunk of everything, and the automatic choice agree with the reference."""
        x = activation(5, 1024, jnp.float32)
        for block in (None, 64):
            op = int8_operand(1024, 72, block)
            want = ref(x, op)
            for cfg in (MatmulConfig(block_k=128), MatmulConfig(block_k=4096), None):
                assert_matches(self.mm(x, op, config=cfg), want)

    @pytest.mark.parametrize("opts", [dict(block_size=96), dict(axis=None)],
                             ids=["block96", "per-tensor"])
    def test_quantized_weights(self, opts):
        """Operands from qkern.quantize (incl. per-tensor, and a block size that is not a
        power of two): the reference, and close to the weight-only product (activation
        rounding is the only difference)."""
        x, _, op = make_case("int8", opts, 3, 300, 40, jnp.float32)
        y, want, _, _ = _xla_and_ref(x, op, jnp.float32(0.03))
        assert_matches(y, want)
        y_wo = np.asarray(reference_matmul(x, op))
        rel = np.linalg.norm(np.asarray(y) - y_wo) / np.linalg.norm(y_wo)
        assert rel < 0.02

    def test_integer_accumulation_is_exact(self):
        # small integers: every product and sum is exact in int32, so y equals the exact value
        x = jnp.array([[127.0, -127.0, 64.0, 0.0]])
        w = jnp.array([[25.0], [-3.0], [50.0], [127.0]]) * 0.5   # codes 25, -3, 50, 127 exactly
        op = stored_operand(qkern.quantize(w, "int8"))
        np.testing.assert_allclose(self.mm(x, op), x @ w, rtol=1e-6)
        # static scale 1: x is already integral, so the codes are x itself
        np.testing.assert_allclose(self.mm(x, op, act_scale=1.0), x @ w, rtol=1e-6)

    def test_static_scale_saturates_and_differs_from_dynamic(self):
        x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
        big = jnp.float32(1.0)                      # |x| < ~4: codes in [-4, 4], coarse
        y_static = self.mm(x, op, act_scale=big)
        xq = jnp.clip(jnp.round(x), -127, 127)
        np.testing.assert_allclose(y_static, reference_matmul(xq, op), rtol=2e-5, atol=2e-4)
        assert not np.allclose(y_static, self.mm(x, op), rtol=1e-2)


# -- the activation pre-pass every backend shares (w8a8/base.py) ----------------------------


def test_row_quantisation_zero_rows():
    q, s = quantize_rows(jnp.zeros((2, 8)))
    assert not np.any(np.isnan(np.asarray(s))) and np.all(np.asarray(q) == 0)


def test_static_quantisation_is_clip_round_divide():
    x = jnp.array([[0.1, -0.26, 3.0, -100.0, 0.05]], jnp.float32)
    q, s = quantize_static(x, jnp.float32(0.1))
    np.testing.assert_array_equal(q, np.clip(np.round(np.asarray(x) / np.float32(0.1)),
                                             -127, 127).astype(np.int8))
    np.testing.assert_array_equal(s, [[np.float32(0.1)]])
    assert q.dtype == jnp.int8
    # a zero scale gives zeros, not NaN
    op = int8_operand(64, 16)
    y = w8a8_matmul(jnp.ones((2, 64)), op, act_scale=0.0)
    np.testing.assert_array_equal(y, np.zeros((2, 16), np.float32))


def test_check_act_scale_accepts_python_numbers():
    s = check_act_scale(0.5)
    assert s.shape == () and s.dtype == jnp.float32
    assert check_act_scale(None) is None
    assert check_act_scale(jnp.float16(2.0)).dtype == jnp.float32


# -- the public API: backend selection, cotangents ------------------------------------------


def _traced(op, x, **kw) -> str:
    """The jaxpr of a fresh function (make_jaxpr caches traces per function object, and
    the backend is read at trace time)."""
    return str(jax.make_jaxpr(lambda x: w8a8_matmul(x, op, **kw))(x))


def test_backend_selection(monkeypatch):
    """Argument > qkern.backend(...) > QKERN_BACKEND > device; seen in the traced jaxpr."""
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    assert "pallas_call" not in _traced(op, x)                      # CPU: xla
    with qkern.backend("triton", interpret=True):
        assert "w8a8_triton_decode" in _traced(op, x)
        assert "w8a8_mosaic_decode" in _traced(op, x, backend="mosaic_tpu")
    monkeypatch.setenv("QKERN_BACKEND", "mosaic_tpu")
    assert "w8a8_mosaic_decode" in _traced(op, x)
    assert "w8a8_triton_tiled" in _traced(op, jnp.ones((40, 256)), backend="triton")
    with qkern.backend("xla"):
        assert "pallas_call" not in _traced(op, x)


def test_grads_of_weight_and_act_scale_are_zero():
    x, op = activation(3, 256, jnp.float32), int8_operand(256, 64)
    gx, gop, gs = jax.grad(
        lambda x, op, s: jnp.sum(w8a8_matmul(x, op, act_scale=s)), argnums=(0, 1, 2),
        allow_int=True)(x, op, jnp.float32(0.05))
    assert gs.shape == () and float(gs) == 0.0
    assert float(jnp.max(jnp.abs(gop.scales))) == 0.0
    assert float(jnp.max(jnp.abs(gx))) > 0
    # a bfloat16 act_scale gets a bfloat16 zero
    gs = jax.grad(lambda s: jnp.sum(w8a8_matmul(x, op, act_scale=s)))(jnp.bfloat16(0.05))
    assert gs.dtype == jnp.bfloat16 and float(gs) == 0.0


# -- the CPU paths: the native kernel below NATIVE_BELOW rows, one whole-K int8 dot above ----

from qkern.pallas._config import (W8A8_WHOLE_K_M, Problem, default_config,  # noqa: E402
                                  heuristic_config)
from qkern.pallas._operand import reference_dequantize  # noqa: E402
from qkern.pallas.qmatmul import _native  # noqa: E402
from qkern.pallas.w8a8 import _xla as w8a8_xla_module  # noqa: E402

needs_native = pytest.mark.skipif(_native.library() is None,
                                  reason=f"native kernels {_native.status()}")


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_native
@pytest.mark.parametrize("block", [None, 64], ids=["per-channel", "block64"])
@pytest.mark.parametrize("m,k,n", [(1, 1024, 96), (3, 300, 37), (7, 520, 130)])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_native_below_8_rows_is_the_int32_product(monkeypatch, block, m, k, n, static):
    """Below NATIVE_BELOW rows the native int8 kernel multiplies the codes of x (as float32);
    its sums of small integers are exact (K < 1040), so with the kernels turned off (the
    int32 dot) a per-channel weight gives the same bits, a per-block one the same up to
    the order its scaled block sums are added in."""
    assert m < w8a8_xla_module.NATIVE_BELOW
    x, op = activation(m, k, jnp.float32, seed=m), int8_operand(k, n, block)
    s = jnp.float32(0.02) if static else None
    fn = lambda x, op: w8a8_matmul(x, op, act_scale=s)
    hlo = _hlo(fn, x, op)
    assert "qkern_int8_gemv" in hlo
    y = jax.jit(fn)(x, op)
    monkeypatch.setenv(_native.ENV_VAR, "0")
    off = lambda x, op: w8a8_matmul(x, op, act_scale=s)      # a new function: traced again
    assert "qkern_int8_gemv" not in _hlo(off, x, op)
    y_off = jax.jit(off)(x, op)
    if block is None:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_off))
    else:
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_off), rtol=1e-5, atol=1e-5)
    assert_matches(y, w8a8_reference(x, op, s))


def _int32_path(monkeypatch, x, op):
    """W8A8 with the native kernels off: quantised rows times the weight by an int32 dot."""
    monkeypatch.setenv(_native.ENV_VAR, "0")
    try:
        return jax.jit(lambda x: w8a8_matmul(x, op))(x)
    finally:
        monkeypatch.delenv(_native.ENV_VAR)


@needs_native
@pytest.mark.parametrize("batch,rows", [(3, 2), (16, 1), (40, 3)])
def test_vmap_folds_below_8_rows_else_takes_the_int8_product(monkeypatch, batch, rows):
    """Under vmap a batch folds into M only while it stays below 8 rows (the streaming
    kernel, exact sums); a wider one takes the int8 product, not the float32 scan. Either
    way a per-channel weight gives the int32 path's bits."""
    op = int8_operand(512, 96)
    xs = activation(batch * rows, 512, jnp.float32).reshape(batch, rows, 512)
    fn = jax.vmap(lambda x: w8a8_matmul(x, op))
    hlo = _hlo(fn, xs)
    folds = batch * rows < w8a8_xla_module.NATIVE_BELOW
    assert ("qkern_int8_gemv" in hlo) == folds
    if not folds:                                             # an int8 dot with int32 sums
        assert re.search(r"= s32\[[^\]]*\]\{[^}]*\} dot\(", hlo)
    ys = jax.jit(fn)(xs)
    want = _int32_path(monkeypatch, xs.reshape(batch * rows, 512), op)
    np.testing.assert_array_equal(np.asarray(ys).reshape(batch * rows, -1), np.asarray(want))


@needs_native
@pytest.mark.parametrize("platforms", [["cpu"], ["cuda"]])
def test_exports_take_the_int8_product(monkeypatch, platforms):
    """Where the kernel cannot run (jax.export, other platforms) the native primitive W8A8
    binds lowers to the int8 product, not to the weight-only float32 scan."""
    x, op = activation(2, 320, jnp.float32), int8_operand(320, 48)
    f = jax.jit(lambda x: w8a8_matmul(x, op))
    assert "qkern_int8_gemv" in _hlo(f, x)
    text = jax.export.export(f, platforms=platforms)(x).mlir_module()
    assert "qkern_int8_gemv" not in text
    assert re.search(r"dot_general.*xi8>.*xi32>", text), text
    if platforms == ["cpu"]:
        y = jax.export.export(f, platforms=platforms)(x).call(x)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(_int32_path(monkeypatch, x, op)))


@needs_native
def test_native_path_in_bfloat16_and_its_straight_through_gradient():
    x, op = activation(2, 256, jnp.bfloat16), int8_operand(256, 64)
    y = jax.jit(lambda x: w8a8_matmul(x, op))(x)
    assert y.dtype == jnp.bfloat16
    assert_matches(y, w8a8_reference(x, op))
    x = activation(3, 256, jnp.float32)
    c = jnp.asarray(np.random.default_rng(5).standard_normal((3, 64)), jnp.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(w8a8_matmul(x, op) * c)))(x)
    np.testing.assert_allclose(g, c @ reference_dequantize(op).T, rtol=1e-5, atol=1e-5)


def test_from_8_rows_one_int8_dot_over_the_whole_of_k():
    """From W8A8_WHOLE_K_M rows the shipped config covers a per-channel (or per-tensor)
    weight's K in one chunk (no scan); below it 256-row chunks. Per-block weights keep the
    table's chunks."""
    for k, block in [(1536, None), (4096, None), (300, None), (1000, None)]:
        op = int8_operand(k, 48, block)
        big = heuristic_config(Problem.of("xla", jnp.zeros((W8A8_WHOLE_K_M, k)), op, "w8a8"))
        assert w8a8_xla_module.chunk_rows(op, 8, big.block_k) == op.k_padded
        small = heuristic_config(Problem.of("xla", jnp.zeros((1, k)), op, "w8a8"))
        assert small.block_k == 256
    for m in (8, 64):
        op = int8_operand(1024, 48, 64)
        cfg = heuristic_config(Problem.of("xla", jnp.zeros((m, 1024)), op, "w8a8"))
        assert cfg == default_config("xla", m)
    x, op = activation(W8A8_WHOLE_K_M, 1536, jnp.float32), int8_operand(1536, 64)
    jaxpr = str(jax.make_jaxpr(lambda x: w8a8_matmul(x, op))(x))
    assert "scan" not in jaxpr and jaxpr.count("preferred_element_type=int32") == 1
    assert_matches(w8a8_matmul(x, op), w8a8_reference(x, op))
    # weight-only int8 keeps its table's chunks
    wo = heuristic_config(Problem.of("xla", jnp.zeros((W8A8_WHOLE_K_M, 1536)), op, "qmatmul"))
    assert wo.block_k == 256


def test_per_block_chunks_keep_their_partials_capped_for_any_block_k():
    """A block_k past K (a config, or the autotuner's largest) still caps a per-block
    weight's int32 partials [blocks, M, N] at _PARTIAL_BYTES."""
    op = int8_operand(2048, 2048, 64)                          # 32 blocks
    rows = w8a8_xla_module.chunk_rows(op, 256, 1 << 20)
    assert rows < op.k_padded and rows % 64 == 0
    assert (rows // 64) * 256 * 2048 * 4 <= w8a8_xla_module._PARTIAL_BYTES
    assert w8a8_xla_module.chunk_rows(op, 1, 1 << 20) == op.k_padded   # small M: all of K


def test_cpu_bench_runs_checks_and_prints_the_table(capsys):
    """bench/w8a8_cpu.py: checks every W8A8 variant against the reference, then one row per
    shape and M."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "w8a8_cpu.py"
    spec = importlib.util.spec_from_file_location("w8a8_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--shapes", "256x72,96x40", "--m", "1,9", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "W8A8  chunks of 256  chunks of 512        one dot  int8 (w-only)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("256x72", "96x40"))]
    assert [r[:2] for r in rows] == [["256x72", "1"], ["256x72", "9"], ["96x40", "1"], ["96x40", "9"]]
    assert all(len(r) == 8 and all(c.endswith("x") for c in r[3:]) for r in rows)
