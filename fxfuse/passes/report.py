"""Pass 8, ``report``: what was done, as a JSON-able dict (written as ``report.json`` and in the model card).

    (Options, Inputs, SameDepth, Analysed, Planned, Checked, Fused) ──report──▶ dict
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..frontend.groups import NAMES as GROUP_NAMES
from ..frontend.verify import CHECK_TOL
from .analyse import Analysed
from .average import Fused
from .check import Checked
from .inputs import Inputs, Options
from .planning import Planned
from .relayer import SameDepth


def report(options: Options, inputs: Inputs, same_depth: SameDepth, analysed: Analysed, planned: Planned,
           checked: Checked, fused: Fused, timings: Mapping[str, float], refined: dict | None = None) -> dict:
    """The fusion report: options, coverage, one entry per space of size > 1 (its group and each model's map),
    the self-check, width and depth maps, notes, unruled ops and rules that fit no node, timings."""
    ref, alignments = analysed.ref, planned.alignments
    spaces, widths = _spaces(analysed, alignments, options)
    out = {
        "width_maps": widths,
        "method": options.method, "cost": options.cost, "solver": options.solver, "reg": options.reg,
        "target": options.target, "weights": list(options.weights), "coverage": ref.coverage,
        "passes": {i: al.passes for i, al in enumerate(alignments) if al is not None},
        "solve_seconds": {i: {f"s{root}": dict(t) for root, t in al.seconds.items()}
                          for i, al in enumerate(alignments) if al is not None},
        "notes": list(ref.notes) + sorted({n for al in alignments if al is not None for n in al.notes}),
        "self_check": list(checked.entries), "spaces": spaces, "timings": dict(timings),
        "unruled_ops": [{"op": u.op, "node": u.node, "module": u.module} for u in ref.unruled],
        "unfit_rules": [{"rule": u.rule, "ops": list(u.ops), "nodes": u.nodes} for u in ref.unfit_rules],
        "depth_cost": options.depth_cost,
    }
    out["notes"] += list(inputs.notes)
    if refined is not None:
        out["refine"] = refined
    if fused.repair is not None:
        out["repair"] = fused.repair
        out["notes"] += fused.repair["notes"]
    out["groups"] = options.groups
    out["canonicalize"] = [dict(c.report(), model=i) for i, c in enumerate(analysed.canonical)]
    out["depth_maps"] = [e for i, p in enumerate(same_depth.plans) if p is not None for e in p.as_dict(i)]
    out["notes"] += _depth_notes(same_depth)
    if options.vocab is not None:
        out["vocab"] = options.vocab.match.report()
        out["notes"] += list(options.vocab.notes)
    return out


def _spaces(analysed: Analysed, alignments, options: Options) -> tuple[list[dict], list[dict]]:
    """One entry per space of size > 1 in some model, and the spaces whose sizes differ (width maps)."""
    ref, fixed, levels = analysed.ref, analysed.fixed, analysed.levels
    spaces, widths = [], []
    for s in ref.spaces:
        sizes = [a.spaces[s.id].size for a in analysed.analyses]
        if max(sizes) <= 1:
            continue
        entry = {"id": s.id, "name": s.name, "size": s.size, "free": s.free and s.id not in fixed,
                 "reason": fixed.get(s.id) or s.reason, "parent": s.parent, "roles": list(s.roles),
                 "members": len(s.members), "models": []}
        for i, al in enumerate(alignments):
            if al is not None and s.id in al.maps:
                entry["models"].append(_map_entry(al.maps[s.id], i, sizes[i], options.solver))
        if len(set(sizes)) > 1:
            entry["sizes"] = sizes
            widths.append({"space": s.id, "name": s.name, "sizes": sizes, "target_size": s.size,
                           "maps": sorted({m["map"] for m in entry["models"]})})
        level = levels.get(s.id, 0)
        entry["group"] = GROUP_NAMES[level]
        limiting = [a.group(s.id).limited_by for a in analysed.analyses if a.group(s.id).level == level]
        entry["group_limited_by"] = (limiting[0] if analysed.canonical and limiting
                                     else "permutations only (groups=perm)")
        spaces.append(entry)
    return spaces, widths


def _map_entry(m, model: int, size: int, solver: str) -> dict:
    moved = None
    if m.perm is not None:  # units whose position changed (in any head, for a nested space)
        changed = m.perm != torch.arange(m.perm.shape[-1])
        moved = int(changed.reshape(-1, changed.shape[-1]).any(0).sum())
    return {"model": model, "hard": m.hard, "map": m.kind, "units_moved": moved,
            "solver": m.solver or ("assignment" if m.hard else solver), "size": size,
            "similarity_identity": m.similarity_identity, "similarity_aligned": m.similarity_aligned}


def _depth_notes(same_depth: SameDepth) -> list[str]:
    notes = []
    for i, p in enumerate(same_depth.plans):
        for d in p.maps if p is not None else ():
            if d.dropped:
                notes.append(f"model {i}: blocks {', '.join(f'{d.path}.{k}' for k in d.dropped)} have no "
                             "counterpart in the target and are left out of its aligned copy")
            if p.drift > CHECK_TOL and None in d.source_of:
                notes.append(f"model {i}: its identity blocks in {d.path} are not exact (output change "
                             f"{p.drift:.1e}; a norm after the residual add, as in post-norm blocks)")
    return notes
