"""``fxfuse permute MODEL -o DIR``: a randomly permuted (or, with ``--groups full``, group-moved) copy that
computes the same function."""
from __future__ import annotations

import argparse
import json

from .shared import (EPILOG, Progress, add_common, analysis_notes, check_paths, check_untie, load_and_analyze,
                     provenance, warn, warn_analysis)


def add_parser(sub) -> None:
    """``fxfuse permute``: its sub-command and flags."""
    from ..recipes.recipe import add_options

    p = sub.add_parser("permute", help="write a randomly permuted copy that computes the same function",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="model spec (see below)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")
    add_options(p, ("groups", "untie"), overriding=False)
    p.add_argument("--force", action="store_true", help="replace an earlier fxfuse output")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.checks import check_finite_weights
    from ..models.io import check_output_path, save_model
    from ..api.permute import checked_permutation, random_permutations
    from ..frontend.rules import load_rules

    progress = Progress(args.quiet)
    check_paths([("-o", args.output)], [args.model], [("--rules", args.rules)])
    out = check_output_path(args.output, args.force, directory=True)
    if args.groups == "full":
        return _move_by_groups(args, progress, out)
    loaded, analysis = load_and_analyze(args, progress, check=check_finite_weights)
    warn_analysis(analysis)
    perms = random_permutations(analysis, args.seed)
    if not perms:
        warn(f"{args.model}: no free space of size > 1, nothing to permute: the output is a copy")
    progress("permuting, and checking that the permuted model computes the same function")
    permuted, err = checked_permutation(analysis, perms, load_rules(args.rules))
    before, after = loaded.module.state_dict(), permuted.state_dict()
    moved = sum(int((before[k] != after[k]).sum()) for k in before if before[k].is_floating_point())
    total = sum(before[k].numel() for k in before if before[k].is_floating_point())
    report = {"fxfuse": provenance(args.argv), "model": args.model, "seed": args.seed,
              "spaces_permuted": sorted(perms), "weights_moved": moved, "weights": total, "error": err,
              "notes": analysis_notes(analysis)}
    save_model(loaded, permuted, out, force=args.force, extra={"report.json": json.dumps(report, indent=1) + "\n"})
    print(f"wrote {out}: {len(perms)} spaces permuted, {moved:,} of {total:,} weights moved "
          f"({moved / max(total, 1):.1%}), output relative error {err:.1e}")
    return 0


def _move_by_groups(args, progress: Progress, out) -> int:
    from ..models.io import load_model, save_model
    from ..api.permute import move_by_group_elements
    from ..frontend.rules import load_rules

    rules = load_rules(args.rules)
    progress(f"loading {args.model}")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    check_untie(args, loaded)
    progress("folding norm scales, analysing, drawing random group elements")
    moved, info = move_by_group_elements(loaded.module, loaded.args, seed=args.seed, rules=rules,
                                         example_kwargs=loaded.kwargs, strict=args.strict, untie=args.untie)
    save_model(loaded, moved, out, force=args.force)
    kinds = ", ".join(f"{n} {g}" for g, n in sorted(info["groups"].items()))
    print(f"wrote {out}: {info['moved']} spaces moved ({kinds}), {info['folded']} norm scales folded, "
          f"output relative error {info['error']:.1e}")
    return 0
