"""``fxfuse barrier A B --data FILE``: the loss along the line from model A to model B, vanilla and aligned
(``fxfuse.barrier``), printed, as JSON, or drawn."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..core.errors import FxfuseError
from .shared import (EPILOG, Progress, add_common, check_calib_file, check_calibration, check_paths, check_sample,
                     progress_bar, warn_unused_options)


def add_parser(sub) -> None:
    """``fxfuse barrier``: its sub-command and flags."""
    from ..recipes.recipe import add_options

    p = sub.add_parser("barrier", help="loss along the line from model A to model B, vanilla and aligned",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("models", nargs=2, metavar="MODEL", help="model A and model B (one architecture)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="labelled data (.pt/.safetensors): inputs, and labels (class ids, or token ids with -100 "
                   "ignored for language models)")
    p.add_argument("--points", type=int, default=21, help="interpolation points including both ends (default 21)")
    p.add_argument("--head", choices=["classification", "mlm", "causal"],
                   help="how to read the loss (default: from the model class)")
    add_options(p, ("match", "cost", "calib", "calib_random", "sample", "sample_length", "solver", "reg", "pin",
                    "heads", "groups", "untie", "repair", "refine", "refine_lr", "refine_batch", "refine_lr_orthogonal",
                    "refine_orthogonal", "refine_condition", "refine_scales", "refine_lr_scales"), overriding=False)
    p.add_argument("--refine-data", metavar="FILE", help="labelled data (.pt/.safetensors: inputs, labels) for "
                   "--refine (the curves are scored on --data)")
    p.add_argument("--plot", metavar="PNG", help="draw both curves into this PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the curves and barriers as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import atomic
    from ..api.barrier import barrier, plot
    from ..models.data import load_calibration, load_labelled
    from ..models.io import check_output_path, load_model
    from ..recipes.recipe import refine_config
    from ..frontend.rules import load_rules

    progress = Progress(args.quiet)
    check_paths([("--plot", args.plot)], list(args.models),
                 [("--data", args.data), ("--calib", args.calib), ("--refine-data", args.refine_data),
                  ("--rules", args.rules)])
    if args.plot:
        check_output_path(args.plot, args.force, owned="plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FxfuseError("--plot needs matplotlib: pip install 'fxfuse[plot]'") from None
    inputs, labels = load_labelled(args.data)
    calib = load_calibration(args.calib) if args.calib else args.calib_random
    check_calibration(args, calib)
    check_sample(args)
    if args.repair and calib is None:
        raise FxfuseError("--repair needs calibration inputs: pass --calib FILE (or --calib-random N)")
    refine = refine_config(args, "--refine-data", on_step=progress_bar(args.quiet))
    rules = load_rules(args.rules)
    a, b = (load_model(spec, trust_pickle=args.trust_pickle) for spec in args.models)
    if args.sample:  # causal LMs without a dataset: the refinement and calibration data drawn from A and B
        from ..models.sampling import labelled_by_themselves, sample_sequences

        calib = sample_sequences([a.module, b.module], a.args, a.kwargs, args.sample,
                                 names=[f"model A ({args.models[0]})", f"model B ({args.models[1]})"],
                                 progress=progress, length=args.sample_length)
        if refine is not None and not args.refine_data:
            refine = labelled_by_themselves(refine, calib)
    if args.cost == "activations" or args.repair:
        check_calib_file(args.calib, calib, a)
    if refine is not None:
        from ..api.barrier import check_refine_data

        check_refine_data(refine, [a.module, b.module], a.args, a.kwargs,
                          f"--refine-data {args.refine_data}" if args.refine_data else f"--sample {args.sample}")
    warn_unused_options(args, set(a.module.state_dict()) == set(b.module.state_dict()))
    result = barrier(a.module, b.module, inputs, labels, a.args, example_kwargs=a.kwargs, points=args.points,
                     head=args.head, progress=progress, cost=args.cost, calib=calib, solver=args.solver,
                     reg=args.reg, pin=args.pin, rules=rules, strict=args.strict, heads=args.heads,
                     repair=args.repair, refine=refine, groups=args.groups, untie=args.untie, match=args.match)
    if args.plot:
        out = Path(args.plot)
        fd, tmp = atomic.temp_file(out)
        os.close(fd)
        try:
            plot([("vanilla", result.vanilla), (f"fxfuse ({args.cost})", result.aligned)]
                 + ([(f"refined ({args.refine} steps)", result.refined)] if result.refined else []), str(tmp),
                 title=f"{os.path.basename(args.models[0])} → {os.path.basename(args.models[1])}")
            atomic.replace(tmp, out)
        except BaseException as exc:
            atomic.discard(tmp)
            raise atomic.write_failure(out, exc) from None
    if args.json:
        json.dump(dict(result.as_dict(), models=list(args.models), data=args.data), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    r = result.refined
    matched = result.report.get("correspondence", {}).get("1")
    if matched:
        print(f"B matched to A by graph: {len(matched['rows'])} rows, the moved copy's error {matched['error']:.1e}")
    print(f"loss along A → B ({result.head} head, {inputs.shape[0]} samples"
          + (", every point repaired" if args.repair else "") + "):")
    print(f"  {'λ':>5}  {'vanilla loss':>12} {'acc':>6}   {'fxfuse loss':>12} {'acc':>6}"
          + (f"   {'refined loss':>12} {'acc':>6}" if r else ""))
    for i, lam in enumerate(result.vanilla.lambdas):
        v, f = result.vanilla, result.aligned
        print(f"  {lam:5.2f}  {v.loss[i]:12.4f} {v.accuracy[i]:6.1%}   {f.loss[i]:12.4f} {f.accuracy[i]:6.1%}"
              + (f"   {r.loss[i]:12.4f} {r.accuracy[i]:6.1%}" if r else ""))
    print(f"barrier: vanilla {result.vanilla.barrier:.4f}, fxfuse {result.aligned.barrier:.4f}"
          + (f", refined ({args.refine} steps, {result.report['refine']['seconds']:.1f}s) {r.barrier:.4f}" if r else ""))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
