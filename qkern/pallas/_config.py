"""Block configurations of the quantised-matmul kernels, and their shipped defaults.

One config type for every backend; each backend reads the fields it uses (Triton: all;
Mosaic TPU: block sizes; xla: block_k, the K-chunk of its scan). Defaults come from a
heuristic table keyed by backend and by decode (M <= 16) or prefill (larger M); the
autotuner (`qkern tune`) replaces them with measured winners per device.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    block_m: int = 16
    block_n: int = 128
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
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
