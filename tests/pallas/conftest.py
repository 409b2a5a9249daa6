"""Fixtures shared by the kernel tests."""

import pytest
from jax.experimental.pallas import tpu as pltpu

from qkern import _compat


@pytest.fixture
def race_params():
    """TPU interpret-mode params with the race detector on, over two simulated cores; the
    interpreter's state is reset before and after. Read the result with
    `_compat.tpu_races_found()`."""
    pltpu.reset_tpu_interpret_mode_state()
    yield _compat.race_detecting_interpret_params(num_cores_or_threads=2)
    pltpu.reset_tpu_interpret_mode_state()
