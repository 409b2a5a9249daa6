"""Shared by the checkpoint tests."""

import json

import pytest


def _rewrite_header(src, dst, edit):
    """Copy the checkpoint `src` to `dst` with its qkern header passed through `edit`."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    with safe_open(str(src), framework="numpy") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["qkern"])
    edit(header)
    meta["qkern"] = json.dumps(header)
    save_file(load_file(str(src)), str(dst), metadata=meta)


@pytest.fixture
def rewrite_header():
    return _rewrite_header
