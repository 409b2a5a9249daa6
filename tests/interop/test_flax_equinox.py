"""A Flax NNX model and an Equinox model, quantised by rules and run under quaxify, equal
their dequantised reference. Each needs its optional extra (`pip install qkern[flax]`,
`qkern[equinox]`); CI installs both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


# -- Flax NNX ------------------------------------------------------------------------------
def test_flax_nnx_model_by_rules():
    nnx = pytest.importorskip("flax.nnx", reason="Flax NNX interop needs the `flax` extra "
                                                 "(pip install 'qkern[flax]')")

    class Block(nnx.Module):
        def __init__(self, d, rngs):
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.Linear(d, d, rngs=rngs)
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            h = self.norm(x)
            x = x + self.attn(h)
            return x + self.down(jax.nn.gelu(self.up(h)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(100, 32, rngs=rngs)
            self.blocks = nnx.List([Block(32, rngs) for _ in range(2)])
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    model = Model(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rules = [qkern.Rule(r"embed/.*", fmt=None),
             qkern.Rule(r".*attn/kernel/value", fmt="nf4", block_size=32, min_size=1),
             qkern.Rule(r".*(up|down)/kernel/value", fmt="int8", block_size=32, act_fmt="int8",
                        min_size=1),
             qkern.Rule(r".*kernel/value", fmt="int4", block_size=32, min_size=1)]
    qstate, report = qkern.quantize(state, rules=rules, report=True)
    assert report["blocks/0/attn/kernel/value"].fmt == "nf4"
    assert report["blocks/1/up/kernel/value"].fmt == "int8"
    assert report["head/kernel/value"].fmt == "int4"
    assert report["embed/embedding/value"].fmt is None
    assert report.ratio > 1.5

    def apply(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.arange(12).reshape(2, 6)
    got = jax.jit(qkern.quaxify(apply))(qstate, ids)
    # reference: the dequantised weights, activations quantised as W8A8 does (per row)
    deq = qkern.dequantize(qstate)
    want = _w8a8_flax_reference(nnx, graphdef, deq, ids)
    _close(got, want)
    # the W8A8 layers really quantised their activations
    assert float(jnp.abs(got - apply(deq, ids)).max()) > 1e-4

    # (docs/models.md saves and loads this kind of state with qkern.save/load(like=...))


def _w8a8_flax_reference(nnx, graphdef, deq, ids):
    model = nnx.merge(graphdef, deq)

    def int8_rows(x):
        s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
        return jnp.clip(jnp.round(x / s), -127, 127) * s

    hi = jax.lax.Precision.HIGHEST
    lin = lambda l, x: jnp.dot(x, l.kernel[...], precision=hi) + l.bias[...]
    x = model.embed(ids)
    for b in model.blocks:
        h = b.norm(x)
        x = x + lin(b.attn, h)
        x = x + lin(b.down, int8_rows(jax.nn.gelu(lin(b.up, int8_rows(h)))))
    return lin(model.head, x)


# -- Equinox -------------------------------------------------------------------------------
def test_equinox_model_by_rules():
    eqx = pytest.importorskip("equinox", reason="Equinox interop needs the `equinox` extra "
                                                "(pip install 'qkern[equinox]')")

    class MLP(eqx.Module):
        layers: list
        norm: eqx.nn.LayerNorm

        def __init__(self, key):
            k = jax.random.split(key, 3)
            self.norm = eqx.nn.LayerNorm(64)
            self.layers = [eqx.nn.Linear(64, 128, key=k[0]), eqx.nn.Linear(128, 128, key=k[1]),
                           eqx.nn.Linear(128, 32, key=k[2])]

        def __call__(self, x):
            x = self.norm(x)
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(jax.random.key(0))
    # Equinox stores Linear weights as [out, in]: blocks along `in` (axis -1) follow the
    # contraction; the kernels take either layout.
    rules = [qkern.Rule(r"layers/0/weight", fmt="nf4", block_size=32, axis=-1),
             qkern.Rule(r"layers/1/weight", fmt="int8"),
             qkern.Rule(r"layers/\d+/weight", fmt="int4", block_size=32)]
    qmodel, report = qkern.quantize(model, rules=rules, report=True)
    assert isinstance(qmodel, MLP) and isinstance(qmodel.layers[0].weight, qkern.QArray)
    assert [r.fmt for r in report.quantised] == ["nf4", "int8", "int4"]
    assert qmodel.layers[0].weight.block_axis == 1

    x = jax.random.normal(jax.random.key(1), (8, 64))
    run = lambda m, x: jax.vmap(m)(x)
    got = eqx.filter_jit(qkern.quaxify(run))(qmodel, x)
    want = run(qkern.dequantize(qmodel), x)
    _close(got, want)
    # eqx.filter_jit sees QArrays as pytrees of arrays: jitting twice reuses the trace
    np.testing.assert_array_equal(eqx.filter_jit(qkern.quaxify(run))(qmodel, x), got)


def test_equinox_qat_then_serve():
    eqx = pytest.importorskip("equinox", reason="needs the `equinox` extra")
    model = eqx.nn.MLP(32, 8, 64, depth=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'layers/1/weight' \(shape \(8, 64\).*rules\[0\]"):
        qkern.fake_quant(model, rules=[qkern.Rule(r".*weight", fmt="int8", block_size=32, min_size=1)])
    rules = [qkern.Rule(r".*weight", fmt="int8", block_size=32, axis=-1, min_size=1)]
    x, y = jax.random.normal(jax.random.key(1), (64, 32)), jax.random.normal(jax.random.key(2), (64, 8))

    @eqx.filter_jit
    def step(m):
        def loss(m):
            qm = qkern.fake_quant(m, rules=rules)
            return jnp.mean((jax.vmap(qm)(x) - y) ** 2)
        l, g = eqx.filter_value_and_grad(loss)(m)
        return eqx.apply_updates(m, jax.tree_util.tree_map(lambda g: -0.05 * g, g)), l

    losses = []
    for _ in range(3):
        model, l = step(model)
        losses.append(float(l))
    assert losses[-1] < losses[0]
    served = qkern.quantize(model, rules=rules)
    qat = qkern.fake_quant(model, rules=rules)
    np.testing.assert_array_equal(jax.vmap(qkern.dequantize(served))(x), jax.vmap(qat)(x))


def test_flax_nnx_module_that_updates_its_state_under_quaxify():
    """Train-mode BatchNorm writes its statistics and Dropout its RNG counter in the
    forward pass: the state's Variables are rebuilt in the trace the model runs in, so the
    writes are allowed (they raised TraceContextError), and typed keys stay keys."""
    nnx = pytest.importorskip("flax.nnx", reason="Flax NNX interop needs the `flax` extra "
                              "(pip install 'qkern[flax]')")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 128, rngs=rngs)
            self.bn = nnx.BatchNorm(128, rngs=rngs)
            self.drop = nnx.Dropout(0.0, rngs=rngs)
            self.l2 = nnx.Linear(128, 32, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))

    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))                   # train mode
    qstate = qkern.quantize(state, "int8", where=r".*kernel.*")

    def apply(s, x):
        m = nnx.merge(graphdef, s)
        return m(x), nnx.state(m)

    want, dense_after = apply(qkern.dequantize(qstate), x)
    for f in (qkern.quaxify(apply), jax.jit(qkern.quaxify(apply))):
        y, after = f(qstate, x)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        mean = lambda st: jax.tree_util.tree_leaves(st["bn"]["mean"])[0]   # noqa: E731
        np.testing.assert_allclose(mean(after), mean(dense_after), rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(mean(after)).max()) > 0                     # it was updated
    qm = qkern.quantize_model(Net(nnx.Rngs(0)), rules=[qkern.Rule(where=r".*kernel.*", fmt="int8")])
    assert qm(x).shape == (4, 32)
