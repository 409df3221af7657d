"""Pass 0, ``prepare``: validated options and checked inputs, before any expensive work.

    compile keywords ──Options.of──▶ Options          (one frozen, validated value)
    models, weights, calibration ──prepare──▶ Inputs  (same class, finite weights, calibration batches)

Every complaint is a ``FusionError`` of one line, raised before tracing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..backend.lazy import in_memory
from ..core.device import compute as compute_device
from ..core.errors import FxfuseError
from ..core.progress import bar
from ..frontend.groups import MODES as GROUP_MODES

WIDTH_MAPS = ("embedding", "matching")  # a stream of another width: stretched orthonormal embedding, or matching
from ..frontend.rules import RuleSet, load_rules
from ..models.calibration import Calibration, CalibrationError, main_input, samples
from ..models.calibration import calibration_batches as batches_of
from ..recipes.recipe import BY_NAME as OPTIONS

Progress = Callable[[str], None]

# allowed values, as the recipe schema declares them
COSTS, SOLVERS, METHODS = OPTIONS["cost"].choices, OPTIONS["solver"].choices, OPTIONS["method"].choices
DEPTH_COSTS, HEADS = OPTIONS["depth_cost"].choices, OPTIONS["heads"].choices


class FusionError(FxfuseError):
    """Inputs that cannot be fused, or an alignment that changed a model's function."""


def quiet(_msg: str) -> None:
    """The progress callback that says nothing."""


@dataclass(frozen=True)
class Options:
    """The options of ``fxfuse.compile``, validated (see ``compile`` for their meaning).

    ``target`` is in ``[0, n)``; ``weights`` are non-negative and sum to 1.
    """

    target: int
    weights: tuple[float, ...]
    cost: str = "weights"
    solver: str = "exact"
    reg: float | None = None
    pin: tuple[str, ...] = ()
    method: str = "ot"
    seed: int = 0
    max_passes: int = 50
    strict: bool = False
    heads: str = "nested"
    depth_cost: str = "cka"
    groups: str = "perm"
    untie: bool = False
    width_maps: str = "embedding"
    repair: bool = False
    refine: Any = None  # a fxfuse.backend.refine.RefineConfig
    out_dtype: torch.dtype | None = None
    device: str = "cpu"
    vocab: Any = None  # a fxfuse.models.vocab.Matched: models re-indexed into one vocabulary, rows averaged per row

    @classmethod
    def of(cls, n_models: int, *, target: int = 0, weights: Sequence[float] | None = None, calib: Any = None,
           **values: Any) -> "Options":
        """Validate ``compile``'s keywords for ``n_models`` models; ``calib`` only to check that repair has data."""
        if n_models < 2:
            raise FusionError("need at least two models to fuse")
        if not -n_models <= target < n_models:
            raise FusionError(f"--target {target} is out of range for {n_models} models")
        opts = cls(target=target % n_models, weights=_fusion_weights(weights, n_models), **values)
        for name, allowed, what in (("cost", COSTS, "cost"), ("solver", SOLVERS, "solver"),
                                    ("heads", HEADS, "heads mode"), ("method", METHODS, "method"),
                                    ("depth_cost", DEPTH_COSTS, "depth cost"), ("groups", GROUP_MODES, "groups"),
                                    ("width_maps", WIDTH_MAPS, "width maps")):
            value = getattr(opts, name)
            if value not in allowed:
                extra = "" if name == "heads" else "one of "
                raise FusionError(f"unknown {what} {value!r} ({extra}{', '.join(allowed)})")
        compute_device(opts.device)  # a device that cannot be used fails here, in one line
        if opts.reg is not None and not (opts.reg > 0 and math.isfinite(opts.reg)):
            raise FusionError(f"--reg must be a positive number, got {opts.reg}")
        if opts.repair and calib is None:
            raise FusionError("--repair needs calibration inputs: pass --calib FILE (or --calib-random N)")
        if opts.refine is not None and (opts.method == "vanilla" or opts.solver != "exact"):
            raise FusionError("--refine needs exact maps (the ot method with the exact solver): soft maps and plain "
                              "averaging are no group elements")
        return opts

    @property
    def on(self) -> torch.device | None:
        """The device the arithmetic moves to, ``None`` for the CPU (``fxfuse.core.device.compute``)."""
        return compute_device(self.device)

    @property
    def full_groups(self) -> bool:
        """Whether spaces move by their whole symmetry group (norm scales folded first)."""
        return self.groups == "full" and self.method == "ot"

    @property
    def by_activations(self) -> bool:
        return self.method == "ot" and self.cost == "activations"

    @property
    def structure_only(self) -> bool:
        """Whether only the graph's structure is read (so a twin model may share an analysis)."""
        return self.cost == "weights" and self.groups == "perm" and self.refine is None and not self.repair


def _fusion_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        weights = [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise FusionError(f"{len(weights)} fusion weights for {n} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError(f"fusion weights must be non-negative with a positive sum, got {weights}")
    return tuple(w / sum(weights) for w in weights)


@dataclass(frozen=True)
class Inputs:
    """The models and data of one fusion, checked.

    ``args``/``kwargs``: the example inputs the graphs are traced at (the first
    calibration batch when the cost reads activations); ``batches``: the
    calibration batches ``[(args, kwargs), …]`` for an activations cost, else
    ``None``; ``states``: each model's weights when given apart from the modules
    (out of core), else ``None``; ``held``: whether every weight is in memory.
    """

    models: tuple[nn.Module, ...]
    args: tuple
    kwargs: Mapping[str, Any]
    rules: RuleSet
    calib: Calibration
    batches: tuple | None
    states: tuple[Mapping[str, torch.Tensor], ...] | None
    held: bool
    notes: tuple[str, ...] = ()

    def calibration(self, seed: int, forward: nn.Module | None = None) -> list[tuple[tuple, dict]]:
        """The calibration batches (made from ``calib`` when the cost did not need them)."""
        if self.batches is not None:
            return list(self.batches)
        return calibration_batches(self.calib, self.args, self.kwargs, seed, forward)


def prepare(models: Sequence[nn.Module], example_args: tuple, example_kwargs: Mapping[str, Any] | None,
            options: Options, calib: Calibration = None, rules: RuleSet | None = None,
            states: Sequence[Mapping[str, torch.Tensor]] | None = None, progress: Progress | None = None) -> Inputs:
    """Check the models (one class, finite weights) and make the calibration batches an activations cost needs."""
    models = tuple(models)
    _check_same_class(models)
    held = states is None or all(in_memory(s) for s in states)
    if states is not None and len(states) != len(models):
        raise FusionError(f"{len(states)} weight mappings for {len(models)} models")
    if not held and (options.method != "ot" or options.groups not in ("perm", "full")
                     or options.refine is not None or options.vocab is not None
                     or (options.groups == "full" and options.untie)):
        raise FusionError("out-of-core fusion supports the ot method with permutations or full groups (no "
                          "refinement or untying); load the models in memory")
    check_finite(states or [m.state_dict() for m in models], progress)
    args, kwargs = tuple(example_args), dict(example_kwargs or {})
    batches, notes = None, ()
    if options.by_activations:
        batches = calibration_batches(calib, args, kwargs, options.seed, models[options.target])
        args, kwargs = batches[0]
        dropped = _dropped_note(calib, batches)
        notes = (dropped,) if dropped else ()
    return Inputs(models, args, kwargs, rules if rules is not None else load_rules(), calib,
                  None if batches is None else tuple(batches), None if states is None else tuple(states), held, notes)


def calibration_batches(calib: Calibration, args: tuple, kwargs: Mapping[str, Any], seed: int = 0,
                        forward: nn.Module | None = None) -> list[tuple[tuple, dict]]:
    """Batches of every batched input (``fxfuse.models.calibration``); bad data raises ``FusionError``."""
    try:
        return batches_of(calib, args, kwargs, seed, forward)
    except CalibrationError as exc:
        raise FusionError(str(exc)) from None


def _dropped_note(calib: Calibration, batches: list[tuple[tuple, dict]]) -> str | None:
    """A note when whole batches leave calibration inputs out (the graphs run at one batch shape)."""
    total = samples(calib)
    size = main_input(*batches[0])[1].shape[0]
    used = size * len(batches)
    if used == total:
        return None
    return (f"calibration used {used} of {total} inputs (whole batches of {size}); give a multiple of {size} "
            "to use them all")


def _check_same_class(models: Sequence[nn.Module]) -> None:
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(models[0]):
            raise FusionError(f"model {i} is a {type(m).__name__}, model 0 a {type(models[0]).__name__}")


def check_finite(states: Sequence[Mapping[str, torch.Tensor]], progress: Progress | None = None) -> None:
    """``FusionError`` naming the first tensor that holds NaN or inf."""
    with bar(progress, "checking weights", sum(len(s) for s in states)) as b:
        for i, state in enumerate(states):
            for key in state:
                b.update()
                t = state[key]
                # a sum is finite unless some element is not (or it overflows: then look closer)
                if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                    raise FusionError(f"model {i}: {key} holds NaN or inf")
