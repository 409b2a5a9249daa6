"""QArray and LoraArray print whatever their children are: arrays, the None of
qkern.lora.partition's halves, shapes from tree_map, ShapeDtypeStructs from eval_shape,
tracers. Printing never raises, and shows what the children are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

W = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)


def _lora(base: str) -> qkern.LoraArray:
    w = qkern.quantize(W, "nf4") if base == "nf4" else W
    return qkern.LoraArray.init(w, 4, jax.random.PRNGKey(0), alpha=8.0)


def _tree(base: str) -> dict:
    return {"q": qkern.quantize(W, "int4", block_size=32), "l": _lora(base), "bias": jnp.ones(32)}


def _printed(x) -> str:
    """repr and str (print) both work and agree."""
    r = repr(x)
    assert str(x) == r
    return r


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_arrays_print_as_before(base):
    t = _tree(base)
    assert _printed(t["q"]) == "QArray(int4, shape=(64, 32), dtype=float32, blocks of 32 along axis 0)"
    kind = "QArray(nf4)" if base == "nf4" else "dense"
    assert _printed(t["l"]) == (f"LoraArray(shape=(64, 32), dtype=float32, base={kind}, "
                                "rank=4, alpha=8.0)")


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_the_halves_of_partition_print(base):
    train, frozen = qkern.lora.partition(_tree(base))
    f = _printed(frozen)
    assert "a=None, b=None, alpha=8.0" in f
    assert ("w=float32[64,32]" in f) if base == "dense" else ("w=QArray(nf4, shape=(64, 32)" in f)
    assert "QArray(int4, shape=(64, 32), dtype=float32, blocks of 32 along axis 0)" in f
    t = _printed(train)
    assert "a=float32[64,4], b=float32[4,32], alpha=8.0" in t
    assert ("w=None" in t) if base == "dense" else ("w=QArray(nf4" in t and "data=None, scales=None" in t)
    # the unadapted QArray: its arrays are in the frozen half
    assert "QArray(int4, shape=(64, 32), dtype=float32, blocks of 32 along axis 0; " \
           "data=None, scales=None)" in t


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_a_tree_of_shapes_prints_the_shapes(base):
    shapes = jax.tree_util.tree_map(lambda a: a.shape, _tree(base))
    out = _printed(shapes)
    assert "a=(64, 4), b=(4, 32)" in out
    assert "data=(32, 32), scales=(2, 32)" in out                   # the int4 QArray
    if base == "dense":
        assert "w=(64, 32)" in out
    else:
        assert "w=QArray(nf4, shape=(64, 32), dtype=float32, blocks of 64 along axis 0; " \
               "data=(32, 32), scales=(1, 32))" in out


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_a_tree_of_nones_prints(base):
    nones = jax.tree_util.tree_map(lambda a: None, _tree(base))
    out = _printed(nones)
    assert "a=None, b=None" in out and "QArray(int4" in out and "data=None, scales=None" in out


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_eval_shape_prints_shapes_and_dtypes(base):
    abstract = jax.eval_shape(lambda t: t, _tree(base))
    assert isinstance(abstract["l"].a, jax.ShapeDtypeStruct)
    out = _printed(abstract)
    assert "LoraArray(shape=(64, 32), dtype=float32" in out and "rank=4" in out
    assert "QArray(int4, shape=(64, 32)" in out


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_values_print_under_jit_and_grad(base):
    seen = []

    def loss(t, x):
        seen.append(repr(t["l"]))
        seen.append(repr(t["q"]))
        return jnp.sum(qkern.quaxify(lambda t, x: x @ t["l"] + (x @ t["q"]).sum())(t, x))

    x = jnp.ones((2, 64))
    jax.jit(loss)(_tree(base), x)
    qkern.lora.grad(loss)(_tree(base), x)          # a, b are JVP tracers, the base is not
    assert len(seen) == 4
    for lora_repr in seen[0::2]:
        assert lora_repr.startswith("LoraArray(shape=(64, 32), dtype=float32") and "rank=4" in lora_repr
    for q_repr in seen[1::2]:
        assert q_repr.startswith("QArray(int4, shape=(64, 32)")


def test_describe_marks_tracers_and_shape_dtype_structs():
    from qkern._core._values import describe_leaf
    got = []
    jax.jit(lambda x: got.append(describe_leaf(x)))(jnp.ones((3, 2), jnp.bfloat16))
    assert got == ["bfloat16[3,2] traced"]
    assert describe_leaf(jax.ShapeDtypeStruct((5,), jnp.int8)) == "int8[5]"
    assert describe_leaf((1, 2)) == "(1, 2)" and describe_leaf(None) == "None"
    assert describe_leaf("x" * 100).endswith("...") and len(describe_leaf("x" * 100)) == 60


def test_broken_static_metadata_still_prints():
    q = qkern.QArray(data=jnp.zeros((4, 2), jnp.int8), scales=jnp.ones((1, 2)))   # no layout
    out = _printed(q)
    assert out.startswith("QArray(data=int8[4,2], scales=float32[1,2]") and "layout=None" in out
