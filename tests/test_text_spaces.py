"""benchmarks/text_spaces.py: the space-by-space barrier tables on a tiny random GPT-2 pair."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fxfuse
import zoo
from fxfuse.backend.refine import RefineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import text_spaces  # noqa: E402


def _trained(seed: int, ids: torch.Tensor):
    """A tiny GPT-2 of the zoo after 40 Adam steps on ``ids`` (so that the pair has a barrier to cut)."""
    model, args = zoo.gpt2(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), args


def test_breakdown_tables_on_a_tiny_gpt2_pair():
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, zoo.VOCAB, (16, 1), generator=g) + 3 * torch.arange(zoo.SEQ)) % zoo.VOCAB
    (a, args), (b, _) = _trained(0, ids), _trained(1, ids)
    refine = RefineConfig(2, ids, ids.clone(), head="causal", batch_size=4)
    out = text_spaces.breakdown(a, b, args, ids, ids.clone(), "causal", "transformer.wte.weight", points=3,
                                refine=refine, blocks=text_spaces.BLOCKS["gpt2"])
    # every partial alignment is exact (self-check) and its curve ends at the parents' losses
    assert out["problems"] == []
    assert all(r["self_check"] <= 1e-4 for r in text_spaces._rows(out) if "self_check" in r)
    # the whole alignments are those fxfuse.barrier scores
    ref = fxfuse.barrier(a, b, ids, ids.clone(), args, points=3, head="causal", groups="full", untie=True, seed=0,
                         refine=refine)
    assert abs(out["base"]["data-free, all aligned"]["barrier"] - ref.aligned.barrier) < 1e-6
    assert abs(out["base"]["refined, all"]["barrier"] - ref.refined.barrier) < 1e-6
    assert abs(out["vanilla"] - ref.vanilla.barrier) < 1e-6
    # families: the stream alone; an in-head map with its heads' permutation; heads left out with their in-head maps
    fam, df = out["families"], out["data_free"]
    assert len(fam["residual stream"]) == 1 and df["residual stream"]["only_spaces"] == fam["residual stream"]
    heads = fam["heads L0"]
    assert set(heads) < set(df["q/k L0"]["only_spaces"])
    assert set(fam["q/k L0"]) | set(fam["v/o L0"]) < set(df["heads L0"]["left_out_spaces"])
    stream = out["refined"]["residual stream"]
    assert stream["with_stream"]["barrier"] == stream["put_in"]["barrier"]  # the same maps
    assert {"MLP L1", "q/k (all layers)", "attention: heads, q/k, v/o (all layers)"} <= set(df) == set(out["refined"])
    # the stream alone moves the barrier: partial alignments are not the identity nor the whole alignment
    none = out["base"]["none aligned (norm scales folded only)"]["barrier"]
    assert out["vanilla"] > out["base"]["data-free, all aligned"]["barrier"]
    assert abs(df["residual stream"]["only"]["barrier"] - none) > 1e-3
    assert abs(df["residual stream"]["left_out"]["barrier"] - out["base"]["data-free, all aligned"]["barrier"]) > 1e-3
    assert set(out["blocks"]) == {"embeddings", "block 0 attention", "block 0 MLP", "block 1 attention",
                                  "block 1 MLP", "final norm + LM head"}
    table = text_spaces.format_tables(out, "tiny")
    assert all(name in table for name in list(df) + list(out["blocks"]))
