"""qkern.lora.grad / value_and_grad: gradients of a whole (Q)LoRA tree with respect to the
adapters' factors only, shaped like partition's trainable half."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

tree_util = jax.tree_util


def _params(key, fmt):
    k = jax.random.split(key, 4)
    p = {"layers": [{"kernel": jax.random.normal(k[i], (64, 64)) / 8, "bias": jnp.zeros(64)}
                    for i in range(2)],
         "head": jax.random.normal(k[2], (64, 16)) / 8}
    if fmt:
        p = qkern.quantize(p, fmt, where=r".*(kernel|head)")
    p = qkern.loraify(p, rank=4, key=k[3], where=r"layers/.*kernel")
    # move b off zero so that every factor has a non-zero gradient
    return tree_util.tree_map(
        lambda v: qkern.LoraArray(v.w, v.a, v.b + 0.05, alpha=v.alpha)
        if isinstance(v, qkern.LoraArray) else v,
        p, is_leaf=lambda v: isinstance(v, qkern.LoraArray))


@qkern.quaxify
def _model(p, x):
    for layer in p["layers"]:
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x @ p["head"]


def loss(p, x):
    return jnp.mean(_model(p, x) ** 2)


def _reference(p, x):
    """The documented long way round: partition, differentiate the train half, combine."""
    train, frozen = qkern.lora.partition(p)
    return jax.value_and_grad(lambda t: loss(qkern.lora.combine(t, frozen), x))(train)


def _assert_trees_close(a, b):
    assert tree_util.tree_structure(a) == tree_util.tree_structure(b)
    for u, v in zip(tree_util.tree_leaves(a), tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


@pytest.fixture(params=[None, "nf4"], ids=["dense", "nf4"])
def setup(request):
    key = jax.random.PRNGKey(0)
    return _params(key, request.param), jax.random.normal(jax.random.fold_in(key, 9), (8, 64))


def test_bare_jax_grad_refuses_a_qlora_tree():
    p = _params(jax.random.PRNGKey(0), "nf4")
    with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
        jax.grad(loss)(p, jnp.ones((2, 64)))


def test_grad_is_shaped_like_the_trainable_half(setup):
    p, x = setup
    g = qkern.lora.grad(loss)(p, x)
    train, _ = qkern.lora.partition(p)
    assert tree_util.tree_structure(g) == tree_util.tree_structure(train)
    leaves = tree_util.tree_leaves(g)
    assert len(leaves) == 4 and all(np.any(np.asarray(v)) for v in leaves)    # a, b of 2 adapters
    assert g["head"] is None or not tree_util.tree_leaves(g["head"])          # no adapter: no grad
    assert g["layers"][0]["bias"] is None
    _assert_trees_close(g, _reference(p, x)[1])


def test_value_and_grad_under_jit(setup):
    p, x = setup
    value, g = jax.jit(qkern.lora.value_and_grad(loss))(p, x)
    ref_value, ref_g = _reference(p, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    _assert_trees_close(g, ref_g)


def test_has_aux(setup):
    p, x = setup

    def with_aux(p, x):
        y = _model(p, x)
        return jnp.mean(y ** 2), {"mean": jnp.mean(y)}

    g, aux = jax.jit(qkern.lora.grad(with_aux, has_aux=True))(p, x)
    (value, aux2), g2 = qkern.lora.value_and_grad(with_aux, has_aux=True)(p, x)
    ref_value, ref_g = _reference(p, x)
    _assert_trees_close(g, ref_g)
    _assert_trees_close(g2, ref_g)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(aux["mean"], jnp.mean(_model(p, x)), rtol=1e-5)
    np.testing.assert_allclose(aux2["mean"], aux["mean"], rtol=1e-6)


def test_argnums_and_keyword_arguments(setup):
    p, x = setup
    swapped = lambda x, p, scale=1.0: scale * loss(p, x)   # noqa: E731
    g1 = qkern.lora.grad(swapped, argnums=1)(x, p, scale=2.0)
    g_neg = qkern.lora.grad(swapped, argnums=-1)(x, p)
    ref = _reference(p, x)[1]
    _assert_trees_close(g1, tree_util.tree_map(lambda g: 2.0 * g, ref))
    _assert_trees_close(g_neg, ref)

    two = lambda p, x, q: loss(p, x) + 3.0 * loss(q, x)   # noqa: E731
    ga, gb = qkern.lora.grad(two, argnums=(0, 2))(p, x, p)
    _assert_trees_close(ga, ref)
    _assert_trees_close(gb, tree_util.tree_map(lambda g: 3.0 * g, ref))


def test_an_sgd_step_on_the_trainable_half_lowers_the_loss(setup):
    p, x = setup
    start = float(loss(p, x))

    @jax.jit
    def step(p):
        g = qkern.lora.grad(loss)(p, x)
        train, frozen = qkern.lora.partition(p)
        train = tree_util.tree_map(lambda w, g: w - 0.5 * g, train, g)   # what optax does
        return qkern.lora.combine(train, frozen)

    for _ in range(5):
        new = step(p)
        assert tree_util.tree_structure(new) == tree_util.tree_structure(p)
        p = new
    assert float(loss(p, x)) < 0.9 * start


def test_errors_name_the_problem(setup):
    p, x = setup
    with pytest.raises(ValueError, match=r"argument 1 holds no LoraArray.*qkern.loraify"):
        qkern.lora.grad(lambda x, q: loss(p, x) + jnp.sum(q["w"]), argnums=1)(x, {"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="argnums must be an int or a tuple of ints"):
        qkern.lora.grad(loss, argnums="0")
    with pytest.raises(TypeError, match=r"argnums=2 but 2 positional argument"):
        qkern.lora.grad(loss, argnums=2)(p, x)
