"""Fixtures the all-MiniLM-L6-v2 tests share: the real weights, the built-in sentences
tokenised once, the jitted quaxified embedding and the float32 embeddings. Module-scoped,
as they were in each module; only modules that ask for them (and so have skipped already
where the weights are missing) load anything."""

import jax
import numpy as np
import pytest

import qkern


@pytest.fixture(scope="module")
def params():
    from qkern.models import minilm
    return minilm.load()


@pytest.fixture(scope="module")
def builtin(params):
    """The built-in sentences, tokenised once (one shape, so one compile per format)."""
    from qkern.models import minilm
    ids, mask = minilm.tokenize(params, list(minilm.SENTENCES), pad_to=32)
    return ids, mask


@pytest.fixture(scope="module")
def embed_jit():
    from qkern.models import minilm
    return jax.jit(qkern.quaxify(minilm.embed))


@pytest.fixture(scope="module")
def float_emb(params, builtin, embed_jit):
    return np.asarray(embed_jit(params, *builtin))
