"""The space graph of an analysis as a ``networkx`` graph, and its files.

Bipartite: one node per space of size > 1 (``s<ID>``: kind ``space``, its id as ``space``, size,
free, role, reason) and one per parameter holding such a space (``p<I>``: kind
``parameter``, name); an edge per member axis (``axis``, ``path`` inside a
structured space). A connected component is a set of spaces tied by shared
parameters: a block whose permutations are solved against the same weights;
each space node carries its block's index (``block``, 0 the largest).

Written as GraphML (``.graphml``), node-link JSON (``.json``) or graphviz DOT
(``.dot`` / ``.gv``).
"""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from ..core.errors import FxfuseError

GRAPH_SUFFIXES = (".graphml", ".json", ".dot", ".gv")


def space_role(space) -> str:
    """The space's most telling role name (``hidden``, ``heads``, …), or ``""``."""
    nice = [r for r in space.roles if len(r) > 2]
    return nice[0] if nice else ""


def space_graph(analysis) -> nx.MultiGraph:
    """Spaces and parameters of ``analysis`` (a ``fxfuse.frontend.spaces.Analysis``), see the module doc."""
    g = nx.MultiGraph(name="spaces")
    shown = [s for s in analysis.spaces if s.size > 1]
    params = sorted({m.param for s in shown for m in s.members})
    for s in shown:
        g.add_node(f"s{s.id}", kind="space", space=s.id, name=s.name, size=s.size, free=bool(s.free),
                   role=space_role(s), reason=s.reason or "free")
    index = {p: i for i, p in enumerate(params)}
    for p, i in index.items():
        g.add_node(f"p{i}", kind="parameter", name=p)
    for s in shown:
        for m in s.members:
            g.add_edge(f"s{s.id}", f"p{index[m.param]}", axis=int(m.axis), path=str(m.path))
    for b, block in enumerate(space_blocks(g)):
        for sid in block:
            g.nodes[f"s{sid}"]["block"] = b
    return g


def space_blocks(graph: nx.MultiGraph) -> list[list[int]]:
    """Ids of the spaces of each connected component (spaces tied through shared parameters), largest first."""
    blocks = [sorted(graph.nodes[n]["space"] for n in comp if graph.nodes[n]["kind"] == "space")
              for comp in nx.connected_components(graph)]
    return sorted((b for b in blocks if b), key=lambda b: (-len(b), b))


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_dot(graph: nx.MultiGraph) -> str:
    """graphviz DOT: spaces as ellipses (green free, grey pinned), parameters as boxes."""
    out = ["graph spaces {", "  rankdir=LR; node [fontsize=10];"]
    nodes = graph.nodes
    for n, d in nodes(data=True):
        if d["kind"] == "space":
            label = f"s{d['space']} · {d['size']}" + (f"\\n{d['role']}" if d["role"] else "")
            style = 'style=filled fillcolor="#c8f0c8"' if d["free"] else 'style=filled fillcolor="#dddddd"'
            out.append(f"  {n} [shape=ellipse {style} label={_q(label)} tooltip={_q(d['reason'])}];")
    for n, d in nodes(data=True):
        if d["kind"] == "parameter":
            out.append(f"  {n} [shape=box label={_q(d['name'])}];")
    for a, b, d in graph.edges(data=True):
        out.append(f"  {a} -- {b} [label={_q(str(d['axis']) + d['path'])}];")
    out.append("}")
    return "\n".join(out) + "\n"


def graph_text(graph: nx.MultiGraph, path: str | Path) -> str:
    """The file text of ``graph`` in the format named by ``path``'s suffix."""
    check_graph_path(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".graphml":
        return "\n".join(nx.generate_graphml(graph)) + "\n"
    if suffix == ".json":
        try:
            data = nx.node_link_data(graph, edges="links")
        except TypeError:  # networkx before 3.4 names them links already
            data = nx.node_link_data(graph)
        return json.dumps(data, indent=1) + "\n"
    return graph_dot(graph)


def check_graph_path(path: str | Path) -> None:
    """Refuse an unknown graph format before any work."""
    if Path(path).suffix.lower() not in GRAPH_SUFFIXES:
        raise FxfuseError(f"--graph {path}: unknown format (name it {', '.join('*' + s for s in GRAPH_SUFFIXES)})")
