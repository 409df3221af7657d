"""``fxfuse compile MODEL... -o DIR``: align models into one basis and fuse them (``fxfuse.compile``).

The work runs in order: the recipe (a recipe file and the flags), the checks
of every output and input before any work, the job (data, models, rules:
``_CompileJob``), the parents' ``--eval`` accuracy, the fusion (out of core
first), the ``--eval`` table, and the output directory with its report,
recipe and model card. ``--workers N`` runs the same command in N local
processes that share the collection of activation statistics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import FxfuseError
from .shared import (EPILOG, Progress, add_common, analysis_notes, check_calib_file, check_calibration, check_paths,
                     check_sample, check_untie, progress_bar, provenance, warn, warn_unused_options)


def add_parser(sub) -> None:
    """``fxfuse compile``: its sub-command and flags (every recipe option)."""
    from ..recipes.recipe import add_options

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
    add_common(p, recipe_flags=True)
    p.set_defaults(func=run)


def compile_recipe(args):
    """The recipe of a ``compile`` command: a recipe file's (the one MODEL given) or the models', with the
    flags given overriding it."""
    from ..recipes.recipe import Recipe, RecipeError, given, is_recipe_file

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
    recipe = recipe.override(flags)
    fused, rescaled = recipe.normalised()
    if rescaled:
        shown = lambda ws: ",".join(f"{w:g}" for w in ws)  # noqa: E731
        warn(f"fusion weights {shown(recipe.weights)} do not sum to 1: fusing with {shown(fused.weights)} "
             "(so recorded in the recipe, the report and the model card)")
    return fused


def _check_workers(recipe) -> None:
    """Refuse, before any process starts, more workers than calibration batches (each needs one) or than
    the processors this process may run on."""
    from ..models.calibration import CALIB_BATCH, samples
    from ..models.data import load_calibration

    n = recipe.sample or samples(load_calibration(recipe.calib) if recipe.calib else recipe.calib_random)
    batches = max(1, n // CALIB_BATCH)  # batches hold at least CALIB_BATCH samples (or all, when fewer)
    if recipe.workers > batches:
        raise FxfuseError(f"--workers {recipe.workers}: {recipe.workers} workers for {batches} calibration batches "
                          f"at most ({n} samples): need at least one batch per worker (more calibration data, or "
                          "fewer workers)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if recipe.workers > cpus:
        raise FxfuseError(f"--workers {recipe.workers}: this machine runs this process on {cpus} processors; "
                          f"use at most {cpus} workers")


def _is_recipe(arg: str) -> bool:
    from ..recipes.recipe import is_recipe_file

    return is_recipe_file(arg)


def run(args) -> int:
    from ..core.device import resolve
    from ..models.distributed import in_launched_group, init_from_env, local_group, wait_workers

    recipe = compile_recipe(args)
    resolve(recipe.device)  # before any loading: a GPU asked for and absent fails at once
    check_paths([("-o", args.output), ("--report", args.report)], list(recipe.models),
                 [("recipe", [m for m in args.models if _is_recipe(m)]), ("--calib", recipe.calib),
                  ("--eval", args.eval), ("--data", recipe.refine_data), ("--rules", recipe.rules)])
    if recipe.workers > 1 and (recipe.cost != "activations" or recipe.method != "ot"):
        raise FxfuseError("--workers shares the collection of activation statistics: use it with --cost activations")
    if recipe.workers > 1 and in_launched_group():
        raise FxfuseError("--workers starts local processes; under torchrun the ranks are the workers")
    if recipe.workers > 1:
        _check_workers(recipe)
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
    matched: Any = None  # {source index: fxfuse.frontend.convert.Converted} of sources matched by graph
    sampled: Mapping | None = None  # --sample: how the sequences were drawn (for the report)


def _compile(args, given) -> int:
    """``given``: the recipe as written (and saved); it runs with its quality settled (``fxfuse.recipes.recipe.settled``)."""
    from ..models.distributed import WorkerDone, world
    from ..recipes.recipe import settled

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
    if job.sampled:
        report["sample"] = dict(job.sampled)
    if job.matched:
        from ..frontend.convert import report_entry

        report["correspondence"] = report_entry(job.matched, report["models"])
    progress(f"coverage {report['coverage']:.1%} of the target's parameters can move")
    _warn_fusion(report, result.analysis)
    _print_refinement(report, recipe)
    _print_quality(report)
    if args.show_depth_map:
        from ..frontend.render import render_depth_maps

        sys.stdout.write(render_depth_maps(report["depth_maps"], report["width_maps"]))
    if job.labelled is not None:
        report["eval"] = _evaluate_fused(job, tgt, recipe, result.module, rows, args.eval, progress)
    _write_compiled(job, tgt, given, result, report, args, progress)
    return 0


def _compile_job(args, recipe, progress):
    """Check the outputs, load the data and the models; ``(job, target's LoadedModel)``, before any work."""
    import torch

    from ..core.checks import check_inputs
    from ..models.data import load_calibration, load_labelled
    from ..models.io import check_output_path, load_model
    from ..backend.lazy import open_out_of_core
    from ..recipes.recipe import refine_config
    from ..frontend.rules import load_rules

    out = check_output_path(args.output, args.force, directory=True)
    if args.report:
        check_output_path(args.report, args.force, owned="report")
    calib = load_calibration(recipe.calib) if recipe.calib else recipe.calib_random
    check_calibration(recipe, calib)
    check_sample(recipe)
    labelled = load_labelled(args.eval) if args.eval else None
    refine = refine_config(recipe, "--data", on_step=progress_bar(args.quiet))
    rules = load_rules(recipe.rules)
    out_dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    if recipe.quality == "best":
        from ..backend.stages import refusal

        problem = refusal({"cost": recipe.cost, "groups": recipe.groups, "repair": recipe.repair,
                           "method": recipe.method, "calib": calib, "refine": refine})
        if problem:
            raise FxfuseError(problem)
    from ..models.vocab import check_specs

    check_specs(recipe.models, recipe.vocab, recipe.target)  # vocabularies that differ: matched by string, or refused
    if recipe.vocab is not None and args.eval:
        raise FxfuseError(f"--eval {args.eval}: with --vocab the parents do not share one token space to score "
                          "the labelled data in; evaluate the output model on its own")
    loaded, states = [], None
    plain = (recipe.method == "ot" and (recipe.groups == "perm" or (recipe.groups == "full" and not recipe.untie))
             and refine is None
             and labelled is None and recipe.quality != "best" and recipe.vocab is None
             and recipe.match != "graph" and not recipe.sample)
    if plain:  # Hugging Face twins in safetensors: fused out of core (activations streamed op by op)
        loaded, states = open_out_of_core(recipe.models, progress)
    if not loaded:
        for spec in recipe.models:
            progress(f"loading {spec}")
            loaded.append(load_model(spec, trust_pickle=args.trust_pickle))
    if not -len(loaded) <= recipe.target < len(loaded):
        raise FxfuseError(f"--target {recipe.target} is out of range for {len(loaded)} models")
    from ..frontend.convert import loaded_to_target

    loaded, matched = loaded_to_target(loaded, recipe.target % len(loaded), recipe.match, progress)
    tgt = loaded[recipe.target]
    if recipe.vocab is not None:  # the output's tokenizer files can be written: checked before the work
        from ..models.vocab import output_files

        output_files(recipe.models, [m.module for m in loaded], recipe.target, recipe.vocab)
    check_untie(recipe, tgt)
    _warn_repair_after_refine(recipe)
    sampled = None
    if recipe.sample:
        calib, refine, sampled = _sampled(recipe, loaded, tgt, refine, progress)
    if refine is not None:
        from ..api.barrier import check_refine_data

        check_refine_data(refine, [m.module for m in loaded], tgt.args, tgt.kwargs, f"--data {recipe.refine_data}",
                          recipe.target)
    same_depths = all(set(m.module.state_dict()) == set(tgt.module.state_dict()) for m in loaded)
    warn_unused_options(recipe, same_depths)
    named = calib.items() if isinstance(calib, Mapping) else [(None, calib)] if isinstance(calib, torch.Tensor) else []
    for key, x in named:
        where = f"--sample {recipe.sample}" if recipe.sample else f"--calib {recipe.calib}"
        check_inputs(tgt.module, x, where + (f" ({key})" if key else ""))
    if recipe.method == "ot" and (recipe.cost == "activations" or recipe.repair or not same_depths
                                  or recipe.quality == "best"):
        check_calib_file(recipe.calib, calib, tgt)  # the data is read: a mismatch names the file now
    job = _CompileJob(out, tuple(loaded), None if states is None else tuple(states), calib, labelled, refine, rules,
                      out_dtype, matched, sampled)
    return job, tgt


def _sampled(recipe, loaded, tgt, refine, progress):
    """``(calib, refine, report entry)``: ``--sample N`` sequences drawn from the loaded parents; the refinement
    data too where ``--data`` is not given (``fxfuse.models.sampling``)."""
    from ..models.sampling import labelled_by_themselves, sample_sequences

    t0 = time.perf_counter()
    names = [f"model {i} ({m.spec})" for i, m in enumerate(loaded)]
    x = sample_sequences([m.module for m in loaded], tgt.args, tgt.kwargs, recipe.sample, seed=recipe.seed,
                         names=names, progress=progress, length=recipe.sample_length)
    if refine is not None and not recipe.refine_data:
        refine = labelled_by_themselves(refine, x)
    entry = {"sequences": int(x.shape[0]), "length": int(x.shape[1]), "seed": recipe.seed,
             "seconds": round(time.perf_counter() - t0, 3), "refine_data": refine is not None and not recipe.refine_data,
             "drawn": "sequence i from parent i mod M, its first token uniform over the vocabulary"}
    progress(f"sampled {entry['sequences']} sequences of {entry['length']} tokens from the parents "
             f"in {entry['seconds']:.1f}s")
    return x, refine, entry


def _evaluate_parents(job: _CompileJob, tgt, eval_file: str | None, progress) -> list:
    """Every parent's accuracy on the ``--eval`` data, run now: data that does not fit fails before the work."""
    from ..core.checks import check_inputs, check_labels, guarded
    from ..models.evaluate import accuracy, predict

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

    from ..core.errors import TraceError
    from ..api.fuse import compile as fuse_models
    from ..models.io import load_model

    def fuse(job, tgt):
        run = recipe.override({"match": "names"}) if job.matched else recipe
        return fuse_models([m.module for m in job.loaded], tgt.args, example_kwargs=tgt.kwargs, recipe=run,
                           calib=job.calib, rules=job.rules, progress=progress, refine=job.refine,
                           states=job.states, out_dtype=job.out_dtype,
                           vocabularies=list(recipe.models) if recipe.vocab else None)

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
              f"{r['barrier_at_weights_after']:.4f} (on {r['eval_samples']} "
              + (f"samples of {recipe.refine_data})" if recipe.refine_data else "sequences sampled from the parents)"))
        if "scales" in r:
            sc = r["scales"]
            print(f"learnt unit scales of the fused model at {sc['sites']} sites (folded into its weights; the "
                  f"parents unchanged)")


def _warn_repair_after_refine(recipe) -> None:
    if recipe.repair and recipe.refine is not None:
        warn("--repair runs after --refine and rescales units that the refinement fitted unrepaired: on the "
             "digits ViTs it lowered the refined accuracy (docs/quality.md); --quality best keeps it only where it "
             "helps on held-out data")


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
    from ..models.evaluate import accuracy
    from ..api.fuse import FusionError, compile as fuse_models

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
    from ..recipes.card import model_card
    from ..models.io import save_model, write_text_atomic
    from ..backend.lazy import save_hf_out_of_core
    from ..recipes.recipe import RECIPE_FILE

    text = json.dumps(report, indent=1, default=float) + "\n"
    saved = recipe.resolved()
    extra = {"report.json": text, RECIPE_FILE: saved.to_yaml(), "README.md": model_card(report, saved)}
    if recipe.vocab is not None:  # the chosen vocabulary's tokenizer files (and vocab_size)
        from ..models.vocab import output_files

        extra.update(output_files(recipe.models, [m.module for m in job.loaded], recipe.target, recipe.vocab))
    if result.state is not None:
        progress(f"writing {job.out}")
        save_hf_out_of_core(tgt, result.state, job.out, force=args.force, extra=extra, dtype=job.out_dtype,
                            progress=progress)
    else:
        save_model(tgt, result.module, job.out, force=args.force, extra=extra)
    if args.report:
        write_text_atomic(args.report, text, force=args.force, owned="report")
    seconds = f"{time.time() - args.started:.1f}s in all ({report['timings']['total_s']:.1f}s fusing)"
    if recipe.method == "vanilla":
        print(f"wrote {job.out} (vanilla average, no alignment); {seconds}")
    elif "quality" in report:
        print(f"wrote {job.out} (quality best: {report['quality']['chosen']}); "
              f"{_self_check_text(report['self_check'])}; {seconds}")
    else:
        print(f"wrote {job.out} (ot, cost {recipe.cost}, solver {recipe.solver}); "
              f"{_self_check_text(report['self_check'])}; {seconds}")


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
    notes = list(dict.fromkeys(analysis_notes(analysis) + list(report["notes"])))
    for note in notes:
        warn(note)
    if report["method"] != "ot":
        return
    maps = [m for s in report["spaces"] for m in s["models"]]
    if not any(m["units_moved"] is None or m["units_moved"] > 0 for m in maps) and not report["depth_maps"]:
        warn("no space moved: every map is the identity, so the fused model is the plain average")
