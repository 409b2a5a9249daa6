"""The quantised ragged_dot on 4 host devices with the experts sharded along their E axis
(expert parallel storage), under jit. Run as a script (XLA_FLAGS must be set before JAX
starts); prints "ok <check>" per check and "ALL OK" at the end."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import qkern  # noqa: E402

assert jax.device_count() == 4, jax.devices()
mesh = jax.make_mesh((4,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
ragged = qkern.quaxify(lambda q, x, g: jax.lax.ragged_dot(x, q, g))

w = jax.random.normal(jax.random.PRNGKey(0), (8, 128, 96))
x = jax.random.normal(jax.random.PRNGKey(1), (20, 128))
g = jnp.asarray([3, 0, 4, 1, 5, 2, 0, 4], jnp.int32)
for fmt in ("int8", "nf4", "int4"):
    q = qkern.quantize(w, fmt, axis=-2)
    qs = qkern.shard(q, mesh, P("expert"))
    assert qs.data.sharding.spec[:1] == ("expert",), qs.data.sharding
    assert qs.scales.sharding.spec[:1] == ("expert",), qs.scales.sharding
    shard = qs.data.addressable_shards[0].data
    assert shard.shape[0] == 2, shard.shape               # 2 of the 8 experts per device
    want = ragged(q, x, g)
    got = jax.jit(ragged)(qs, x, g)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    ref = jax.lax.ragged_dot(x, qkern.dequantize(q), g, precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(ragged(qs, x, g) ** 2)))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(jax.lax.ragged_dot(
        x, qkern.dequantize(q), g, precision="highest") ** 2))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-4, atol=1e-3)
    print(f"ok experts sharded 4 ways, {fmt}: jit and grad equal unsharded")
print("ALL OK")
