"""Small CNNs quantised by rules: a Flax NNX model (`nnx.Conv`, HWIO kernels) and an Equinox
model (`eqx.nn.Conv2d`, OIHW weights, blocked along I with Rule(axis=1)) equal their
dequantised reference, and their convolutions run the quantised rule."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qkern
from qkern.types import _qarray_conv

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def conv_calls(monkeypatch):
    calls = []
    real = _qarray_conv.qconv
    monkeypatch.setattr(_qarray_conv, "qconv",
                        lambda *a, **k: calls.append(k.get("w8a8", False)) or real(*a, **k))
    return calls


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.dw = nnx.Conv(32, 32, (3, 3), feature_group_count=32, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c1(x))
        x = nnx.relu(self.c2(x))
        x = nnx.relu(self.dw(x))
        return self.head(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("fmt,act_fmt", [("int8", None), ("nf4", None), ("int8", "int8")])
def test_nnx_cnn_by_rules(conv_calls, fmt, act_fmt):
    model = NNXCNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 12, 3))
    rules = [qkern.Rule(where=r"dw/kernel.*", fmt="int8", axis=0, min_size=0),  # depthwise: I is 1
             qkern.Rule(where=r"c\d/kernel.*", fmt=fmt, act_fmt=act_fmt, min_size=0),
             qkern.Rule(fmt=None)]
    qm = qkern.quantize_model(model, rules=rules)
    q = {r.path.split("/")[0]: r.fmt for r in qm.report.rows}
    assert q["c1"] == fmt and q["c2"] == fmt and q["dw"] == "int8" and q["head"] is None
    y = jax.jit(lambda m, x: m(x))(qm, x)
    ref = qm.dequantized()(x)
    if act_fmt is None:
        np.testing.assert_allclose(y, ref, **TOL)
    else:                        # int8 activations: close to the float-activation reference
        assert float(jnp.max(jnp.abs(y - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    assert len(conv_calls) == 3 and conv_calls.count(True) == (2 if act_fmt else 0)


class EqxCNN(eqx.Module):
    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.c1 = eqx.nn.Conv2d(3, 16, 3, padding=1, key=k1)
        self.c2 = eqx.nn.Conv2d(16, 16, 3, stride=2, padding="SAME", key=k2)
        self.head = eqx.nn.Linear(16, 10, key=k3)

    def __call__(self, x):                       # one image, [C, H, W]
        x = jax.nn.relu(self.c1(x))
        x = jax.nn.relu(self.c2(x))
        return self.head(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3"])
def test_equinox_cnn_by_rules(conv_calls, fmt):
    model = EqxCNN(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 10, 10))
    rules = [qkern.Rule(where=r"c\d/weight", fmt=fmt, axis=1, min_size=0),          # OIHW: blocks along I
             qkern.Rule(fmt=None)]
    qm = qkern.quantize_model(model, rules=rules)
    assert isinstance(qm.params.c1.weight, qkern.QArray)
    run = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    np.testing.assert_allclose(run(qm, x), run(qm.dequantized(), x), **TOL)
    assert conv_calls
