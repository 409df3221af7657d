"""Every fusion mode side by side, per family and pair, with time: ``python benchmarks/quality.py --modes ...``.

    python benchmarks/quality.py --modes --families hf64-short,hf128-long --pairs 0,1   # measure what is missing
    python benchmarks/quality.py --modes --families hf64-short,hf128-long --pairs 0,1 --print-only

Families: ``vit`` (the shipped ``digits.vit``, 2 blocks, its own recipe) and
``hf{64,128,256}-{short,long}`` (``benchmarks/digits_vit.py``: Hugging Face ViTs,
4 layers, the short recipe or trained to convergence). Pair ``i``: seeds
``(2i + 1, 2i + 2)``. Calibration inputs: the first 512 training images; labelled
data for refinement and for ``quality best``: the training split (best holds out
its last fifth to score the stages); test accuracy on the fixed 400 test images.
Each (family, pair, mode) cell is cached in ``benchmarks/.cache/modes/`` so that
a long sweep can run as several short commands; ``--print-only`` prints the
tables from the cache.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import _paths  # noqa: F401
import digits
import digits_vit
import fxfuse
from fxfuse.models.evaluate import accuracy

CACHE = Path(__file__).resolve().parent / ".cache" / "modes"
N_CALIB = 512
STEPS = 300
MODES = [  # (row, compile keywords; "refine" True: a RefineConfig on the training split, "calib" True: calibration)
    ("vanilla average", {"method": "vanilla"}),
    ("weights, perm (default without data)", {}),
    ("weights, groups full", {"groups": "full"}),
    ("activations, perm", {"cost": "activations", "calib": True}),
    ("weights, perm + repair", {"repair": True, "calib": True}),
    ("weights, groups full + repair", {"groups": "full", "repair": True, "calib": True}),
    (f"weights, perm + refine {STEPS}", {"refine": True}),
    (f"weights, perm + repair + refine {STEPS}", {"repair": True, "refine": True, "calib": True}),
    (f"weights, groups full + refine {STEPS}", {"groups": "full", "refine": True}),
    ("quality best, --calib only (default with --calib)", {"quality": "best", "calib": True}),
    ("quality best, --calib and --data", {"quality": "best", "calib": True, "refine": True}),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _custom_vit(seed: int, data):
    path = CACHE.parent / "digits_custom" / f"vit-s{seed}.pt"
    model, args = digits.vit(seed=seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), args, {}
    hp = digits.HYPERPARAMS["vit"]
    torch.manual_seed(seed)
    digits.train(model, hp["epochs"], seed, lr=hp["lr"], batch_size=hp["batch_size"], data=data)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), args, {}


def parents(family: str, pair: int, data):
    """``([model A, model B], example args, example kwargs)``."""
    seeds = (2 * pair + 1, 2 * pair + 2)
    if family == "vit":
        got = [_custom_vit(s, data) for s in seeds]
        return [g[0] for g in got], got[0][1], {}
    hidden, recipe = family.removeprefix("hf").split("-")
    models = [digits_vit.trained(int(hidden), recipe, s, data, log) for s in seeds]
    return models, (), {"pixel_values": digits_vit.example_args()[0]}


def _keywords(kw: dict, x_tr, y_tr) -> dict:
    from fxfuse.backend.refine import RefineConfig

    kw = dict(kw)
    kw["calib"] = x_tr[:N_CALIB] if kw.pop("calib", False) else None
    kw["refine"] = RefineConfig(STEPS, x_tr, y_tr) if kw.pop("refine", False) else None
    return kw


def measure(family: str, pair: int, modes, data) -> dict:
    """Test accuracy and seconds of every mode of ``modes`` on one pair, cached per cell."""
    x_tr, y_tr, x_te, y_te = data
    path = CACHE / f"{family}-p{pair}.json"
    cells = json.loads(path.read_text()) if path.exists() else {}
    missing = [(n, kw) for n, kw in modes if n not in cells]
    if not missing and "parents" in cells:
        return cells
    models, args, kwargs = parents(family, pair, (x_tr, y_tr))
    cells["parents"] = [accuracy(m, x_te, y_te) for m in models]
    for name, kw in missing:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = fxfuse.compile(models, args, example_kwargs=kwargs, **_keywords(kw, x_tr, y_tr))
            except fxfuse.FxfuseError as exc:
                cells[name] = {"error": str(exc)}
                log(f"[{family} pair {pair}] {name}: refused: {exc}")
                continue
        cell = {"accuracy": accuracy(result.module, x_te, y_te), "seconds": time.perf_counter() - start}
        if "quality" in result.report:
            q = result.report["quality"]
            cell["chosen"] = q["chosen"]
            cell["candidates"] = [(c["name"], c["score"]) for c in q["candidates"]]
        if "refine" in result.report:
            cell["refine_s"] = result.report["refine"]["seconds"]
        cells[name] = cell
        log(f"[{family} pair {pair}] {name}: {cell['accuracy']:.4f} ({cell['seconds']:.0f} s)"
            + (f", chose {cell['chosen']}" if "chosen" in cell else ""))
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cells, indent=1))
    path.write_text(json.dumps(cells, indent=1))
    return cells


def print_tables(families, pairs, modes) -> None:
    for family in families:
        found = {p: json.loads((CACHE / f"{family}-p{p}.json").read_text())
                 for p in pairs if (CACHE / f"{family}-p{p}.json").exists()}
        if not found:
            continue
        print(f"\n### {family}: test accuracy % (seconds), pairs {', '.join(map(str, found))}\n")
        print("| mode | mean | " + " | ".join(f"pair {p}" for p in found) + " |")
        print("|---|---:|" + "---:|" * len(found))
        par = [statistics.fmean(c["parents"]) for c in found.values()]
        print(f"| parents (mean of the two) | {100 * statistics.fmean(par):.1f} | "
              + " | ".join(f"{100 * c['parents'][0]:.1f} / {100 * c['parents'][1]:.1f}" for c in found.values()) + " |")
        for name, _ in modes:
            cells = [c.get(name) for c in found.values()]
            accs = [c["accuracy"] for c in cells if c and "accuracy" in c]
            if not any(cells):
                continue

            def text(c):
                if c is None:
                    return "–"
                if "error" in c:
                    return "refused"
                return f"{100 * c['accuracy']:.1f} ({c['seconds']:.0f} s)" + (f" [{c['chosen']}]" if "chosen" in c else "")

            mean = f"{100 * statistics.fmean(accs):.1f}" if accs and len(accs) == len(cells) else "–"
            print(f"| {name} | {mean} | " + " | ".join(text(c) for c in cells) + " |")
        errors = {c[n]["error"] for c in found.values() for n, _ in modes if n in c and "error" in c[n]}
        for e in sorted(errors):
            print(f"\nrefused: {e}")


def print_summary(families, pairs, modes) -> None:
    """One table: the mean over the measured pairs of every mode, one column per family."""
    found = {}
    for family in families:
        cells = [json.loads((CACHE / f"{family}-p{p}.json").read_text())
                 for p in pairs if (CACHE / f"{family}-p{p}.json").exists()]
        if cells:
            found[family] = cells
    if not found:
        return

    def mean(cells, name):
        accs = [c[name]["accuracy"] for c in cells if "accuracy" in c.get(name, {})]
        if any("error" in c.get(name, {}) for c in cells):
            return "refused"
        return f"{100 * statistics.fmean(accs):.1f}" if accs and len(accs) == len(cells) else "–"

    print("\n### Summary: mean test accuracy % over the measured pairs\n")
    print("| mode | " + " | ".join(f"{f} ({len(c)} pair{'s' * (len(c) > 1)})" for f, c in found.items()) + " |")
    print("|---|" + "---:|" * len(found))
    print("| parents (mean) | " + " | ".join(f"{100 * statistics.fmean(statistics.fmean(c['parents']) for c in cells):.1f}"
                                           for cells in found.values()) + " |")
    for name, _ in modes:
        print(f"| {name} | " + " | ".join(mean(cells, name) for cells in found.values()) + " |")


def main(args) -> None:
    families = [f for f in args.families.split(",") if f]
    pairs = [int(p) for p in str(args.pairs).split(",")]
    modes = MODES if not args.rows else [m for m in MODES if m[0] in args.rows.split(";")]
    torch.set_num_threads(args.threads)
    if not args.print_only:
        data = digits.load_split()
        for family in families:
            for pair in pairs:
                measure(family, pair, modes, data)
    print_tables(families, pairs, modes)
    print_summary(families, pairs, modes)
