"""Bad inputs to the quantised ragged_dot are refused before any work, naming the shapes;
the kernel's own entry point and its backend selection."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.pallas import _backend
from qkern.pallas.ragged_qmatmul import StackedOperand, base, ragged_qmatmul
from qkern.types._qarray_ragged import stacked_operand

E, K, N = 4, 64, 32


@pytest.fixture(scope="module")
def q():
    return qkern.quantize(jax.random.normal(jax.random.PRNGKey(0), (E, K, N)), "int8", axis=-2)


ragged = qkern.quaxify(lambda q, x, g: jax.lax.ragged_dot(x, q, g))


def test_group_sizes_of_the_wrong_length(q):
    with pytest.raises(ValueError, match=r"group_sizes has shape \(3,\) but the stacked weight "
                                         r"has 4 experts"):
        ragged(q, jnp.ones((5, K)), jnp.asarray([1, 2, 2]))


def test_group_sizes_of_the_wrong_length_under_jit(q):
    with pytest.raises(ValueError, match=r"shape \(5,\).*4 experts"):
        jax.jit(ragged)(q, jnp.ones((5, K)), jnp.asarray([1, 1, 1, 1, 1]))


def test_static_group_sizes_summing_past_m(q):
    with pytest.raises(ValueError, match=r"sum to 9, more rows than x has \(M=5\)"):
        ragged(q, jnp.ones((5, K)), jnp.asarray([2, 3, 4, 0]))


def test_negative_group_sizes(q):
    with pytest.raises(ValueError, match=r"negative"):
        ragged(q, jnp.ones((5, K)), jnp.asarray([2, -1, 4, 0]))


def test_float_group_sizes():
    op = stacked_operand(qkern.quantize(jnp.ones((E, K, N)), "int8", axis=-2))
    with pytest.raises(TypeError, match=r"group_sizes must be integers; got dtype float32"):
        ragged_qmatmul(jnp.ones((4, K)), op, jnp.ones((E,), jnp.float32))


def test_contracting_size_mismatch(q):
    with pytest.raises(ValueError, match=r"x \(5, 63\) contracts 63 values per row with the "
                                         r"quantised experts \(4, 64, 32\) along their K=64"):
        ragged(q, jnp.ones((5, K - 1)), jnp.asarray([1, 1, 1, 1]))


def test_ragged_qmatmul_checks_its_operand_and_activation(q):
    op = stacked_operand(q)
    with pytest.raises(TypeError, match=r"expects a StackedOperand"):
        ragged_qmatmul(jnp.ones((4, K)), "not an operand", jnp.ones((E,), jnp.int32))
    bad = StackedOperand(op.data, op.scales[:2], None, op.fmt, op.block_size, op.k)
    with pytest.raises(ValueError, match=r"scales \(2, 1, 32\) do not have the 4 experts"):
        ragged_qmatmul(jnp.ones((4, K)), bad, jnp.ones((E,), jnp.int32))
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\]"):
        ragged_qmatmul(jnp.ones((2, 4, K)), op, jnp.ones((E,), jnp.int32))
    with pytest.raises(ValueError, match=r"x dtype int32 is not supported"):
        ragged_qmatmul(jnp.ones((4, K), jnp.int32), op, jnp.ones((E,), jnp.int32))


def test_direct_call_matches_the_reference_with_any_window(q):
    op = stacked_operand(q)
    x = jax.random.normal(jax.random.PRNGKey(2), (13, K))
    g = jnp.asarray([5, 0, 6, 1])
    want = base.reference(x, op, g)
    for tm in (1, 3, 4, 16, 64):
        got = ragged_qmatmul(x, op, g, config=qkern.pallas.MatmulConfig(block_m=tm))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"tm={tm}")
    dy = jax.random.normal(jax.random.PRNGKey(3), (13, N))
    np.testing.assert_allclose(ragged_qmatmul(dy, op, g, transposed=True),
                               base.reference(dy, op, g, transposed=True), rtol=1e-5, atol=1e-4)


def test_zero_rows(q):
    y = ragged_qmatmul(jnp.ones((0, K)), stacked_operand(q), jnp.zeros((E,), jnp.int32))
    assert y.shape == (0, N)


def test_explicit_pallas_backend_without_a_ragged_kernel_raises(q, monkeypatch):
    monkeypatch.delitem(_backend._TABLE["ragged_qmatmul"], "mosaic_tpu")
    with pytest.raises(ValueError, match=r"the mosaic_tpu backend has no ragged_qmatmul kernel"):
        ragged_qmatmul(jnp.ones((4, K)), stacked_operand(q), jnp.asarray([1, 1, 1, 1]),
                       backend="mosaic_tpu", interpret=True)


def test_a_backend_without_the_family_runs_xla_windows_on_its_2d_kernel(q, monkeypatch):
    """Under `qkern.backend("mosaic_tpu")` with the grouped Mosaic kernel taken out of the
    table, the grouped schedule falls back to xla with a warning, and each window runs the
    Mosaic 2-D kernel (here in interpret mode)."""
    monkeypatch.delitem(_backend._TABLE["ragged_qmatmul"], "mosaic_tpu")
    x = jax.random.normal(jax.random.PRNGKey(2), (6, K))
    g = jnp.asarray([2, 0, 3, 1])
    _backend._warned.clear()
    with qkern.backend("mosaic_tpu", interpret=True), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        jaxpr = str(jax.make_jaxpr(ragged)(q, x, g))
        got = ragged(q, x, g)
    assert any("ragged_qmatmul runs on the xla backend here" in str(m.message) for m in w)
    assert "pallas_call" in jaxpr and "while" in jaxpr
    np.testing.assert_allclose(got, base.reference(x, stacked_operand(q), g), rtol=1e-5,
                               atol=1e-4)


def test_w8a8_arguments_are_checked(q):
    op = stacked_operand(q)
    x, g = jnp.ones((4, K)), jnp.asarray([1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"act_scale is for w8a8=True only"):
        ragged_qmatmul(x, op, g, act_scale=0.1)
    with pytest.raises(ValueError, match=r"W8A8 needs a symmetric int8 weight; got nf4"):
        nf4 = stacked_operand(qkern.quantize(jnp.ones((E, K, N)), "nf4", axis=-2))
        ragged_qmatmul(x, nf4, g, w8a8=True)
    with pytest.raises(ValueError, match=r"no transposed kernel"):
        ragged_qmatmul(jnp.ones((4, N)), op, g, w8a8=True, transposed=True)


def test_the_family_is_in_the_backend_table_with_the_protocol():
    impls = _backend.implementations("ragged_qmatmul")
    assert set(impls) == {"xla", "triton", "mosaic_tpu"}
    for name, module in impls.items():
        for attr in ("forward", "transposed", "candidates"):
            assert callable(getattr(module, attr)), (name, attr)
        assert isinstance(module.SPACE, dict) and module.SPACE
        assert module.MAX_CONFIGS is None or module.MAX_CONFIGS > 0
