"""The one place that touches JAX internals or papers over JAX version differences.

Supported: jax 0.10.x and 0.11.x. Everything here is either a public `jax.extend` name or
an internal protocol (custom_vjp's flattened fwd/bwd calling conventions) that has moved
between releases; keep such knowledge here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.core
import numpy as np
import jax.extend.core as _ext_core
from jax.extend.core import primitives as _prims

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])

Primitive = _ext_core.Primitive
TraceTag = _ext_core.TraceTag
ClosedJaxpr = _ext_core.ClosedJaxpr
Jaxpr = _ext_core.Jaxpr
jaxpr_as_fun = _ext_core.jaxpr_as_fun
take_current_trace = _ext_core.take_current_trace
set_current_trace = _ext_core.set_current_trace
Trace = jax.core.Trace
Tracer = jax.core.Tracer
eval_jaxpr = jax.core.eval_jaxpr
ShapedArray = jax.core.ShapedArray

jit_p = _prims.jit_p
cond_p = _prims.cond_p
while_p = _prims.while_p
scan_p = _prims.scan_p
remat_p = _prims.remat_p
custom_jvp_call_p = _prims.custom_jvp_call_p
custom_vjp_call_p = _prims.custom_vjp_call_p

from jax._src import ad_util as _ad_util  # noqa: E402
from jax._src import core as _core  # noqa: E402

# `lax.ragged_dot` / `lax.ragged_dot_general` bind this primitive; it is not public in jax
# 0.10 to 0.12 (`jax.lax` exports only the functions).
ragged_dot_general_p = getattr(jax.lax, "ragged_dot_general_p", None)
if ragged_dot_general_p is None:
    from jax._src.lax.lax import ragged_dot_general_p  # noqa: E402


def jaxprs_in_params(params: dict) -> bool:
    """Whether a primitive's params hold a jaxpr (it is a higher-order primitive)."""
    for v in params.values():
        vs = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(x, (ClosedJaxpr, Jaxpr)) for x in vs):
            return True
    return False


@contextlib.contextmanager
def no_leaks(trace: Any):
    """Invalidate `trace` on exit; under `jax.checking_leaks()` report tracers that escaped."""
    ensure = getattr(_core, "ensure_no_leaks", None)
    if ensure is None:
        yield
        trace.invalidate()
        return
    with ensure(trace):
        del trace
        yield


def is_symbolic_zero(x: Any) -> bool:
    return type(x) in (_ad_util.Zero, _ad_util.SymbolicZero)


def instantiate(x: Any, like_aval: Any = None) -> Any:
    """A symbolic zero (internal `Zero` or `SymbolicZero`) made into a real zero array."""
    if not is_symbolic_zero(x):
        return x
    aval = x.aval if like_aval is None else like_aval
    if aval.dtype == jax.dtypes.float0:
        return np.zeros(aval.shape, jax.dtypes.float0)
    return jax.numpy.zeros(aval.shape, aval.dtype)


def call_custom_vjp_fwd(fwd, out_trees: Callable, primals: list) -> tuple[list, list]:
    """Run custom_vjp's flattened fwd as JAX's own JVP does; return (residuals, outputs).

    jax 0.10/0.11 protocol: fwd takes (primal, perturbed) pairs interleaved, returns the
    residuals that are not forwarded inputs followed by the primal outputs; `out_trees()`
    then gives (out_tree, res_tree, input_forwards) where input_forwards[i] is the index of
    the input that residual i is, or None.
    """
    flat = []
    for p in primals:
        flat += [p, True]
    res_and_out = fwd.call_wrapped(*flat)
    _, res_tree, input_fwds = out_trees()
    num_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    res_out, outs = list(res_and_out[:num_res_out]), list(res_and_out[num_res_out:])
    it = iter(res_out)
    res = [next(it) if f is None else primals[f] for f in input_fwds]
    return res, outs


def call_custom_vjp_bwd(bwd, res: list, cts: list, in_avals: list) -> list:
    """Run custom_vjp's flattened bwd; symbolic-zero cotangents come back as zeros."""
    cts_in = bwd.call_wrapped(*res, *cts)
    # Newer JAX (custom_vjp with logs) returns (cotangents, logs).
    if isinstance(cts_in, tuple) and len(cts_in) == 2 and isinstance(cts_in[0], list):
        cts_in = cts_in[0]
    return [instantiate(c, a) for c, a in zip(cts_in, in_avals)]


def call_custom_jvp(jvp, primals: list, tangents: list, *, dry_run: bool = False
                    ) -> tuple[list, list]:
    """Run custom_jvp's flattened jvp (primals then tangents in, outputs then tangents out).

    Symbolic-zero output tangents come back as None. With `dry_run`, the jvp's output stores
    are emptied afterwards, so that JAX, which allows either the function or its jvp to
    have run, still sees neither (qkern runs it only to learn its output types).
    """
    try:
        outs = jvp.call_wrapped(*primals, *tangents)
    finally:
        if dry_run:
            for store in getattr(jvp, "stores", ()) or ():
                if store is not None:
                    store.reset()
    n = len(outs) // 2
    outs_p, outs_t = list(outs[:n]), list(outs[n:])
    return outs_p, [None if is_symbolic_zero(t) else t for t in outs_t]


def scan_counts(params: dict) -> tuple[int, int]:
    """(num_consts, num_carry) of a scan equation.

    jax 0.10 has them as params; later releases describe operands with FlatTree params
    `ft_in` = (consts, carry, xs).
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    # Count the FlatTree's values, not pytree leaves: its values may be placeholders
    # (None), which `tree_leaves` would drop.
    return len(list(consts.vals)), len(list(carry.vals))


def eval_open_jaxpr(jaxpr, *args):
    """Evaluate a remat-style jaxpr (an open Jaxpr; newer JAX may attach its consts)."""
    return eval_jaxpr(jaxpr, tuple(getattr(jaxpr, "consts", ()) or ()), *args)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes `x` varies over inside `shard_map` (empty elsewhere)."""
    try:
        return aval_vma(jax.typeof(x))
    except TypeError:
        return frozenset()


def vary_like(x: Any, *refs: Any) -> Any:
    """`x` marked as varying over every manual mesh axis any of `refs` varies over.

    A `lax.scan` carry initialised with `jnp.zeros` is replicated; inside `shard_map` with
    `check_vma=True` its body output varies like the operands, and scan refuses the
    mismatch. Outside `shard_map` this returns `x` unchanged.
    """
    want = frozenset().union(*(_vma(r) for r in refs))
    missing = tuple(sorted(want - _vma(x)))
    if not missing:
        return x
    return jax.lax.pcast(x, missing, to="varying")


# -- varying manual axes (shard_map with check_vma=True) --------------------------------
# jax 0.10 keeps them in `aval.manual_axis_type.varying` (`aval.mat` for short); earlier
# releases had `aval.vma`, and later ones may again.
pvary_p = getattr(_core, "pvary_p", None)


def aval_vma(aval: Any) -> frozenset:
    """The manual mesh axes an abstract value varies over (empty outside `shard_map`)."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()) or ())
    return frozenset(getattr(aval, "vma", ()) or ())


def aval_with_vma(aval: Any, vma: frozenset, like: Any) -> Any:
    """`aval` varying over `vma`, on the mesh of the abstract value `like` (one that
    varies over those axes: a leaf of the same Value). The sharding spec is replicated,
    which is what every value inside a fully manual `shard_map` has."""
    if not vma or aval_vma(aval) == vma or not hasattr(aval, "update"):
        return aval
    sharding = getattr(like, "sharding", None)
    kw: dict = {}
    if sharding is not None and hasattr(sharding, "update"):
        ndim = len(aval.shape)
        kw["sharding"] = sharding.update(
            spec=jax.sharding.PartitionSpec(*[None] * ndim))
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        kw["manual_axis_type"] = mat.update(varying=frozenset(vma))
    else:
        kw["vma"] = frozenset(vma)
    return aval.update(**kw)


def pvary_leaf(x: Any, axes: tuple, params: dict) -> Any:
    """`pvary_p` on one array, over those of `axes` it does not vary over yet (the leaves
    of one Value may vary over fewer axes than the Value: a replicated scale beside
    sharded codes)."""
    have = _vma(x)
    todo = tuple(a for a in axes if a not in have)
    if not todo:
        return x
    return pvary_p.bind(x, **dict(params, axes=todo))


# -- explicit-axis meshes (jax.make_mesh's default: AxisType.Explicit) ------------------
def _explicit(sharding: Any) -> Any:
    """`sharding` if it is on a mesh with Explicit axes, else None."""
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ()
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    if explicit is None or not any(t == explicit for t in types):
        return None
    return sharding


def explicit_sharding(x: Any) -> Any:
    """The sharding in `x`'s type when it lives on a mesh with Explicit axes, else None.

    On such meshes the sharding is part of the type: operations whose output sharding JAX
    cannot infer (a gather from a replicated table with sharded indices) need it spelled
    out, e.g. `table.at[idx].get(out_sharding=explicit_sharding(idx))`."""
    try:
        return aval_explicit_sharding(jax.typeof(x))
    except TypeError:
        return None


def aval_explicit_sharding(aval: Any) -> Any:
    """`explicit_sharding` of an abstract value (a transpose rule's undefined primal)."""
    return _explicit(getattr(aval, "sharding", None))


# -- primitives that carry the jaxpr of a Python function ----------------------------------
from jax._src.interpreters import partial_eval as _pe  # noqa: E402


def trace_jaxpr(fun: Callable, *avals: Any) -> Any:
    """The closed jaxpr of `fun` (one array out) on `avals` (shapes, dtypes, shardings and
    varying manual axes included), its `out_avals` the result's type. Traced afresh on
    every call (a new function object: no trace cache), so choices `fun` makes while
    tracing (environment variables, the autotune cache) are read each time."""
    return jax.make_jaxpr(lambda *args: fun(*args))(*avals)


def lower_jaxpr(jaxpr: Any) -> Any:
    """A jaxpr with "high" primitives (newer JAX's hijax: `jnp.searchsorted` is one) in
    their low-level form, for a primitive's `to_lojax` rule that rebinds itself with it.
    Older JAX has no such primitives: the jaxpr is returned as it is."""
    lower = getattr(_pe, "lower_jaxpr2", None)
    return jaxpr if lower is None or not getattr(jaxpr, "is_high", False) else lower(jaxpr)


# -- lowering rules that choose by their lowering context ---------------------------------
from jax._src.interpreters import batching as _batching  # noqa: E402

not_mapped = getattr(_batching, "not_mapped", None)   # a batching rule's "no batch dim"


def lowering_is_local(ctx: Any) -> bool:
    """Whether a lowering rule's context is one device's plain compile: not `jax.export`
    (whose output may only hold custom calls with compatibility guarantees) and not an
    SPMD-partitioned program over several devices (whose partitioner would replicate an
    opaque custom call's operands) or a `shard_map`/`pmap` body."""
    module = ctx.module_context
    if getattr(getattr(module, "lowering_parameters", None), "for_export", False):
        return False
    axis = getattr(module, "axis_context", None)
    return type(axis).__name__ == "ShardingContext" and getattr(axis, "num_devices", 0) == 1


# -- lowering for a device this host does not have (jax.export) ----------------------------
# The Triton lowering asks for the target GPU's compute capability. jax 0.10 lowers for a
# generic CUDA target on any host; jax 0.12 reads it from the device and, on a host with
# no GPU, refuses unless an abstract GPU device is named through `use_abstract_mesh`.
EXPORT_GPU_KIND = "NVIDIA H100 80GB HBM3"   # sm_90: the GPUs qkern's Triton kernels target


def _target_device(platform: str):
    """A context in which lowering for `platform` needs no such local device."""
    if platform not in ("cuda", "rocm", "gpu"):
        return contextlib.nullcontext()
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice") or not hasattr(sharding, "use_abstract_mesh"):
        return contextlib.nullcontext()
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()   # a real GPU: lower for it
    device = sharding.AbstractDevice(device_kind=EXPORT_GPU_KIND, num_cores=132,
                                     platform="gpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=device))


TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def export(fn: Callable, platform: str, *args: Any) -> Any:
    """`jax.export.export(jax.jit(fn), platforms=[platform])(*args)` from any host.

    For `cuda` the Triton custom call's compatibility check is disabled (it carries no
    export-stability guarantee, and qkern never serialises it) and, on JAX releases that
    need one, an abstract GPU device (`EXPORT_GPU_KIND`) stands in for the absent GPU.
    """
    checks = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
              if platform in ("cuda", "rocm") else [])
    with _target_device(platform):
        return jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=checks)(*args)


# -- the TPU interpreter's race detector (tests) -------------------------------------------
def tpu_races_found() -> bool:
    """Whether the last `pallas_call` run under
    `pltpu.InterpretParams(detect_races=True)` found a data race.

    Raises AssertionError when the race detector did not run at all, so a test cannot
    pass by not checking."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp
    races = getattr(interp, "races", None)
    assert races is not None, "the TPU interpreter's race detector did not run"
    return bool(races.races_found)


def race_detecting_interpret_params(**kwargs: Any) -> Any:
    """`pltpu.InterpretParams(detect_races=True, **kwargs)` that records races rather than
    raising on the first (jax 0.12 raises by default; `tpu_races_found` reads the record)."""
    from jax.experimental.pallas import tpu as pltpu
    fields = {f.name for f in dataclasses.fields(pltpu.InterpretParams)}
    if "on_race" in fields:
        kwargs.setdefault("on_race", "warn")
    return pltpu.InterpretParams(detect_races=True, **kwargs)
