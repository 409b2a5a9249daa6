"""Ways to write the nf4 codebook lookup in XLA, each timed as the whole M = 1 matmul.

    python bench/nf4_lookup.py                 # K = N = 4096, M = 1, chunks of 256 stored rows
    python bench/nf4_lookup.py --m 16 --repeats 30

Each variant is the `xla` kernel's structure stripped to its core (a `lax.scan` over chunks
of packed rows; each step decodes both nibble halves and adds two dots), with only the
lookup changed; scales are left out, they cost the same for every variant. "int4 decode"
swaps the lookup for int4's arithmetic decode: the cost of the scan without any lookup.
All variants and the dense float32 `x @ w` are timed in turns in one process; the table
gives each as a ratio to the shipped lookup and to dense. Every variant is checked
against the shipped one before timing.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qkern._bench.timing import interleaved_medians
from qkern.formats._codebooks import NF4
from qkern.pallas._decode import codebook_select

_T = np.asarray(NF4, np.float32)
_DN = jax.lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                     start_index_map=(0,))


def _gather(table, idx):
    return jax.lax.gather(jnp.asarray(table), idx[..., None], _DN, slice_sizes=(1,),
                          mode="promise_in_bounds")


def _nibbles(codes):
    b = codes.astype(jnp.int32)
    return b & 0xF, (b >> 4) & 0xF


def _per_nibble(lookup):
    def decode(codes):
        lo, hi = _nibbles(codes)
        return lookup(lo), lookup(hi)
    return decode


def _by_byte(codes):
    i = codes.astype(jnp.int32)
    return _gather(_T[np.arange(256) & 15], i), _gather(_T[np.arange(256) >> 4], i)


def _complex_pair(codes):
    pairs = (_T[np.arange(256) & 15] + 1j * _T[np.arange(256) >> 4]).astype(np.complex64)
    v = _gather(pairs, codes.astype(jnp.int32))
    return jnp.real(v), jnp.imag(v)


def _split8(nib):
    i = nib & 7
    return jnp.where(nib >= 8, _gather(_T[8:], i), _gather(_T[:8], i))


def _one_hot(nib):
    return sum(jnp.where(nib == c, float(_T[c]), 0.0) for c in range(16))


VARIANTS = {
    "table.at[nib].get(promise_in_bounds) (shipped)":
        _per_nibble(lambda n: jnp.asarray(_T).at[n].get(mode="promise_in_bounds")),
    "lax.gather, int32 index": _per_nibble(lambda n: _gather(_T, n)),
    "lax.gather, uint8 index": _per_nibble(lambda n: _gather(_T, n.astype(jnp.uint8))),
    "jnp.take(mode='clip')": _per_nibble(lambda n: jnp.take(jnp.asarray(_T), n, mode="clip")),
    "two 256-entry tables by byte": _by_byte,
    "one 256-entry complex64 table": _complex_pair,
    "two 8-entry gathers + select": _per_nibble(_split8),
    "15-select tree": _per_nibble(lambda n: codebook_select(n, _T)),
    "16-way one-hot sum": _per_nibble(_one_hot),
    "int4 decode (no lookup)": _per_nibble(lambda n: (n - 8).astype(jnp.float32)),
}


def scan_matmul(decode, m: int, k: int, n: int, rows: int):
    c = k // 2 // rows

    def f(x, packed):
        xs = x.reshape(m, 2, c, rows).transpose(2, 1, 0, 3)
        ds = packed.reshape(c, rows, n)

        def body(acc, inp):
            xc, dc = inp
            lo, hi = decode(dc)
            return acc + xc[0] @ lo + xc[1] @ hi, None

        acc, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), (xs, ds))
        return acc
    return jax.jit(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, default=256, help="stored rows per scan step")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    packed = jnp.asarray(rng.integers(0, 256, (a.k // 2, a.n), dtype=np.uint8))
    x = jnp.asarray(rng.standard_normal((a.m, a.k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((a.k, a.n)), jnp.float32)
    fns = {name: scan_matmul(dec, a.m, a.k, a.n, a.rows) for name, dec in VARIANTS.items()}
    shipped = next(iter(VARIANTS))
    ref = np.asarray(fns[shipped](x, packed))
    for name, f in fns.items():
        if "no lookup" in name:
            continue
        err = np.abs(np.asarray(f(x, packed)) - ref).max() / np.abs(ref).max()
        if err > 1e-5:
            raise AssertionError(f"{name} disagrees with the shipped lookup ({err:.1e})")
    dense = jax.jit(lambda x, w: x @ w)
    timers = {"dense": lambda: dense(x, w)}
    timers.update({name: (lambda f=f: f(x, packed)) for name, f in fns.items()})
    t = interleaved_medians(timers, repeats=a.repeats)
    print(f"nf4 lookup variants, x[{a.m}, {a.k}] @ W[{a.k}, {a.n}], {a.rows} stored rows per "
          f"step, on {jax.devices()[0].device_kind} (jax {jax.__version__}); dense "
          f"{t['dense'] * 1e3:.2f} ms")
    print("| lookup written as | time (ms) | vs shipped | speed-up vs dense |")
    print("|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {t[name] * 1e3:.2f} | {t[name] / t[shipped]:.2f} | "
              f"{t['dense'] / t[name]:.2f}x |")


if __name__ == "__main__":
    main()
