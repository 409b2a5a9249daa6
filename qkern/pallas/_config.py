"""Block configurations of the quantised-matmul kernels, and their shipped defaults.

One config type for every backend; each backend reads the fields it uses (Triton: all;
Mosaic TPU: block sizes; xla: block_k, the K-chunk of its scan); `dequantize=True` on any
backend runs dequantise-then-dot instead of the kernel. Defaults come from a
heuristic table keyed by backend and by decode (M <= 16) or prefill (larger M), plus one
rule on xla for each of two kernels (`heuristic_config`: weight-only, small weights at
M >= 128 dequantise first; W8A8, one int8 dot over the whole of K from M = 8); the
autotuner (`qkern tune`) replaces them with measured winners per device: kernels ask
`config_for(problem)`, which returns the autotune cache's winner for this device, or the
shipped heuristic on a miss.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    block_m: int = 16
    block_n: int = 128
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1
    # Dequantise the weight to x's dtype and run XLA's own dot instead of the kernel: for
    # large M, where a kernel that decodes W once per row tile can lose to the dense dot.
    # The autotuner times it for every M > DECODE_M problem and keeps it where it wins.
    dequantize: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "dequantize":
                if not isinstance(v, bool):
                    raise ValueError(f"MatmulConfig.dequantize must be True or False, got {v!r}.")
            elif isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MatmulConfig.{f.name} must be a positive int, got {v!r}.")


DECODE_M = 16  # M at or below this uses the skinny (decode) kernels

# (backend, "decode" | "prefill") -> default config. Measured winners replace these.
HEURISTICS: dict[tuple[str, str], MatmulConfig] = {
    ("triton", "decode"): MatmulConfig(block_m=16, block_n=64, block_k=256, num_warps=4,
                                       num_stages=3, split_k=4),
    # From a sweep on an H100 (jax 0.11.2, K = N = 4096, M = 256): the best of those tried.
    ("triton", "prefill"): MatmulConfig(block_m=128, block_n=64, block_k=64, num_warps=4,
                                        num_stages=3),
    ("mosaic_tpu", "decode"): MatmulConfig(block_m=16, block_n=256, block_k=512),
    ("mosaic_tpu", "prefill"): MatmulConfig(block_m=128, block_n=256, block_k=512),
    ("xla", "decode"): MatmulConfig(block_k=256),
    ("xla", "prefill"): MatmulConfig(block_k=512),
}


def default_config(backend: str, m: int) -> MatmulConfig:
    regime = "decode" if m <= DECODE_M else "prefill"
    return HEURISTICS[(backend, regime)]


# xla, weight-only, M >= DEQUANTIZE_MIN_M: a weight whose float32 form is at most
# SMALL_WEIGHT_BYTES is dequantised whole and multiplied by XLA's dense dot instead of the
# K-chunked scan. Measured on a 2-core AMD EPYC (docs/benchmarks.md, "Weight-only matmuls
# above the decode kernels"): alone, at M = 128-512, weights of 384x384 to 1536x384 ran
# 0.62-0.97x dense through the scan and 0.89-1.02x dequantised first; at 4096x4096 the scan
# wins (dequantising 67 MB costs more than the dot). In the MiniLM demo the switch helped at
# M = 1024 (batch 32: int4 0.72x -> 0.90x, nf4 0.80x -> 0.94x) and hurt at M = 32 (batch 1:
# int8 0.86x -> 0.45x, nf4 0.64x -> 0.42x), so it starts at M = 128.
SMALL_WEIGHT_BYTES = 8 << 20
DEQUANTIZE_MIN_M = 128

# xla, W8A8, M >= W8A8_WHOLE_K_M, per-channel or per-tensor weights: one int8 dot over the
# whole of K instead of a scan over K chunks (per-block weights keep the table's chunks,
# whose int32 partials per block w8a8/_xla.py caps). Measured on a 2-core Intel Xeon with
# AMX (docs/benchmarks.md, "W8A8 on the CPU", `python bench/w8a8_cpu.py`): at MiniLM's
# 384 x 1536 and 1536 x 384, M = 32 to 1024, one dot ran up to 1.7x faster than chunks of 512 rows and 2x faster than chunks of 256,
# under jax 0.10.2 and 0.12; at K = N = 4096, M = 8 to 256, it ran 1.6-1.7x faster under
# jax 0.12 (what `pip install qkern` gets) and 0.7-1.05x as fast under 0.10.2. Below M = 8
# the native kernel runs where it can (w8a8/_xla.py), else 256-row chunks (XLA:CPU's integer
# GEMV over K = 4096 in one dot ran at 0.09x of dense float32 under 0.10.2, in 256-row chunks
# at 0.40x).
W8A8_WHOLE_K_M = 8


def heuristic_config(problem: "Problem") -> MatmulConfig:
    """The shipped config for `problem` when nothing is tuned: the table's entry for its
    backend and regime; on xla, dequantise-then-dot for small weights at M >= 128, and W8A8
    with one scale block (per channel or per tensor) in one chunk of K from M = 8 (a block_k
    above the padded K, which is at most 2 K)."""
    cfg = default_config(problem.backend, problem.m)
    if (problem.backend == "xla" and problem.kernel == "w8a8" and problem.m >= W8A8_WHOLE_K_M
            and problem.block_size >= problem.k):       # one scale block: per channel / tensor
        whole = 1 << (2 * problem.k).bit_length()
        return dataclasses.replace(cfg, block_k=max(cfg.block_k, whole))
    if (problem.backend == "xla" and problem.kernel in ("qmatmul", "qmatmul_t")
            and problem.m >= DEQUANTIZE_MIN_M and 4 * problem.k * problem.n <= SMALL_WEIGHT_BYTES):
        cfg = dataclasses.replace(cfg, dequantize=True)
    return cfg


# Problem.kernel -> the kernel family that runs it. "qmatmul": x @ W; "qmatmul_t": dy @ W.T
# (the gradient for x); "w8a8": x @ W with int8 activations; "lora" / "lora_t": the fused
# QLoRA matmul forward and transposed.
KERNELS = {"qmatmul": "qmatmul", "qmatmul_t": "qmatmul", "w8a8": "w8a8",
           "lora": "lora_qmatmul", "lora_t": "lora_qmatmul"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One quantised matmul as a kernel sees it: the autotune cache key, less the device.

    kernel (one of KERNELS) "qmatmul" is x[M, K] @ W[K, N]; "qmatmul_t" is dy[M, N] @ W.T;
    "w8a8" x @ W with x quantised to int8; "lora" / "lora_t" the fused QLoRA matmul, of
    rank `rank` (0 for the other kernels). K and N are always the weight's logical dims.
    x_dtype is the activation dtype's name; fmt, block_size and zeros (asymmetric zero
    points) describe the quantised weight.
    """

    backend: str
    kernel: str
    m: int
    k: int
    n: int
    x_dtype: str
    fmt: str
    block_size: int
    zeros: bool = False
    rank: int = 0

    @classmethod
    def of(cls, backend: str, x, op, kernel: str, rank: int = 0) -> "Problem":
        """The problem of running `kernel` on `op` (a QOperand) and the 2-D activation x."""
        return cls(backend, kernel, int(x.shape[0]), int(op.k), int(op.n),
                   np.dtype(x.dtype).name, op.fmt.name, int(op.block_size),
                   op.zeros is not None, int(rank))

    @property
    def family(self) -> str:
        return KERNELS[self.kernel]

    @property
    def regime(self) -> str:
        return "decode" if self.m <= DECODE_M else "prefill"


# Called with every Problem a kernel asks a config for, at trace time (`qkern tune --from`
# installs one to find the quantised matmuls of a function).
OBSERVERS: list[Callable[[Problem], None]] = []


# Where tuned configs come from: the autotune cache registers its lookup here when it is
# imported (qkern/autotune/_cache.py); kernels never import the cache themselves.
LOOKUPS: list[Callable[[Problem], "MatmulConfig | None"]] = []


def config_for(problem: Problem, *, interpret: bool = False,
               heuristic: bool = True) -> MatmulConfig | None:
    """The config a kernel runs when none is given: the autotune cache's winner for this
    device and problem (qkern/autotune), else the shipped heuristic.

    On a miss the Pallas backends get None, so that each kernel starts from its heuristic
    and moves it to the nearest legal tiling itself; the xla backend gets its heuristic.
    Interpret mode (tests) never reads the cache. heuristic=False: None on a miss on
    every backend (a caller that has a better fallback of its own).
    """
    for observe in OBSERVERS:
        observe(problem)
    if not interpret:
        for lookup in LOOKUPS:
            hit = lookup(problem)
            if hit is not None:
                return hit
    if heuristic and problem.backend == "xla":
        return heuristic_config(problem)
    return None
