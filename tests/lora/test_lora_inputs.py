"""LoraArray takes array-likes for its fields, as jnp functions do, and says which field
is wrong when one is not an array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from qkern.types.lora import LoraArray


def _parts(din=6, dout=5, r=2):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((din, dout)).astype(np.float32),
            rng.standard_normal((din, r)).astype(np.float32),
            rng.standard_normal((r, dout)).astype(np.float32))


def test_lists_are_converted_like_jnp_does():
    w, a, b = _parts()
    lw = LoraArray(jnp.asarray(w), a.tolist(), b.tolist(), alpha=4.0)
    assert isinstance(lw.a, jax.Array) and isinstance(lw.b, jax.Array)
    assert lw.a.dtype == jnp.float32 and lw.a.shape == (6, 2) and lw.rank == 2
    ref = LoraArray(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), alpha=4.0)
    np.testing.assert_array_equal(lw.materialise(), ref.materialise())
    y = qkern.quaxify(lambda x, w: x @ w)(jnp.ones((3, 6)), lw)
    np.testing.assert_allclose(y, jnp.ones((3, 6)) @ ref.materialise(), rtol=1e-5)


def test_a_list_base_and_tuples_are_converted_too():
    w, a, b = _parts()
    lw = LoraArray(w.tolist(), tuple(map(tuple, a.tolist())), b.tolist())
    assert lw.shape == (6, 5) and lw.dtype == jnp.float32 and lw.alpha == 2.0


def test_numpy_arrays_and_qarrays_are_kept_as_they_are():
    w, a, b = _parts(64, 64, 4)
    lw = LoraArray(w, a, b)
    assert lw.w is w and lw.a is a and lw.b is b
    q = qkern.quantize(w, "int8")
    assert LoraArray(q, a, b).w is q


def test_shape_dtype_structs_make_an_abstract_adapter():
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)   # noqa: E731
    lw = LoraArray(s(8, 4), s(8, 2), s(2, 4))
    assert lw.shape == (8, 4) and lw.rank == 2


@pytest.mark.parametrize("field", ["a", "b"])
@pytest.mark.parametrize("bad", [None, "ab", object(), {"x": 1}])
def test_a_field_that_is_no_array_is_a_type_error_naming_it(field, bad):
    w, a, b = _parts()
    parts = {"w": w, "a": a, "b": b}
    parts[field] = bad
    with pytest.raises(TypeError, match=rf"LoraArray: {field} must be an array or array-like"):
        LoraArray(**parts)


def test_a_ragged_list_is_a_type_error_naming_the_field():
    w, a, b = _parts()
    with pytest.raises(TypeError, match="LoraArray: b must be an array"):
        LoraArray(w, a, [[1.0] * 5, [1.0] * 4])


def test_a_value_other_than_a_qarray_is_refused():
    w, a, b = _parts()
    inner = LoraArray(w, a, b)
    with pytest.raises(TypeError, match="LoraArray: a must be an array, got a LoraArray"):
        LoraArray(w, inner, b)


def test_integer_lists_and_misfit_shapes_are_clear_errors():
    w, a, b = _parts()
    with pytest.raises(TypeError, match="a must be floating, got int32"):
        LoraArray(w, [[1, 0]] * 6, b)
    with pytest.raises(ValueError, match=r"shapes do not fit.*a \(6, 3\), b \(2, 5\)"):
        LoraArray(w, [[0.0] * 3] * 6, b.tolist())
    with pytest.raises(ValueError, match=r"must have the rank of w"):
        LoraArray(w, [0.0] * 6, b.tolist())
