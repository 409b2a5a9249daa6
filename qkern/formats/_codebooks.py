"""4-bit codebooks: bitsandbytes' NF4 and FP4, and OCP's FP4 (E2M1) element grid."""

import numpy as np

# NF4: quantiles of N(0, 1) normalised to [-1, 1], as in bitsandbytes `get_4bit_type("nf4")`
# (QLoRA, Dettmers et al. 2023). Index 7 is exactly zero.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

# FP4 as bitsandbytes defines it (sign, 2 exponent bits, 1 mantissa bit, its own bias),
# normalised by its largest magnitude, 12.
FP4 = (np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=np.float32) / 12.0)
