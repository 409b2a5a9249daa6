"""`qkern.quantize_model`: one call from a Flax Linen, Flax NNX or Equinox model (or an
apply function and its params) to a quantised model called like the original, equal to
the same model run on the dequantised weights."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qkern

TOL = dict(rtol=1e-4, atol=1e-4)


class LinenNet(nn.Module):
    """Dense, Conv and Einsum layers."""

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(16, (3, 3))(x))                 # [B, 8, 8, 16]
        y = y.reshape(y.shape[0], -1)
        y = nn.relu(nn.Dense(64)(y))
        return nn.Einsum((64, 32), "bi,io->bo")(y)


def linen_case():
    model = LinenNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    return model, model.init(jax.random.PRNGKey(1), x), x


RULES = [qkern.Rule(where=r".*Dense.*kernel", fmt="nf4", block_size=64),
         qkern.Rule(where=r".*kernel", fmt="int8", min_size=0)]


def test_linen_dense_conv_einsum():
    model, variables, x = linen_case()
    qm = qkern.quantize_model(model, variables, rules=RULES)
    assert qm.framework == "linen"
    kinds = {p: type(v).__name__ for p, v in
             jax.tree_util.tree_leaves_with_path(qm.params, is_leaf=lambda v: isinstance(v, qkern.QArray))
             if "kernel" in jax.tree_util.keystr(p)}
    assert sorted(kinds.values()) == ["QArray"] * 3
    assert {r.fmt for r in qm.report.rows if r.fmt} == {"nf4", "int8"}
    y = qm(x)
    ref = model.apply(qkern.dequantize(qm.params), x)          # unchanged apply, float weights
    np.testing.assert_allclose(y, ref, **TOL)
    np.testing.assert_allclose(qm.dequantized()(x), ref, **TOL)
    jitted = jax.jit(lambda m, x: m(x))(qm, x)                 # a pytree: jit takes it whole
    np.testing.assert_allclose(jitted, ref, **TOL)
    # the quantisation costs something against the float model, but not much
    dense = model.apply(variables, x)
    assert 0 < float(jnp.max(jnp.abs(y - dense)) / jnp.max(jnp.abs(dense))) < 0.1


class NNXBlock(nnx.Module):
    def __init__(self, d, rngs):
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


def test_nnx_module():
    block = NNXBlock(32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32))
    qm = qkern.quantize_model(block, rules=[qkern.Rule(where=r".*kernel.*", fmt="int4", block_size=32)])
    assert qm.framework == "nnx"
    assert sum(isinstance(v, qkern.QArray) for v in jax.tree_util.tree_leaves(
        qm.params, is_leaf=lambda v: isinstance(v, qkern.QArray))) == 2
    graphdef, _ = nnx.split(block)
    ref = nnx.merge(graphdef, qkern.dequantize(qm.params))(x)
    np.testing.assert_allclose(qm(x), ref, **TOL)
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(qm, x), ref, **TOL)
    assert all(isinstance(v, jax.Array) for v in jax.tree_util.tree_leaves(nnx.state(block)))  # untouched


def test_equinox_module_with_out_in_weights():
    mlp = eqx.nn.MLP(64, 16, 128, depth=1, key=jax.random.key(4))
    x = jax.random.normal(jax.random.PRNGKey(5), (64,))
    qm = qkern.quantize_model(mlp, rules=[qkern.Rule(where=r"layers/\d+/weight", fmt="nf4",
                                                     axis=-1, block_size=32)])
    assert qm.framework == "equinox" and isinstance(qm.params, eqx.nn.MLP)
    ref = qkern.dequantize(qm.params)(x)
    np.testing.assert_allclose(qm(x), ref, **TOL)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, x: m(x))(qm, x), ref, **TOL)
    np.testing.assert_allclose(jax.vmap(qm)(jnp.stack([x, -x]))[1], qkern.dequantize(qm.params)(-x), **TOL)


def test_apply_function_and_params():
    params = {"w1": jax.random.normal(jax.random.PRNGKey(6), (128, 64)),
              "w2": jax.random.normal(jax.random.PRNGKey(7), (64, 8))}
    apply = lambda p, x, scale=1.0: jnp.tanh(x @ p["w1"]) @ p["w2"] * scale
    qm = qkern.quantize_model(apply, params, fmt="int8", where=r"w\d")
    x = jnp.ones((3, 128))
    assert qm.framework == "function"
    np.testing.assert_allclose(qm(x, scale=2.0), apply(qkern.dequantize(qm.params), x, 2.0), **TOL)
    assert "w1" in str(qm.report)
    moved = jax.device_put(qm)                     # rebuilt from its leaves: report kept
    assert isinstance(moved, qkern.QuantizedModel) and moved.report == qm.report
    np.testing.assert_allclose(moved(x), qm(x), **TOL)


def test_bad_calls_say_what_to_pass():
    model, variables, _ = linen_case()
    with pytest.raises(TypeError, match="Linen module .* pass its variables"):
        qkern.quantize_model(model, rules=RULES)
    with pytest.raises(TypeError, match="NNX module .* pass the module alone"):
        qkern.quantize_model(NNXBlock(8, nnx.Rngs(0)), {"a": 1}, rules=RULES)
    with pytest.raises(TypeError, match="Equinox module .* pass the module alone"):
        qkern.quantize_model(eqx.nn.Linear(4, 4, key=jax.random.key(0)), {}, rules=RULES)
    with pytest.raises(TypeError, match="apply function .* got dict without params"):
        qkern.quantize_model({"w": jnp.ones((4, 4))}, rules=RULES)
    with pytest.raises(TypeError, match="needs rules="):
        qkern.quantize_model(model, variables)
    with pytest.raises(TypeError, match="drop report="):
        qkern.quantize_model(model, variables, rules=RULES, report=True)
