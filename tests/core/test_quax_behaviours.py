"""Behaviours Quax users rely on, each found by running Quax's own cases against qkern.

One regression test (or a few) per defect, named after what broke. `Boxed` is a type in
Quax's style: its `default` applies every primitive to its array and wraps the result, and
it refuses to materialise (like Quax's `Unitful`), so any hidden materialisation fails
loudly. `Wrapped` is the same without the refusal, to show types are kept, not lost.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern
from tests.core.qtypes import Scaled

lax = jax.lax


class Boxed(qkern.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.array), jnp.result_type(self.array))

    def materialise(self):
        raise ValueError("Boxed refuses to materialise")

    @staticmethod
    def default(primitive, values, params):
        arrays = [v.array if isinstance(v, Boxed) else v for v in values]
        out = primitive.bind(*arrays, **params)
        return [Boxed(o) for o in out] if primitive.multiple_results else Boxed(out)


class Wrapped(qkern.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.array), jnp.result_type(self.array))

    def materialise(self):
        return self.array

    @staticmethod
    def default(primitive, values, params):
        arrays = [v.array if isinstance(v, Wrapped) else v for v in values]
        out = primitive.bind(*arrays, **params)
        return [Wrapped(o) for o in out] if primitive.multiple_results else Wrapped(out)


def _close(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=rtol, atol=atol)


A = jnp.array([1.0, 2.0, -3.0, 0.25], jnp.float32)
B = jnp.array([0.5, 2.0, 1.0, -4.0], jnp.float32)
M = jnp.array([[2.0, 0.5, 0.1], [0.3, 1.5, -0.2], [0.0, 0.4, 3.0]], jnp.float32)


# -- custom_jvp functions keep the Value type the rules give ------------------------------
UNARY = {
    "sinc": jnp.sinc,
    "logaddexp_self": lambda x: jnp.logaddexp(x, x),
    "ldexp": lambda x: jnp.ldexp(x, 3),
    "relu": jax.nn.relu,
}


@pytest.mark.parametrize("cls", [Boxed, Wrapped])
@pytest.mark.parametrize("name", list(UNARY))
def test_custom_jvp_result_keeps_value_type(cls, name):
    f = UNARY[name]
    out = qkern.quaxify(f)(cls(A))
    assert type(out) is cls, f"{name} returned {type(out).__name__}"
    _close(out.array, f(A))


@pytest.mark.parametrize("cls", [Boxed, Wrapped])
def test_logaddexp_of_two_values_keeps_type_under_jit(cls):
    out = jax.jit(qkern.quaxify(jnp.logaddexp))(cls(A), cls(B))
    assert type(out) is cls
    _close(out.array, jnp.logaddexp(A, B))


@pytest.mark.parametrize("cls", [Boxed, Wrapped])
def test_frexp_keeps_value_type_for_both_outputs(cls):
    mant, expo = qkern.quaxify(jnp.frexp)(cls(A))
    assert type(mant) is cls and type(expo) is cls
    want_m, want_e = jnp.frexp(A)
    _close(mant.array, want_m)
    np.testing.assert_array_equal(expo.array, want_e)


@pytest.mark.parametrize("cls", [Boxed, Wrapped])
def test_linalg_slogdet_and_pinv_keep_value_type(cls):
    sign, logdet = qkern.quaxify(jnp.linalg.slogdet)(cls(M))
    assert type(logdet) is cls
    want_s, want_l = jnp.linalg.slogdet(M)
    _close(logdet.array, want_l, rtol=1e-5)
    _close(sign.array if isinstance(sign, qkern.Value) else sign, want_s)
    pinv = qkern.quaxify(jnp.linalg.pinv)(cls(M))
    assert type(pinv) is cls
    _close(pinv.array, jnp.linalg.pinv(M), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrap", ["grad", "jit_grad"])
def test_custom_jvp_value_type_kept_and_gradient_right(wrap):
    # The JVP rule of logaddexp runs on Wrapped primals; its tangent is a Wrapped, carried
    # leaf by leaf. The gradient must be the plain one.
    loss = lambda a, b: jnp.sum(qkern.quaxify(jnp.logaddexp)(Wrapped(a), Wrapped(b)).array)
    g = jax.grad(loss, argnums=(0, 1))
    if wrap == "jit_grad":
        g = jax.jit(g)
    ga, gb = g(A, B)
    wa, wb = jax.grad(lambda a, b: jnp.sum(jnp.logaddexp(a, b)), argnums=(0, 1))(A, B)
    _close(ga, wa)
    _close(gb, wb)


def test_custom_jvp_refusing_type_differentiates_on_its_leaves():
    loss = lambda a: jnp.sum(qkern.quaxify(jnp.sinc)(Boxed(a)).array)
    _close(jax.grad(loss)(A), jax.grad(lambda a: jnp.sum(jnp.sinc(a)))(A), rtol=1e-4,
           atol=1e-5)


def test_custom_jvp_with_plain_tangent_still_materialises():
    # The rules make a Scaled, but the JVP rule's tangent is a plain array: that output
    # cannot be carried as a Scaled, so it is materialised (and the gradient is right).
    @jax.custom_jvp
    def f(a, b):
        return a * b

    f.defjvp(lambda p, t: (p[0] * p[1], 5.0 * t[0] * p[1] + 7.0 * p[0] * t[1]))
    w = Scaled(A, jnp.float32(2.0))
    out = qkern.quaxify(f)(w, B)
    assert not isinstance(out, qkern.Value)
    _close(out, A * 2.0 * B)
    g = jax.grad(lambda y: jnp.sum(qkern.quaxify(f)(w, y)))(B)
    _close(g, 7.0 * A * 2.0)


# -- while loops run on what the rules return --------------------------------------------
I1 = jnp.array([12, 18, 7, 0], jnp.int32)
I2 = jnp.array([8, 24, 21, 5], jnp.int32)


@pytest.mark.parametrize("fn", [jnp.gcd, jnp.lcm], ids=["gcd", "lcm"])
@pytest.mark.parametrize("jit", [False, True])
def test_while_condition_computed_from_value(fn, jit):
    f = qkern.quaxify(fn)
    out = (jax.jit(f) if jit else f)(Boxed(I1), Boxed(I2))
    assert type(out) is Boxed
    np.testing.assert_array_equal(out.array, fn(I1, I2))


@pytest.mark.parametrize("cls", [Boxed, Wrapped])
def test_qdwh_on_a_custom_type(cls):
    # Its convergence flag starts as a Python bool and comes back from the loop body as the
    # custom type: carried as the array the rules returned, never materialised by force.
    u, h, _, _ = jax.lax.linalg.qdwh(M)
    with pytest.warns(UserWarning, match="carry positions"):
        out = qkern.quaxify(lambda m: jax.lax.linalg.qdwh(m)[:2])(cls(M))
    assert type(out[0]) is cls
    _close(out[0].array, u, rtol=1e-4, atol=1e-4)
    _close(out[1].array, h, rtol=1e-4, atol=1e-4)


def _doubling(w, x):
    return lax.while_loop(lambda c: jnp.sum(c[1]) < x,
                          lambda c: (c[0] + 1, lax.mul(c[1], jnp.float32(2.0))), (0, w))[1]


@pytest.mark.parametrize("jit", [False, True])
def test_quaxify_of_vmap_with_batched_while_predicate(jit):
    # JAX's batching rule gives the loop a predicate per batch element (bool[6]); only the
    # primitive accepts it, not the public lax.while_loop.
    data = jax.random.normal(jax.random.key(0), (6, 3), jnp.float32) ** 2 + 0.1
    w = Scaled(data, jnp.full((6,), 0.5, jnp.float32))
    xs = jnp.arange(6.0, dtype=jnp.float32) * 2
    f = qkern.quaxify(jax.vmap(_doubling))
    out = (jax.jit(f) if jit else f)(w, xs)
    assert type(out) is Scaled
    _close(out.materialise(), jax.vmap(_doubling)(w.materialise(), xs))


# -- literals staged inside quaxify are arrays -------------------------------------------
def test_asarray_of_python_scalar_inside_quaxify_is_an_array():
    out = qkern.quaxify(lambda w: jnp.asarray(1))(Wrapped(A))
    assert isinstance(out, jax.Array) and out.ndim == 0 and int(out) == 1


def test_jnp_insert_inside_quaxify():
    f = lambda w: jnp.insert(jnp.arange(4.0), 1, jnp.asarray(9.0)) + w
    out = qkern.quaxify(f)(Wrapped(jnp.ones(5)))
    _close(out.array, f(jnp.ones(5)))


# -- aval() runs where the Value's fields live --------------------------------------------
class StopGradLora(qkern.ArrayValue):
    """Quax's LoraArray computes its aval through lax.stop_gradient."""
    w: jax.Array
    a: jax.Array
    b: jax.Array

    def aval(self):
        w = lax.stop_gradient(self.w)
        return jax.core.ShapedArray(w.shape, w.dtype)

    def materialise(self):
        return self.w + self.a @ self.b


def _lora():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    return StopGradLora(jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (4, 2)),
                        jax.random.normal(k3, (2, 3)))


X = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(2, 4)


@pytest.mark.parametrize("wrap", ["plain", "jit", "grad", "filter_jit"])
def test_aval_applying_a_jax_operation_does_not_leak(wrap):
    lw = _lora()
    f = qkern.quaxify(jnp.matmul)            # jnp.matmul is itself jitted
    want = X @ lw.materialise()
    if wrap == "plain":
        _close(f(X, lw), want)
    elif wrap == "jit":
        _close(jax.jit(f)(X, lw), want)
    elif wrap == "filter_jit":
        eqx = pytest.importorskip("equinox", reason="needs the `equinox` extra")
        _close(eqx.filter_jit(f)(X, lw), want)
    else:
        g = jax.grad(lambda lw: jnp.sum(f(X, lw)))(lw)
        want_g = jax.grad(lambda a: jnp.sum(X @ (lw.w + a @ lw.b)))(lw.a)
        _close(g.a, want_g)


# -- qkern.register accepts what Quax users annotate --------------------------------------
class Tagged(qkern.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(jnp.shape(self.array), jnp.result_type(self.array))

    def materialise(self):
        return self.array


def test_register_accepts_jaxtyping_arraylike():
    jaxtyping = pytest.importorskip("jaxtyping", reason="jaxtyping comes with the `equinox` extra")

    @qkern.register(lax.sub_p)
    def rule(x: Tagged, y: jaxtyping.ArrayLike):
        return Tagged(x.array - 2 * y)

    out = qkern.quaxify(lambda t, y: t - y)(Tagged(A), B)
    assert type(out) is Tagged
    _close(out.array, A - 2 * B)
    out = qkern.quaxify(lambda t: t - 1.0)(Tagged(A))   # a Python scalar is ArrayLike too
    _close(out.array, A - 2.0)


def test_register_python_scalar_annotations_match_python_scalars_only():
    @qkern.register(lax.max_p)
    def array_rule(x: Tagged, y: qkern.ArrayLike):
        return Tagged(jnp.full_like(x.array, 1.0))

    @qkern.register(lax.max_p)
    def float_rule(x: Tagged, y: float):
        return Tagged(jnp.full_like(x.array, 2.0))

    @qkern.register(lax.max_p)
    def bool_int_rule(x: Tagged, y: bool | int):
        return Tagged(jnp.full_like(x.array, 3.0))

    f = lambda t, y: lax.max_p.bind(t, y)
    assert float(qkern.quaxify(f)(Tagged(A), 0.5).array[0]) == 2.0
    assert float(qkern.quaxify(f)(Tagged(A), 3).array[0]) == 3.0
    assert float(qkern.quaxify(f)(Tagged(A), B).array[0]) == 1.0


def test_register_positional_parameter_with_default_receives_primitive_param():
    @qkern.register(lax.top_k_p)
    def rule(x: Tagged, k: int = 1, **params):
        vals, idx = lax.top_k(x.array, k)
        return [Tagged(vals), idx]

    vals, idx = qkern.quaxify(lambda t: lax.top_k(t, 2))(Tagged(A))
    assert type(vals) is Tagged
    want_v, want_i = lax.top_k(A, 2)
    _close(vals.array, want_v)
    np.testing.assert_array_equal(idx, want_i)


def test_register_error_names_the_annotation_as_written():
    def rule(x: Tagged, y: "dict[str, int] | Tagged"):
        return x
    with pytest.raises(TypeError, match=re.escape("annotated dict[str, int] | ")):
        qkern.register(lax.mul_p)(rule)


# -- eqx.field(static=True) on a Value is static ------------------------------------------
def test_equinox_static_field_is_static():
    eqx = pytest.importorskip("equinox", reason="needs the `equinox` extra")

    class Units(qkern.ArrayValue):
        array: jax.Array
        unit: str = eqx.field(static=True, default="m")

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.array), jnp.result_type(self.array))

        def materialise(self):
            return self.array

    u = Units(A, "s")
    assert jax.tree_util.tree_leaves(u) == [u.array]
    back = jax.tree_util.tree_map(lambda x: x * 2, u)
    assert back.unit == "s"
    out = jax.jit(qkern.quaxify(lambda u: u * 3.0))(u)
    _close(out, A * 3.0)
