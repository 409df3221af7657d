"""Streams of different widths: a stretched orthonormal embedding against a matching, both directions.

    python benchmarks/widths.py --recipes short,long --pairs 2        # measure what is missing, print the tables
    python benchmarks/widths.py --recipes short,long --pairs 2 --print-only

Pair ``i`` of a recipe: A, a Hugging Face digits ViT 64 wide with 4 heads (seed
``2i + 1``), and B, 128 wide with 8 heads of the same size (seed ``2i + 2``;
``benchmarks/digits_vit.py``: 4 layers, the short recipe or trained to
convergence). The heads and the MLP units differ in number and move by
matchings either way; the residual stream moves by ``--width-maps matching``
(a hard many-to-one matching) or ``embedding`` (``√(n_t/n_s)·Q̃``, ``Q̃``
orthonormal). Each is fused into the wide target (B: A is embedded, exactly)
and into the narrow one (A: B is projected), data-free (``--groups full``) and
refined 300 steps on the training split. Printed per cell: test accuracy of the
fused model, of the aligned source alone, and the output change of the aligned
source against the source as given (``self_check`` drift). Cells are cached
under ``benchmarks/.cache/widths/``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import _paths  # noqa: E402,F401
import digits  # noqa: E402
import digits_vit  # noqa: E402
import fxfuse  # noqa: E402
from fxfuse.models.evaluate import accuracy  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "widths"
STEPS = 300
NARROW, WIDE = (64, 4), (128, 8)  # (hidden, heads): heads of 16 in both
TARGETS = (("wide target (B)", 1), ("narrow target (A)", 0))
MODES = (("matching", "matching", False), ("embedding", "embedding", False),
         (f"matching + refine {STEPS}", "matching", True), (f"embedding + refine {STEPS}", "embedding", True))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parents(recipe: str, pair: int, data) -> list[torch.nn.Module]:
    (h_a, n_a), (h_b, n_b) = NARROW, WIDE
    return [digits_vit.trained(h_a, recipe, 2 * pair + 1, data, log, heads=n_a),
            digits_vit.trained(h_b, recipe, 2 * pair + 2, data, log, heads=n_b)]


def measure(recipe: str, pair: int, data) -> dict:
    """Every (target, mode) cell of one pair, cached."""
    from fxfuse.backend.refine import RefineConfig

    x_tr, y_tr, x_te, y_te = data
    path = CACHE / f"{recipe}-p{pair}.json"
    cells = json.loads(path.read_text()) if path.exists() else {}
    models = None
    for label, t in TARGETS:
        for name, maps, refine in MODES:
            key = f"{label}: {name}"
            if key in cells:
                continue
            models = models or parents(recipe, pair, (x_tr, y_tr))
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fxfuse.compile(models, example_kwargs={"pixel_values": digits_vit.example_args()[0]},
                                        target=t, groups="full", width_maps=maps,
                                        refine=RefineConfig(STEPS, x_tr, y_tr) if refine else None)
            check = result.report["self_check"][1 - t]
            cells[key] = {"accuracy": accuracy(result.module, x_te, y_te),
                          "aligned": accuracy(result.aligned[1 - t], x_te, y_te) if result.aligned else None,
                          "drift": check.get("drift", check.get("error")), "seconds": time.perf_counter() - start}
            log(f"[{recipe} pair {pair}] {key}: {cells[key]['accuracy']:.4f} (aligned source "
                f"{cells[key]['aligned']:.4f}, drift {cells[key]['drift']:.2e}, {cells[key]['seconds']:.0f} s)")
            CACHE.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cells, indent=1))
    if "parents" not in cells:
        models = models or parents(recipe, pair, (x_tr, y_tr))
        cells["parents"] = [accuracy(m, x_te, y_te) for m in models]
        path.write_text(json.dumps(cells, indent=1))
    return cells


def print_tables(recipes: list[str], pairs: int) -> None:
    for recipe in recipes:
        got = []
        for p in range(pairs):
            path = CACHE / f"{recipe}-p{p}.json"
            if path.exists():
                got.append(json.loads(path.read_text()))
        if not got:
            continue
        mean = statistics.fmean
        par = " / ".join(f"{100 * c['parents'][0]:.1f}, {100 * c['parents'][1]:.1f}" for c in got if "parents" in c)
        print(f"\n### {recipe} recipe: {len(got)} pair(s), A = {NARROW[0]} wide ({NARROW[1]} heads), "
              f"B = {WIDE[0]} wide ({WIDE[1]} heads); parents (A, B) {par} %\n")
        print("Test accuracy %, mean over pairs (per pair in brackets); aligned source: the source after its maps "
              "alone; drift: its output change against the source as given (mean).\n")
        print("| target | stream map | fused | per pair | aligned source | drift | seconds |")
        print("|---|---|---:|---|---:|---:|---:|")
        for label, t in TARGETS:
            alone = [c["parents"][t] for c in got if "parents" in c]
            per = " / ".join(f"{100 * a:.1f}" for a in alone)
            print(f"| {label} | target alone | {100 * mean(alone):.1f} | {per} | | | |")
            for name, _, _ in MODES:
                cs = [c[f"{label}: {name}"] for c in got if f"{label}: {name}" in c]
                if not cs:
                    continue
                per = " / ".join(f"{100 * c['accuracy']:.1f}" for c in cs)
                print(f"| {label} | {name} | {100 * mean(c['accuracy'] for c in cs):.1f} | {per} | "
                      f"{100 * mean(c['aligned'] for c in cs):.1f} | {mean(c['drift'] for c in cs):.2g} | "
                      f"{mean(c['seconds'] for c in cs):.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="short,long", help="training recipes of the parents (short, long)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per recipe")
    ap.add_argument("--print-only", action="store_true", help="print the cached cells, measure nothing")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    if not args.print_only:
        data = digits.load_split()
        for recipe in recipes:
            for p in range(args.pairs):
                measure(recipe, p, data)
    print_tables(recipes, args.pairs)


if __name__ == "__main__":
    main()
