import pytest

from tests.core import qtypes


@pytest.fixture(autouse=True)
def _clear_rule_log():
    qtypes.LOG.clear()
    yield
    qtypes.LOG.clear()


@pytest.fixture
def log():
    """The list of rule names that ran (see tests/core/qtypes.py), cleared per test."""
    return qtypes.LOG
