"""Sharded QArrays on 8 host devices. Run as a script (the test runs it in a subprocess,
because XLA_FLAGS must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/sharded_checks.py

Each check asserts; the script prints "ok <name>" (or "FAIL <name>" and the error) per check,
and "ALL OK" at the end when every check passed (else "FAILED: ..." and exit status 1).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qkern  # noqa: E402

assert jax.device_count() == 8, f"need 8 devices, got {jax.devices()}"
# XLA's SPMD partitioner (Auto axes) is the engine; see docs/models.md on Explicit meshes.
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(0)


def _w(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


params = {"w1": _w(256, 512) / 16, "w2": _w(512, 256) / 22, "w3": _w(256, 128) / 16,
          "b1": _w(512)}
rules = [qkern.Rule(r"w1", "nf4", block_size=64),                     # column parallel
         qkern.Rule(r"w2", "int8", block_size=128, act_fmt="int8"),   # row parallel, W8A8
         qkern.Rule(r"w3", "int4", block_size=64)]
SPECS = {"w1": P(None, "model"), "w2": P("model", None), "w3": P(None, "model"),
         "b1": P("model")}


def model(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return (h @ p["w2"]) @ p["w3"]


q = qkern.quantize(params, rules=rules)
x = _w(16, 256)
want = qkern.quaxify(model)(q, x)


FAILED = []


def check(name):
    """Run the check now; print "ok <name>", or "FAIL <name>" and the error, and go on."""
    def deco(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001 - reported; the script then exits 1
            FAILED.append(name)
            print(f"FAIL {name}\n    {type(e).__name__}: {str(e)[:2000]}", flush=True)
        else:
            print("ok", name, flush=True)
        return f
    return deco


@check("jit with NamedSharding equals unsharded")
def _():
    qs = qkern.shard(q, mesh, SPECS)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    got = jax.jit(qkern.quaxify(model))(qs, xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # in_shardings/out_shardings spelled out with qkern.shardings
    f = jax.jit(qkern.quaxify(model), in_shardings=(qkern.shardings(q, mesh, SPECS),
                                                     NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(f(q, x), want, rtol=1e-5, atol=1e-5)


@check("scales are sharded alongside their data")
def _():
    qs = qkern.shard(q, mesh, SPECS)
    w1, w2 = qs["w1"], qs["w2"]
    assert w1.data.sharding.spec == P(None, "model") and w1.scales.sharding.spec == P(None, "model")
    assert w2.data.sharding.spec == P("model", None) and w2.scales.sharding.spec == P("model", None)
    d0 = jax.devices()[0]
    shard_of = lambda a: next(s for s in a.addressable_shards if s.device == d0).data
    assert shard_of(w1.data).shape == (128, 128)        # [K/2 packed, N/4]
    assert shard_of(w1.scales).shape == (4, 128)        # 4 blocks of 64 along K, N/4
    assert shard_of(w2.data).shape == (128, 256)        # K/4 rows: one block of 128
    assert shard_of(w2.scales).shape == (1, 256)


@check("per-device bytes drop by the model axis")
def _():
    qs = qkern.shard(q, mesh, SPECS)
    per = qkern.per_device_bytes({k: qs[k] for k in ("w1", "w2", "w3")})
    total = sum(qs[k].nbytes() for k in ("w1", "w2", "w3"))
    assert len(per) == 8
    for dev, b in per.items():
        assert b == total // 4, (dev, b, total)
    dense = sum(params[k].nbytes for k in ("w1", "w2", "w3"))
    assert max(per.values()) * 4 * 3 < dense          # 4-8 bit and sharded 4 ways
    print(f"   bytes per device: {max(per.values())} of {total} quantised ({dense} dense)")


# shard_map bodies run with JAX's default check_vma=True: a QArray's tracer varies over
# the manual axes its leaves vary over, and pvary reaches its leaves (qkern/_core/_trace.py).
@check("shard_map: each device runs its own QArray shard")
def _():
    def body(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])            # local [B, 512/4]
        y = jax.lax.psum(h @ p["w2"], "model")           # row parallel: partial sums
        return y @ p["w3"]                               # local [B, 128/4]

    # Row-parallel W8A8 would give each device a quarter of every activation row, so its
    # per-row scales would differ from unsharded ones: this body runs w2 weight-only, and
    # W8A8 is checked column-parallel (whole rows) below.
    q_wo = dict(q, w2=qkern.quantize(params["w2"], "int8", block_size=128))
    want_wo = qkern.quaxify(model)(q_wo, x)
    f_wo = jax.jit(jax.shard_map(qkern.quaxify(body), mesh=mesh,
                                 in_specs=(qkern.partition_specs(q_wo, SPECS), P("data", None)),
                                 out_specs=P("data", "model")))
    np.testing.assert_allclose(f_wo(qkern.shard(q_wo, mesh, SPECS), x), want_wo,
                               rtol=1e-5, atol=1e-5)


@check("shard_map: column-parallel W8A8 equals unsharded exactly")
def _():
    w = qkern.quantize(params["w2"], "int8", act_fmt="int8")
    h = _w(16, 512)
    ref = qkern.quaxify(lambda w, h: h @ w)(w, h)
    f = jax.jit(jax.shard_map(qkern.quaxify(lambda w, h: h @ w), mesh=mesh,
                              in_specs=(qkern.partition_specs(w, P(None, "model")), P("data")),
                              out_specs=P("data", "model")))
    np.testing.assert_array_equal(f(w, h), ref)


@check("shard_map over a stacked QArray and scan inside")
def _():
    stack = qkern.quantize({"w": jnp.stack([_w(128, 128) / 11 for _ in range(3)])},
                           "int8", block_size=64)

    def body(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    ref = qkern.quaxify(body)(stack, x[:, :128])
    f = jax.jit(jax.shard_map(qkern.quaxify(body), mesh=mesh,
                              in_specs=(qkern.partition_specs(stack, P()), P("data")),
                              out_specs=P("data")))
    np.testing.assert_allclose(f(stack, x[:, :128]), ref, rtol=1e-6, atol=1e-6)


def _sm(body, in_specs, out_specs):
    return jax.jit(jax.shard_map(qkern.quaxify(body), mesh=mesh, in_specs=in_specs,
                                 out_specs=out_specs))


def _max_err(got, want):
    return float(jnp.max(jnp.abs(jnp.asarray(got) - jnp.asarray(want))))


# Column parallel: [in, out] weights split along out, x whole. Row parallel: split along
# in, x split alike, partial products summed with psum. 4-bit formats pack the two halves
# of their block axis into one byte, so row-parallel 4-bit weights are blocked along out.
# W8A8 row parallel uses a calibrated static activation scale (dynamic per-row scales
# would be taken over each device's quarter of a row); its act_scale leaf is replicated
# while the codes vary over "model": one Value with leaves of different varying axes.
COL_FORMATS = [("int8", {}), ("int4", dict(block_size=64)), ("nf4", dict(block_size=64)),
               ("w8a8", dict(act_fmt="int8"))]
ROW_FORMATS = [("int8", dict(block_size=128)), ("int4", dict(axis=-1, block_size=64)),
               ("nf4", dict(axis=-1, block_size=64)),
               ("w8a8", dict(act_fmt="int8", block_size=128))]
mm = lambda w, h: h @ w


def _q(w, name, kw, h):
    fmt = "int8" if name == "w8a8" else name
    qw = qkern.quantize(w, fmt, **kw)
    if name == "w8a8" and kw.get("block_size"):
        qw = qkern.calibrate(mm, qw, [h])
    return qw


@check("shard_map check_vma: column-parallel int8/int4/nf4/W8A8 equal unsharded")
def _():
    h = _w(16, 512)
    for name, kw in COL_FORMATS:
        w = _q(params["w2"], name, kw, h)
        want = qkern.quaxify(mm)(w, h)
        for x_spec, out_spec in [(P("data"), P("data", "model")), (P(), P(None, "model"))]:
            f = _sm(mm, (qkern.partition_specs(w, P(None, "model")), x_spec), out_spec)
            got = f(w, h)
            if name == "w8a8":      # whole rows on each device: the same codes and scales
                np.testing.assert_array_equal(got, want, err_msg=f"{name} x {x_spec}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{name} x {x_spec}")


@check("shard_map check_vma: row-parallel with psum, int8/int4/nf4/W8A8 equal unsharded")
def _():
    h = _w(16, 512)
    body = lambda w, h: jax.lax.psum(h @ w, "model")
    for name, kw in ROW_FORMATS:
        w = _q(params["w2"], name, kw, h)
        want = qkern.quaxify(mm)(w, h)
        f = _sm(body, (qkern.partition_specs(w, P("model", None)), P("data", "model")),
                P("data"))
        np.testing.assert_allclose(f(w, h), want, rtol=1e-5, atol=1e-5, err_msg=name)


def _stacked_mlp(fmt1, kw1, fmt2, kw2, layers=3, d=128, hidden=256):
    w1 = jnp.stack([_w(d, hidden) / 11 for _ in range(layers)])
    w2 = jnp.stack([_w(hidden, d) / 16 for _ in range(layers)])
    x0 = _w(16, d)
    p = {"w1": _q(w1, fmt1, kw1, x0), "w2": qkern.quantize(w2, "int8" if fmt2 == "w8a8" else fmt2, **kw2)}
    return p, x0


def megatron(p, x, psum=True):
    """Layers of a column-parallel up projection and a row-parallel down projection."""
    def layer(h, w):
        u = jax.nn.relu(h @ w["w1"])
        y = u @ w["w2"]
        return h + (jax.lax.psum(y, "model") if psum else y), None
    return jax.lax.scan(layer, x, p)[0]


def _calibrated_mlp(f1, k1, f2, k2):
    p, x0 = _stacked_mlp(f1, k1, f2, k2)
    if f2 == "w8a8":        # row-parallel W8A8 takes a static activation scale
        p = qkern.calibrate(lambda p, x: megatron(p, x, psum=False), p, [x0])
    return p, x0


MEGATRON_SPECS = {"w1": P(None, None, "model"), "w2": P(None, "model", None)}
MLP_CASES = [("nf4", dict(block_size=64), "int8", dict(block_size=64)),
             ("int4", dict(block_size=64), "nf4", dict(axis=-1, block_size=64)),
             ("w8a8", dict(act_fmt="int8"), "w8a8", dict(act_fmt="int8", block_size=64))]


@check("shard_map check_vma: lax.scan over stacked column/row-parallel layers")
def _():
    for f1, k1, f2, k2 in MLP_CASES:
        p, x0 = _calibrated_mlp(f1, k1, f2, k2)
        want = qkern.quaxify(lambda p, x: megatron(p, x, psum=False))(p, x0)
        f = _sm(megatron, (qkern.partition_specs(p, MEGATRON_SPECS), P("data")), P("data"))
        np.testing.assert_allclose(f(p, x0), want, rtol=1e-5, atol=1e-5, err_msg=f"{f1}/{f2}")


@check("shard_map check_vma: grads with respect to x equal unsharded")
def _():
    def loss(f):
        return lambda p, x: jnp.sum(jnp.sin(f(p, x)))

    for f1, k1, f2, k2 in MLP_CASES[:2]:
        p, x0 = _stacked_mlp(f1, k1, f2, k2)
        want = jax.grad(loss(qkern.quaxify(lambda p, x: megatron(p, x, psum=False))),
                        argnums=1)(p, x0)
        sm = jax.shard_map(qkern.quaxify(megatron), mesh=mesh,
                           in_specs=(qkern.partition_specs(p, MEGATRON_SPECS), P("data")),
                           out_specs=P("data"))
        got = jax.jit(jax.grad(loss(sm), argnums=1))(p, x0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{f1}/{f2}")
    # one unscanned layer: column parallel into row parallel, W8A8 both (static scales)
    h = _w(16, 256)
    p1 = {"up": qkern.quantize(params["w3"], "int8", act_fmt="int8"),               # [256, 128]
          "down": qkern.quantize(params["w3"].T, "int8", block_size=32, act_fmt="int8")}

    def two(p, x, psum=True):
        y = jax.nn.relu(x @ p["up"]) @ p["down"]
        return jax.lax.psum(y, "model") if psum else y

    p1 = qkern.calibrate(lambda p, x: two(p, x, False), p1, [h])
    want = jax.grad(loss(qkern.quaxify(lambda p, x: two(p, x, False))), argnums=1)(p1, h)
    specs = qkern.partition_specs(p1, {"up": P(None, "model"), "down": P("model", None)})
    sm = jax.shard_map(qkern.quaxify(two), mesh=mesh, in_specs=(specs, P("data")),
                       out_specs=P("data"))
    got = jax.jit(jax.grad(loss(sm), argnums=1))(p1, h)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@check("shard_map check_vma: QLoRA grads of the factors equal unsharded")
def _():
    # data parallel with a column-parallel frozen nf4 base: a [in, r] is replicated over
    # "model", so its gradient is the sum of every model shard's contribution.
    base = qkern.quantize(params["w1"], "nf4", block_size=64)
    a0, b0 = _w(256, 8) / 16, _w(8, 512) / 8
    h = _w(16, 256)
    loss = lambda lw, x: jnp.sum(jnp.sin(x @ lw))
    want = jax.grad(lambda a, b: qkern.quaxify(loss)(qkern.LoraArray(base, a, b, 2.0), h),
                    argnums=(0, 1))(a0, b0)
    is_p = lambda v: isinstance(v, P)
    specs = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(qkern.LoraArray(base, a0, b0, 2.0)),
        jax.tree_util.tree_leaves(qkern.partition_specs(base, P(None, "model")), is_leaf=is_p)
        + [P(), P(None, "model")])
    sm = jax.shard_map(lambda lw, x: jax.lax.psum(qkern.quaxify(loss)(lw, x), ("data", "model")),
                       mesh=mesh, in_specs=(specs, P("data")), out_specs=P())
    got = jax.jit(jax.grad(lambda a, b: sm(qkern.LoraArray(base, a, b, 2.0), h),
                           argnums=(0, 1)))(a0, b0)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-5)


@check("shard_map check_vma: forward mode (jvp, forward-over-reverse HVP) equals unsharded")
def _():
    for f1, k1, f2, k2 in MLP_CASES:
        p, x0 = _calibrated_mlp(f1, k1, f2, k2)
        t0 = _w(*x0.shape)
        plain = qkern.quaxify(lambda p, x: megatron(p, x, psum=False))
        want = jax.jvp(lambda x: plain(p, x), (x0,), (t0,))
        sm = jax.shard_map(qkern.quaxify(megatron), mesh=mesh,
                           in_specs=(qkern.partition_specs(p, MEGATRON_SPECS), P("data")),
                           out_specs=P("data"))
        got = jax.jit(lambda x, t: jax.jvp(lambda x: sm(p, x), (x,), (t,)))(x0, t0)
        for g, w_ in zip(got, want):
            np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-5, err_msg=f"{f1}/{f2}")
        loss = lambda f: lambda x: jnp.sum(jnp.sin(f(p, x)))          # noqa: E731
        want = jax.jvp(jax.grad(loss(plain)), (x0,), (t0,))[1]
        got = jax.jit(lambda x, t: jax.jvp(jax.grad(loss(sm)), (x,), (t,))[1])(x0, t0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{f1}/{f2} hvp")


@check("shard_map check_vma: QLoRA jvp in the factors and x equals unsharded")
def _():
    base = qkern.quantize(params["w1"], "nf4", block_size=64)
    a0, b0 = _w(256, 8) / 16, _w(8, 512) / 8
    h, th = _w(16, 256), _w(16, 256)
    ta, tb = _w(256, 8), _w(8, 512)
    f = qkern.quaxify(lambda lw, x: jnp.sin(x @ lw))
    want = jax.jvp(lambda a, b, x: f(qkern.LoraArray(base, a, b, 2.0), x), (a0, b0, h),
                   (ta, tb, th))
    is_p = lambda v: isinstance(v, P)                                   # noqa: E731
    specs = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(qkern.LoraArray(base, a0, b0, 2.0)),
        jax.tree_util.tree_leaves(qkern.partition_specs(base, P(None, "model")), is_leaf=is_p)
        + [P(), P(None, "model")])
    sm = jax.shard_map(f, mesh=mesh, in_specs=(specs, P("data")), out_specs=P("data", "model"))
    got = jax.jit(lambda *z: jax.jvp(
        lambda a, b, x: sm(qkern.LoraArray(base, a, b, 2.0), x), z[:3], z[3:]))(
            a0, b0, h, ta, tb, th)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)


@check("bad shardings name the QArray and the reason")
def _():
    for spec, needle in [({"w1": P("model", None)}, "packs the two halves"),
                         ({"w2": P(("data", "model"), None)}, "do not split into 8")]:
        try:
            qkern.shard(q, mesh, spec)
        except ValueError as e:
            assert needle in str(e) and "QArray(" in str(e), str(e)
        else:
            raise AssertionError(f"{spec} should fail")


@check("per-channel weights shard along K (row-parallel): jit and shard_map equal unsharded")
def _():
    w = params["w2"]                                              # [512, 256], K sharded
    h = _w(16, 512)
    for fmt, kw in [("int8", {}), ("int8", {"act_fmt": "int8"}), ("fp8_e4m3", {})]:
        qw = qkern.quantize(w, fmt, block_size=None, **kw)        # one block along K
        assert qw.layout.num_blocks == 1, qw
        ws = qkern.shard(qw, mesh, P("model", None))
        assert ws.scales.sharding.spec == P(None, None), ws.scales.sharding   # shared scales
        ref = qkern.quaxify(lambda w, h: h @ w)(qw, h)
        got = jax.jit(qkern.quaxify(lambda w, h: h @ w))(ws, h)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4, err_msg=f"{fmt} {kw} jit")
        if kw:   # dynamic per-row activation scales differ per K shard (docs/models.md)
            continue
        sm = jax.jit(jax.shard_map(
            lambda w, h: jax.lax.psum(qkern.quaxify(lambda w, h: h @ w)(w, h), "model"),
            mesh=mesh, in_specs=(qkern.partition_specs(qw, P("model", None)), P(None, "model")),
            out_specs=P()))
        np.testing.assert_allclose(sm(qw, h), ref, rtol=1e-5, atol=1e-4, err_msg=f"{fmt} shard_map")


# Explicit-axis meshes (jax.make_mesh's default): the sharding is part of every type.
explicit = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)


@check("explicit mesh: materialise a sharded nf4 QArray under jit")
def _():
    w = qkern.shard(q["w1"], explicit, P(None, "model"))
    with jax.set_mesh(explicit):
        got = jax.jit(qkern.dequantize)(w)
    assert got.sharding.spec == P(None, "model"), got.sharding
    np.testing.assert_array_equal(got, qkern.dequantize(q["w1"]))


@check("explicit mesh: jit with NamedSharding, every format, equals unsharded")
def _():
    h = _w(16, 512)
    hs = jax.device_put(h, NamedSharding(explicit, P("data", None)))
    for name, kw in COL_FORMATS + [("fp4", dict(block_size=64))]:
        w = _q(params["w2"], name, kw, h)
        want = qkern.quaxify(mm)(w, h)
        with jax.set_mesh(explicit):
            got = jax.jit(qkern.quaxify(mm))(qkern.shard(w, explicit, P(None, "model")), hs)
        assert got.sharding.spec == P("data", "model"), (name, got.sharding)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@check("explicit mesh: row-parallel, several K chunks per device, equals unsharded")
def _():
    h = _w(16, 2048)
    hs = jax.device_put(h, NamedSharding(explicit, P("data", None)))
    w = _w(2048, 256) / 45
    for name, kw in [("int8", dict(block_size=128)), ("w8a8", dict(act_fmt="int8", block_size=128))]:
        qw = _q(w, name, kw, h)
        want = qkern.quaxify(mm)(qw, h)
        with jax.set_mesh(explicit):
            got = jax.jit(qkern.quaxify(mm))(qkern.shard(qw, explicit, P("model", None)), hs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@check("explicit mesh: jvp and grad of a sharded weight's matmul equal unsharded")
def _():
    h = _w(16, 512)
    hs = jax.device_put(h, NamedSharding(explicit, P("data", None)))
    ts = jax.device_put(_w(16, 512), NamedSharding(explicit, P("data", None)))
    for name, kw in COL_FORMATS:
        w = _q(params["w2"], name, kw, h)
        f = qkern.quaxify(lambda w, x: jnp.sin(mm(w, x)))
        want = jax.jvp(lambda x: f(w, x), (h,), (ts,))
        gwant = jax.grad(lambda x: jnp.sum(f(w, x)))(h)
        with jax.set_mesh(explicit):
            ws = qkern.shard(w, explicit, P(None, "model"))
            got = jax.jit(lambda x, t: jax.jvp(lambda x: f(ws, x), (x,), (t,)))(hs, ts)
            g = jax.jit(jax.grad(lambda x: jnp.sum(f(ws, x))))(hs)
        assert got[1].sharding.spec == P("data", "model"), (name, got[1].sharding)
        assert g.sharding.spec == hs.sharding.spec, (name, g.sharding)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(g, gwant, rtol=1e-5, atol=1e-5, err_msg=name)


@check("decode (M = 1) on a sharded weight: the scan, not the native kernel; equals unsharded")
def _():
    # The native CPU kernel is an opaque custom call: under SPMD partitioning over several
    # devices its lowering picks the scan, so a sharded weight is not gathered whole.
    from qkern.pallas.qmatmul import _native

    x1 = x[:1]
    want1 = qkern.quaxify(model)(q, x1)
    f = jax.jit(qkern.quaxify(model))
    assert _native.library() is None or "qkern_packed4_gemv" in f.lower(q, x1).compile().as_text()
    qs = qkern.shard(q, mesh, SPECS)
    hlo = f.lower(qs, x1).compile().as_text()
    assert "qkern_packed4_gemv" not in hlo and "qkern_int8_gemv" not in hlo
    np.testing.assert_allclose(f(qs, x1), want1, rtol=1e-5, atol=1e-5)
    assert f(qs, x1).sharding.num_devices == 8



@check("a LoraArray takes its dense weight's spec (rank axis whole); a vmap-built stack shards")
def _():
    w = _w(512, 256) / 16
    a, b = _w(512, 2) * 0.1, _w(2, 256) * 0.1          # rank 2: cannot split over 4 devices
    mm = lambda p, x: x @ p["l"]                           # noqa: E731
    xx = _w(8, 512)
    for base in (w, qkern.quantize(w, "int8")):
        lw = qkern.LoraArray(base, a, b, 2.0)
        for spec in (P(None, "model"), P("model", None)):
            t = qkern.shard({"l": lw}, mesh, {"l": spec})
            assert t["l"].a.sharding.spec[-1] is None and t["l"].b.sharding.spec[0] is None
            np.testing.assert_allclose(jax.jit(qkern.quaxify(mm))(t, xx), xx @ lw.materialise(),
                                       rtol=1e-4, atol=1e-4)
        train, frozen = qkern.lora.partition({"l": lw})     # each half gets its parts' specs
        for half in (train, frozen):
            jax.device_put(half, qkern.shardings(half, mesh, {"l": P(None, "model")}))
    stack = jax.vmap(lambda w: qkern.quantize(w, "int8"))(_w(4, 256, 128))
    t = qkern.shard(stack, mesh, P(None, None, "model"))
    assert t.data.sharding.spec == P(None, None, "model")
    np.testing.assert_array_equal(qkern.dequantize(t), qkern.dequantize(stack))


if FAILED:
    print("FAILED:", "; ".join(FAILED))
    sys.exit(1)
print("ALL OK")
sys.exit(0)
