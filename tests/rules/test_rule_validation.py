"""qkern.Rule checks its fields when it is written, with qkern.quantize's messages; a bad
regex in `where` (Rule, quantize's pytree form, loraify) is a ValueError naming it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qkern

W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


def _error(fn):
    with pytest.raises((TypeError, ValueError)) as e:
        fn()
    return e.value


# Options that no leaf can make right: Rule refuses them as quantize(w, ...) does, with
# the same exception type and message.
SAME_AS_QUANTIZE = [
    ("int8", dict(block_size=3.5)),
    ("int8", dict(block_size="8")),
    ("int8", dict(block_size=True)),
    ("int8", dict(block_size=np.float32(8))),
    ("int8", dict(block_size=0)),
    ("int8", dict(block_size=-4)),
    ("nf4", dict(block_size=33)),
    ("mxfp4", dict(block_size=64)),
    ("mxfp4", dict(axis=None)),
    ("int8", dict(scale_dtype=jnp.int8)),
    ("nf4", dict(calibration="minmax")),
    ("int4", dict(calibration="minmax", double_quant=True)),
    ("int9", {}),
]


@pytest.mark.parametrize("fmt,kw", SAME_AS_QUANTIZE, ids=lambda v: repr(v))
def test_rule_refuses_what_quantize_refuses_with_its_message(fmt, kw):
    by_quantize = _error(lambda: qkern.quantize(W, fmt, **kw))
    by_rule = _error(lambda: qkern.Rule(where=r".*", fmt=fmt, **kw))
    assert type(by_rule) is type(by_quantize)
    assert str(by_rule) == str(by_quantize)


def test_calibration_that_the_format_cannot_take():
    # quantize's message shows the parsed Calibration(...); the rule's the option as written
    with pytest.raises(ValueError, match=r"^mxfp8 scales are powers of two from each block's "
                                         r"absmax; calibration='rms' does not apply\.$"):
        qkern.Rule(fmt="mxfp8", calibration="rms")
    with pytest.raises(ValueError, match=r"^mxfp8 scales are powers of two"):
        qkern.quantize(W, "mxfp8", calibration="rms")


def test_block_size_is_not_truncated():
    with pytest.raises(TypeError, match=r"block_size must be an int or None, got 3\.5"):
        qkern.Rule(block_size=3.5)
    with pytest.raises(TypeError, match=r"got '8'"):
        qkern.Rule(fmt="nf4", block_size="8")
    # numpy integers are ints; a rule with fmt=None still checks its types
    assert qkern.Rule(block_size=np.int64(32)).block_size == 32
    with pytest.raises(TypeError, match="block_size"):
        qkern.Rule(fmt=None, block_size=2.0)


@pytest.mark.parametrize("axis", [1.0, "0", True, (0,)])
def test_axis_must_be_an_int_or_none(axis):
    with pytest.raises(TypeError, match=r"axis must be an int .*or None .*got " + re.escape(repr(axis))):
        qkern.Rule(axis=axis)


def test_good_axes_and_formats_are_accepted():
    for axis in (None, 0, -1, np.int32(1)):
        qkern.Rule(axis=axis)
    qkern.Rule(fmt=None)
    qkern.Rule(fmt="mxfp4", block_size=32)
    with pytest.raises(ValueError, match="with axis=None"):  # per tensor has no blocks:
        qkern.Rule(fmt="nf4", block_size=33, axis=None)        # refused, not ignored


def test_unknown_format_and_scale_dtype_fail_when_written():
    with pytest.raises(ValueError, match="Unknown quantisation format 'nf5'"):
        qkern.Rule(fmt="nf5")
    with pytest.raises(TypeError, match="scale_dtype must be a floating dtype"):
        qkern.Rule(scale_dtype="not a dtype")
    with pytest.raises(TypeError, match="min_size must be an int"):
        qkern.Rule(min_size=1.5)


def test_where_of_a_wrong_type_fails_when_written():
    with pytest.raises(TypeError, match="`where` must be a regex string or a predicate"):
        qkern.Rule(where=3)


BAD = r"layers/([0-9/kernel"


def _is_bad_regex_error(e: BaseException):
    assert isinstance(e, ValueError) and not isinstance(e, re.error)
    msg = str(e)
    assert repr(BAD) in msg and "not a valid regular expression" in msg
    assert "missing ), unterminated subpattern" in msg or "unterminated" in msg


def test_bad_regex_in_rule_fails_when_written():
    with pytest.raises(ValueError) as e:
        qkern.Rule(where=BAD, fmt="int8")
    _is_bad_regex_error(e.value)


def test_bad_regex_in_quantize_where():
    with pytest.raises(ValueError) as e:
        qkern.quantize({"layers": [{"kernel": W}]}, "int8", where=BAD)
    _is_bad_regex_error(e.value)


def test_bad_regex_in_loraify():
    with pytest.raises(ValueError) as e:
        qkern.loraify({"kernel": jnp.asarray(W)}, rank=2, key=jax.random.PRNGKey(0), where=BAD)
    _is_bad_regex_error(e.value)
