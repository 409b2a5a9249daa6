"""Quantised matmuls with operands sharded on a mesh with Explicit axes (sharding in
types), on 8 host CPU devices; run by test_explicit_mesh.py in a fresh interpreter.

Prints "ok <check>" for each check that passes; a failing check raises.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import qkern  # noqa: E402

mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def matmul(x, w):
    return x @ w


def loss(x, w):
    return (qkern.quaxify(matmul)(x, w) ** 2).sum()


def check_case(w, x, fmt, kw, w_spec, x_spec):
    q = qkern.quantize(w, fmt, **kw)
    want = qkern.quaxify(matmul)(x, q)
    want_dx = jax.grad(loss)(x, q)
    with jax.set_mesh(mesh):
        qs = qkern.shard(q, mesh, w_spec)
        xs = jax.device_put(x, NamedSharding(mesh, x_spec))
        got = jax.jit(qkern.quaxify(matmul))(xs, qs)
        dx = jax.jit(jax.grad(loss))(xs, qs)
    assert dx.sharding.spec == xs.sharding.spec, (fmt, kw, dx.sharding, xs.sharding)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale * x.shape[1] ** 0.5,
                               err_msg=f"{fmt} {kw} {w_spec}")
    dscale = float(jnp.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dx), np.asarray(want_dx), rtol=0, atol=2e-6 * dscale * w.shape[1] ** 0.5,
                               err_msg=f"dx {fmt} {kw} {w_spec}")


def column_parallel():
    w = jax.random.normal(jax.random.key(0), (256, 512))
    x = jax.random.normal(jax.random.key(1), (8, 256))
    for fmt, kw in [("int8", {}), ("int4", {}), ("nf4", {}), ("fp4", {}), ("mxfp4", {}),
                    ("int4", {"calibration": "minmax"}), ("int8", {"act_fmt": "int8"})]:
        check_case(w, x, fmt, kw, P(None, "model"), P("data", None))
    print("ok column-parallel: every format, forward and dx, equal unsharded")


def row_parallel():
    # K = 2048 over 4 devices: 512 rows each (the scan takes 256), several of the scan's K chunks per device.
    w = jax.random.normal(jax.random.key(2), (2048, 256))
    x = jax.random.normal(jax.random.key(3), (8, 2048))
    for fmt, kw in [("int8", {"block_size": 64}), ("int8", {"block_size": 128, "calibration": "minmax"}),
                    ("fp8_e4m3", {"block_size": 64}), ("int8", {"block_size": 64, "act_fmt": "int8"})]:
        check_case(w, x, fmt, kw, P("model", None), P("data", "model"))
    print("ok row-parallel: K sharded, several chunks per device, forward and dx equal unsharded")


def lora():
    w = jax.random.normal(jax.random.key(4), (256, 512))
    x = jax.random.normal(jax.random.key(5), (8, 256))
    q = qkern.quantize(w, "nf4")
    a = jax.random.normal(jax.random.key(6), (256, 4)) / 16
    b = jax.random.normal(jax.random.key(7), (4, 512)) / 10

    def lora_loss(a, b, x, q):
        return (qkern.quaxify(matmul)(x, qkern.LoraArray(q, a, b)) ** 2).sum()

    want = jax.grad(lora_loss, argnums=(0, 1, 2))(a, b, x, q)
    with jax.set_mesh(mesh):
        qs = qkern.shard(q, mesh, P(None, "model"))
        args = (jax.device_put(a, NamedSharding(mesh, P(None, None))),
                jax.device_put(b, NamedSharding(mesh, P(None, "model"))),
                jax.device_put(x, NamedSharding(mesh, P("data", None))))
        got = jax.jit(jax.grad(lora_loss, argnums=(0, 1, 2)))(*args, qs)
    for g, r, arg in zip(got, want, args):
        assert g.sharding.spec == arg.sharding.spec, (g.sharding, arg.sharding)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(r).max()))
    print("ok QLoRA: gradients of a, b and x equal unsharded, each sharded like its input")


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    column_parallel()
    row_parallel()
    lora()
