"""``quality="best"``: every optional stage of ``compile`` earns its place on held-out data.

    data ─split─▶ (fit part, held-out part)
    align:  weights/perm ▸ weights/full ▸ activations/perm      the lowest score wins
    refine: the best perm and the best full alignment + refine; the lower one kept if it scores lower
    scales: (with refine's ``scales``) the kept refinement again learning unit scales too, else each
            alignment + refine with scales; kept if it scores lower
    repair: the refined result + repair, else the best perm and the best full alignment + repair;
            the lowest kept if it scores lower
    refit:  the kept options fused again on all the samples (the held-out part included); kept
            unless it scores worse on the held-out part (which it saw) than the fit without it

A *score* is measured on held-out samples that no stage saw:

* labelled data ``(x, y)`` (the refinement data): the mean cross-entropy of the
  fused model, ``L = −(1/M) Σ_i log q(y_i | x_i)`` (``fxfuse.models.heads.evaluate``);
* else unlabelled calibration inputs: the divergence of the fused model's
  prediction from its parents' mixed prediction, ``KL(p̄ ‖ q)`` with
  ``p̄ = Σ_m w_m softmax(f_m(x))`` and ``q = softmax(f(x))`` over the output's last
  dim, averaged over samples (and positions).

The held-out part is the last ``HELD_OUT`` of the samples (at least one); the
stages fit on the rest (calibration statistics of repair and activation
costs; the refinement's batches); once the held-out scores have chosen, the
kept options are fitted again on all the samples and those weights returned. Candidates that cannot run (a group whose
maps cannot be refined yet, say) are skipped and said so; a stage that scores
worse than the result without it is dropped, said in the notes (printed as
warnings by the command line) and under ``quality`` in the report. Every
candidate is a deterministic ``compile``: the same inputs and seed choose the
same stages and give bit-identical weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..core.errors import FxfuseError

HELD_OUT = 0.2          # share of the samples held out for scoring
REFINE_STEPS = 300      # refinement budget of "best" when no step count is given
ALIGNMENTS = (("weights, groups perm", {"cost": "weights", "groups": "perm"}),
              ("weights, groups full", {"cost": "weights", "groups": "full"}),
              ("activations, groups perm", {"cost": "activations", "groups": "perm"}))
CHOSEN_BY_BEST = {"cost": "weights", "groups": "perm", "repair": False}  # defaults of the options "best" chooses


class StageError(FxfuseError):
    """``quality="best"`` cannot run on these inputs."""


@dataclass(frozen=True)
class Trial:
    """One candidate: ``name``, the options it changes, its score (``None``: skipped, ``reason`` says why)."""

    name: str
    options: Mapping[str, Any]
    score: float | None = None
    seconds: float = 0.0
    reason: str = ""
    kept: bool = False

    def as_dict(self) -> dict:
        return {"name": self.name, "options": {k: v for k, v in self.options.items() if k != "refine"}
                | ({"refine_steps": self.options["refine"].steps} if self.options.get("refine") else {})
                | ({"refine_scales": True} if getattr(self.options.get("refine"), "scales", False) else {}),
                "score": self.score, "seconds": round(self.seconds, 3), "kept": self.kept,
                **({"reason": self.reason} if self.reason else {})}


# ---------------------------------------------------------------- held-out data and scores


def split(n: int, share: float = HELD_OUT) -> tuple[slice, slice]:
    """``(fit, held_out)`` slices of ``n`` samples: the last ``max(1, round(share·n))`` are held out."""
    if n < 2:
        raise StageError(f"--quality best holds out some of the samples to score the stages: need at least 2, "
                         f"got {n}")
    k = min(n - 1, max(1, round(share * n)))
    return slice(0, n - k), slice(n - k, n)


def take(calib, part: slice):
    """Rows ``part`` of calibration data (a tensor, or a mapping of named inputs)."""
    if isinstance(calib, Mapping):
        return {k: v[part] for k, v in calib.items()}
    return calib[part]


@dataclass(frozen=True)
class Scorer:
    """Scores a fused model on held-out data; lower is better. ``what`` says which score, for the report."""

    what: str
    short: str
    score: Callable[[torch.nn.Module], float] = field(repr=False)


def loss_scorer(x: torch.Tensor, y: torch.Tensor, head: str, input_key: str | None) -> Scorer:
    """Mean cross-entropy on ``(x, y)`` (``head``: classification, mlm or causal)."""
    from ..models.heads import evaluate

    return Scorer(f"loss on {x.shape[0]} held-out labelled samples", "held-out loss", lambda m: evaluate(m, x, y, head, input_key)[0])


def _log_probs(model: torch.nn.Module, batches) -> list[torch.Tensor]:
    from ..models.evaluate import logits_of

    model.eval()
    with torch.no_grad():
        return [F.log_softmax(logits_of(model(*a, **kw)).double(), dim=-1) for a, kw in batches]


def agreement_scorer(parents, weights, batches) -> Scorer:
    """``KL(p̄ ‖ q)`` per sample (and position), ``p̄`` the parents' predictions mixed by ``weights``."""
    total = float(sum(weights))
    mixed = None
    for w, parent in zip(weights, parents):
        probs = [lp.exp() * (w / total) for lp in _log_probs(parent, batches)]
        mixed = probs if mixed is None else [a + b for a, b in zip(mixed, probs)]
    log_mixed = [p.clamp(min=1e-300).log() for p in mixed]

    def score(model: torch.nn.Module) -> float:
        kl = [(p * (lp - lq)).sum(-1) for p, lp, lq in zip(mixed, log_mixed, _log_probs(model, batches))]
        return float(torch.cat([k.reshape(-1) for k in kl]).mean())

    n = sum(int(next(iter(kw.values())).shape[0]) if not a else int(a[0].shape[0]) for a, kw in batches)
    return Scorer(f"KL of the prediction to the parents' mixed prediction on {n} held-out calibration samples", "held-out KL", score)


# ---------------------------------------------------------------- the search


def _chosen(keywords: Mapping[str, Any]) -> list[str]:
    """Options that "best" chooses itself but the caller set."""
    out = [f"--{k}" + ("" if keywords[k] is True else f" {keywords[k]}") for k, v in CHOSEN_BY_BEST.items()
           if keywords.get(k, v) != v]
    if keywords.get("method", "ot") != "ot":
        out.append(f"--method {keywords['method']}")
    return out


def refusal(keywords: Mapping[str, Any]) -> str | None:
    """Why ``quality="best"`` cannot run with ``compile``'s ``keywords``, or ``None``."""
    set_by_caller = _chosen(keywords)
    if set_by_caller:
        return (f"--quality best chooses --cost, --groups and --repair itself (with the ot method): drop "
                f"{', '.join(set_by_caller)}, or use --quality fast")
    if keywords.get("states") is not None:
        return "--quality best fuses several candidates: it needs the models in memory, not out of core"
    calib = keywords.get("calib")
    if isinstance(calib, int) or (calib is None and keywords.get("refine") is None):
        return ("--quality best scores every stage on held-out inputs: give calibration inputs (--calib FILE) or "
                "labelled data (--data FILE); random inputs score nothing")
    return None


def held_out(models, example_args: tuple, keywords: Mapping[str, Any]) -> tuple[Scorer, Any, Any]:
    """``(scorer, calibration inputs, refinement config)``: the scorer reads the held-out samples, the stages
    the rest. Labelled data (``refine``'s) is scored by loss, else ``calib`` by agreement with the parents."""
    from ..models.heads import detect_head
    from ..models.calibration import calibration_batches, main_input, samples

    calib, refine = keywords.get("calib"), keywords.get("refine")
    target = models[keywords.get("target", 0)]
    args, kwargs = tuple(example_args), dict(keywords.get("example_kwargs") or {})
    if refine is not None:
        fit, held = split(refine.inputs.shape[0])
        key, _ = main_input(args, kwargs)
        scorer = loss_scorer(refine.inputs[held], refine.labels[held], refine.head or detect_head(target),
                             key if isinstance(key, str) else None)
        refine = replace(refine, inputs=refine.inputs[fit], labels=refine.labels[fit])
        calib = refine.inputs if calib is None else take(calib, split(samples(calib))[0])
        return scorer, calib, refine
    fit, held = split(samples(calib))
    batches = calibration_batches(take(calib, held), args, kwargs, forward=target)
    weights = keywords.get("weights") or [1.0] * len(models)
    return agreement_scorer(models, weights, batches), take(calib, fit), None


def _refit(compile_fn, models, example_args: tuple, keywords: Mapping[str, Any], changes: Mapping[str, Any], say):
    """The kept candidate's options (``changes``) fitted again on all the samples, held-out part included:
    ``(result, what)``. The choice was made on held-out data; the refit only gives the chosen stages
    (repair's statistics, activation costs, the refinement's batches) the samples the scoring kept from them."""
    calib, refine = keywords.get("calib"), keywords.get("refine")
    if changes.get("refine") is not None:
        changes = dict(changes, refine=replace(refine, steps=changes["refine"].steps,
                                               scales=getattr(changes["refine"], "scales", False)))
    if calib is None and refine is not None:
        calib = refine.inputs
    say("quality best: refitting the kept candidate on all the samples")
    result = compile_fn(models, example_args, **(dict(keywords, quality="fast", calib=calib, refine=None) | changes))
    from ..models.calibration import samples

    what = {"calib_samples": samples(calib)}
    if changes.get("refine") is not None:
        what["refine_samples"] = int(refine.inputs.shape[0])
    return result, what


def fuse_best(compile_fn, models, example_args: tuple, keywords: Mapping[str, Any]):
    """``compile_fn`` (``fxfuse.compile``) run on the candidates above; the kept result, its report under
    ``quality``. ``keywords``: ``compile``'s options; ``calib`` (unlabelled inputs) and ``refine`` (a
    ``RefineConfig``: the labelled data and the refinement budget) give the held-out data."""
    start = time.perf_counter()
    say = keywords.get("progress") or (lambda _m: None)
    problem = refusal(keywords)
    if problem:
        raise StageError(problem)
    scorer, calib, refine = held_out(models, example_args, keywords)
    base = dict(keywords, quality="fast", calib=calib, refine=None)

    trials: list[Trial] = []

    def run(name: str, changes: Mapping[str, Any]):
        say(f"quality best: trying {name}")
        start = time.perf_counter()
        try:
            result = compile_fn(models, example_args, **dict(base, **changes))
        except FxfuseError as exc:
            if not trials:  # the first candidate is today's default: its errors are the caller's
                raise
            trials.append(Trial(name, dict(changes), None, time.perf_counter() - start, f"skipped: {exc}"))
            return None
        trials.append(Trial(name, dict(changes), result_score := scorer.score(result.module),
                            time.perf_counter() - start))
        return result, result_score

    results = {}
    for name, changes in ALIGNMENTS:
        got = run(name, changes)
        if got is not None:
            results[name] = (changes, *got)
    align = min(results, key=lambda n: results[n][2])  # ties: the earlier (simpler) candidate
    chosen_name, (changes, result, score) = align, results[align]
    notes = []
    for name, (_c, _r, s) in results.items():
        if name != align:
            notes.append(f"quality best: alignment '{name}' not kept ({scorer.short} {s:.4g} against {score:.4g} "
                         f"for '{align}')")
    # the best alignment of each group level goes on to the next stage: refinement and repair reorder them (a
    # permutation alignment that scores better unrefined or unrepaired can end below the orthogonal maps, and
    # the other way round)
    best_of: dict[str, str] = {}
    for name in sorted(results, key=lambda n: results[n][2]):
        best_of.setdefault(results[name][0]["groups"], name)
    def best_with(label: str, bases, extra: Mapping[str, Any]):
        """Each base ``(name, options)`` fused again with ``extra``: ``(name, options, result, score)`` of the
        lowest score (ties: the better aligned), the others said; ``None`` where none could run."""
        ran = []
        for base, options in bases:
            got = run(f"{base} + {label}", dict(options, **extra))
            if got is None:
                notes.append(f"quality best: {trials[-1].name} {trials[-1].reason}")
                continue
            ran.append((trials[-1].name, trials[-1].options, *got))
        if not ran:
            return None
        best = min(ran, key=lambda r: r[3])
        notes.extend(f"quality best: '{other}' not kept ({scorer.short} {other_score:.4g} against {best[3]:.4g} "
                     f"for '{best[0]}')" for other, _o, _r, other_score in ran if other != best[0])
        return best

    def kept(stage: str, best) -> bool:
        """Whether the stage's ``best`` scores lower than the result without it (else said)."""
        if best is None:
            return False
        if best[3] < score:
            return True
        notes.append(f"quality best: stage {stage} dropped: it made the result worse ({scorer.short} "
                     f"{best[3]:.4g} against {score:.4g} without it)")
        return False

    refined_kept = False
    if refine is not None:
        plain = replace(refine, scales=False)
        best = best_with(f"refine {refine.steps}", [(n, results[n][0]) for n in best_of.values()], {"refine": plain})
        if kept("refine", best):
            chosen_name, changes, result, score = best
            refined_kept = True
        if getattr(refine, "scales", False):  # unit scales: a stage of their own, on the refinement kept
            bases = ([(chosen_name, changes)] if refined_kept else
                     [(f"{n} + refine {refine.steps}", results[n][0]) for n in best_of.values()])
            best = best_with("scales", bases, {"refine": refine})
            if kept("scales", best):
                chosen_name, changes, result, score = best
                refined_kept = True
    # repair: of the refined result, else of the best alignment of each group level (the chosen one first)
    bases = [(chosen_name, changes)] if refined_kept else [(n, results[n][0]) for n in best_of.values()]
    best = best_with("repair", bases, {"repair": True})
    if kept("repair", best):
        chosen_name, changes, result, score = best
    trials = [replace(t, kept=t.name == chosen_name) for t in trials]
    refitted, refit = _refit(compile_fn, models, example_args, keywords, changes, say)
    # a guard, not a fair score (the refit saw the held-out samples): a refit that lands in a worse place
    # than the fit on the first part (refinement is sensitive to its batches) scores worse even there
    refit_score = scorer.score(refitted.module)
    refit = dict(refit, score=refit_score, kept=refit_score <= score)
    if refit["kept"]:
        result = refitted
    else:
        notes.append(f"quality best: the refit on all the samples dropped: it scored worse on the held-out samples, "
                     f"which it saw ({scorer.short} {refit_score:.4g} against {score:.4g}); kept the fit on the "
                     f"first {1 - HELD_OUT:.0%}")
    report = dict(result.report)
    report["quality"] = {"preset": "best", "score": scorer.what, "chosen": chosen_name,
                         "options": trials[[t.name for t in trials].index(chosen_name)].as_dict()["options"],
                         "candidates": [t.as_dict() for t in trials], "refit": refit}
    report["notes"] = list(report["notes"]) + notes
    report["timings"] = dict(report["timings"], kept_candidate_s=report["timings"]["total_s"],
                             total_s=time.perf_counter() - start)  # the whole search
    say(f"quality best: kept {chosen_name} ({scorer.short} {score:.4g})"
        + (", refit on all the samples" if refit["kept"] else ""))
    return replace(result, report=report)
