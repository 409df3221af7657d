"""Refinement over whole symmetry groups on digits ViT pairs: one-shot test accuracy and refinement time.

    python benchmarks/refine_groups.py [--pairs 3] [--modes perm,full,perm+refine,full+refine] [--steps 300]
                                       [--threads 1] [--json FILE]

Pairs are the ones of ``benchmarks/quality.py`` (``digits.vit``, pair i = seeds
2i+1, 2i+2, the shipped hyper-parameters), trained once and cached under
``benchmarks/.cache/``. Each mode is one ``fxfuse.compile`` call (target 0,
seed 0): ``perm`` / ``full`` are ``groups="perm"`` / ``"full"`` with the weights
cost; ``act-full`` the activations cost on the first 512 training images;
``X+refine`` adds ``RefineConfig(--steps, training split)``; ``X+refineN``
refines ``N`` steps; ``X+refine+scales`` also learns unit scales of the fused
model (``scales=True``, ``--lr-scales``). Printed: per pair and mean, test accuracy (400 images) and
the refinement's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import _paths  # noqa: E402,F401
import digits  # noqa: E402
import fxfuse  # noqa: E402
from fxfuse.backend.refine import RefineConfig  # noqa: E402

CACHE = _paths.ROOT / "benchmarks" / ".cache"
N_CALIB = 512


def parent(seed: int, data):
    """A digits ViT trained with the shipped recipe from ``seed`` (cached)."""
    hp = digits.HYPERPARAMS["vit"]
    model, example = digits.vit(seed=seed)
    path = CACHE / f"digits_vit_seed{seed}_e{hp['epochs']}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), example
    torch.manual_seed(seed)
    digits.train(model, hp["epochs"], seed, lr=hp["lr"], batch_size=hp["batch_size"], data=data[:2])
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), example


def options(mode: str, steps: int, data, lr_scales: float = 0.01) -> dict:
    base, _, refine = mode.partition("+")
    refine, _, scales = refine.partition("+")
    kw = {"groups": "perm" if base in ("perm", "act-perm") else "full",
          "cost": "activations" if base.startswith("act") else "weights"}
    if kw["cost"] == "activations":
        kw["calib"] = data[0][:N_CALIB]
    if refine:
        n = int(refine[len("refine"):] or steps)
        kw["refine"] = RefineConfig(n, data[0], data[1], scales=scales == "scales", lr_scales=lr_scales)
    return kw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--modes", default="perm,full,perm+refine,full+refine")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr-scales", type=float, default=0.01, help="learning rate of the unit scales (+scales)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits.load_split()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows: dict[str, list] = {m: [] for m in ["parents (mean)", "vanilla"] + modes}
    times: dict[str, list] = {m: [] for m in modes}
    for i in range(args.pairs):
        seeds = (2 * i + 1, 2 * i + 2)
        parents, example = zip(*(parent(s, data) for s in seeds))
        rows["parents (mean)"].append(statistics.fmean(digits.accuracy(m, *data[2:]) for m in parents))
        van = fxfuse.compile(list(parents), example[0], method="vanilla")
        rows["vanilla"].append(digits.accuracy(van.module, *data[2:]))
        for mode in modes:
            t0 = time.perf_counter()
            res = fxfuse.compile(list(parents), example[0], target=0, seed=0,
                                 **options(mode, args.steps, data, args.lr_scales))
            acc = digits.accuracy(res.module, *data[2:])
            rows[mode].append(acc)
            t = res.report["refine"]["seconds"] if "refine" in res.report else float("nan")
            times[mode].append(t)
            print(f"pair {i} {seeds} {mode}: {100 * acc:.2f} % (compile {time.perf_counter() - t0:.1f} s, "
                  f"refine {t:.1f} s, check {res.report['self_check'][1]})", file=sys.stderr, flush=True)
    print(f"digits ViT, {args.pairs} pairs, target 0, seed 0, refine steps {args.steps} unless named, "
          f"{args.threads} thread(s); test accuracy %")
    print(f"{'mode':<22} {'mean':>6} " + " ".join(f"{'pair ' + str(i):>7}" for i in range(args.pairs))
          + f" {'refine s':>9}")
    for mode, accs in rows.items():
        t = times.get(mode)
        ts = f"{statistics.fmean(t):9.1f}" if t and t[0] == t[0] else ""
        print(f"{mode:<22} {100 * statistics.fmean(accs):6.2f} " + " ".join(f"{100 * a:7.2f}" for a in accs)
              + f" {ts}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "refine_s": times, "steps": args.steps}, fh, indent=1)


if __name__ == "__main__":
    main()
