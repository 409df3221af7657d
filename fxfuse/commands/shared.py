"""What the commands share: progress and warnings on stderr, the common flags, path and data checks.

A command module (``fxfuse.commands.*_command``) has ``add_parser(sub)``, which
adds its sub-command and flags (the recipe options among them generated from
the schema, ``fxfuse.recipes.recipe.add_options``), and the function its parser runs.
Nothing here imports torch at import time: ``fxfuse --help`` stays quick.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..core.errors import FxfuseError

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
        from ..core.progress import tqdm_bar

        return tqdm_bar(description, total, sys.stderr, self.quiet or not sys.stderr.isatty())


def warn(message: str) -> None:
    """A warning on stderr, shown even with --quiet: the run is legitimate but not what it may seem."""
    print(f"fxfuse: warning: {message}", file=sys.stderr, flush=True)


def add_common(p: argparse.ArgumentParser, recipe_flags: bool = False) -> None:
    """Flags of every command; ``--rules`` and ``--strict`` as declared by the recipe schema."""
    from ..recipes.recipe import add_options

    if not recipe_flags:
        add_options(p, ("rules", "strict"), overriding=False)
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickled model files (runs their code)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def progress_bar(quiet: bool):
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


def version() -> str:
    from .. import __version__

    return __version__


def provenance(argv: list[str]) -> dict:
    """Versions and the command line, recorded in every report."""
    from importlib import metadata

    import torch

    try:
        hf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        hf = None
    return {"version": version(), "torch": torch.__version__, "transformers": hf, "command": list(argv)}


def analysis_notes(analysis) -> list[str]:
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


def warn_analysis(analysis) -> list[str]:
    """``analysis_notes``, each said as a warning; returned for the report."""
    notes = analysis_notes(analysis)
    for note in notes:
        warn(note)
    return notes


def check_paths(outputs: list[tuple[str, str | None]], models: list[str], files: list[tuple[str, Any]]) -> None:
    """Refuse, before any work, an output that is, holds or lies inside an input (``fxfuse.core.guard``).

    ``files``: ``(flag, path or paths)`` of the data and rule files read."""
    from ..core.guard import check_outputs, file_inputs, model_inputs

    inputs = model_inputs(models)
    for flag, paths in files:
        inputs += file_inputs(flag, [paths] if isinstance(paths, str) or paths is None else paths)
    check_outputs(outputs, inputs)


def load_and_analyze(args, progress: Progress, check=None):
    """``(LoadedModel, Analysis)`` of ``args.model`` under ``args.rules``; ``check(module, spec)`` runs on the
    loaded module before it is traced."""
    from ..models.io import load_model
    from ..frontend.rules import load_rules
    from ..frontend.spaces import analyze

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


def warn_unused_options(args, same_depths: bool) -> None:
    """Options that do nothing in the chosen mode, and random calibration inputs, said on stderr."""
    if args.reg is not None and args.solver == "exact":
        warn("--reg is ignored with --solver exact (it regularises sinkhorn)")
    data = ("--calib" if args.calib else "--calib-random" if args.calib_random is not None
            else "--sample" if getattr(args, "sample", None) else None)
    if getattr(args, "method", "ot") == "vanilla":
        if args.cost != "weights" or data:
            warn("--method vanilla averages the weights as they are: --cost and calibration inputs are ignored")
    elif (args.cost == "weights" and data and same_depths and not getattr(args, "repair", False)
          and getattr(args, "quality", None) != "best"
          and not (data == "--sample" and getattr(args, "refine", None) is not None)):  # the refinement data
        warn(f"{data} is ignored with --cost weights (weight matching reads no data; only models of different "
             "depths and --repair use calibration inputs)")
    elif args.cost == "activations" and data is None:
        from ..models.calibration import DEFAULT_CALIB_RANDOM

        warn(f"--cost activations without --calib: correlating on {DEFAULT_CALIB_RANDOM} random inputs "
             "(pass --calib FILE with real inputs)")
    elif data == "--calib-random":
        warn(f"--calib-random {args.calib_random}: calibrating on random inputs, not data the models were trained "
             "on; the maps follow what the models do on noise (pass --calib FILE with real inputs)")


def check_calibration(args, calib) -> None:
    """Enough calibration samples for ``--cost activations`` (``fxfuse.core.checks.check_calibration_size``)."""
    from ..models.calibration import samples
    from ..core.checks import check_calibration_size

    if getattr(args, "method", "ot") != "ot" or args.cost != "activations":
        return
    if isinstance(calib, int):
        check_calibration_size(calib, f"--calib-random {calib}")
    elif calib is not None:  # one tensor, or named inputs sharing their sample count
        check_calibration_size(samples(calib), args.calib)


def check_sample(args) -> None:
    """``--sample`` (and ``--sample-length``) with options that cannot read sampled sequences: refused before
    any loading (compile, barrier)."""
    if args.sample_length is not None and not args.sample:
        raise FxfuseError(f"--sample-length {args.sample_length} is only used with --sample N")
    if not args.sample:
        return
    from ..core.checks import check_calibration_size

    if args.head not in (None, "causal"):
        raise FxfuseError(f"--sample draws causal LM sequences: --head {args.head} cannot read them "
                          "(leave --head out, or give --head causal)")
    if getattr(args, "vocab", None) is not None:
        raise FxfuseError(f"--sample with --vocab {args.vocab}: the parents do not share one token space to "
                          "sample in; pass --calib FILE (and --data FILE) instead")
    if args.cost == "activations" and getattr(args, "method", "ot") == "ot":
        check_calibration_size(args.sample, f"--sample {args.sample}")


def check_calib_file(path: str | None, calib, model) -> None:
    """A calibration file's tensors matched to ``model``'s inputs now, so that a mismatch names the file."""
    from ..models.calibration import CalibrationError, calibration_batches

    if not path:
        return
    try:
        calibration_batches(calib, model.args, model.kwargs, forward=model.module)
    except CalibrationError as exc:
        raise FxfuseError(f"--calib {path}: {exc}") from None


def check_untie(args, loaded) -> None:
    """An untied weight is recorded only by a Hugging Face config: refuse it where the output could not keep it."""
    from ..models.io import HF

    if getattr(args, "untie", False) and loaded.source != HF:
        raise FxfuseError("--untie needs a Hugging Face model directory as the target (its config records the "
                          "untied weights; a factory would build the tied model again)")
