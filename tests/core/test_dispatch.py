"""Multiple dispatch: specificity, precedence, ambiguity, the resolution cache, varargs,
and the errors `qkern.register` gives for bad rules.

Every test defines fresh Value types, so the rules it registers (which are global) cannot
match anything in another test.
"""

import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

X = jnp.array([1.0, 2.0, 3.0], jnp.float32)


def family():
    """Fresh (Base, Sub, Other) Value types; Sub subclasses Base."""

    class Base(qkern.ArrayValue):
        a: jax.Array

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

        def materialise(self):
            return self.a

    class Sub(Base):
        pass

    class Other(qkern.ArrayValue):
        a: jax.Array

        def aval(self):
            return jax.core.ShapedArray(jnp.shape(self.a), jnp.result_type(self.a))

        def materialise(self):
            return self.a

    return Base, Sub, Other


def marker(k):
    """A rule body returning the constant k with the first operand's shape."""
    def body(*args, **params):
        shape = args[0].shape
        return jnp.full(shape, float(k), jnp.float32)
    return body


def which(out) -> float:
    out = np.asarray(out)
    assert np.all(out == out.flat[0]), out
    return float(out.flat[0])


# -- specificity -----------------------------------------------------------------------
@pytest.mark.parametrize("sub_first", [False, True])
def test_subclass_rule_beats_base_class_rule(sub_first):
    Base, Sub, _ = family()

    def rule_base(x: Base, **params):
        return marker(1)(x)

    def rule_sub(x: Sub, **params):
        return marker(2)(x)

    order = [(rule_sub), (rule_base)] if sub_first else [rule_base, rule_sub]
    for r in order:
        qkern.register(jax.lax.sin_p)(r)
    f = qkern.quaxify(jax.lax.sin)
    assert which(f(Sub(X))) == 2
    assert which(f(Base(X))) == 1


def test_concrete_type_beats_object_and_arraylike():
    Base, Sub, Other = family()

    @qkern.register(jax.lax.add_p)
    def rule_object(x: Base, y: object, **params):
        return marker(1)(x)

    @qkern.register(jax.lax.add_p)
    def rule_array(x: Base, y: qkern.ArrayLike, **params):
        return marker(2)(x)

    @qkern.register(jax.lax.add_p)
    def rule_other(x: Base, y: Other, **params):
        return marker(3)(x)

    f = qkern.quaxify(jax.lax.add)
    assert which(f(Base(X), X)) == 2
    assert which(f(Base(X), 2.0)) == 2  # Python scalars are ArrayLike
    assert which(f(Base(X), Other(X))) == 3
    assert which(f(Base(X), Base(X))) == 1  # only `object` matches a Base second operand
    assert which(f(Sub(X), Other(X))) == 3  # inherited through the subclass


def test_object_only_rule_matches_any_value():
    Base, Sub, Other = family()

    @qkern.register(jax.lax.cos_p)
    def rule_any(x: object, **params):
        return marker(7)(x)

    f = qkern.quaxify(jax.lax.cos)
    for v in (Base(X), Sub(X), Other(X)):
        assert which(f(v)) == 7


def test_jax_array_annotation_is_arraylike():
    Base, _, _ = family()

    @qkern.register(jax.lax.mul_p)
    def rule(x: jax.Array, y: Base, **params):
        return marker(4)(y)

    f = qkern.quaxify(jax.lax.mul)
    assert which(f(X, Base(X))) == 4
    # A Value is not ArrayLike: (Base, Base) does not match, so it falls back to default.
    np.testing.assert_allclose(f(Base(X), Base(X)), X * X)


@pytest.mark.parametrize("spelling", ["pipe", "typing.Union"])
def test_union_annotation(spelling):
    Base, Sub, Other = family()
    union = (Base | Other) if spelling == "pipe" else typing.Union[Base, Other]

    def rule_union(x: union, **params):
        return marker(1)(x)

    def rule_other(x: Other, **params):
        return marker(2)(x)

    qkern.register(jax.lax.exp_p)(rule_union)
    qkern.register(jax.lax.exp_p)(rule_other)
    f = qkern.quaxify(jax.lax.exp)
    assert which(f(Base(X))) == 1
    assert which(f(Sub(X))) == 1
    assert which(f(Other(X))) == 2  # the single type is more specific than the union


def test_union_with_arraylike():
    Base, _, Other = family()

    @qkern.register(jax.lax.sub_p)
    def rule(x: Base | qkern.ArrayLike, y: Base | qkern.ArrayLike, **params):
        return marker(5)(x)

    f = qkern.quaxify(jax.lax.sub)
    assert which(f(Base(X), X)) == 5
    assert which(f(X, Base(X))) == 5
    assert which(f(Base(X), Base(X))) == 5
    # Other is not in the union: default (materialise) applies.
    np.testing.assert_allclose(f(Base(X), Other(2 * X)), -X)


# -- precedence and ambiguity ----------------------------------------------------------
@pytest.mark.parametrize("high_first", [False, True])
def test_precedence_breaks_a_tie(high_first):
    Base, _, _ = family()

    def rule_low(x: Base, **params):
        return marker(1)(x)

    def rule_high(x: Base, **params):
        return marker(2)(x)

    regs = [(rule_high, 1), (rule_low, 0)]
    for fn, p in (regs if high_first else regs[::-1]):
        qkern.register(jax.lax.tanh_p, precedence=p)(fn)
    assert which(qkern.quaxify(jax.lax.tanh)(Base(X))) == 2


def test_remaining_tie_raises_ambiguous_rule_error_naming_both_rules():
    Base, _, _ = family()

    def rule_left_of_tie(x: Base, y: object, **params):
        return marker(1)(x)

    def rule_right_of_tie(x: object, y: Base, **params):
        return marker(2)(x)

    qkern.register(jax.lax.max_p)(rule_left_of_tie)
    qkern.register(jax.lax.max_p)(rule_right_of_tie)
    f = qkern.quaxify(jax.lax.max)
    with pytest.raises(qkern.AmbiguousRuleError) as info:
        jax.make_jaxpr(f)(Base(X), Base(X))  # at trace time
    assert isinstance(info.value, TypeError)
    msg = str(info.value)
    assert "rule_left_of_tie" in msg and "rule_right_of_tie" in msg
    # Each rule alone still resolves where it is the only match.
    assert which(f(Base(X), X)) == 1
    assert which(f(X, Base(X))) == 2


def test_identical_signatures_same_precedence_are_ambiguous():
    Base, _, _ = family()

    def first_identical(x: Base, **params):
        return marker(1)(x)

    def second_identical(x: Base, **params):
        return marker(2)(x)

    qkern.register(jax.lax.log_p, precedence=3)(first_identical)
    qkern.register(jax.lax.log_p, precedence=3)(second_identical)
    with pytest.raises(TypeError, match="first_identical[\\s\\S]*second_identical"):
        qkern.quaxify(jax.lax.log)(Base(X))


def test_ambiguity_is_resolved_by_precedence():
    Base, _, _ = family()

    def left(x: Base, y: object, **params):
        return marker(1)(x)

    def right(x: object, y: Base, **params):
        return marker(2)(x)

    qkern.register(jax.lax.min_p)(left)
    qkern.register(jax.lax.min_p, precedence=1)(right)
    assert which(qkern.quaxify(jax.lax.min)(Base(X), Base(X))) == 2


def test_ambiguous_rule_error_surfaces_through_jnp_and_jit():
    Base, _, _ = family()

    def amb_one(x: Base, y: object, **params):
        return marker(1)(x)

    def amb_two(x: object, y: Base, **params):
        return marker(2)(x)

    qkern.register(jax.lax.pow_p)(amb_one)
    qkern.register(jax.lax.pow_p)(amb_two)
    f = jax.jit(qkern.quaxify(lambda a, b: jnp.power(a, b)))
    with pytest.raises(qkern.AmbiguousRuleError, match="amb_one"):
        f(Base(X), Base(X))


# -- the resolution cache ----------------------------------------------------------------
def test_resolution_cache_cleared_by_a_new_rule():
    Base, Sub, _ = family()
    f = qkern.quaxify(jax.lax.sin)
    # No rule yet: the default materialises.
    np.testing.assert_allclose(f(Sub(X)), jnp.sin(X), rtol=1e-6)

    @qkern.register(jax.lax.sin_p)
    def rule_base(x: Base, **params):
        return marker(1)(x)

    assert which(f(Sub(X))) == 1  # the cached "no rule" was dropped
    assert which(f(Sub(X))) == 1  # and the new answer is cached consistently

    @qkern.register(jax.lax.sin_p)
    def rule_sub(x: Sub, **params):
        return marker(2)(x)

    assert which(f(Sub(X))) == 2
    assert which(f(Base(X))) == 1

    @qkern.register(jax.lax.sin_p, precedence=1)
    def rule_sub_again(x: Sub, **params):
        return marker(3)(x)

    assert which(f(Sub(X))) == 3
    assert which(jax.jit(f)(Sub(X))) == 3


# -- varargs ---------------------------------------------------------------------------
def test_varargs_rule_receives_every_operand():
    Base, _, _ = family()
    seen = []

    @qkern.register(jax.lax.concatenate_p)
    def rule_concat(*args: Base | qkern.ArrayLike, dimension, **params):
        seen.append(tuple(type(a).__name__ if isinstance(a, qkern.Value) else "array"
                          for a in args))
        return jnp.concatenate([a.a if isinstance(a, Base) else a for a in args]) * 10

    f = qkern.quaxify(lambda *xs: jax.lax.concatenate(xs, 0))
    out = f(Base(X), X, Base(2 * X))
    np.testing.assert_allclose(out, 10 * jnp.concatenate([X, X, 2 * X]))
    assert seen == [("Base", "array", "Base")]
    out = f(X, Base(X))
    np.testing.assert_allclose(out, 10 * jnp.concatenate([X, X]))
    assert seen[-1] == ("array", "Base")


def test_positional_then_varargs_is_more_specific_than_varargs_alone():
    Base, Sub, _ = family()

    @qkern.register(jax.lax.concatenate_p)
    def rule_all(*args: Base | qkern.ArrayLike, dimension, **params):
        return jnp.full((sum(a.shape[0] for a in args),), 1.0)

    @qkern.register(jax.lax.concatenate_p)
    def rule_sub_first(x: Sub, *rest: Base | qkern.ArrayLike, dimension, **params):
        return jnp.full((x.shape[0] + sum(a.shape[0] for a in rest),), 2.0)

    f = qkern.quaxify(lambda *xs: jax.lax.concatenate(xs, 0))
    assert which(f(Sub(X), X, X)) == 2
    # zero varargs still matches (lax.concatenate short-circuits one operand: bind directly)
    one = qkern.quaxify(lambda x: jax.lax.concatenate_p.bind(x, dimension=0))
    assert which(one(Sub(X))) == 2
    assert which(f(Base(X), Sub(X))) == 1
    assert f(Sub(X), X, X).shape == (9,)


# -- bad rules at registration ---------------------------------------------------------
def test_unannotated_operand_accepts_any_type():
    # As in Quax: an operand without an annotation matches every type (least specific).
    Base, _, _ = family()

    @qkern.register(jax.lax.add_p)
    def rule(x: Base, y, **params):
        return jnp.full(x.shape, 7.0)

    f = qkern.quaxify(lambda a, b: a + b)
    assert float(f(Base(X), X)[0]) == 7.0
    assert float(f(Base(X), Base(X))[0]) == 7.0


def test_unannotated_varargs_accept_any_type():
    Base, _, _ = family()

    @qkern.register(jax.lax.concatenate_p)
    def rule(x: Base, *rest, dimension, **params):
        return jnp.full((x.shape[0] + sum(a.shape[0] for a in rest),), 4.0)

    f = qkern.quaxify(lambda *xs: jax.lax.concatenate(xs, 0))
    assert float(f(Base(X), X)[0]) == 4.0


def test_rule_with_only_keyword_parameters_is_a_type_error():
    with pytest.raises(TypeError):
        @qkern.register(jax.lax.sin_p)
        def _(**params):
            return 0


def test_keyword_only_operand_is_a_type_error():
    Base, _, _ = family()
    with pytest.raises(TypeError, match="keyword-only"):
        @qkern.register(jax.lax.add_p)
        def _(x: Base, *, y: Base):
            return x
    with pytest.raises(TypeError, match="'y'"):
        @qkern.register(jax.lax.add_p)
        def _(x: Base, *, y: qkern.ArrayLike, **params):
            return x


@pytest.mark.parametrize("annotation,written", [
    (str, "str"), (list[int], "list[int]"), (int | str, "int | str"),
])
def test_unsupported_annotation_is_a_type_error_naming_it(annotation, written):
    def rule(x, **params):
        return x
    rule.__annotations__ = {"x": annotation}
    with pytest.raises(TypeError, match=r"annotated " + re.escape(written) + ";"):
        qkern.register(jax.lax.sin_p)(rule)


@pytest.mark.parametrize("not_a_primitive", [
    "mul", jax.lax.mul, jnp.multiply, lambda x: x, None, 3,
], ids=["str", "lax_function", "jnp_function", "lambda", "None", "int"])
def test_registering_for_a_non_primitive_is_a_type_error(not_a_primitive):
    with pytest.raises(TypeError):
        qkern.register(not_a_primitive)


def test_a_rejected_rule_is_not_registered():
    Base, _, _ = family()
    with pytest.raises(TypeError):
        @qkern.register(jax.lax.sin_p)
        def _(x: Base, *, y: Base):
            return marker(99)(x)
    np.testing.assert_allclose(qkern.quaxify(jax.lax.sin)(Base(X)), jnp.sin(X), rtol=1e-6)


def test_arraylike_is_an_annotation_not_a_type():
    assert isinstance(jnp.ones(2), qkern.ArrayLike)
    assert isinstance(np.ones(2), qkern.ArrayLike)
    assert isinstance(1.5, qkern.ArrayLike)
    Base, _, _ = family()
    assert not isinstance(Base(X), qkern.ArrayLike)
    assert not isinstance("text", qkern.ArrayLike)
    with pytest.raises(TypeError):
        qkern.ArrayLike()
