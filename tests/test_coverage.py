"""Honest coverage: parameter elements with every axis free, and the pinned inner spaces."""
from __future__ import annotations

import json

import pytest

import fxfuse
import zoo
from fxfuse.commands.cli import main
from fxfuse.frontend.coverage import full_coverage, natural_pin, pinned_inner

pytestmark = pytest.mark.usefixtures("one_thread")

SCAN_MODEL = """\
import torch
from torch import nn


class ScanNet(nn.Module):
    '''fc1 (8 -> 16) -> relu -> fc2 (16 -> 12) -> cumsum -> fc3 (12 -> 4): the 12 units keep their order.'''

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc3(torch.cumsum(self.fc2(torch.relu(self.fc1(x))), dim=-1))


def make():
    torch.manual_seed(0)
    return ScanNet().eval(), (torch.randn(3, 8),)
"""


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan_net.py"
    path.write_text(SCAN_MODEL)
    namespace: dict = {}
    exec(compile(SCAN_MODEL, str(path), "exec"), namespace)
    model, args = namespace["make"]()
    return path, fxfuse.analyze(model, args)


def test_full_coverage_counts_only_parameters_with_every_axis_free(scan):
    _, a = scan
    # fc1 (16·8 + 16 = 144) moves on every axis but its input (the interface); fc2.weight (192) moves
    # on its input axis only; fc2.bias (12) and fc3.weight (48) lie on the pinned 12 units; fc3.bias (4)
    # has only the output axis (the interface)
    assert a.coverage == pytest.approx((144 + 192) / 400)
    assert full_coverage(a) == pytest.approx((144 + 4) / 400)
    # cumsum pins its input and its output: two spaces of 12 units, largest first
    into, out_of = pinned_inner(a)
    assert (into.size, into.params, into.name) == (12, 192 + 12, "fc2.weight:0")
    assert (out_of.size, out_of.params, out_of.name) == (12, 48, "fc3.weight:1")
    for p in (into, out_of):
        assert p.reason.startswith("order matters along this axis for aten.cumsum.default")


def test_explain_shows_both_in_text_and_json(scan, capsys):
    path, _ = scan
    assert main(["explain", f"{path}:make", "-q"]) == 0
    text = capsys.readouterr().out
    assert "full coverage 37.0% of parameter elements have every axis free" in text
    assert "2 pinned inner spaces" in text
    assert "pinned inner spaces (a symmetry left unused; parameter elements on each) and why:" in text
    assert "fc2.weight:0 (204): order matters along this axis for aten.cumsum.default" in text
    assert "fc3.weight:1 (48): order matters along this axis for aten.cumsum.default" in text
    assert main(["explain", f"{path}:make", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["coverage"] == pytest.approx(0.84) and report["full_coverage"] == pytest.approx(0.37)
    assert [(p["size"], p["params"], p["name"]) for p in report["pinned_inner"]] == [
        (12, 204, "fc2.weight:0"), (12, 48, "fc3.weight:1")]
    assert all("cumsum" in p["reason"] for p in report["pinned_inner"])


@pytest.mark.parametrize("name, natural", [("cnn", {"interface", "kernel taps"}),
                                           ("vit", {"interface", "kernel taps", "spatial positions"}),
                                           ("bert", {"interface", "vocabulary"})])
def test_pins_by_nature_are_not_inner(name, natural):
    model, args = zoo.ZOO[name]()
    a = fxfuse.analyze(model, args)
    assert {natural_pin(s) for s in a.spaces if not s.free and s.size > 1} == natural
    assert pinned_inner(a) == () and full_coverage(a) == 1.0


def test_rope_pins_the_inside_head_axis_of_llama():
    model, args = zoo.llama()
    a = fxfuse.analyze(model, args)
    assert a.coverage == 1.0 > full_coverage(a)
    # rotate_half ties dim i of a head to dim i + d/2; cos and sin, from the unsaved inv_freq, pin them
    assert pinned_inner(a) and all("inv_freq" in p.reason for p in pinned_inner(a))
