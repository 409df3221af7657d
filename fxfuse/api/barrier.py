"""Loss barriers: the loss along the straight line between two models, before and after alignment.

For ``θ(λ) = (1 − λ)·θ_A + λ·θ_B`` the barrier is

    B = max_λ [ L(θ(λ)) − ((1 − λ)·L(θ_A) + λ·L(θ_B)) ],

the largest excess of the interpolated loss over the straight line between the
end losses. ``barrier`` measures it twice: with B as it is (vanilla) and with B
moved into A's basis by fxfuse; both curves share their end points because an
alignment does not change what B computes.

The loss is the model's own head: classification (logits ``(N, C)``, labels
``(N,)``), masked LM (logits ``(N, S, V)``, labels ``(N, S)`` with ``-100``
ignored), or causal LM (the same, shifted by one token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_inputs, check_labels, guarded
from ..core.derived import forget_derived
from ..core.errors import FxfuseError
from ..models.evaluate import logits_of
from ..models.heads import HEADS, call_on, detect_head, evaluate, head_loss, scored  # noqa: F401  (also imported from here)

@dataclass(frozen=True)
class Curve:
    lambdas: tuple[float, ...]
    loss: tuple[float, ...]
    accuracy: tuple[float, ...] | None = None

    @property
    def barrier(self) -> float:
        """``max_λ L(λ) − ((1−λ)L(0) + λL(1))``."""
        l0, l1 = self.loss[0], self.loss[-1]
        return max(l - ((1 - t) * l0 + t * l1) for t, l in zip(self.lambdas, self.loss))


@dataclass(frozen=True)
class BarrierResult:
    vanilla: Curve
    aligned: Curve
    head: str
    report: dict = field(default_factory=dict)
    refined: Curve | None = None  # B aligned and then refined on labelled data (``refine=``)

    def as_dict(self) -> dict:
        out = {"head": self.head, "lambdas": list(self.vanilla.lambdas)}
        curves = (("vanilla", self.vanilla), ("aligned", self.aligned), ("refined", self.refined))
        for name, c in ((n, c) for n, c in curves if c is not None):
            out[name] = {"loss": list(c.loss), "barrier": c.barrier}
            if c.accuracy is not None:
                out[name]["accuracy"] = list(c.accuracy)
        if "correspondence" in self.report:  # B matched to A by graph
            out["correspondence"] = self.report["correspondence"]
        return out


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    return {k: ((1 - lam) * v + lam * b[k]).to(v.dtype) if v.is_floating_point() else v for k, v in a.items()}


def curve(model_a: nn.Module, state_b: Mapping[str, torch.Tensor], inputs, labels, head: str, points: int,
          input_key: str | None = None, progress: Callable[[str], None] | None = None, label: str = "",
          repair: Callable[[dict, Mapping, Mapping, float], dict] | None = None) -> Curve:
    """Loss and accuracy along ``A → B``; ``repair(state, state_a, state_b, λ)`` corrects every point first."""
    import copy

    state_a = model_a.state_dict()
    probe = copy.deepcopy(forget_derived(model_a))
    lambdas = tuple(i / (points - 1) for i in range(points))
    losses, accs = [], []
    for i, lam in enumerate(lambdas):
        state = interpolate(state_a, state_b, lam)
        probe.load_state_dict(state if repair is None else repair(state, state_a, state_b, lam), strict=True)
        forget_derived(probe)
        loss, acc = evaluate(probe, inputs, labels, head, input_key)
        losses.append(loss)
        accs.append(acc)
        if progress:
            progress(f"{label} λ={lam:.2f}: loss {loss:.4f}, accuracy {acc:.1%} ({i + 1}/{points})")
    return Curve(lambdas, tuple(losses), tuple(accs))


def check_data(inputs: torch.Tensor, labels: torch.Tensor, example: torch.Tensor, head: str) -> None:
    """One-line errors for data that does not fit the models."""
    if inputs.shape[0] == 0:
        raise FxfuseError("the data is empty")
    if tuple(inputs.shape[1:]) != tuple(example.shape[1:]) and not (
            head != "classification" and inputs.dim() == example.dim()):
        raise FxfuseError(f"inputs have shape {tuple(inputs.shape)}; the models take (N, "
                          f"{', '.join(map(str, example.shape[1:]))})")
    if inputs.is_floating_point() != example.is_floating_point():
        raise FxfuseError(f"inputs have dtype {inputs.dtype}; the models take {example.dtype}")
    if labels.shape[0] != inputs.shape[0]:
        raise FxfuseError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise FxfuseError(f"labels must be integer ids, got {labels.dtype}")
    want = 1 if head == "classification" else 2
    if labels.dim() != want:
        raise FxfuseError(f"labels have shape {tuple(labels.shape)}; a {head} head takes "
                          + ("(N,)" if want == 1 else "(N, S)"))


def _check_fit(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, head: str,
               input_key: str | None) -> None:
    """Inputs both models take and labels within their classes, checked before any alignment.

    Model A is run once over all the data (its loss is the curve's first point), so that inputs
    it cannot take fail here with one line rather than halfway along a curve.
    """
    for name, model in (("model A", model_a), ("model B", model_b)):
        check_inputs(model, inputs, f"the data for {name}")
        with torch.no_grad():
            logits = guarded(f"{name} cannot run on the data", lambda: logits_of(call_on(model, inputs[:2], input_key)))
        check_labels(logits, labels, f"the labels for {name}", shift=head == "causal")
    guarded("model A cannot run on the data", lambda: evaluate(model_a, inputs, labels, head, input_key))


def check_refine_data(refine, models, example_args: tuple, example_kwargs: Mapping[str, Any] | None,
                      where: str, target: int = 0) -> None:
    """The labelled data of ``refine`` (a ``RefineConfig``) fits every model: inputs they take, labels within
    their classes (the head read from ``models[target]`` unless ``refine`` names one). Run before any
    alignment, so that ``--refine`` fails at once with one line naming ``where``."""
    from ..models.calibration import main_input

    key, example = main_input(tuple(example_args), dict(example_kwargs or {}))
    input_key = key if isinstance(key, str) else None
    head = refine.head or detect_head(models[target])
    for i, model in enumerate(models):
        check_inputs(model, refine.inputs, f"{where}: model {i}")
        with torch.no_grad():
            logits = guarded(f"{where}: model {i} cannot run on the inputs",
                             lambda: logits_of(call_on(model, refine.inputs[:2], input_key)))
        check_labels(logits, refine.labels, f"{where}: model {i}", shift=head == "causal")


def barrier(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
            example_args: tuple = (), *, example_kwargs: Mapping[str, Any] | None = None, points: int = 21,
            head: str | None = None, progress: Callable[[str], None] | None = None, repair: bool = False,
            refine: Any = None, match: str = "auto", **fuse_options) -> BarrierResult:
    """Loss along ``A → B`` for B as it is and for B aligned into A's basis (``fxfuse.compile`` options).

    ``match``: as ``fxfuse.compile``'s: with ``"graph"`` (or ``"auto"`` and B of another class than A) B is
    first moved into A's class and names by matching the two exported graphs (``fxfuse.frontend.convert``,
    checked), and both curves run from A to that copy, which computes what B does.

    ``repair=True``: every interpolated model is repaired at its own ``λ``
    (``fxfuse.backend.repair``, on ``calib``) before it is scored, on both curves.
    ``refine``: a ``fxfuse.backend.refine.RefineConfig`` (its own labelled data, not the
    data scored here): also the curve of B aligned and then refined; with ``refine.scales``
    the learnt unit scales are applied along it at strength ``λ(1 − λ) / (w(1 − w))`` (0 at
    both ends, so the ends stay the parents; ``fxfuse.backend.scales``).
    """
    from ..models.calibration import main_input
    from .fuse import compile as fuse

    if points < 2:
        raise FxfuseError(f"--points must be at least 2, got {points}")
    head = head or detect_head(model_a)
    if head not in HEADS:
        raise FxfuseError(f"unknown head {head!r} (one of {', '.join(HEADS)})")
    kwargs = dict(example_kwargs or {})
    key, example = main_input(tuple(example_args), kwargs)
    input_key = key if isinstance(key, str) else None
    check_data(inputs, labels, example, head)
    if repair and fuse_options.get("calib") is None:
        raise FxfuseError("--repair needs calibration inputs: pass --calib FILE (or --calib-random N)")
    from ..frontend.convert import report_entry, to_target

    (model_a, model_b), matched = to_target([model_a, model_b], [(tuple(example_args), kwargs)] * 2, 0, match,
                                            ["model A", "model B"], progress)
    fuse_options["match"] = "names"  # B, moved or not, has A's names now
    _check_fit(model_a, model_b, inputs, labels, head, input_key)
    if progress:
        progress("aligning B into A's basis")
    result = fuse([model_a, model_b], example_args, example_kwargs=kwargs, target=0, progress=progress, **fuse_options)
    fix = _repairer(model_a, example_args, kwargs, fuse_options) if repair else None
    aligned_b = result.aligned[1].state_dict()
    vanilla = curve(model_a, model_b.state_dict(), inputs, labels, head, points, input_key, progress, "vanilla", fix)
    aligned = curve(result.aligned[0], aligned_b, inputs, labels, head, points, input_key, progress, "aligned", fix)
    report = {"fusion": {k: result.report[k] for k in ("cost", "solver", "self_check", "passes", "timings")}}
    if matched:
        report["correspondence"] = report_entry(matched, ["model A", "model B"])
    refined = None
    if refine is not None:
        from dataclasses import replace

        if progress:
            progress(f"refining the alignment ({refine.steps} steps)")
        options = dict(fuse_options, refine=replace(refine, head=refine.head or head))
        ref = fuse([model_a, model_b], example_args, example_kwargs=kwargs, target=0, progress=progress, **options)
        refined = curve(ref.aligned[0], ref.aligned[1].state_dict(), inputs, labels, head, points, input_key, progress,
                        "refined", _scaler(ref.scales, fix))
        report["refine"] = ref.report["refine"]
        report["refined_self_check"] = ref.report["self_check"]
    return BarrierResult(vanilla, aligned, head, report, refined)


def _scaler(scales, then=None):
    """``repair(state, state_a, state_b, λ)`` applying learnt unit scales (``fxfuse.backend.scales``) at their
    strength ``s(λ) = λ(1 − λ) / (w(1 − w))``, 0 at both ends, then ``then`` (repair) if given; ``then`` itself
    where there are no scales."""
    if scales is None:
        return then
    from ..backend.scales import fold, strength

    def fix(state: dict, state_a: Mapping, state_b: Mapping, lam: float) -> dict:
        state = fold(state, scales, strength(lam, scales.weight))
        return state if then is None else then(state, state_a, state_b, lam)

    return fix


def _repairer(model_a: nn.Module, example_args: tuple, kwargs: Mapping[str, Any], fuse_options: Mapping[str, Any]):
    """``repair(state, state_a, state_b, λ)`` on the calibration inputs of ``fuse_options``."""
    from ..passes.inputs import calibration_batches
    from ..backend.repair import repair_state, trace_for

    batches = calibration_batches(fuse_options["calib"], tuple(example_args), kwargs, fuse_options.get("seed", 0))
    traced = trace_for(model_a, batches)

    def fix(state: dict, state_a: Mapping, state_b: Mapping, lam: float) -> dict:
        return repair_state(traced, state, [state_a, state_b], [1 - lam, lam], batches).state

    return fix


def plot(results: Sequence[tuple[str, Curve]], path: str, title: str = "") -> None:
    """Draw loss curves (one per ``(label, curve)``) into a PNG; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FxfuseError("plotting needs matplotlib: pip install 'fxfuse[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, c in results:
        ax.plot(c.lambdas, c.loss, marker="o", markersize=3, label=f"{label} (barrier {c.barrier:.3f})")
    ax.set_xlabel("λ  (0 = model A, 1 = model B)")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

