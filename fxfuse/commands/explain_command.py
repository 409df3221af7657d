"""``fxfuse explain MODEL``: a model's permutation spaces, pinned axes and rule coverage (text, JSON, graph)."""
from __future__ import annotations

import argparse
import json
import sys

from .shared import EPILOG, Progress, add_common, check_paths, load_and_analyze


def add_parser(sub) -> None:
    """``fxfuse explain``: its sub-command and flags."""
    from ..recipes.recipe import add_options

    p = sub.add_parser("explain", help="show a model's permutation spaces, pinned axes and rule coverage (or, "
                       "with TARGET --correspondence, which weight of MODEL is which of TARGET)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="model spec (see below)")
    p.add_argument("target", nargs="?", metavar="TARGET", help="with --correspondence: the model whose class and "
                   "names MODEL's weights are matched to")
    p.add_argument("--correspondence", action="store_true", help="print which weight of MODEL is which of TARGET, "
                   "found by matching their graphs (source -> target, layout transform), checked on random inputs")
    p.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    p.add_argument("--dot", metavar="FILE", help="write the space graph (spaces and parameters) for graphviz")
    p.add_argument("--graph", metavar="FILE", help="write the space graph as GraphML (.graphml), node-link JSON "
                   "(.json) or DOT (.dot), by the file's suffix")
    p.add_argument("--all", action="store_true", help="list every pinned space, not only the first 20")
    p.add_argument("--force", action="store_true", help="replace an existing --dot or --graph file")
    add_options(p, ("groups", "untie"), overriding=False)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.io import check_output_path, write_text_atomic
    from ..frontend.render import render_dot, render_text

    progress = Progress(args.quiet)
    if args.correspondence or args.target:
        return _correspondence(args, progress)
    check_paths([("--dot", args.dot), ("--graph", args.graph)], [args.model], [("--rules", args.rules)])
    if args.graph:
        from ..frontend.graph import check_graph_path

        check_graph_path(args.graph)
    for path in (args.dot, args.graph):
        if path:
            check_output_path(path, args.force, owned="graph")
    folded = None
    if args.groups == "full":
        from ..passes.analyse import canonical_analysis
        from ..models.io import load_model
        from ..frontend.rules import load_rules

        loaded = load_model(args.model, trust_pickle=args.trust_pickle)
        analysis, folded = canonical_analysis(loaded.module, loaded.args, dict(loaded.kwargs or {}),
                                              load_rules(args.rules), args.strict, args.untie)
    else:
        loaded, analysis = load_and_analyze(args, progress)
    if args.dot:
        write_text_atomic(args.dot, render_dot(analysis), force=args.force, owned="graph")
        progress(f"wrote {args.dot}")
    if args.graph:
        from ..frontend.graph import graph_text, space_graph

        write_text_atomic(args.graph, graph_text(space_graph(analysis), args.graph), force=args.force,
                          owned="graph")
        progress(f"wrote {args.graph}")
    if args.json:
        json.dump(analysis.report(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(analysis, loaded.spec, show_all=args.all))
        for f in folded.folds if folded else ():
            print(f"folded: {f.scale}" + (f" and {f.shift}" if f.shift else "") + f" into {', '.join(f.readers)}")
        for r in folded.refused if folded else ():
            print(f"not folded: {r.scale} (at {r.node}): {r.reason}")
    return 0


def _correspondence(args, progress) -> int:
    """``explain MODEL TARGET --correspondence``: the table of ``fxfuse.frontend.convert.convert``, text or JSON."""
    from ..frontend.convert import convert, table
    from ..core.errors import FxfuseError
    from ..models.io import load_model

    if not args.target:
        raise FxfuseError("--correspondence needs two models: MODEL TARGET")
    if not args.correspondence:
        raise FxfuseError(f"a second model ({args.target}) is read only with --correspondence")
    if args.dot or args.graph or args.groups != "perm" or args.all:
        raise FxfuseError("--correspondence prints a table: --dot, --graph, --groups full and --all do not apply")
    loaded = []
    for spec in (args.model, args.target):
        progress(f"loading {spec}")
        loaded.append(load_model(spec, trust_pickle=args.trust_pickle))
    progress("matching the graphs")
    done = convert(loaded[0].module, (loaded[0].args, loaded[0].kwargs), loaded[1].module,
                   (loaded[1].args, loaded[1].kwargs), (args.model, args.target))
    if args.json:
        rows = [{"source": s, "target": t, "transform": k} for s, t, k in done.correspondence.rows()]
        json.dump({"source": args.model, "target": args.target, "self_check_error": done.error, "rows": rows},
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(done))
    return 0
