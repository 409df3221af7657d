"""The ``fxfuse`` command line: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings

from .errors import FxfuseError

EPILOG = """model specs:
  DIR                        a Hugging Face model directory (config.json + safetensors), or a
                             directory written by fxfuse (fxfuse.json + model.safetensors)
  pkg.module:factory[@W]     a factory returning a module or (module, example_args); W is an
                             optional weights file (.safetensors, or a .pt state dict)
  path/file.py:factory[@W]   the same, from a file
  model.pt                   a pickled module (only with --trust-pickle)
"""


class Progress:
    """Phase messages on stderr, silenced by --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def bar(self, description: str, total: int | None):
        """A progress bar with ETA on stderr, drawn only on a terminal and without --quiet."""
        from .progress import tqdm_bar

        return tqdm_bar(description, total, sys.stderr, self.quiet or not sys.stderr.isatty())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", action="append", default=[], metavar="FILE",
                   help="extra rule file (repeatable; later files override earlier and the shipped rules)")
    p.add_argument("--strict", action="store_true", help="fail if any op has no rule (default: pin and report)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled model files (runs their code)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse", description="Align and fuse trained PyTorch models from their torch.fx graphs.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"fxfuse {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("explain", help="show a model's permutation spaces, pinned axes and rule coverage",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="model spec (see below)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    p.add_argument("--dot", metavar="FILE", help="write the space graph (spaces and parameters) for graphviz")
    p.add_argument("--all", action="store_true", help="list every pinned space, not only the first 20")
    p.add_argument("--force", action="store_true", help="replace an existing --dot file")
    _common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("permute", help="write a randomly permuted copy that computes the same function",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="model spec (see below)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _common(p)
    p.set_defaults(func=cmd_permute)

    p = sub.add_parser("compile", help="align models into one basis and fuse them",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Align every model into the target's basis and average them. The models may "
                       "differ in width\n(the fused model takes the target's widths: a narrower target is a "
                       "compression) and in depth\n(blocks of a list of repeated blocks are matched by a "
                       "cross-layer dynamic program; the fused\nmodel takes the target's depth).")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="two or more model specs of one architecture (widths and depths may differ)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--target", type=int, default=0, help="index of the model whose basis and class the result takes")
    p.add_argument("--cost", choices=["weights", "activations"], default="weights",
                   help="weight matching (no data) or activation correlation (needs calibration inputs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib", metavar="FILE", help="calibration inputs: a .pt/.safetensors tensor (N, ...)")
    g.add_argument("--calib-random", type=int, metavar="N", help="N random calibration inputs (smoke tests)")
    p.add_argument("--solver", choices=["exact", "sinkhorn"], default="exact",
                   help="hard assignment / exact OT, or soft entropic OT")
    p.add_argument("--reg", type=float, help="sinkhorn regularisation on the max-normalised cost (default 0.06)")
    p.add_argument("--weights", metavar="W,W,...", help="fusion weights, one per model (default uniform)")
    p.add_argument("--pin", action="append", default=[], metavar="PATTERN",
                   help="keep a space unpermuted: sID, or PARAM[:AXIS] glob over its member axes (repeatable)")
    p.add_argument("--method", choices=["ot", "vanilla"], default="ot", help="ot alignment, or plain averaging")
    p.add_argument("--heads", choices=["nested", "flat"], default="nested",
                   help="inside-head dims matched per head (nested) or shared by all heads (flat)")
    p.add_argument("--depth-cost", choices=["cka", "ot"], default="cka",
                   help="models of different depth: block-to-block cost of the cross-layer alignment, "
                   "1 - linear CKA of block outputs or the OT cost between their units (default cka)")
    p.add_argument("--show-depth-map", action="store_true",
                   help="print which block of each model went to which block of the target, and the width maps")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the fused model (default: the target's); costs and checks run in float32")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="collect activation statistics in N local processes (torch.distributed, gloo); under "
                   "torchrun the ranks torchrun starts are the workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the descent order and random calibration")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here (it is always in the output)")
    p.add_argument("--eval", metavar="FILE", help="labelled data (.pt/.safetensors: inputs, labels): print accuracy "
                   "of each model, of vanilla averaging and of the fused model")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _common(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("barrier", help="loss along the line from model A to model B, vanilla and aligned",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("models", nargs=2, metavar="MODEL", help="model A and model B (one architecture)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="labelled data (.pt/.safetensors): inputs, and labels (class ids, or token ids with -100 "
                   "ignored for language models)")
    p.add_argument("--points", type=int, default=21, help="interpolation points including both ends (default 21)")
    p.add_argument("--head", choices=["classification", "mlm", "causal"],
                   help="how to read the loss (default: from the model class)")
    p.add_argument("--cost", choices=["weights", "activations"], default="weights", help="alignment cost")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib", metavar="FILE", help="calibration inputs for --cost activations")
    g.add_argument("--calib-random", type=int, metavar="N", help="N random calibration inputs")
    p.add_argument("--solver", choices=["exact", "sinkhorn"], default="exact", help="alignment solver")
    p.add_argument("--reg", type=float, help="sinkhorn regularisation")
    p.add_argument("--pin", action="append", default=[], metavar="PATTERN", help="keep a space unpermuted")
    p.add_argument("--heads", choices=["nested", "flat"], default="nested",
                   help="inside-head dims matched per head (nested) or shared by all heads (flat)")
    p.add_argument("--plot", metavar="PNG", help="draw both curves into this PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the curves and barriers as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    _common(p)
    p.set_defaults(func=cmd_barrier)

    p = sub.add_parser("rules", help="check or list propagation rules")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    c = rsub.add_parser("check", help="validate rule files")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.set_defaults(func=cmd_rules_check)
    c = rsub.add_parser("list", help="which ops have rules, of which kind, from which file")
    c.add_argument("--rules", action="append", default=[], metavar="FILE", help="extra rule file (repeatable)")
    c.add_argument("--json", action="store_true", help="print as JSON")
    c.set_defaults(func=cmd_rules_list)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- commands


def _load_and_analyze(args, progress: Progress):
    from .io import load_model
    from .rules import load_rules
    from .spaces import analyze

    rules = load_rules(args.rules)
    progress(f"loading {args.model}")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    progress(f"tracing {type(loaded.module).__name__} with torch.export")
    analysis = analyze(loaded.module, loaded.args, rules=rules, strict=args.strict, example_kwargs=loaded.kwargs)
    progress(f"found {len(analysis.spaces)} spaces ({len(analysis.free_spaces)} free), "
             f"coverage {analysis.coverage:.1%}")
    return loaded, analysis


def cmd_explain(args) -> int:
    from .io import check_output_path, write_text_atomic
    from .render import render_dot, render_text

    progress = Progress(args.quiet)
    if args.dot:
        check_output_path(args.dot, args.force)
    loaded, analysis = _load_and_analyze(args, progress)
    if args.dot:
        write_text_atomic(args.dot, render_dot(analysis), force=args.force)
        progress(f"wrote {args.dot}")
    if args.json:
        json.dump(analysis.report(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(analysis, loaded.spec, show_all=args.all))
    return 0


def cmd_permute(args) -> int:
    from .io import check_output_path, save_model
    from .permute import apply_permutations, random_permutations
    from .verify import compare_outputs

    progress = Progress(args.quiet)
    out = check_output_path(args.output, args.force)
    loaded, analysis = _load_and_analyze(args, progress)
    perms = random_permutations(analysis, args.seed)
    permuted = apply_permutations(analysis, perms)
    before, after = loaded.module.state_dict(), permuted.state_dict()
    moved = sum(int((before[k] != after[k]).sum()) for k in before if before[k].is_floating_point())
    total = sum(before[k].numel() for k in before if before[k].is_floating_point())
    progress("checking that the permuted model computes the same function")
    err = compare_outputs(loaded.module, permuted, loaded.args, loaded.kwargs)
    if not err < 1e-4:
        raise FxfuseError(f"permuted model differs from the original (relative error {err:.2e}); "
                          "a rule is wrong: run 'fxfuse explain' and check the rules of the ops it lists")
    save_model(loaded, permuted, out, force=args.force)
    print(f"wrote {out}: {len(perms)} spaces permuted, {moved:,} of {total:,} weights moved "
          f"({moved / max(total, 1):.1%}), output relative error {err:.1e}")
    return 0


def cmd_compile(args) -> int:
    from .distributed import in_launched_group, init_from_env, local_group, wait_workers

    if args.workers < 1:
        raise FxfuseError(f"--workers {args.workers}: need at least one")
    if args.workers > 1 and (args.cost != "activations" or args.method != "ot"):
        raise FxfuseError("--workers shares the collection of activation statistics: use it with --cost activations")
    if args.workers > 1 and in_launched_group():
        raise FxfuseError("--workers starts local processes; under torchrun the ranks are the workers")
    if args.workers == 1:
        init_from_env()  # under torchrun: join its group
        return _compile(args)
    ok, failure = False, None
    with local_group(args.workers, args.argv) as procs:
        try:
            code = _compile(args)
            ok = True
        finally:
            failure = wait_workers(procs, ok)
    if failure:
        raise FxfuseError(failure)
    return code


def _compile(args) -> int:
    from .data import load_calibration, load_labelled
    from .evaluate import accuracy
    import torch

    from .fuse import FusionError, compile as fuse_models

    from .distributed import WorkerDone, world
    from .errors import TraceError
    from .io import check_output_path, load_model, save_model, write_text_atomic
    from .lazy import open_out_of_core, save_hf_out_of_core
    from .rules import load_rules

    progress = Progress(args.quiet)
    out = check_output_path(args.output, args.force)
    if args.report:
        check_output_path(args.report, args.force)
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise FxfuseError(f"--weights {args.weights}: expected numbers separated by commas") from None
    calib = load_calibration(args.calib) if args.calib else args.calib_random
    labelled = load_labelled(args.eval) if args.eval else None
    rules = load_rules(args.rules)
    out_dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded, states = [], None
    if args.cost == "weights" and args.method == "ot" and labelled is None:
        loaded, states = open_out_of_core(args.models, progress)
    if not loaded:
        for spec in args.models:
            progress(f"loading {spec}")
            loaded.append(load_model(spec, trust_pickle=args.trust_pickle))
    if not -len(loaded) <= args.target < len(loaded):
        raise FxfuseError(f"--target {args.target} is out of range for {len(loaded)} models")
    tgt = loaded[args.target]
    def fuse():
        return fuse_models([m.module for m in loaded], tgt.args, example_kwargs=tgt.kwargs, target=args.target,
                           cost=args.cost, calib=calib, solver=args.solver, reg=args.reg, weights=weights,
                           pin=args.pin, method=args.method, rules=rules, seed=args.seed, strict=args.strict,
                           heads=args.heads, depth_cost=args.depth_cost, progress=progress, states=states,
                           out_dtype=out_dtype)

    try:
        try:
            result = fuse()
        except TraceError:
            if states is None:
                raise
            progress("the models do not trace without their weights: loading them in memory")
            loaded = [load_model(spec, trust_pickle=args.trust_pickle) for spec in args.models]
            tgt, states = loaded[args.target], None
            result = fuse()
    except WorkerDone:  # its share of the statistics is in rank 0's sums
        return 0
    if world()[0] != 0:
        return 0
    if result.state is None and out_dtype is not None:
        result.module.to(out_dtype)
    report = dict(result.report, models=[m.spec for m in loaded])
    if args.show_depth_map:
        from .render import render_depth_maps

        text = render_depth_maps(report["depth_maps"], report["width_maps"])
        sys.stdout.write(text or "all models have the target's depth and widths\n")
    if labelled is not None:
        progress("evaluating")
        x, y = labelled
        rows = [(f"model {i} ({m.spec})", accuracy(m.module, x, y, tgt)) for i, m in enumerate(loaded)]
        try:
            vanilla = fuse_models([m.module for m in loaded], tgt.args, example_kwargs=tgt.kwargs,
                                  target=args.target, weights=weights, method="vanilla", rules=rules).module
            rows.append(("vanilla average", accuracy(vanilla, x, y, tgt)))
        except FusionError:  # undefined across widths or depths: the target alone is the baseline
            rows.append(("vanilla average", None))
        rows.append(("fused (fxfuse)", accuracy(result.module, x, y, tgt)))
        report["eval"] = {"file": args.eval, "samples": int(x.shape[0]), "accuracy": dict(rows)}
        width = max(len(r[0]) for r in rows)
        print(f"accuracy on {args.eval} ({x.shape[0]} samples):")
        for label, acc in rows:
            print(f"  {label:<{width}}  " + ("   n/a (the shapes differ)" if acc is None else f"{acc:6.1%}"))
    text = json.dumps(report, indent=1, default=float) + "\n"
    if result.state is not None:
        progress(f"writing {out}")
        save_hf_out_of_core(tgt, result.state, out, force=args.force, extra={"report.json": text}, dtype=out_dtype,
                            progress=progress)
    else:
        save_model(tgt, result.module, out, force=args.force, extra={"report.json": text})
    if args.report:
        write_text_atomic(args.report, text, force=args.force)
    checks = ", ".join(f"model {c['model']}: {c['drift' if 'drift' in c else 'error']:.1e}"
                       for c in report["self_check"])
    print(f"wrote {out} ({args.method}, cost {args.cost}, solver {args.solver}); "
          f"self-check {checks}; {report['timings']['total_s']:.1f}s")
    return 0


def cmd_barrier(args) -> int:
    from .barrier import barrier, plot
    from .data import load_calibration, load_labelled
    from .io import check_output_path, load_model
    from .rules import load_rules

    progress = Progress(args.quiet)
    if args.plot:
        check_output_path(args.plot, args.force)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FxfuseError("--plot needs matplotlib: pip install 'fxfuse[plot]'") from None
    inputs, labels = load_labelled(args.data)
    calib = load_calibration(args.calib) if args.calib else args.calib_random
    rules = load_rules(args.rules)
    a, b = (load_model(spec, trust_pickle=args.trust_pickle) for spec in args.models)
    result = barrier(a.module, b.module, inputs, labels, a.args, example_kwargs=a.kwargs, points=args.points,
                     head=args.head, progress=progress, cost=args.cost, calib=calib, solver=args.solver,
                     reg=args.reg, pin=args.pin, rules=rules, strict=args.strict, heads=args.heads)
    if args.plot:
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(args.plot)))
        os.close(fd)
        try:
            plot([("vanilla", result.vanilla), (f"fxfuse ({args.cost})", result.aligned)], tmp,
                 title=f"{os.path.basename(args.models[0])} → {os.path.basename(args.models[1])}")
            os.replace(tmp, args.plot)
        except BaseException:
            os.unlink(tmp)
            raise
    if args.json:
        json.dump(dict(result.as_dict(), models=list(args.models), data=args.data), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"loss along A → B ({result.head} head, {inputs.shape[0]} samples):")
    print(f"  {'λ':>5}  {'vanilla loss':>12} {'acc':>6}   {'fxfuse loss':>12} {'acc':>6}")
    for i, lam in enumerate(result.vanilla.lambdas):
        v, f = result.vanilla, result.aligned
        print(f"  {lam:5.2f}  {v.loss[i]:12.4f} {v.accuracy[i]:6.1%}   {f.loss[i]:12.4f} {f.accuracy[i]:6.1%}")
    print(f"barrier: vanilla {result.vanilla.barrier:.4f}, fxfuse {result.aligned.barrier:.4f}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def cmd_rules_check(args) -> int:
    from .rules import parse_rule_file

    for f in args.files:
        rules = parse_rule_file(f)
        ops = sum(len(r.ops) for r in rules)
        print(f"ok: {f}: {len(rules)} rules for {ops} ops")
    return 0


def cmd_rules_list(args) -> int:
    from .rules import load_rules

    ruleset = load_rules(args.rules)
    rows = sorted((op, r.kind, r.source) for op, r in ruleset.rules.items())
    if args.json:
        json.dump([{"op": o, "kind": k, "source": s} for o, k, s in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max(len(o) for o, _, _ in rows)
    for op, kind, source in rows:
        print(f"{op:<{width}}  {kind:<11} {source}")
    print(f"{len(rows)} ops from {len(ruleset.files)} files")
    return 0


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fxfuse rules list | head` ends quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    try:
        return args.func(args)
    except FxfuseError as exc:
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxfuse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
