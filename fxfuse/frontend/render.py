"""Human-readable views of an ``Analysis``: a text summary and a graphviz DOT graph."""
from __future__ import annotations

import re
from collections import Counter

from .coverage import full_coverage, pinned_inner
from .graph import graph_dot, space_graph, space_role
from .spaces import Analysis, Space

PINNED_SHOWN = 20


def _members(space: Space, limit: int = 3) -> str:
    names = [f"{m.param}[{m.axis}]" for m in space.members[:limit]]
    more = len(space.members) - limit
    return ", ".join(names) + (f", +{more} more" if more > 0 else "")


def _part(space: Space) -> tuple[str, str, int, int] | None:
    """``(axis, separator, index, count)`` of a space that is one part of a split parameter axis (its last
    split): ``×`` a factor of a product axis (a flatten or reshape), ``|`` a piece of a concatenated one."""
    m = space.members[0] if space.members else None
    found = re.findall(r"([×|])(\d+)/(\d+)", m.path) if m else []
    if not found:
        return None
    sep, i, n = found[-1]
    axis = f"{m.param} axis {m.axis}" + (" (a part of it)" if len(found) > 1 else "")
    return axis, sep, int(i), int(n)


def _split_axes(spaces) -> list[str]:
    """A line for each parameter axis split into several of ``spaces`` (all its parts among them): why they
    look alike and are apart."""
    parts: dict[tuple[str, str, int], list[tuple[int, Space]]] = {}
    for s in spaces:
        part = _part(s)
        if part is not None:
            parts.setdefault((part[0], part[1], part[3]), []).append((part[2], s))
    lines = []
    for (axis, sep, n), found in parts.items():
        if len(found) != n or n < 2:
            continue
        found.sort(key=lambda t: t[0])
        ids = ", ".join(f"s{s.id}" for _, s in found)
        sizes = [s.size for _, s in found]
        if sep == "×":
            total = 1
            for size in sizes:
                total *= size
            lines.append(f"{ids} are the {n} factors of {axis} ({total} = {' × '.join(map(str, sizes))}): the "
                         f"graph flattens (or reshapes) {n} axes into that one, and each is a space of its own")
        else:
            lines.append(f"{ids} are the {n} pieces of {axis} ({' + '.join(map(str, sizes))}): the graph "
                         "concatenates them, and each is a space of its own")
    return lines


def render_text(analysis: Analysis, spec: str, show_all: bool = False) -> str:
    model = analysis.traced.module
    n_params = sum(p.numel() for p in model.parameters())
    free = [s for s in analysis.spaces if s.free]
    pinned = [s for s in analysis.spaces if not s.free and s.size > 1]
    inner = pinned_inner(analysis)
    lines = [
        f"{type(model).__name__} ({spec}): {n_params:,} parameters",
        f"coverage {analysis.coverage:.1%} of parameter elements can move; "
        f"{len(free)} free spaces, {len(pinned)} pinned; {len(analysis.unruled)} ops without rules",
        f"full coverage {full_coverage(analysis):.1%} of parameter elements have every axis free (the interface, "
        f"kernel taps, spatial positions and vocabularies aside); {len(inner)} pinned inner spaces",
        "",
        "free spaces (move together under one permutation):",
        f"  {'id':>4} {'size':>6}  {'role':<8} {'part':<6} {'axes':>4}  members",
    ]
    for s in free:
        part = s.structure.split("/")[0] if s.structure else ""
        lines.append(f"  {s.id:>4} {s.size:>6}  {space_role(s):<8} {part:<6} {len(s.members):>4}  {_members(s)}")
    grouped = [s for s in free if s.size > 1]
    if grouped:
        lines += ["", "groups (the maps each free space may move by, and the op or fact that limits it):"]
        for s in grouped:
            g = analysis.group(s.id)
            lines.append(f"  {s.id:>4} {g.name:<16} {g.limited_by}")
    lines += _listing("pinned spaces (identity permutation) and why:", show_all,
                      [f"  {s.id:>4} {s.size:>6}  {s.name}{_part_text(s)}: {s.reason}" for s in pinned])
    split = _split_axes(pinned if show_all else pinned[:PINNED_SHOWN])
    if split:
        lines += ["", "split axes (why pinned spaces above look alike):"] + [f"  {n}" for n in split]
    lines += _listing("pinned inner spaces (a symmetry left unused; parameter elements on each) and why:", show_all,
                      [f"  {p.id:>4} {p.size:>6}  {p.name} ({p.params:,}): {p.reason}" for p in inner])
    if analysis.notes:
        lines += ["", "notes:"] + [f"  {note}" for note in analysis.notes]
    if analysis.unruled:
        lines += ["", "ops without rules (their axes are pinned; add a rule with --rules FILE):"]
        counts = Counter((u.op, u.reason) for u in analysis.unruled)
        firsts = {}
        for u in analysis.unruled:
            firsts.setdefault((u.op, u.reason), u)
        for (op, reason), n in counts.items():
            u = firsts[(op, reason)]
            where = f"{u.node}" + (f" in {u.module}" if u.module else "")
            lines.append(f"  {op} ×{n} (first at {where}): {reason}")
    if analysis.unfit_rules:
        lines += ["", "rules that fit no node of this model (their ops are pinned; fix the rule or add one):"]
        for u in analysis.unfit_rules:
            lines.append(f"  {u.rule} for {', '.join(u.ops)} ×{u.nodes}: {u.reason}")
    return "\n".join(lines) + "\n"


def _part_text(space: Space) -> str:
    part = _part(space)
    if part is None:
        return ""
    return f" ({'factor' if part[1] == '×' else 'piece'} {part[2] + 1} of {part[3]})"


def _listing(title: str, show_all: bool, rows: list[str]) -> list[str]:
    """A titled section of ``rows`` (the first ``PINNED_SHOWN`` unless ``show_all``); none if no rows."""
    if not rows:
        return []
    shown = rows if show_all else rows[:PINNED_SHOWN]
    more = [f"  … {len(rows) - len(shown)} more (use --all)"] if len(shown) < len(rows) else []
    return ["", title] + shown + more


def render_dot(analysis: Analysis) -> str:
    """Bipartite graph: spaces (ellipses; green free, grey pinned) and parameters (boxes)."""
    return graph_dot(space_graph(analysis))


def render_depth_maps(entries: list[dict], width_maps: list[dict] | None = None) -> str:
    """The depth maps of a compile report (``report["depth_maps"]``) as text, one table per block list, then
    the width maps; models of the target's depth (or widths) get a line saying so."""
    lines = [] if entries else ["depth: every model has the target's depth, so each depth map is the identity"]
    for e in entries:
        what = "1 - linear CKA" if e["cost"] == "cka" else "OT cost"
        lines.append(f"depth map, model {e['model']} -> target: {e['path']} ({e['source_blocks']} -> "
                     f"{e['target_blocks']} blocks, cost {what})")
        rows = [(f"{e['path']}.{t}", "identity" if s is None else f"{e['path']}.{s}", "-" if c is None else f"{c:.3f}")
                for t, (s, c) in enumerate(zip(e["source_of"], e["matched_costs"]))]
        w = max(len("target block"), *(len(r[0]) for r in rows), *(len(r[1]) for r in rows))
        lines.append(f"  {'target block':<{w}}  {'source block':<{w}}  cost")
        lines += [f"  {t:<{w}}  {s:<{w}}  {c}" for t, s, c in rows]
        if e["dropped"]:
            left = ", ".join(f"{e['path']}.{k}" for k in e["dropped"])
            lines.append(f"  left out: {left}")
        lines.append(f"  output change of the relayered model {e['model']}: {e['drift']:.1e}")
    for w in width_maps or ():
        sizes = " / ".join(str(n) for n in w["sizes"])
        kinds = ", ".join(w.get("maps", ()))
        lines.append(f"width: s{w['space']} ({w['name']}) sizes {sizes} -> {w['target_size']}"
                     + (f" by {kinds}" if kinds else ""))
    if not width_maps:
        lines.append("width: every model has the target's widths")
    return "\n".join(lines) + "\n"
