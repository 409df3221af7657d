"""The ``fxfuse`` command line: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def warn(message: str) -> None:
    """A warning on stderr, shown even with --quiet: the run is legitimate but not what it may seem."""
    print(f"fxfuse: warning: {message}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser, recipe_flags: bool = False) -> None:
    """Flags of every command; ``--rules`` and ``--strict`` as declared by the recipe schema."""
    from .recipe import add_options

    if not recipe_flags:
        add_options(p, ("rules", "strict"), overriding=False)
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled model files (runs their code)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def _progress_bar(quiet: bool):
    """``on_step(step, steps, loss)`` drawing a bar with the loss on stderr (nothing with --quiet)."""
    if quiet:
        return None
    state = {"avg": None, "t0": None}

    def on_step(step: int, steps: int, loss: float) -> None:
        avg = loss if state["avg"] is None else 0.9 * state["avg"] + 0.1 * loss
        state["avg"] = avg
        now = time.perf_counter()
        state["t0"] = state["t0"] or now  # the first step's end: the rate counts the steps after it
        width = 30
        done = int(width * step / steps)
        rate = (step - 1) / max(now - state["t0"], 1e-9)
        print(f"\rrefining [{'#' * done}{'.' * (width - done)}] {step}/{steps} loss {avg:.4f} ({rate:.1f} steps/s)",
              end="\n" if step == steps else "", file=sys.stderr, flush=True)

    return on_step


def build_parser() -> argparse.ArgumentParser:
    from .recipe import add_options

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
    p.add_argument("--graph", metavar="FILE", help="write the space graph as GraphML (.graphml), node-link JSON "
                   "(.json) or DOT (.dot), by the file's suffix")
    p.add_argument("--all", action="store_true", help="list every pinned space, not only the first 20")
    p.add_argument("--force", action="store_true", help="replace an existing --dot or --graph file")
    add_options(p, ("groups", "untie"), overriding=False)
    _common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("permute", help="write a randomly permuted copy that computes the same function",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="model spec (see below)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")
    add_options(p, ("groups", "untie"), overriding=False)
    p.add_argument("--force", action="store_true", help="replace an earlier fxfuse output")
    _common(p)
    p.set_defaults(func=cmd_permute)

    p = sub.add_parser("compile", help="align models into one basis and fuse them",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Align every model into the target's basis and average them. The models may "
                       "differ in width\n(the fused model takes the target's widths: a narrower target is a "
                       "compression) and in depth\n(blocks of a list of repeated blocks are matched by a "
                       "cross-layer dynamic program; the fused\nmodel takes the target's depth).")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="two or more model specs of one architecture (widths and depths may differ), or one "
                   "recipe file (.yaml/.yml: options as in fxfuse-recipe.yaml; flags given here override it)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model directory")
    add_options(p)
    p.add_argument("--show-depth-map", action="store_true",
                   help="print which block of each model went to which block of the target, and the width maps")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here (it is always in the output)")
    p.add_argument("--eval", metavar="FILE", help="labelled data (.pt/.safetensors: inputs, labels): print accuracy "
                   "of each model, of vanilla averaging and of the fused model")
    p.add_argument("--force", action="store_true", help="replace an earlier fxfuse output")
    _common(p, recipe_flags=True)
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
    add_options(p, ("cost", "calib", "calib_random", "solver", "reg", "pin", "heads", "groups", "untie", "repair",
                    "refine", "refine_lr", "refine_batch"), overriding=False)
    p.add_argument("--refine-data", metavar="FILE", help="labelled data (.pt/.safetensors: inputs, labels) for "
                   "--refine (the curves are scored on --data)")
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


def provenance(argv: list[str]) -> dict:
    """Versions and the command line, recorded in every report."""
    from importlib import metadata

    import torch

    try:
        hf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        hf = None
    return {"version": _version(), "torch": torch.__version__, "transformers": hf, "command": list(argv)}


def _analysis_notes(analysis) -> list[str]:
    """What the analysis recorded: its notes, and the ops without a usable rule (their axes pinned)."""
    notes = list(getattr(analysis, "notes", ()))
    unruled = analysis.unruled
    if unruled:
        shown = "; ".join(f"{u.op} at {u.node} ({u.reason})" for u in unruled[:3])
        more = f"; and {len(unruled) - 3} more" if len(unruled) > 3 else ""
        notes.append(f"{len(unruled)} op(s) without a usable rule, their axes pinned: {shown}{more}")
    if not any(s.free and s.size > 1 for s in analysis.spaces):
        notes.append("no free space: nothing can move (coverage 0%)")
    return notes


def _warn_analysis(analysis) -> list[str]:
    notes = _analysis_notes(analysis)
    for note in notes:
        warn(note)
    return notes


# ---------------------------------------------------------------- commands


def _load_and_analyze(args, progress: Progress, check=None):
    from .io import load_model
    from .rules import load_rules
    from .spaces import analyze

    rules = load_rules(args.rules)
    progress(f"loading {args.model}")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    if check is not None:
        check(loaded.module, args.model)
    progress(f"tracing {type(loaded.module).__name__} with torch.export")
    analysis = analyze(loaded.module, loaded.args, rules=rules, strict=args.strict, example_kwargs=loaded.kwargs)
    progress(f"found {len(analysis.spaces)} spaces ({len(analysis.free_spaces)} free), "
             f"coverage {analysis.coverage:.1%}")
    return loaded, analysis


def cmd_explain(args) -> int:
    from .io import check_output_path, write_text_atomic
    from .render import render_dot, render_text

    progress = Progress(args.quiet)
    if args.graph:
        from .graph import check_graph_path

        check_graph_path(args.graph)
    for path in (args.dot, args.graph):
        if path:
            check_output_path(path, args.force)
    folded = None
    if args.groups == "full":
        from .passes.analyse import canonical_analysis
        from .io import load_model
        from .rules import load_rules

        loaded = load_model(args.model, trust_pickle=args.trust_pickle)
        analysis, folded = canonical_analysis(loaded.module, loaded.args, dict(loaded.kwargs or {}),
                                              load_rules(args.rules), args.strict, args.untie)
    else:
        loaded, analysis = _load_and_analyze(args, progress)
    if args.dot:
        write_text_atomic(args.dot, render_dot(analysis), force=args.force)
        progress(f"wrote {args.dot}")
    if args.graph:
        from .graph import graph_text, space_graph

        write_text_atomic(args.graph, graph_text(space_graph(analysis), args.graph), force=args.force)
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


def cmd_permute(args) -> int:
    from .checks import check_finite_weights
    from .io import check_output_path, save_model
    from .permute import checked_permutation, random_permutations
    from .rules import load_rules

    progress = Progress(args.quiet)
    out = check_output_path(args.output, args.force, directory=True)
    if args.groups == "full":
        return _permute_groups(args, progress, out)
    loaded, analysis = _load_and_analyze(args, progress, check=check_finite_weights)
    _warn_analysis(analysis)
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
              "notes": _analysis_notes(analysis)}
    save_model(loaded, permuted, out, force=args.force, extra={"report.json": json.dumps(report, indent=1) + "\n"})
    print(f"wrote {out}: {len(perms)} spaces permuted, {moved:,} of {total:,} weights moved "
          f"({moved / max(total, 1):.1%}), output relative error {err:.1e}")
    return 0


def _warn_unused_options(args, same_depths: bool) -> None:
    """Options that do nothing in the chosen mode, and random calibration inputs, said on stderr."""
    if args.reg is not None and args.solver == "exact":
        warn("--reg is ignored with --solver exact (it regularises sinkhorn)")
    data = "--calib" if args.calib else "--calib-random" if args.calib_random is not None else None
    if getattr(args, "method", "ot") == "vanilla":
        if args.cost != "weights" or data:
            warn("--method vanilla averages the weights as they are: --cost and calibration inputs are ignored")
    elif (args.cost == "weights" and data and same_depths and not getattr(args, "repair", False)
          and getattr(args, "quality", None) != "best"):
        warn(f"{data} is ignored with --cost weights (weight matching reads no data; only models of different "
             "depths and --repair use calibration inputs)")
    elif args.cost == "activations" and data is None:
        from .calibration import DEFAULT_CALIB_RANDOM

        warn(f"--cost activations without --calib: correlating on {DEFAULT_CALIB_RANDOM} random inputs "
             "(pass --calib FILE with real inputs)")


def _warn_repair_after_refine(recipe) -> None:
    if recipe.repair and recipe.refine is not None:
        warn("--repair runs after --refine and rescales units that the refinement fitted unrepaired: on the "
             "digits ViTs it lowered the refined accuracy (docs/quality.md); --quality best keeps it only where it "
             "helps on held-out data")


def _check_calibration(args, calib) -> None:
    from .calibration import samples
    from .checks import check_calibration_size

    if getattr(args, "method", "ot") != "ot" or args.cost != "activations":
        return
    if isinstance(calib, int):
        check_calibration_size(calib, f"--calib-random {calib}")
    elif calib is not None:  # one tensor, or named inputs sharing their sample count
        check_calibration_size(samples(calib), args.calib)


def _self_check_text(checks: list[dict]) -> str:
    """Exact maps have a self-check error (≤ 1e-4 or the run fails); soft, width or depth maps an output drift."""
    errors = ", ".join(f"model {c['model']} {c['error']:.1e}" for c in checks if "error" in c)
    drifts = ", ".join(f"model {c['model']} {c['drift']:.1e}" for c in checks if "drift" in c)
    parts = [f"self-check error of exact maps: {errors}"] if errors else []
    if drifts:
        parts.append(f"output drift of soft, width or depth maps (not an error): {drifts}")
    return "; ".join(parts)


def _warn_fusion(report: dict, analysis) -> None:
    """Every note of the fusion and of the target's analysis, once; and a fusion where nothing moved."""
    notes = list(dict.fromkeys(_analysis_notes(analysis) + list(report["notes"])))
    for note in notes:
        warn(note)
    if report["method"] != "ot":
        return
    maps = [m for s in report["spaces"] for m in s["models"]]
    if not any(m["units_moved"] is None or m["units_moved"] > 0 for m in maps) and not report["depth_maps"]:
        warn("no space moved: every map is the identity, so the fused model is the plain average")


def _check_untie(args, loaded) -> None:
    """An untied weight is recorded only by a Hugging Face config: refuse it where the output could not keep it."""
    from .io import HF

    if getattr(args, "untie", False) and loaded.source != HF:
        raise FxfuseError("--untie needs a Hugging Face model directory as the target (its config records the "
                          "untied weights; a factory would build the tied model again)")


def _permute_groups(args, progress: Progress, out) -> int:
    from .io import load_model, save_model
    from .permute import move_by_group_elements
    from .rules import load_rules

    rules = load_rules(args.rules)
    progress(f"loading {args.model}")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    _check_untie(args, loaded)
    progress("folding norm scales, analysing, drawing random group elements")
    moved, info = move_by_group_elements(loaded.module, loaded.args, seed=args.seed, rules=rules,
                                         example_kwargs=loaded.kwargs, strict=args.strict, untie=args.untie)
    save_model(loaded, moved, out, force=args.force)
    kinds = ", ".join(f"{n} {g}" for g, n in sorted(info["groups"].items()))
    print(f"wrote {out}: {info['moved']} spaces moved ({kinds}), {info['folded']} norm scales folded, "
          f"output relative error {info['error']:.1e}")
    return 0


def compile_recipe(args):
    """The recipe of a ``compile`` command: a recipe file's (the one MODEL given) or the models', with the
    flags given overriding it."""
    from .recipe import Recipe, RecipeError, given, is_recipe_file

    flags = given(args)
    recipes = [m for m in args.models if is_recipe_file(m)]
    if recipes and len(args.models) > 1:
        raise RecipeError(f"{recipes[0]}: a recipe file must be the only MODEL argument")
    if recipes:
        recipe = Recipe.load(recipes[0])
        if len(recipe.models) < 2:
            raise RecipeError(f"{recipes[0]}: key 'models': need at least two model specs, got {len(recipe.models)}")
    else:
        recipe, flags = Recipe(), dict(flags, models=args.models)
    return recipe.override(flags)


def cmd_compile(args) -> int:
    from .distributed import in_launched_group, init_from_env, local_group, wait_workers

    recipe = compile_recipe(args)
    if recipe.workers > 1 and (recipe.cost != "activations" or recipe.method != "ot"):
        raise FxfuseError("--workers shares the collection of activation statistics: use it with --cost activations")
    if recipe.workers > 1 and in_launched_group():
        raise FxfuseError("--workers starts local processes; under torchrun the ranks are the workers")
    if recipe.workers == 1:
        init_from_env()  # under torchrun: join its group
        return _compile(args, recipe)
    ok, failure = False, None
    with local_group(recipe.workers, args.argv[1:]) as procs:
        try:
            code = _compile(args, recipe)
            ok = True
        finally:
            failure = wait_workers(procs, ok)
    if failure:
        raise FxfuseError(failure)
    return code


@dataclass(frozen=True)
class _CompileJob:
    """What ``fxfuse compile`` works on, loaded and checked before the work: the models (``states``: their
    weights read on access when fused out of core), calibration, ``--eval`` data, refinement, rules, out dtype."""

    out: Path
    loaded: tuple
    states: tuple | None
    calib: Any
    labelled: tuple | None
    refine: Any
    rules: Any
    out_dtype: Any


def _compile(args, given) -> int:
    """``given``: the recipe as written (and saved); it runs with its quality settled (``fxfuse.recipe.settled``)."""
    from .distributed import WorkerDone, world
    from .recipe import settled

    progress = Progress(args.quiet)
    recipe = settled(given)
    job, tgt = _compile_job(args, recipe, progress)
    rows = _evaluate_parents(job, tgt, args.eval, progress)
    try:
        result, job, tgt = _fuse_job(job, tgt, recipe, args, progress)
    except WorkerDone:  # its share of the statistics is in rank 0's sums
        return 0
    if world()[0] != 0:
        return 0
    if result.state is None and job.out_dtype is not None:
        result.module.to(job.out_dtype)
    report = dict(result.report, models=[m.spec for m in job.loaded], fxfuse=provenance(args.argv))
    progress(f"coverage {report['coverage']:.1%} of the target's parameters can move")
    _warn_fusion(report, result.analysis)
    _print_refinement(report, recipe)
    _print_quality(report)
    if args.show_depth_map:
        from .render import render_depth_maps

        text = render_depth_maps(report["depth_maps"], report["width_maps"])
        sys.stdout.write(text or "all models have the target's depth and widths\n")
    if job.labelled is not None:
        report["eval"] = _evaluate_fused(job, tgt, recipe, result.module, rows, args.eval, progress)
    _write_compiled(job, tgt, given, result, report, args, progress)
    return 0


def _compile_job(args, recipe, progress):
    """Check the outputs, load the data and the models; ``(job, target's LoadedModel)``, before any work."""
    import torch

    from .checks import check_inputs
    from .data import load_calibration, load_labelled
    from .io import check_output_path, load_model
    from .lazy import open_out_of_core
    from .recipe import refine_config
    from .rules import load_rules

    out = check_output_path(args.output, args.force, directory=True)
    if args.report:
        check_output_path(args.report, args.force)
    calib = load_calibration(recipe.calib) if recipe.calib else recipe.calib_random
    _check_calibration(recipe, calib)
    labelled = load_labelled(args.eval) if args.eval else None
    refine = refine_config(recipe, "--data", on_step=_progress_bar(args.quiet))
    rules = load_rules(recipe.rules)
    out_dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    if recipe.quality == "best":
        from .stages import refusal

        problem = refusal({"cost": recipe.cost, "groups": recipe.groups, "repair": recipe.repair,
                           "method": recipe.method, "calib": calib, "refine": refine})
        if problem:
            raise FxfuseError(problem)
    loaded, states = [], None
    plain = (recipe.cost == "weights" and recipe.method == "ot" and recipe.groups == "perm" and not recipe.repair
             and refine is None and labelled is None and recipe.quality != "best")
    if plain:  # Hugging Face twins in safetensors: fused out of core
        loaded, states = open_out_of_core(recipe.models, progress)
    if not loaded:
        for spec in recipe.models:
            progress(f"loading {spec}")
            loaded.append(load_model(spec, trust_pickle=args.trust_pickle))
    if not -len(loaded) <= recipe.target < len(loaded):
        raise FxfuseError(f"--target {recipe.target} is out of range for {len(loaded)} models")
    tgt = loaded[recipe.target]
    _check_untie(recipe, tgt)
    _warn_repair_after_refine(recipe)
    _warn_unused_options(recipe, all(set(m.module.state_dict()) == set(tgt.module.state_dict()) for m in loaded))
    named = calib.items() if isinstance(calib, Mapping) else [(None, calib)] if isinstance(calib, torch.Tensor) else []
    for key, x in named:
        check_inputs(tgt.module, x, f"--calib {recipe.calib}" + (f" ({key})" if key else ""))
    job = _CompileJob(out, tuple(loaded), None if states is None else tuple(states), calib, labelled, refine, rules,
                      out_dtype)
    return job, tgt


def _evaluate_parents(job: _CompileJob, tgt, eval_file: str | None, progress) -> list:
    """Every parent's accuracy on the ``--eval`` data, run now: data that does not fit fails before the work."""
    from .checks import check_inputs, check_labels, guarded
    from .evaluate import accuracy, predict

    rows = []
    if job.labelled is None:
        return rows
    progress("evaluating the models")
    x, y = job.labelled
    for i, m in enumerate(job.loaded):
        where = f"--eval {eval_file}: model {i} ({m.spec})"
        check_inputs(m.module, x, where)
        check_labels(guarded(f"{where} cannot run on the inputs", lambda: predict(m.module, x[:2], tgt)), y, where)
        rows.append((f"model {i} ({m.spec})", guarded(where, lambda: accuracy(m.module, x, y, tgt))))
    return rows


def _fuse_job(job: _CompileJob, tgt, recipe, args, progress):
    """``fxfuse.compile`` on the job; out of core first, in memory where the models need their weights to trace.
    ``(result, job, target)`` (the job and target change when the models had to be loaded in memory)."""
    from dataclasses import replace

    from .errors import TraceError
    from .fuse import compile as fuse_models
    from .io import load_model

    def fuse(job, tgt):
        return fuse_models([m.module for m in job.loaded], tgt.args, example_kwargs=tgt.kwargs, recipe=recipe,
                           calib=job.calib, rules=job.rules, progress=progress, refine=job.refine,
                           states=job.states, out_dtype=job.out_dtype)

    try:
        return fuse(job, tgt), job, tgt
    except TraceError:
        if job.states is None:
            raise
    progress("the models do not trace without their weights: loading them in memory")
    job = replace(job, loaded=tuple(load_model(spec, trust_pickle=args.trust_pickle) for spec in recipe.models),
                  states=None)
    tgt = job.loaded[recipe.target]
    return fuse(job, tgt), job, tgt


def _print_refinement(report: dict, recipe) -> None:
    if "refine" in report:
        r = report["refine"]
        print(f"refined {r['steps']} steps in {r['seconds']:.1f}s: loss at the fusion weights "
              f"{r['loss_at_weights_before']:.4f} -> {r['loss_at_weights_after']:.4f}, barrier there "
              f"{r['barrier_at_weights_before']:.4f} -> "
              f"{r['barrier_at_weights_after']:.4f} (on {r['eval_samples']} samples of {recipe.refine_data})")


def _print_quality(report: dict) -> None:
    """What quality best tried and kept, one line."""
    q = report.get("quality")
    if q:
        tried = ", ".join(f"{c['name']} " + ("skipped" if c["score"] is None else f"{c['score']:.4g}")
                          for c in q["candidates"])
        print(f"quality best: kept {q['chosen']} ({q['score']}; tried {tried})")


def _evaluate_fused(job: _CompileJob, tgt, recipe, fused, rows: list, eval_file: str, progress) -> dict:
    """The ``--eval`` table: the parents (``rows``), the vanilla average where defined, the fused model; printed
    and returned for the report."""
    from .evaluate import accuracy
    from .fuse import FusionError, compile as fuse_models

    progress("evaluating")
    x, y = job.labelled
    rows = list(rows)
    if recipe.method == "ot":
        try:
            vanilla = fuse_models([m.module for m in job.loaded], tgt.args, example_kwargs=tgt.kwargs,
                                  target=recipe.target, weights=recipe.weights, method="vanilla",
                                  rules=job.rules).module
            rows.append(("vanilla average", accuracy(vanilla, x, y, tgt)))
        except FusionError:  # undefined across widths or depths: the target alone is the baseline
            rows.append(("vanilla average", None))
    rows.append(("fused (fxfuse)" if recipe.method == "ot" else "fused (vanilla average)", accuracy(fused, x, y, tgt)))
    width = max(len(r[0]) for r in rows)
    print(f"accuracy on {eval_file} ({x.shape[0]} samples):")
    for label, acc in rows:
        print(f"  {label:<{width}}  " + ("   n/a (the shapes differ)" if acc is None else f"{acc:6.1%}"))
    return {"file": eval_file, "samples": int(x.shape[0]), "accuracy": dict(rows)}


def _write_compiled(job: _CompileJob, tgt, recipe, result, report: dict, args, progress) -> None:
    """The output directory (weights, ``report.json``, the recipe, the model card), ``--report``, the last line."""
    from .card import model_card
    from .io import save_model, write_text_atomic
    from .lazy import save_hf_out_of_core
    from .recipe import RECIPE_FILE

    text = json.dumps(report, indent=1, default=float) + "\n"
    saved = recipe.resolved()
    extra = {"report.json": text, RECIPE_FILE: saved.to_yaml(), "README.md": model_card(report, saved)}
    if result.state is not None:
        progress(f"writing {job.out}")
        save_hf_out_of_core(tgt, result.state, job.out, force=args.force, extra=extra, dtype=job.out_dtype,
                            progress=progress)
    else:
        save_model(tgt, result.module, job.out, force=args.force, extra=extra)
    if args.report:
        write_text_atomic(args.report, text, force=args.force)
    seconds = f"{report['timings']['total_s']:.1f}s"
    if recipe.method == "vanilla":
        print(f"wrote {job.out} (vanilla average, no alignment); {seconds}")
    elif "quality" in report:
        print(f"wrote {job.out} (quality best: {report['quality']['chosen']}); "
              f"{_self_check_text(report['self_check'])}; {seconds}")
    else:
        print(f"wrote {job.out} (ot, cost {recipe.cost}, solver {recipe.solver}); "
              f"{_self_check_text(report['self_check'])}; {seconds}")


def cmd_barrier(args) -> int:
    from . import atomic
    from .barrier import barrier, plot
    from .data import load_calibration, load_labelled
    from .io import check_output_path, load_model
    from .recipe import refine_config
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
    _check_calibration(args, calib)
    if args.repair and calib is None:
        raise FxfuseError("--repair needs calibration inputs: pass --calib FILE (or --calib-random N)")
    refine = refine_config(args, "--refine-data", on_step=_progress_bar(args.quiet))
    rules = load_rules(args.rules)
    a, b = (load_model(spec, trust_pickle=args.trust_pickle) for spec in args.models)
    _warn_unused_options(args, set(a.module.state_dict()) == set(b.module.state_dict()))
    result = barrier(a.module, b.module, inputs, labels, a.args, example_kwargs=a.kwargs, points=args.points,
                     head=args.head, progress=progress, cost=args.cost, calib=calib, solver=args.solver,
                     reg=args.reg, pin=args.pin, rules=rules, strict=args.strict, heads=args.heads,
                     repair=args.repair, refine=refine, groups=args.groups, untie=args.untie)
    if args.plot:
        out = Path(args.plot)
        fd, tmp = atomic.temp_file(out)
        os.close(fd)
        try:
            plot([("vanilla", result.vanilla), (f"fxfuse ({args.cost})", result.aligned)]
                 + ([(f"refined ({args.refine} steps)", result.refined)] if result.refined else []), str(tmp),
                 title=f"{os.path.basename(args.models[0])} → {os.path.basename(args.models[1])}")
            atomic.replace(tmp, out)
        except BaseException:
            atomic.discard(tmp)
            raise
    if args.json:
        json.dump(dict(result.as_dict(), models=list(args.models), data=args.data), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    r = result.refined
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


def cmd_rules_check(args) -> int:
    from .rules import parse_rule_file
    from .schema import unresolved_ops

    for f in args.files:
        rules = parse_rule_file(f)
        ops = sum(len(r.ops) for r in rules)
        unknown = unresolved_ops(op for r in rules for op in r.ops)
        checked = f" ({ops - len(unknown)} checked against their torch schema)" if unknown else ""
        print(f"ok: {f}: {len(rules)} rules for {ops} ops{checked}")
        if unknown:
            print(f"  not in torch.ops here, so unchecked: {', '.join(unknown)}")
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


def _negative_values(argv: list[str]) -> list[str]:
    """``--weights -1,2`` as ``--weights=-1,2`` (argparse would take ``-1,2`` for an option)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] == "--weights" and re.fullmatch(r"-[0-9.][0-9.,eE+-]*", a):
            out[-1] = f"--weights={a}"
        else:
            out.append(a)
    return out


def _quiet_libraries() -> None:
    """--quiet: no progress bars or load reports from transformers (torch's export logging is always off)."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from .atomic import Terminated, interrupts

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fxfuse rules list | head` ends quietly
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["fxfuse", *argv]
    warnings.filterwarnings("ignore")
    if getattr(args, "quiet", False):
        _quiet_libraries()
    try:
        with interrupts():
            return args.func(args)
    except FxfuseError as exc:
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("fxfuse: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("fxfuse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file system failure no check foresaw: still one line
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
