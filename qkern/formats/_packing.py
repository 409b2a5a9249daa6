"""Two 4-bit codes per byte, split by halves along the block axis.

Byte i along the axis holds code i in its low nibble and code i + n/2 in its high nibble
(n, the padded axis length, is even). Unpacking is two masks and one concatenation; a
kernel that holds a packed tile multiplies its low and high nibbles by the two matching
halves of the activation tile, so no interleaving is ever needed.
"""

import jax.numpy as jnp


def pack_halves(nibbles: jnp.ndarray, axis: int) -> jnp.ndarray:
    n = nibbles.shape[axis]
    if n % 2:
        raise ValueError(f"packing needs an even length along axis {axis}, got {n}")
    low, high = jnp.split(nibbles.astype(jnp.uint8), 2, axis=axis)
    return (low & 0xF) | ((high & 0xF) << 4)


def unpack_halves(packed: jnp.ndarray, axis: int) -> jnp.ndarray:
    """uint8 nibbles, the axis twice as long as `packed`'s."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=axis)
