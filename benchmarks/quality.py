"""Fusion quality on scikit-learn ``digits``: parents vs vanilla averaging vs fxfuse, one-shot and after 1 epoch.

    python benchmarks/quality.py [--pairs 3] [--families mlp,vit] [--json FILE] [--threads 2]
    python benchmarks/quality.py --modes [--families vit,hf64-short,hf128-long] [--pairs 0,1] [--print-only]

``--modes``: every fusion mode side by side per pair, with time, and the digits
ViT width/training sweep (``benchmarks/quality_modes.py``).

For each family (``digits.mlp``, ``digits.vit`` of ``examples/digits.py``) it trains
``--pairs`` pairs of models from different seeds (pair i = seeds 2i+1, 2i+2)
with the shipped hyper-parameters (``digits.HYPERPARAMS``), then measures test
accuracy (the fixed 400-image test split) of

* each parent, as trained (mean of the two, and the better one);
* vanilla averaging (``method="vanilla"``);
* fxfuse with cost weights/activations x solver exact/sinkhorn (target 0;
  calibration: the first 512 *training* images; sinkhorn ``reg`` left at the
  default, 0.06 on the cost normalised by its max);
* fxfuse weights/activations with the exact solver and ``groups="full"``
  (norm scales folded, orthogonal residual streams and in-head maps), beside
  the same settings with permutations (the loss barriers too); and with
  groups full refined (``--refine-steps``, the rows marked ``+ refine``);

once as produced ("one-shot") and once after one epoch of finetuning on the
training split (``digits.train`` for 1 epoch: Adam, 10% linear warm-up, cosine
decay, at ``FT_LR_FACTOR`` x the family's training lr, the same shuffle seed for
every model of a pair). The parents get the same extra epoch as the honest
reference ("parents +1 epoch"). Every cell is the mean over the pairs, with the
standard deviation and the min-max.

A last row is a reference, not a method: weights/sinkhorn with ``reg=10``,
a near-uniform plan that spreads every unit of model 1 evenly, so the aligned
model 1 is at chance and the "fusion" is model 0 plus a constant. A soft map
can score well one-shot just by washing model 1 out; this row shows how far.

Finally it sweeps the sinkhorn ``reg`` (0.01, 0.03, 0.06, 0.1) on the first
pair of each family (the ViT is the one of interest; the MLP sweep costs about
a second), for both costs, one-shot.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (set before torch is imported):
on a shared 2-core machine, spinning OpenMP threads made ViT training ~30x
slower. Everything is seeded (model init, training shuffles, fxfuse ``seed=0``), so
two runs with the same thread count print the same accuracies. Wall times are
printed for information only; the machine may be shared.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

# OpenMP threads that spin while they wait make a shared 2-core machine crawl: measured under a
# load average of ~5.5, one ViT training epoch took 66 s wall with 2 spinning threads, 2.4 s with
# OMP_WAIT_POLICY=PASSIVE (2.1 s with 1 thread). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import _paths  # noqa: E402,F401  (examples/ on sys.path, for the digits example)
import digits  # noqa: E402
import fxfuse  # noqa: E402

N_CALIB = 512
FT_EPOCHS = 1
FT_LR_FACTOR = 0.5          # finetuning lr = this x the family's training lr (HYPERPARAMS)
FT_SEED = 1000              # finetuning shuffle seed for pair i: FT_SEED + i (shared by all models of the pair)
DEFAULT_REG = 0.06          # fxfuse.core.solvers.solve's default when reg=None
SWEEP_REGS = (0.01, 0.03, 0.06, 0.1)
UNIFORM_REG = 10.0          # extra sweep column: a near-uniform soft map, i.e. no alignment at all (reference)

# (row name, compile kwargs); "calib" is filled in at run time
FUSIONS = [
    ("vanilla", {"method": "vanilla"}),
    ("fxfuse weights/exact", {"cost": "weights", "solver": "exact"}),
    ("fxfuse weights/sinkhorn", {"cost": "weights", "solver": "sinkhorn"}),
    ("fxfuse activations/exact", {"cost": "activations", "solver": "exact"}),
    ("fxfuse activations/sinkhorn", {"cost": "activations", "solver": "sinkhorn"}),
    # data-aware: statistics repair on the calibration images; refinement of the maps on the training split
    ("fxfuse weights/exact + repair", {"cost": "weights", "solver": "exact", "repair": True}),
    ("fxfuse weights/exact + refine", {"cost": "weights", "solver": "exact", "refine": True}),
    ("fxfuse weights/exact + refine + repair", {"cost": "weights", "solver": "exact", "refine": True, "repair": True}),
    ("fxfuse weights/exact, groups full", {"cost": "weights", "solver": "exact", "groups": "full"}),
    ("fxfuse activations/exact, groups full", {"cost": "activations", "solver": "exact", "groups": "full"}),
    ("fxfuse weights/exact, groups full + refine", {"cost": "weights", "solver": "exact", "groups": "full",
                                                    "refine": True}),
    # Not a method: a reference for how much a soft map can score by *removing* model 1's function.
    # With reg this large the plan is ~uniform, the aligned model 1 is at chance, and the average is
    # ~model 0 plus a constant. A sinkhorn row near or below it owes its one-shot score to that, not to
    # alignment.
    ("reference: no alignment (weights/sinkhorn reg 10)", {"cost": "weights", "solver": "sinkhorn", "reg": 10.0}),
]
FXFUSE_ROWS = [name for name, _ in FUSIONS if name.startswith("fxfuse")]
REFINE = {"steps": 300, "lr": 0.2, "batch_size": 32}  # refinement budget (--refine-steps), on the training split
TRAIN_DATA: tuple = ()                                 # (x_train, y_train), set by main
REPAIR_TARGET, REFINE_TARGET = 0.88, 0.92              # ViT one-shot targets with repair / with refinement


def compile_kwargs(kw: dict, calib: torch.Tensor) -> dict:
    """``fxfuse.compile`` options of a row: calibration for activations and repair, a ``RefineConfig``."""
    from fxfuse.backend.refine import RefineConfig

    kw = dict(kw)
    if kw.get("cost") == "activations" or kw.get("repair"):
        kw["calib"] = calib
    if kw.get("refine"):
        kw["refine"] = RefineConfig(REFINE["steps"], *TRAIN_DATA, lr=REFINE["lr"], batch_size=REFINE["batch_size"])
    else:
        kw.pop("refine", None)
    return kw

# thresholds of the targets (stated in the output)
MLP_RATIO = 0.97            # one-shot fused >= 97% of the mean parent accuracy
MLP_VANILLA_RATIO = 0.94    # "vanilla clearly below": < 94% of the mean parent accuracy (3 points under the bar)
VIT_GAP = 0.20              # "far above vanilla": best fxfuse one-shot >= vanilla + 20 points


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def cell(s: dict) -> str:
    if s["n"] == 0:
        return "error"
    return f"{100 * s['mean']:.2f} ±{100 * s['std']:.2f} ({100 * s['min']:.2f}–{100 * s['max']:.2f})"


def finetune(model: torch.nn.Module, hp: dict, seed: int, data) -> torch.nn.Module:
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    return digits.train(model, FT_EPOCHS, seed, lr=FT_LR_FACTOR * hp["lr"], batch_size=hp["batch_size"],
                        data=data)


def git_commit() -> str:
    import subprocess

    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "fxfuse"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty fxfuse/" if dirty.stdout.strip() else "") if out.returncode == 0 else "?"
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def fuse(parents, example_args, kw: dict, calib: torch.Tensor, test=None):
    """``(module, info)``; ``module`` is None when compile raised (the error is in ``info``).

    With ``test = (x, y)``, ``info["aligned_acc"]`` is the test accuracy of model 1 moved into
    model 0's basis: its own accuracy for a hard map, less for a soft (sinkhorn) map.
    """
    kw = compile_kwargs(kw, calib)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fxfuse.compile(parents, example_args, target=0, seed=0, **kw)
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            return None, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    solver_warnings = sorted({str(w.message) for w in caught if "sinkhorn" in str(w.message) or "OT" in str(w.message)})
    checks = result.report["self_check"][1]
    info = {"seconds": time.perf_counter() - t0, "self_check": checks,
            "solver_warnings": solver_warnings, "notes": result.report["notes"]}
    if "refine" in result.report:
        info["refine"] = {k: result.report["refine"][k] for k in ("steps", "seconds", "loss_at_weights_before",
                                                                  "loss_at_weights_after")}
    if test is not None:
        info["aligned_acc"] = digits.accuracy(result.aligned[1], *test)
    return result.module, info


def run_family(family: str, pairs: int, data) -> dict:
    x_tr, y_tr, x_te, y_te = data
    calib = x_tr[:N_CALIB]
    hp = digits.HYPERPARAMS[family]
    factory = digits.EXAMPLES[family]
    rows: dict[str, dict[str, list]] = {}

    def put(row: str, col: str, value) -> None:
        rows.setdefault(row, {}).setdefault(col, []).append(value)

    per_pair = []
    first_pair = None
    for i in range(pairs):
        seeds = (2 * i + 1, 2 * i + 2)
        t0 = time.perf_counter()
        parents, example_args = [], None
        for s in seeds:
            model, example_args = factory(seed=s)
            torch.manual_seed(s)
            t_train = time.perf_counter()
            digits.train(model, hp["epochs"], s, lr=hp["lr"], batch_size=hp["batch_size"], data=(x_tr, y_tr))
            put("parents (mean of 2)", "train_s", time.perf_counter() - t_train)
            parents.append(model)
        acc_p = [digits.accuracy(m, x_te, y_te) for m in parents]
        ft_seed = FT_SEED + i
        acc_p_ft = [digits.accuracy(finetune(m, hp, ft_seed, (x_tr, y_tr)), x_te, y_te) for m in parents]
        put("parents (mean of 2)", "oneshot", statistics.fmean(acc_p))
        put("parents (mean of 2)", "ft", statistics.fmean(acc_p_ft))
        put("better parent", "oneshot", max(acc_p))
        put("better parent", "ft", max(acc_p_ft))
        record = {"seeds": seeds, "parents": acc_p, "parents_ft": acc_p_ft, "fusions": {}}
        log(f"[{family}] pair {i} seeds {seeds}: parents {acc_p} (+1 epoch {acc_p_ft}), "
            f"trained in {time.perf_counter() - t0:.0f} s")
        for name, kw in FUSIONS:
            fused, info = fuse(parents, example_args, kw, calib, test=(x_te, y_te))
            if fused is None:
                log(f"[{family}] pair {i} {name}: FAILED {info['error']}")
                put(name, "oneshot", None)
                put(name, "ft", None)
                put(name, "ratio", None)
                put(name, "aligned", None)
                record["fusions"][name] = info
                continue
            acc = digits.accuracy(fused, x_te, y_te)
            acc_ft = digits.accuracy(finetune(fused, hp, ft_seed, (x_tr, y_tr)), x_te, y_te)
            put(name, "oneshot", acc)
            put(name, "ft", acc_ft)
            put(name, "ratio", acc / statistics.fmean(acc_p))
            put(name, "aligned", info["aligned_acc"])
            if "refine" in info:
                put(name, "refine_s", info["refine"]["seconds"])
            info.update(oneshot=acc, ft=acc_ft)
            record["fusions"][name] = info
            log(f"[{family}] pair {i} {name}: {acc:.4f} -> {acc_ft:.4f} after 1 epoch, aligned model 1 "
                f"{info['aligned_acc']:.4f} "
                f"({info['seconds']:.1f} s; check {info['self_check']})"
                + (f"; solver warnings: {info['solver_warnings']}" if info["solver_warnings"] else ""))
        record["barrier"] = pair_barriers(parents, example_args, calib, (x_te, y_te))
        put("barrier", "vanilla", record["barrier"]["vanilla"]["barrier"])
        for setting in BARRIER_SETTINGS:
            put("barrier", setting, record["barrier"][setting]["barrier"])
        log(f"[{family}] pair {i} barriers: " + ", ".join(f"{k} {v['barrier']:.3f}" for k, v in record["barrier"].items()))
        per_pair.append(record)
        if first_pair is None:
            first_pair = (parents, example_args)
            plot_barriers(family, record["barrier"], seeds)
    summary = {row: {col: stats(v) for col, v in cols.items()} for row, cols in rows.items()}
    return {"family": family, "hyperparams": hp, "ft_lr": FT_LR_FACTOR * hp["lr"], "pairs": per_pair,
            "summary": summary, "_first_pair": first_pair}


BARRIER_SETTINGS = {"fxfuse weights": {"cost": "weights"}, "fxfuse activations": {"cost": "activations"},
                    "fxfuse weights, groups full": {"cost": "weights", "groups": "full"},
                    "fxfuse activations, groups full": {"cost": "activations", "groups": "full"}}
BARRIER_POINTS = 11


def pair_barriers(parents, example_args, calib, test) -> dict:
    """Test loss along A → B: vanilla, and B aligned by each setting (``fxfuse.barrier``)."""
    out = {}
    for name, kw in BARRIER_SETTINGS.items():
        r = fxfuse.barrier(parents[0], parents[1], *test, example_args, points=BARRIER_POINTS,
                           calib=calib if kw["cost"] == "activations" else None, **kw)
        out.setdefault("vanilla", {"barrier": r.vanilla.barrier, "loss": list(r.vanilla.loss),
                                   "accuracy": list(r.vanilla.accuracy)})
        out[name] = {"barrier": r.aligned.barrier, "loss": list(r.aligned.loss), "accuracy": list(r.aligned.accuracy)}
    return out


def plot_barriers(family: str, barriers: dict, seeds) -> None:
    """``benchmarks/quality_barrier_<family>.png``: the curves of the first pair."""
    from fxfuse.api.barrier import Curve, plot

    lambdas = tuple(i / (BARRIER_POINTS - 1) for i in range(BARRIER_POINTS))
    curves = [(name, Curve(lambdas, tuple(b["loss"]))) for name, b in barriers.items()]
    path = Path(__file__).resolve().parent / f"quality_barrier_{family}.png"
    plot(curves, str(path), title=f"digits {family.upper()}: test loss from seed {seeds[0]} to seed {seeds[1]}")


def print_barriers(res: dict) -> None:
    summary = res["summary"]["barrier"]
    print(f"\nLoss barrier on the test set ({BARRIER_POINTS} points, cross-entropy), mean ±std (min–max) over pairs; "
          f"curves of the first pair: benchmarks/quality_barrier_{res['family']}.png\n")
    print("| interpolation | barrier | vs vanilla |")
    print("|---|---:|---:|")
    base = summary["vanilla"]["mean"]
    for name, st in summary.items():
        cut = "" if name == "vanilla" else f"{100 * (st['mean'] / base - 1):+.0f}%"
        print(f"| {name} | {st['mean']:.3f} ±{st['std']:.3f} ({st['min']:.3f}–{st['max']:.3f}) | {cut} |")


def reg_sweep(family: str, parents, example_args, data) -> list[dict]:
    x_tr, _, x_te, y_te = data
    out = []
    for cost in ("weights", "activations"):
        for reg in SWEEP_REGS + (UNIFORM_REG,):
            fused, info = fuse(parents, example_args, {"cost": cost, "solver": "sinkhorn", "reg": reg}, x_tr[:N_CALIB],
                               test=(x_te, y_te))
            acc = None if fused is None else digits.accuracy(fused, x_te, y_te)
            out.append({"family": family, "cost": cost, "reg": reg, "oneshot": acc, **{k: v for k, v in info.items() if k != "traceback"}})
            log(f"[{family} reg sweep] {cost} reg={reg}: {acc} ({info.get('error') or info['self_check']})")
    return out


def print_family(res: dict) -> dict:
    fam, s = res["family"], res["summary"]
    hp = res["hyperparams"]
    n = len(res["pairs"])
    print(f"\n### {fam.upper()} — {n} pair(s), seeds {', '.join(str(p['seeds']) for p in res['pairs'])}; "
          f"training {hp['epochs']} epochs, lr {hp['lr']:g}, batch {hp['batch_size']}; "
          f"finetune {FT_EPOCHS} epoch at lr {res['ft_lr']:g}\n")
    print("Test accuracy (%), mean ±std (min–max) over pairs. Parent rows: the finetune column is the parents +1 epoch. "
          "Last column: model 1 after its alignment into model 0's basis, before averaging (mean; = model 1 for a hard map).\n")
    print("| method | one-shot | one-shot / mean parent | after 1-epoch finetune | aligned copy of model 1 |")
    print("|---|---:|---:|---:|---:|")
    for row in ["parents (mean of 2)", "better parent"] + [name for name, _ in FUSIONS]:
        r = s[row]
        ratio = f"{100 * r['ratio']['mean']:.1f}%" if "ratio" in r and r["ratio"]["n"] else ("100.0%" if row.startswith("parents") else "—")
        if row == "better parent":
            ratio = f"{100 * s['better parent']['oneshot']['mean'] / s['parents (mean of 2)']['oneshot']['mean']:.1f}%"
        label = {"parents (mean of 2)": "parents, mean of 2 (→ +1 epoch)",
                 "better parent": "better parent (→ better after +1 epoch)"}.get(row, row)
        if "refine_s" in r:
            label += f" ({REFINE['steps']} steps, {r['refine_s']['mean']:.0f} s)"
        aligned = f"{100 * r['aligned']['mean']:.2f}" if "aligned" in r and r["aligned"]["n"] else ""
        print(f"| {label} | {cell(r['oneshot'])} | {ratio} | {cell(r['ft'])} | {aligned} |")

    def m(row, col="oneshot"):
        return s[row][col]["mean"]

    mean_parent, better, better_ft = m("parents (mean of 2)"), m("better parent"), m("better parent", "ft")
    fx = {row: m(row) for row in FXFUSE_ROWS if s[row]["oneshot"]["n"]}
    best_row = max(fx, key=fx.get) if fx else None
    targets = {}
    lines = []
    if fam == "mlp":
        ok_best = best_row is not None and fx[best_row] >= MLP_RATIO * mean_parent
        ok_we = "fxfuse weights/exact" in fx and fx["fxfuse weights/exact"] >= MLP_RATIO * mean_parent
        ok_van = m("vanilla") < MLP_VANILLA_RATIO * mean_parent
        targets.update(mlp_best_ge_97=ok_best, mlp_weights_exact_ge_97=ok_we, mlp_vanilla_clearly_below=ok_van)
        lines.append(f"one-shot best fxfuse ({best_row}) {100 * fx[best_row]:.2f} ≥ {MLP_RATIO:.0%} × mean parent "
                     f"= {100 * MLP_RATIO * mean_parent:.2f}: {'MET' if ok_best else 'MISSED'}")
        lines.append(f"one-shot weights/exact {100 * fx.get('fxfuse weights/exact', float('nan')):.2f} ≥ "
                     f"{100 * MLP_RATIO * mean_parent:.2f}: {'MET' if ok_we else 'MISSED'}")
        lines.append(f"vanilla {100 * m('vanilla'):.2f} clearly below (< {MLP_VANILLA_RATIO:.0%} × mean parent = "
                     f"{100 * MLP_VANILLA_RATIO * mean_parent:.2f}): {'MET' if ok_van else 'MISSED'}")
    else:
        gap = fx[best_row] - m("vanilla") if best_row else float("nan")
        ok = best_row is not None and gap >= VIT_GAP
        targets.update(vit_far_above_vanilla=ok)
        lines.append(f"one-shot best fxfuse ({best_row}) {100 * fx[best_row]:.2f} vs vanilla {100 * m('vanilla'):.2f}: "
                     f"+{100 * gap:.1f} points (target ≥ +{100 * VIT_GAP:.0f}): {'MET' if ok else 'MISSED'}; "
                     f"every fxfuse setting minus vanilla: "
                     + ", ".join(f"{r.removeprefix('fxfuse ')} {100 * (v - m('vanilla')):+.1f}" for r, v in fx.items()))
    ft_ok = {}
    for row in FXFUSE_ROWS:
        if not s[row]["ft"]["n"]:
            continue
        v = m(row, "ft")
        ft_ok[row] = v >= better
        lines.append(f"after 1-epoch finetune {row.removeprefix('fxfuse ')} {100 * v:.2f} ≥ better parent as trained "
                     f"{100 * better:.2f}: {'MET' if v >= better else 'MISSED'}; vs better parent +1 epoch "
                     f"{100 * better_ft:.2f}: {100 * (v - better_ft):+.2f} points; vs mean parent +1 epoch "
                     f"{100 * m('parents (mean of 2)', 'ft'):.2f}: {100 * (v - m('parents (mean of 2)', 'ft')):+.2f}")
    van_ft = m("vanilla", "ft")
    lines.append(f"(vanilla after 1-epoch finetune {100 * van_ft:.2f}; ≥ better parent as trained: "
                 f"{'yes' if van_ft >= better else 'no'})")
    targets["ft_ge_better_parent"] = ft_ok
    ref = "reference: no alignment (weights/sinkhorn reg 10)"
    if ref in s and s[ref]["oneshot"]["n"]:
        lines.append(f"(no-alignment reference one-shot {100 * m(ref):.2f}, aligned model 1 at "
                     f"{100 * s[ref]['aligned']['mean']:.2f}; fxfuse settings above it: "
                     + (", ".join(r.removeprefix('fxfuse ') for r, v in fx.items() if v > m(ref)) or "none") + ")")
    # a sanity check, not a target: an fxfuse setting below vanilla would point at a bug
    below = [row for row, v in fx.items() if v < m("vanilla")]
    if below:
        lines.append(f"WARNING: one-shot below vanilla for {', '.join(below)} — investigate")
    if "train_s" in s["parents (mean of 2)"]:
        lines.append(f"cost: parents' training {s['parents (mean of 2)']['train_s']['mean']:.0f} s per model "
                     f"({hp['epochs']} epochs × {math.ceil(1397 / hp['batch_size'])} steps of {hp['batch_size']}); "
                     f"refinement {REFINE['steps']} steps of {REFINE['batch_size']} at lr {REFINE['lr']:g}")
    if fam == "vit":
        for row, goal in (("fxfuse weights/exact + repair", REPAIR_TARGET), ("fxfuse weights/exact + refine", REFINE_TARGET),
                          ("fxfuse weights/exact + refine + repair", REFINE_TARGET)):
            if row in fx:
                targets[row] = fx[row] >= goal
                lines.append(f"one-shot {row.split(' ', 2)[2]} {100 * fx[row]:.2f} ≥ {100 * goal:.0f}: "
                             f"{'MET' if fx[row] >= goal else 'MISSED'}")
    print(f"\nTargets ({fam.upper()}):")
    for line in lines:
        print(f"- {line}")
    return targets


# ---------------------------------------------------------------- heterogeneous pairs

# (family, model A kwargs, model B kwargs, targets: (label, index)); A is the wide / deep one
HETERO = {
    "mlp-width": ("mlp", {"h1": 256, "h2": 128}, {"h1": 128, "h2": 64}, [("narrow", 1)]),
    "vit-depth": ("vit", {"depth": 4}, {"depth": 2}, [("shallow", 1), ("deep", 0)]),
}
HETERO_FUSIONS = [(name, kw) for name, kw in FUSIONS if name in FXFUSE_ROWS and "groups" not in kw]


def run_hetero(kind: str, pairs: int, data) -> dict:
    """Wide/narrow or deep/shallow pairs: parents, the target alone, fxfuse into each target; one-shot and +1 epoch.

    Plain averaging is undefined across shapes, so the baseline is the target parent alone,
    and after finetuning the target parent trained one epoch more (the same total epochs).
    """
    x_tr, y_tr, x_te, y_te = data
    calib = x_tr[:N_CALIB]
    family, kw_a, kw_b, targets = HETERO[kind]
    hp = digits.HYPERPARAMS[family]
    factory = digits.EXAMPLES[family]
    rows: dict[str, dict[str, list]] = {}
    per_pair = []

    def put(row: str, col: str, value) -> None:
        rows.setdefault(row, {}).setdefault(col, []).append(value)

    for i in range(pairs):
        seeds = (2 * i + 1, 2 * i + 2)
        parents, example_args = [], None
        for s, kw in zip(seeds, (kw_a, kw_b)):
            model, example_args = factory(seed=s, **kw)
            torch.manual_seed(s)
            digits.train(model, hp["epochs"], s, lr=hp["lr"], batch_size=hp["batch_size"], data=(x_tr, y_tr))
            parents.append(model)
        ft_seed = FT_SEED + i
        acc_p = [digits.accuracy(m, x_te, y_te) for m in parents]
        acc_p_ft = [digits.accuracy(finetune(m, hp, ft_seed, (x_tr, y_tr)), x_te, y_te) for m in parents]
        record = {"seeds": seeds, "parents": acc_p, "parents_ft": acc_p_ft, "fusions": {}}
        log(f"[{kind}] pair {i} seeds {seeds}: parents {acc_p} (+1 epoch {acc_p_ft})")
        for label, t in targets:
            put(f"{label}: parent A ({_kw_text(kw_a)})", "oneshot", acc_p[0])
            put(f"{label}: parent A ({_kw_text(kw_a)})", "ft", acc_p_ft[0])
            put(f"{label}: parent B ({_kw_text(kw_b)})", "oneshot", acc_p[1])
            put(f"{label}: parent B ({_kw_text(kw_b)})", "ft", acc_p_ft[1])
            put(f"{label}: target alone", "oneshot", acc_p[t])
            put(f"{label}: target alone", "ft", acc_p_ft[t])
            for name, kw in HETERO_FUSIONS:
                row = f"{label}: {name}"
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        result = fxfuse.compile(parents, example_args, target=t, seed=0,
                                                **dict(compile_kwargs(kw, calib), calib=calib))
                    except Exception as exc:  # noqa: BLE001 - reported, never hidden
                        log(f"[{kind}] pair {i} {row}: FAILED {type(exc).__name__}: {exc}")
                        record["fusions"][row] = {"error": f"{type(exc).__name__}: {exc}"}
                        continue
                acc = digits.accuracy(result.module, x_te, y_te)
                acc_ft = digits.accuracy(finetune(result.module, hp, ft_seed, (x_tr, y_tr)), x_te, y_te)
                aligned = digits.accuracy(result.aligned[1 - t], x_te, y_te)
                put(row, "oneshot", acc)
                put(row, "ft", acc_ft)
                put(row, "aligned", aligned)
                info = {"oneshot": acc, "ft": acc_ft, "aligned_acc": aligned, "seconds": time.perf_counter() - t0,
                        "self_check": result.report["self_check"][1 - t],
                        "depth_maps": [{k: d[k] for k in ("path", "source_of", "dropped", "matched_costs")}
                                       for d in result.report["depth_maps"]],
                        "width_maps": result.report["width_maps"]}
                if "refine" in result.report:
                    info["refine_s"] = result.report["refine"]["seconds"]
                    put(row, "refine_s", info["refine_s"])
                record["fusions"][row] = info
                depth = "; ".join(f"{d['path']} {d['source_of']}" for d in info["depth_maps"])
                log(f"[{kind}] pair {i} {row}: {acc:.4f} -> {acc_ft:.4f} after 1 epoch, aligned source {aligned:.4f} "
                    f"({info['seconds']:.1f} s)" + (f"; depth map {depth}" if depth else ""))
        per_pair.append(record)
    summary = {row: {col: stats(v) for col, v in cols.items()} for row, cols in rows.items()}
    return {"kind": kind, "family": family, "a": kw_a, "b": kw_b, "targets": targets, "hyperparams": hp,
            "pairs": per_pair, "summary": summary}


def _kw_text(kw: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in kw.items())


def print_hetero(res: dict) -> dict:
    s, hp = res["summary"], res["hyperparams"]
    n = len(res["pairs"])
    print(f"\n### {res['kind']} — {n} pair(s): A = {res['family']} {_kw_text(res['a'])} (seed 2i+1), "
          f"B = {_kw_text(res['b'])} (seed 2i+2); training {hp['epochs']} epochs; finetune {FT_EPOCHS} epoch\n")
    print("Test accuracy (%), mean ±std (min–max) over pairs. The finetune column of a parent is that parent "
          "+1 epoch (the same total number of epochs as a fused model finetuned once). Last column: the source "
          "model after its alignment into the target's widths/depth, before averaging.\n")
    print("| target | model | one-shot | after 1-epoch finetune | aligned source |")
    print("|---|---|---:|---:|---:|")
    targets = {}
    lines = []
    for label, _ in res["targets"]:
        for row in [r for r in s if r.startswith(label + ":")]:
            r = s[row]
            aligned = f"{100 * r['aligned']['mean']:.2f}" if "aligned" in r else ""
            name = row.split(': ', 1)[1] + (f" ({REFINE['steps']} steps, {r['refine_s']['mean']:.0f} s)"
                                            if "refine_s" in r else "")
            print(f"| {label} | {name} | {cell(r['oneshot'])} | {cell(r['ft'])} | {aligned} |")
        base = s[f"{label}: target alone"]
        for name, _ in HETERO_FUSIONS:
            r = s.get(f"{label}: {name}")
            if r is None or not r["ft"]["n"]:
                continue
            ok = r["ft"]["mean"] > base["ft"]["mean"]
            targets[f"{label}: {name}"] = ok
            lines.append(f"{label}, {name.removeprefix('fxfuse ')}: fused +1 epoch {100 * r['ft']['mean']:.2f} vs target parent +1 "
                         f"epoch {100 * base['ft']['mean']:.2f} ({100 * (r['ft']['mean'] - base['ft']['mean']):+.2f}): "
                         f"{'MET' if ok else 'MISSED'}; one-shot vs target alone "
                         f"{100 * (r['oneshot']['mean'] - base['oneshot']['mean']):+.2f}")
    print(f"\nTargets ({res['kind']}: after one epoch of finetuning the fused model beats the target parent "
          "trained one epoch more):")
    for line in lines:
        print(f"- {line}")
    return targets


def print_sweep(family: str, sweep: list[dict]) -> None:
    print(f"\n### {family.upper()} sinkhorn reg sweep (pair 0, seeds (1, 2), one-shot test accuracy %; default reg = {DEFAULT_REG})\n")
    regs = SWEEP_REGS + (UNIFORM_REG,)
    print("| cost | " + " | ".join(f"reg {r}" for r in SWEEP_REGS) + f" | reg {UNIFORM_REG:g} (≈ no alignment) |")
    print("|---|" + "---:|" * len(regs))
    for cost in ("weights", "activations"):
        cells = []
        for r in regs:
            e = next(x for x in sweep if x["cost"] == cost and x["reg"] == r)
            if e["oneshot"] is None:
                cells.append("error")
                continue
            c = f"{100 * e['oneshot']:.2f}"
            drift = e["self_check"].get("drift")
            c += f" (aligned {100 * e['aligned_acc']:.1f}" + (f", drift {drift:.2f})" if drift is not None else ")")
            if e["solver_warnings"]:
                c += " ⚠ not converged"
            cells.append(c)
        print(f"| {cost} | " + " | ".join(cells) + " |")
    print("\n(fused accuracy; in brackets: test accuracy of the aligned copy of model 1 alone, and its drift = relative "
          "output change vs model 1 on the example inputs; a hard permutation gives ~0. The last column is a "
          "reference: so strong a regularisation that every source unit is spread evenly over the target units.)")


def modes_main(argv) -> None:
    import quality_modes

    ap = argparse.ArgumentParser(description=quality_modes.__doc__.split("\n\n")[0])
    ap.add_argument("--modes", action="store_true")
    ap.add_argument("--families", default="vit,hf64-short,hf64-long,hf128-short,hf128-long")
    ap.add_argument("--pairs", default="0", help="comma-separated pair indices (pair i: seeds 2i+1, 2i+2)")
    ap.add_argument("--rows", help="semicolon-separated mode names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--print-only", action="store_true", help="print the cached cells, measure nothing")
    quality_modes.main(ap.parse_args(argv))


def main(argv=None) -> None:
    global FT_LR_FACTOR
    if "--modes" in (sys.argv[1:] if argv is None else argv):
        return modes_main(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--families", default="mlp,vit,mlp-width,vit-depth",
                    help="comma-separated subset of mlp,vit (twin pairs) and mlp-width,vit-depth (heterogeneous pairs)")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sinkhorn reg sweeps")
    ap.add_argument("--ft-lr-factor", type=float, default=FT_LR_FACTOR,
                    help=f"finetuning lr as a multiple of the family's training lr (default {FT_LR_FACTOR})")
    ap.add_argument("--rows", help="semicolon-separated row names (some hold commas): keep only these fxfuse rows "
                    "(parents and vanilla always stay), e.g. 'fxfuse weights/exact;fxfuse weights/exact + refine'")
    ap.add_argument("--refine-steps", type=int, default=REFINE["steps"], help="refinement steps of the + refine rows")
    ap.add_argument("--refine-lr", type=float, default=REFINE["lr"], help="refinement learning rate")
    args = ap.parse_args(argv)
    global TRAIN_DATA
    REFINE["steps"], REFINE["lr"] = args.refine_steps, args.refine_lr
    if args.rows:
        keys = [k.strip() for k in args.rows.split(";") if k.strip()]
        unknown = [k for k in keys if k not in dict(FUSIONS)]
        if unknown:
            ap.error(f"--rows: unknown rows {unknown} (choose from {', '.join(n for n, _ in FUSIONS)})")
        FUSIONS[:] = [(n, kw) for n, kw in FUSIONS if n == "vanilla" or n in keys]
        FXFUSE_ROWS[:] = [n for n, _ in FUSIONS if n.startswith("fxfuse")]
        HETERO_FUSIONS[:] = [(n, kw) for n, kw in FUSIONS if n in FXFUSE_ROWS]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in digits.EXAMPLES and f not in HETERO]
    if bad or not families:
        ap.error(f"unknown family {bad} (choose from {', '.join(list(digits.EXAMPLES) + list(HETERO))})")
    if args.pairs < 1:
        ap.error("--pairs must be ≥ 1")
    if not args.ft_lr_factor > 0:
        ap.error("--ft-lr-factor must be > 0")
    FT_LR_FACTOR = args.ft_lr_factor
    torch.set_num_threads(args.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    data = digits.load_split()
    TRAIN_DATA = (data[0], data[1])

    results, targets, sweeps, hetero = {}, {}, {}, {}
    for fam in [f for f in families if f in HETERO]:
        hetero[fam] = run_hetero(fam, args.pairs, data)
    for fam in [f for f in families if f not in HETERO]:
        res = run_family(fam, args.pairs, data)
        first = res.pop("_first_pair")
        results[fam] = res
        if not args.no_sweep:
            sweeps[fam] = reg_sweep(fam, *first, data)

    print(f"fxfuse fusion quality on digits, fxfuse commit {git_commit()}, torch {torch.__version__} (train {len(data[0])} / test {len(data[2])} images); "
          f"calibration: first {N_CALIB} training images; target model 0; "
          f"sinkhorn reg {DEFAULT_REG} (default, on the cost scaled by its max) unless stated; "
          f"finetune: {FT_EPOCHS} epoch, lr = {FT_LR_FACTOR:g} × training lr, warm-up 10% + cosine, shuffle seed "
          f"{FT_SEED}+pair")
    for fam in results:
        targets[fam] = print_family(results[fam])
        print_barriers(results[fam])
    for fam, res in hetero.items():
        targets[fam] = print_hetero(res)
    for fam, sweep in sweeps.items():
        print_sweep(fam, sweep)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    print(f"\nrun time: {wall:.0f} s wall, {cpu:.0f} s CPU ({args.threads} threads)")
    if args.json:
        for res in results.values():
            for p in res["pairs"]:
                for info in p["fusions"].values():
                    info.pop("traceback", None)
        payload = {"pairs": args.pairs, "families": families, "ft_epochs": FT_EPOCHS, "ft_lr_factor": FT_LR_FACTOR,
                   "calib": N_CALIB, "default_reg": DEFAULT_REG, "results": results, "hetero": hetero, "reg_sweep": sweeps,
                   "targets": targets, "wall_s": wall, "cpu_s": cpu, "threads": args.threads,
                   "torch": torch.__version__, "commit": git_commit()}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
            fh.write("\n")


if __name__ == "__main__":
    main()
