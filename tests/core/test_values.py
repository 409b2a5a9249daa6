"""Value subclasses: frozen dataclasses and pytrees, static fields, ArrayValue attributes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from tests.core.qtypes import Scaled, SymbolicZero, make_scaled


class Tagged(qkern.ArrayValue):
    data: jax.Array
    name: str = qkern.static_field(default="x")

    def aval(self):
        return jax.core.ShapedArray(self.data.shape, self.data.dtype)

    def materialise(self):
        return self.data


def test_fields_are_children_and_static_fields_are_metadata():
    v = Tagged(jnp.ones((2, 3)), name="a")
    leaves, tree = jax.tree_util.tree_flatten(v)
    assert len(leaves) == 1 and leaves[0] is v.data
    w = jax.tree_util.tree_unflatten(tree, [jnp.zeros((2, 3))])
    assert type(w) is Tagged and w.name == "a"
    np.testing.assert_array_equal(w.data, np.zeros((2, 3)))
    assert tree != jax.tree_util.tree_structure(Tagged(jnp.ones((2, 3)), name="b"))
    assert Tagged(jnp.ones(1)).name == "x"


def test_values_are_frozen():
    v = make_scaled()
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.scale = 3.0


def test_array_value_attributes_come_from_aval():
    v = make_scaled((3, 4), dtype=jnp.bfloat16)
    assert v.shape == (3, 4) and v.dtype == jnp.bfloat16 and v.ndim == 2 and v.size == 12
    z = SymbolicZero((2, 5), jnp.dtype(jnp.float32))  # fields that shadow .shape / .dtype
    assert z.shape == (2, 5) and z.ndim == 2 and z.size == 10
    assert jax.tree_util.tree_leaves(z) == []


def test_static_field_change_retraces_jit():
    traces = []

    @jax.jit
    def f(v):
        traces.append(v.name)
        return v.data * 2

    f(Tagged(jnp.ones(3), name="a"))
    f(Tagged(jnp.zeros(3), name="a"))
    f(Tagged(jnp.ones(3), name="b"))
    assert traces == ["a", "b"]


def test_value_is_abstract_without_aval_and_materialise():
    with pytest.raises(TypeError):
        class Incomplete(qkern.ArrayValue):
            data: jax.Array
        Incomplete(jnp.ones(2))


def test_materialise_of_helper_type():
    v = Scaled(jnp.array([1.0, 2.0]), jnp.float32(3.0))
    np.testing.assert_allclose(v.materialise(), [3.0, 6.0])
