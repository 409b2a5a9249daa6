"""A BERT encoder in plain JAX: the config, the parameter layout, the forward pass.

The layout is a nested dict whose linear kernels are `[in, out]` and named `kernel`, so
`qkern.quantize(params, fmt, where=r".*kernel")` selects exactly the linear layers:

    {"config": BertConfig(...),                       # static: a pytree with no leaves
     "embeddings": {"word": [vocab, d], "position": [max_pos, d], "token_type": [types, d],
                    "ln": {"scale": [d], "bias": [d]}},
     "layers": [{"attn": {"query"|"key"|"value"|"output": {"kernel": [d, d], "bias": [d]}},
                 "attn_ln": {"scale", "bias"},
                 "mlp": {"up": {"kernel": [d, ff], "bias": [ff]},
                         "down": {"kernel": [ff, d], "bias": [d]}},
                 "mlp_ln": {"scale", "bias"}}, ...]}

The forward pass is HF's `BertModel` (post-LayerNorm, exact erf GELU, token type 0,
absolute positions) followed by sentence-transformers' mean pooling over the attention
mask and L2 normalisation. Model code only: every `x @ kernel` is an ordinary matmul, so
the same function runs under `qkern.quaxify` with quantised kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder. Hashable and static: it rides in `params["config"]`
    through `jit`, `quantize` and `quaxify` without becoming a traced leaf."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256          # the tokenizer's truncation length (sentence-transformers)
    path: str | None = None            # the folder the weights came from (for its tokenizer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


jax.tree_util.register_static(BertConfig)

LINEARS = {("attn", "query"): "attention.self.query", ("attn", "key"): "attention.self.key",
           ("attn", "value"): "attention.self.value", ("attn", "output"): "attention.output.dense",
           ("mlp", "up"): "intermediate.dense", ("mlp", "down"): "output.dense"}
LAYER_NORMS = {"attn_ln": "attention.output.LayerNorm", "mlp_ln": "output.LayerNorm"}


def _layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _linear(x, p):
    return x @ p["kernel"] + p["bias"]


def _attention(x, p, neg_mask, cfg: BertConfig):
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, cfg.num_heads, cfg.head_dim)
    q, k, v = (heads(_linear(x, p[n])) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    probs = jax.nn.softmax(scores + neg_mask, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, cfg.hidden_size)
    return _linear(ctx, p["output"])


def check_inputs(cfg: BertConfig, input_ids, attention_mask) -> None:
    """Shape and dtype checks that run at trace time (shapes are static under jit)."""
    ids_shape, mask_shape = np.shape(input_ids), np.shape(attention_mask)
    if len(ids_shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids_shape}.")
    if tuple(mask_shape) != tuple(ids_shape):
        raise ValueError(f"attention_mask shape {tuple(mask_shape)} does not match input_ids "
                         f"shape {tuple(ids_shape)}; both must be [batch, seq].")
    if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {jnp.result_type(input_ids)}.")
    if ids_shape[0] == 0 or ids_shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {ids_shape}): nothing to embed.")
    if ids_shape[1] > cfg.max_position:
        raise ValueError(f"sequence length {ids_shape[1]} exceeds the model's "
                         f"{cfg.max_position} positions; truncate the input (encode() "
                         f"truncates to {cfg.max_seq_length} tokens).")
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids hold token ids in [{lo}, {hi}], outside the "
                             f"vocabulary [0, {cfg.vocab_size}).")


def forward(params: dict[str, Any], input_ids, attention_mask) -> jax.Array:
    """Sentence embeddings `[batch, hidden]`, float32, unit length (see the module doc)."""
    cfg: BertConfig = params["config"]
    check_inputs(cfg, input_ids, attention_mask)
    input_ids = jnp.asarray(input_ids)
    mask = jnp.asarray(attention_mask).astype(jnp.float32)
    emb = params["embeddings"]
    s = input_ids.shape[1]
    x = (jnp.take(emb["word"], input_ids, axis=0) + emb["position"][:s][None]
         + emb["token_type"][0])
    x = _layer_norm(x, emb["ln"], cfg.layer_norm_eps)
    # HF adds the dtype's most negative value to the scores of padded keys.
    neg_mask = ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]
    for layer in params["layers"]:
        x = _layer_norm(x + _attention(x, layer["attn"], neg_mask, cfg), layer["attn_ln"],
                        cfg.layer_norm_eps)
        h = jax.nn.gelu(_linear(x, layer["mlp"]["up"]), approximate=False)
        x = _layer_norm(x + _linear(h, layer["mlp"]["down"]), layer["mlp_ln"], cfg.layer_norm_eps)
    # sentence-transformers: mean over unmasked tokens (count clamped at 1e-9), then
    # x / max(||x||, 1e-12).
    summed = jnp.einsum("bsd,bs->bd", x, mask)
    pooled = summed / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def init(cfg: BertConfig, seed: int = 0, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters in the layout above (tests and examples; not a trained model).
    numpy's generator: no JAX compilation for a throwaway model."""
    rng = np.random.default_rng(seed)
    normal = lambda shape: (scale * rng.standard_normal(shape)).astype(np.float32)
    ln = lambda: {"scale": np.ones(cfg.hidden_size, np.float32),
                  "bias": np.zeros(cfg.hidden_size, np.float32)}
    lin = lambda i, o: {"kernel": normal((i, o)), "bias": np.zeros(o, np.float32)}
    d, ff = cfg.hidden_size, cfg.intermediate_size
    return {
        "config": cfg,
        "embeddings": {"word": normal((cfg.vocab_size, d)), "position": normal((cfg.max_position, d)),
                       "token_type": normal((cfg.type_vocab_size, d)), "ln": ln()},
        "layers": [{"attn": {n: lin(d, d) for n in ("query", "key", "value", "output")},
                    "attn_ln": ln(), "mlp": {"up": lin(d, ff), "down": lin(ff, d)}, "mlp_ln": ln()}
                   for _ in range(cfg.num_layers)],
    }
