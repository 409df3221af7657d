"""The space graph with networkx: ``explain --graph`` as GraphML, node-link JSON and DOT; blocks."""
from __future__ import annotations

import json
from types import SimpleNamespace

import networkx as nx
import pytest

from fxfuse.frontend.graph import space_blocks, space_graph
from fxfuse.models.io import load_model
from fxfuse.frontend.render import render_dot
from fxfuse.frontend.spaces import analyze

from clirun import refused, run

SPEC = "zoo:mlp"


def _space(sid, size, members, free=True):
    return SimpleNamespace(id=sid, name=f"n{sid}", size=size, free=free, roles={}, reason=None if free else "pinned",
                           members=[SimpleNamespace(param=p, axis=a, path="") for p, a in members])


def test_blocks_are_the_spaces_tied_by_shared_parameters():
    analysis = SimpleNamespace(spaces=[
        _space(0, 4, [("a.weight", 0), ("b.weight", 1)]),
        _space(1, 4, [("b.weight", 0), ("c.weight", 1)]),
        _space(2, 3, [("d.weight", 0)]),
        _space(3, 1, [("c.weight", 0)]),  # size 1: not shown
        _space(4, 5, [("e.weight", 0), ("e.bias", 0)], free=False),
        _space(5, 2, [("e.weight", 1)]),
    ])
    g = space_graph(analysis)
    assert space_blocks(g) == [[0, 1], [4, 5], [2]]
    assert {n: d["block"] for n, d in g.nodes(data=True) if d["kind"] == "space"} == {
        "s0": 0, "s1": 0, "s4": 1, "s5": 1, "s2": 2}
    assert g.number_of_edges() == 8 and "s3" not in g


@pytest.mark.parametrize("suffix", [".graphml", ".json", ".dot"])
def test_explain_writes_the_space_graph(tmp_path, capsys, suffix):
    path = tmp_path / f"spaces{suffix}"
    code, _, err = run(capsys, "explain", SPEC, "--graph", path, "-q")
    assert code == 0, err
    loaded = load_model(SPEC)
    analysis = analyze(loaded.module, loaded.args)
    shown = [s for s in analysis.spaces if s.size > 1]
    text = path.read_text()
    if suffix == ".dot":
        assert text == render_dot(analysis)
        return
    g = nx.read_graphml(path) if suffix == ".graphml" else nx.node_link_graph(json.loads(text), edges="links")
    spaces = {n: d for n, d in g.nodes(data=True) if d["kind"] == "space"}
    assert sorted(int(d["space"]) for d in spaces.values()) == [s.id for s in shown]
    assert {d["name"] for n, d in g.nodes(data=True) if d["kind"] == "parameter"} == {
        m.param for s in shown for m in s.members}
    assert g.number_of_edges() == sum(len(s.members) for s in shown)
    for s in shown:
        assert bool(spaces[f"s{s.id}"]["free"]) == s.free and int(spaces[f"s{s.id}"]["size"]) == s.size


def test_unknown_graph_format_is_refused_before_the_work(tmp_path, capsys):
    line = refused(capsys, tmp_path, "explain", SPEC, "--graph", tmp_path / "g.png", "-q")
    assert line == f"--graph {tmp_path / 'g.png'}: unknown format (name it *.graphml, *.json, *.dot, *.gv)"
