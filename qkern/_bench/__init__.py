"""Measurements behind `qkern bench` and bench/ (never asserted in tests)."""
