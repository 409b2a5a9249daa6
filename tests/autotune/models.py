"""`--from` targets for the tests: zero-argument callables returning (fn, args)."""

import jax
import jax.numpy as jnp

import qkern


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w1": qkern.quantize(jax.random.normal(k1, (256, 128)), "int8"),
            "w2": qkern.quantize(jax.random.normal(k2, (128, 64)), "nf4")}


def _mlp(params, x):
    return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def tiny_mlp():
    """Two quantised matmuls: [3, 256] @ int8 [256, 128], then [3, 128] @ nf4 [128, 64]."""
    return _mlp, (_params(), jnp.ones((3, 256)))


def tiny_grad():
    """The gradient with respect to x of the same MLP: the transposed kernels too."""
    def fn(params, x):
        return jax.grad(lambda x: _mlp(params, x).sum())(x)
    return fn, (_params(), jnp.ones((2, 256)))


def not_a_pair():
    return 42


def needs_an_argument(x):
    return x


def raises_inside():
    """Takes no arguments but fails in its own body: the error is reported as its own."""
    return 1 + "one"
