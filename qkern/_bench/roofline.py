"""Peak memory bandwidth of known devices, for `% of roofline` in `qkern bench`.

Weight-only decode is memory bound: its limit is bytes moved / bandwidth. The table holds
vendor peak HBM bandwidths (GB/s); a device not listed (every CPU) gets None and a blank
column, unless `qkern bench --bandwidth GBPS` gives the number.
"""

from __future__ import annotations

# (substrings that must all appear in the upper-cased device_kind, GB/s, name). Checked in
# order: more specific entries first.
KNOWN: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H200",), 4800.0, "NVIDIA H200"),
    (("H100", "PCIE"), 2000.0, "NVIDIA H100 PCIe"),
    (("H100", "NVL"), 3900.0, "NVIDIA H100 NVL"),
    (("H100",), 3350.0, "NVIDIA H100 SXM"),
    (("H800",), 3350.0, "NVIDIA H800"),
    (("A100", "80GB"), 2039.0, "NVIDIA A100 80GB"),
    (("A100",), 1555.0, "NVIDIA A100 40GB"),
    (("L40S",), 864.0, "NVIDIA L40S"),
    (("L40",), 864.0, "NVIDIA L40"),
    (("L4",), 300.0, "NVIDIA L4"),
    (("A10G",), 600.0, "NVIDIA A10G"),
    (("A10",), 600.0, "NVIDIA A10"),
    (("4090",), 1008.0, "NVIDIA RTX 4090"),
    (("V100",), 900.0, "NVIDIA V100"),
    (("T4",), 320.0, "NVIDIA T4"),
    (("TPU", "V6", "LITE"), 1640.0, "TPU v6e"),
    (("TPU", "V6E"), 1640.0, "TPU v6e"),
    (("TPU", "V5", "LITE"), 819.0, "TPU v5e"),
    (("TPU", "V5E"), 819.0, "TPU v5e"),
    (("TPU", "V5P"), 2765.0, "TPU v5p"),
    (("TPU", "V5"), 2765.0, "TPU v5p"),
    (("TPU", "V4"), 1200.0, "TPU v4"),
    (("TPU", "V3"), 900.0, "TPU v3"),
)


def peak_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth in GB/s of a jax `device_kind`, or None when unknown."""
    kind = (device_kind or "").upper()
    if not kind or kind.startswith("CPU"):
        return None
    for needles, gbps, _ in KNOWN:
        if all(n in kind for n in needles):
            return gbps
    return None
