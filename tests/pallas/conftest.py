"""Fixtures shared by the kernel tests. The shared cases, references and tolerances are in
the contract modules (contract_qmatmul.py, contract_w8a8.py, contract_lora.py), which every
backend's test class subclasses."""

import pytest

# The contracts' assertions get pytest's rewriting (values in failure messages) as the test
# modules' do; this must run before they are imported.
pytest.register_assert_rewrite("tests.pallas.contract_qmatmul", "tests.pallas.contract_w8a8",
                               "tests.pallas.contract_lora")

from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from qkern import _compat  # noqa: E402


@pytest.fixture
def race_params():
    """TPU interpret-mode params with the race detector on, over two simulated cores; the
    interpreter's state is reset before and after. Read the result with
    `_compat.tpu_races_found()`."""
    pltpu.reset_tpu_interpret_mode_state()
    yield _compat.race_detecting_interpret_params(num_cores_or_threads=2)
    pltpu.reset_tpu_interpret_mode_state()


@pytest.fixture
def fp8_bits(monkeypatch):
    """The Triton kernels as on GPUs below sm_89: float8 codes decoded arithmetically from
    their bits (`fp8_from_bits`) instead of by the hardware conversion."""
    from qkern.pallas.qmatmul import _triton
    monkeypatch.setattr(_triton, "_native_fp8_convert", lambda: False)
