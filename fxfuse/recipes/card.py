"""Model cards: the ``README.md`` of a compile output, in the Hugging Face model-card style.

``model_card(report, recipe) -> str`` reads nothing but the parents'
``config.json`` (for their hub ids): YAML front matter (tags, and the
parents' hub ids as base models; a local path is left out), then the recipe
as a YAML block, the parents and their fusion weights, the versions,
coverage, self-check and drift figures, and the evaluation and barrier
figures where the report holds them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .recipe import RECIPE_FILE


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows), ""]


def _figure(value: Any, fmt: str = ".1e") -> str:
    return "–" if value is None else format(value, fmt)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_id(spec: str) -> str | None:
    """The Hugging Face hub id of a parent: the spec itself where it is one (not a local path), else the
    ``_name_or_path`` a Hugging Face directory's ``config.json`` records where that is one; else ``None``."""
    path = Path(spec)
    name: Any = spec
    if (path / "config.json").is_file():
        try:
            name = json.loads((path / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
    elif path.exists():
        return None
    if not isinstance(name, str) or not HUB_ID.fullmatch(name) or Path(name).exists():
        return None
    return name


def _front_matter(report: Mapping[str, Any], recipe) -> list[str]:
    """Tags, and ``base_model``: the parents' hub ids (a local path is no base model a hub can link)."""
    meta: dict[str, Any] = {"library_name": "pytorch",
                            "tags": ["fxfuse", "merge", "model-fusion", f"fxfuse-{recipe.method}"]}
    hub = [h for h in (hub_id(spec) for spec in recipe.models) if h]
    if hub:
        meta["base_model"] = hub
    return ["---", yaml.safe_dump(meta, sort_keys=False).rstrip("\n"), "---", ""]


def _parents(report: Mapping[str, Any], recipe) -> list[str]:
    weights = report.get("weights") or [None] * len(recipe.models)
    target = report.get("target", recipe.target) % max(len(recipe.models), 1)
    rows = [[str(i), f"`{spec}`", _figure(w, ".3f"), "target (basis and class)" if i == target else "source"]
            for i, (spec, w) in enumerate(zip(recipe.models, weights))]
    return ["## Parents", "", *_table(["#", "model", "fusion weight", "role"], rows)]


def _checks(report: Mapping[str, Any]) -> list[str]:
    rows = [[str(c["model"]), "exact" if c.get("hard") else "soft, width or depth", _figure(c.get("error")),
             _figure(c.get("drift")), _figure(c.get("depth_drift"))] for c in report.get("self_check", ())]
    return ["## Self-check", "",
            "Each source, moved into the target's basis, is run on the example inputs against itself: exact maps "
            "must reproduce its outputs (relative error at most 1e-4, else the compile fails); soft, width and "
            "depth maps change them by the drift shown.", "",
            *_table(["model", "maps", "relative error", "output drift", "depth drift"], rows)]


def _evaluation(report: Mapping[str, Any]) -> list[str]:
    ev = report.get("eval")
    if not ev:
        return []
    rows = [[label, "n/a (the shapes differ)" if acc is None else f"{acc:.1%}"]
            for label, acc in ev["accuracy"].items()]
    return ["## Evaluation", "", f"Accuracy on `{ev['file']}` ({ev['samples']} samples):", "",
            *_table(["model", "accuracy"], rows)]


def _barrier(report: Mapping[str, Any]) -> list[str]:
    b = report.get("barrier")
    if not b:
        return []
    return ["## Loss barrier", "", *_table(["interpolation", "barrier"],
                                           [["vanilla", _figure(b.get("vanilla"), ".4f")],
                                            ["fxfuse", _figure(b.get("aligned"), ".4f")]])]


def _vocabulary(report: Mapping[str, Any]) -> list[str]:
    """How many tokens the parents shared, where their vocabularies were matched by token string."""
    v = report.get("vocab")
    if not v:
        return []
    rows = [[str(m["model"]), str(m["rows"]), str(m["kept"]), str(m["shared_with_target"])] for m in v["models"]]
    return ["## Vocabulary", "", f"Rows matched by token string into the {v['mode']} vocabulary of {v['size']} "
            f"tokens; {v['shared']} tokens are shared by every parent (averaged), the other rows come from the "
            "parents that have them, moved into the target's basis.", "",
            *_table(["model", "vocabulary rows", "rows kept", "tokens shared with the target"], rows)]


def _sampled(report: Mapping[str, Any]) -> list[str]:
    """Where the data came from when the parents drew it (``--sample``)."""
    sm = report.get("sample")
    if not sm:
        return []
    use = "the calibration inputs" + (" and, labelled by themselves, the refinement data" if sm.get("refine_data")
                                      else "")
    return ["## Data", "", f"No dataset was read: {sm['sequences']} sequences of {sm['length']} tokens were sampled "
            f"from the parents (seed {sm['seed']}; {sm['drawn']}) and served as {use}.", ""]


def _refit(refit: Mapping[str, int] | None) -> str:
    if not refit:
        return ""
    data = ", ".join(f"{n} {what}" for what, n in (("calibration inputs", refit.get("calib_samples")),
                                                     ("labelled samples", refit.get("refine_samples"))) if n)
    if not refit.get("kept", True):
        return (f" Fitting them again on all the samples ({data}) was tried and dropped: it scored worse on the "
                "held-out samples, which it saw.")
    return f" The kept options were then fitted again on all the samples ({data}), the held-out ones included."


def _stages(report: Mapping[str, Any]) -> list[str]:
    q = report.get("quality")
    if not q:
        return []
    rows = [[c["name"], "skipped" if c["score"] is None else f"{c['score']:.4g}", f"{c['seconds']:.1f}",
             "kept" if c["kept"] else (c.get("reason") or "not kept")] for c in q["candidates"]]
    return ["## Stages", "", f"Chosen by the `best` quality preset: **{q['chosen']}**. Every candidate was scored "
            f"by its {q['score']} (lower is better); a stage that did not lower the score was dropped."
            + _refit(q.get("refit")), "",
            *_table(["candidate", "score", "seconds", "outcome"], rows)]


def _correspondence(report: Mapping[str, Any]) -> list[str]:
    """Sources matched by graph (``fxfuse.frontend.convert``), with what their weights went through."""
    entry = report.get("correspondence")
    if not entry:
        return []
    lines = ["## Correspondence", "", "Parameters were matched by graph, not by name: each source below was moved "
             "into the target's class and names first, and its outputs checked against the original's before any "
             "alignment.", ""]
    for i, c in entry.items():
        kinds = ", ".join(sorted({row[2] for row in c["rows"]}))
        lines.append(f"- model {i} ({c['model']}): {len(c['rows'])} tensors or slices ({kinds}); self-check "
                     f"error {_figure(c['error'])}")
    return lines + [""]


def model_card(report: Mapping[str, Any], recipe) -> str:
    """Markdown for the output of ``compile``: ``report`` as in its ``report.json``, ``recipe`` as saved."""
    prov = report.get("fxfuse", {})
    method = "OT alignment into the target's basis, then a weighted average" if recipe.method == "ot" \
        else "plain weighted average (no alignment)"
    lines = _front_matter(report, recipe)
    lines += ["# Fused model", "",
              f"Fused by fxfuse {prov.get('version', '?')} from {len(recipe.models)} models: {method}"
              + (f" (cost {recipe.cost}, solver {recipe.solver})." if recipe.method == "ot" else "."), "",
              "## Recipe", "", f"Saved beside the weights as `{RECIPE_FILE}`; "
              f"`fxfuse compile {RECIPE_FILE} -o OUT` reproduces these weights bit for bit (with the versions below, "
              "on the same kind of CPU).", "",
              "```yaml", recipe.to_yaml().rstrip("\n"), "```", ""]
    lines += _parents(report, recipe)
    lines += ["## Versions", "", *_table(["fxfuse", "torch", "transformers"],
                                         [[str(prov.get("version")), str(prov.get("torch")),
                                           str(prov.get("transformers") or "–")]])]
    coverage = report.get("coverage")
    lines += ["## Coverage", "", f"{_figure(coverage, '.1%')} of the target's parameters lie on axes that can "
              "move (the rest is pinned: averaged as it is).", ""]
    lines += (_vocabulary(report) + _correspondence(report) + _sampled(report) + _stages(report) + _checks(report) + _evaluation(report)
              + _barrier(report))
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
