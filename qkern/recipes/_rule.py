"""Quantisation rules for whole models, and the report of what they did.

    rules = [
        qkern.Rule(where=r".*embed.*", fmt=None),                  # keep dense
        qkern.Rule(where=r".*attn.*kernel", fmt="nf4", block_size=64),
        qkern.Rule(where=r".*mlp.*kernel", fmt="int8", act_fmt="int8"),   # W8A8
    ]
    qparams, report = qkern.quantize(params, rules=rules, report=True)
    print(report)

Each floating leaf is claimed by the first rule whose `where` matches its key path; a rule
with `fmt=None` claims the leaf and keeps it dense. Leaves no rule claims stay dense
(`choose_rule`, shared by quantize, GPTQ's tree walk and fake_quant).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..formats import get_format, parse_calibration
from ..formats._quantize import check_options
from ..types.lora import LoraArray, with_parts
from ..types.qarray import QArray, as_compute_dtype
from ._paths import selector

ACT_FORMATS = ("int8",)
_PlainArray = (jax.Array, np.ndarray)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a quantisation recipe: which leaves (`where`) get which format.

    where: a regex matched in full against the key path ("layers/0/attn/kernel"), a
    predicate `(path, leaf) -> bool`, or None for every leaf.
    fmt: a weight format ("int8", "int4", "nf4", "fp8_e4m3", ...), or None to keep the
    matched leaves dense (a rule that skips).
    block_size, axis, calibration, scale_dtype, double_quant: as in `qkern.quantize`.
    act_fmt: "int8" quantises the activations that meet this weight in a matmul too
    (W8A8, needs fmt="int8" with symmetric calibration): per row on the fly, or with the
    static per-tensor scale that `qkern.calibrate` records.
    compute_dtype: "bfloat16", "float16" or "float32": matmuls against this weight compute
    in it (float32 accumulation), as in `qkern.quantize`; None: as dense JAX.
    min_size: leaves with fewer elements stay dense (listed as such in the report).

    A rule checks its fields when it is written, with `qkern.quantize`'s messages: the
    types (block_size and axis are ints, not floats or bools), a known format, the block
    sizes and calibrations that format takes, and a `where` regex that compiles
    (ValueError naming it). Only what depends on a leaf (its shape) is checked at use.
    """

    where: str | Callable | None = None
    fmt: str | None = "int8"
    block_size: int | None = None
    axis: int | None = -2
    calibration: Any = "absmax"
    scale_dtype: Any = None
    double_quant: bool = False
    act_fmt: str | None = None
    min_size: int = 1024
    compute_dtype: Any = None

    def __post_init__(self):
        # Everything that does not depend on a leaf fails when the rule is written, with
        # the messages `qkern.quantize` gives for the same options.
        selector(self.where)              # a bad regex, or a `where` of the wrong type
        check_options(self.fmt, block_size=self.block_size, axis=self.axis,
                      calibration=self.calibration, scale_dtype=self.scale_dtype,
                      double_quant=self.double_quant)
        object.__setattr__(self, "compute_dtype",
                           as_compute_dtype(self.compute_dtype))
        if self.compute_dtype is not None and self.act_fmt is not None:
            raise ValueError(
                f"Rule(act_fmt={self.act_fmt!r}, compute_dtype={self.compute_dtype.name!r}): a "
                "W8A8 weight multiplies int8 activations by int8 codes, so a compute dtype "
                "does not apply; give one or the other.")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)):
            raise TypeError(f"min_size must be an int, got {self.min_size!r}.")
        if self.act_fmt is not None:
            if self.act_fmt not in ACT_FORMATS:
                raise ValueError(f"Rule(act_fmt={self.act_fmt!r}): activation formats are "
                                 f"{', '.join(ACT_FORMATS)} (or None for weight-only).")
            if self.fmt is None or get_format(self.fmt).name != "int8":
                raise ValueError(f"Rule(act_fmt={self.act_fmt!r}) runs the W8A8 kernel, which "
                                 f"needs fmt='int8' weights; got fmt={self.fmt!r}.")
            if parse_calibration(self.calibration).method == "minmax":
                raise ValueError("Rule(act_fmt='int8') needs symmetric int8 weights; "
                                 "calibration='minmax' adds zero points.")

    def options(self) -> dict:
        """The keyword arguments of `qkern.quantize` for one leaf."""
        return dict(block_size=self.block_size, axis=self.axis, calibration=self.calibration,
                    scale_dtype=self.scale_dtype, double_quant=self.double_quant)

    def describe(self) -> str:
        parts = [f"fmt={self.fmt!r}"]
        if self.block_size is not None:
            parts.append(f"block_size={self.block_size}")
        if self.act_fmt is not None:
            parts.append(f"act_fmt={self.act_fmt!r}")
        if self.compute_dtype is not None:
            parts.append(f"compute_dtype={self.compute_dtype.name!r}")
        return f"Rule(where={_where_str(self.where)}, {', '.join(parts)})"




def is_plain_array(x: Any) -> bool:
    """An array leaf that rules can claim: a jax or numpy array, not a QArray, not a typed
    PRNG key (NNX modules hold them; NumPy cannot even name their dtype)."""
    return (isinstance(x, _PlainArray) and not isinstance(x, QArray)
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _weight_node(v) -> bool:
    return isinstance(v, (QArray, LoraArray))


def map_weights(fn: Callable[[Any, Any], Any], tree: Any) -> Any:
    """`tree_map_with_path(fn, tree)` over the weights a recipe may quantise: QArrays are
    leaves, and a LoraArray is its frozen base `w`, under the LoraArray's own path (the
    path the weight had before `loraify`); its trainable factors are never touched."""
    def one(path, v):
        if not isinstance(v, LoraArray):
            return fn(path, v)
        if v.w is None:                             # the trainable half of lora.partition
            return v
        return with_parts(v, [fn(path, v.w)] + [f for f in (v.a, v.b) if f is not None])
    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_weight_node)


def weights_with_path(tree: Any) -> list[tuple[Any, Any]]:
    """[(path, weight)] in `map_weights`' sense."""
    return [(p, v.w if isinstance(v, LoraArray) else v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_weight_node)]


def choose_rule(path: str, v, rules: Sequence[Rule], selects) -> tuple[int | None, str | None]:
    """(index of the rule that claims this array leaf or None, why it stays dense or None)."""
    if not jnp.issubdtype(v.dtype, jnp.floating):
        return None, "not floating"
    i = next((i for i, s in enumerate(selects) if s(path, v)), None)
    if i is None:
        return None, "no rule"
    r = rules[i]
    if r.fmt is None:
        return i, "kept dense by rule"
    if v.ndim < 2 or v.size < r.min_size:
        return i, "rank < 2" if v.ndim < 2 else f"< min_size={r.min_size} elements"
    return i, None


def _where_str(where) -> str:
    if where is None or isinstance(where, str):
        return repr(where)
    return getattr(where, "__name__", repr(where))


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One array leaf: where it is, what happened to it, and its bytes before and after."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    fmt: str | None          # the format it was quantised to, or None (kept dense)
    rule: int | None         # index of the rule that claimed it, or None
    bytes_before: int
    bytes_after: int
    note: str = ""           # why a leaf stayed dense, or extras (block size, act_fmt)


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What `qkern.quantize(..., report=True)` did, leaf by leaf; `print(report)` shows a
    table. `bytes_before`/`bytes_after` cover every array leaf of the tree."""

    rows: tuple[ReportRow, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def quantised(self) -> tuple[ReportRow, ...]:
        return tuple(r for r in self.rows if r.fmt is not None)

    @property
    def ratio(self) -> float:
        """How many times smaller the tree got (bytes before / bytes after)."""
        return self.bytes_before / max(self.bytes_after, 1)

    def __getitem__(self, path: str) -> ReportRow:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(f"no leaf {path!r} in the report; paths: {[r.path for r in self.rows]}")

    def table(self) -> str:
        head = ("path", "shape", "dtype", "format", "rule", "before", "after", "note")
        body = [(r.path, "x".join(map(str, r.shape)) or "()", r.dtype, r.fmt or "dense",
                 "-" if r.rule is None else str(r.rule), _human(r.bytes_before),
                 _human(r.bytes_after), r.note) for r in self.rows]
        total = ("total", "", "", f"{len(self.quantised)}/{len(self.rows)} quantised", "",
                 _human(self.bytes_before), _human(self.bytes_after), f"{self.ratio:.2f}x smaller")
        widths = [max(len(str(row[i])) for row in (head, *body, total)) for i in range(len(head))]
        right = {5, 6}

        def line(row):
            cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), rule, *map(line, body), rule, line(total)])

    __str__ = table

    def __repr__(self) -> str:
        return (f"QuantReport({len(self.quantised)}/{len(self.rows)} leaves quantised, "
                f"{_human(self.bytes_before)} -> {_human(self.bytes_after)})")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def nbytes(x) -> int:
    """Bytes of an array or a QArray's storage."""
    if hasattr(x, "nbytes") and callable(x.nbytes):
        return int(x.nbytes())
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
