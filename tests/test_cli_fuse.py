"""``fxfuse compile`` end to end through ``fxfuse.commands.cli.main``: outputs, refusals, --eval, --calib, --report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import zoo
from fxfuse.commands.cli import main
from fxfuse.models.io import load_model
from fxfuse.frontend.verify import compare_outputs

from clirun import run, snapshot

SPEC = "zoo:mlp"
OUTPUT_FILES = {"fxfuse.json", "model.safetensors", "report.json", "README.md", "fxfuse-recipe.yaml"}


@pytest.fixture
def permuted(tmp_path, capsys) -> Path:
    out = tmp_path / "permuted"
    code, stdout, err = run(capsys, "permute", SPEC, "-o", out, "--seed", "1", "-q")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: 2 spaces permuted")
    return out


@pytest.fixture
def reference():
    return zoo.mlp(seed=0)


def compile_args(permuted: Path, out: Path, *extra) -> list:
    return ["compile", permuted, SPEC, "--target", "1", "-o", out, "-q", *extra]


def test_compile_recovers_the_model(tmp_path, capsys, permuted, reference):
    model, args = reference
    loaded_permuted = load_model(str(permuted))
    assert compare_outputs(model, loaded_permuted.module, args) <= 1e-4
    assert not torch.equal(loaded_permuted.module.net[0].weight, model.net[0].weight)

    out = tmp_path / "out"
    code, stdout, err = run(capsys, *compile_args(permuted, out))
    assert code == 0, err
    assert err == ""  # -q
    assert re.match(rf"wrote {re.escape(str(out))} \(ot, cost weights, solver exact\); "
                    r"self-check error of exact maps: model 0 \d\.\de-\d\d, model 1 0\.0e\+00; "
                    r"\d+\.\ds in all \(\d+\.\ds fusing\)\n$", stdout)
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert json.loads((out / "fxfuse.json").read_text())["factory"] == SPEC
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == [str(permuted), SPEC] and report["target"] == 1

    fused = load_model(str(out)).module
    assert compare_outputs(model, fused, args) <= 1e-4
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    assert compare_outputs(model, fused, (x,)) <= 1e-4  # also off the example inputs


def test_existing_output_is_refused_then_replaced_with_force(tmp_path, capsys, permuted):
    out = tmp_path / "out"
    assert run(capsys, *compile_args(permuted, out))[0] == 0
    before = snapshot(tmp_path)

    code, stdout, err = run(capsys, *compile_args(permuted, out))
    assert code == 2
    assert stdout == ""
    assert err == f"fxfuse: error: {out}: already exists (use --force to replace it)\n"
    assert snapshot(tmp_path) == before  # untouched, and no temporary left behind

    code, _, err = run(capsys, *compile_args(permuted, out, "--force", "--method", "vanilla"))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert json.loads((out / "report.json").read_text())["method"] == "vanilla"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "permuted"]  # no backup left


def test_eval_prints_accuracy_of_every_model(tmp_path, capsys, permuted, reference):
    model, _ = reference
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the models get 100% on; the vanilla average does not
    data = tmp_path / "eval.pt"
    torch.save({"inputs": x, "labels": y}, data)

    code, stdout, err = run(capsys, *compile_args(permuted, tmp_path / "out", "--eval", data))
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == f"accuracy on {data} (200 samples):"
    acc = {}
    for line in lines[1:5]:
        m = re.match(r"^  (.+?)\s+(\d+\.\d)%$", line)
        assert m, line
        acc[m.group(1)] = float(m.group(2))
    assert list(acc) == [f"model 0 ({tmp_path / 'permuted'})", f"model 1 ({SPEC})", "vanilla average",
                         "fused (fxfuse)"]
    assert acc[f"model 0 ({tmp_path / 'permuted'})"] == acc[f"model 1 ({SPEC})"] == 100.0
    assert acc["fused (fxfuse)"] == 100.0
    assert acc["vanilla average"] < 90.0
    assert lines[5].startswith("wrote ")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval"]["samples"] == 200
    assert report["eval"]["accuracy"]["fused (fxfuse)"] == 1.0


def test_calib_of_the_wrong_shape_writes_nothing(tmp_path, capsys, permuted):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 63), calib)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, *compile_args(permuted, out, "--cost", "activations", "--calib", calib))
    assert code == 2
    assert stdout == ""
    assert err == f"fxfuse: error: --calib {calib}: calibration data has shape (32, 63); the models take (N, 64)\n"
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_calib_file_works(tmp_path, capsys, permuted, reference):
    model, args = reference
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 64), calib)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, *compile_args(permuted, out, "--cost", "activations", "--calib", calib))
    assert code == 0, err
    assert "cost activations" in stdout
    assert compare_outputs(model, load_model(str(out)).module, args) <= 1e-4


def test_report_file(tmp_path, capsys, permuted):
    report = tmp_path / "report.json"
    code, _, err = run(capsys, *compile_args(permuted, tmp_path / "out", "--report", report))
    assert code == 0, err
    data = json.loads(report.read_text())
    assert {"spaces", "self_check", "timings"} <= set(data)
    assert data == json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["model"] for c in data["self_check"]] == [0, 1]
    assert data["timings"]["total_s"] > 0
    assert any(s["free"] and s["models"][0]["units_moved"] > 0 for s in data["spaces"])
    # an existing report file is refused before any work, like the output directory
    code, _, err = run(capsys, *compile_args(permuted, tmp_path / "out2", "--report", report))
    assert code == 2 and "already exists" in err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("target", ["7", "-3"])
def test_target_out_of_range(tmp_path, capsys, permuted, target):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compile", permuted, SPEC, "--target", target, "-o", out, "-q")
    assert code == 2
    assert stdout == ""
    if target.startswith("-"):  # no Python index from the end: the first model is 0
        assert err == f"fxfuse: error: --target {target}: must be a model's index, 0 or more, got {target}\n"
    else:
        assert err == f"fxfuse: error: --target {target} is out of range for 2 models\n"
    assert not out.exists()


def test_bad_fusion_weights_and_pins(tmp_path, capsys, permuted):
    out = tmp_path / "out"
    code, _, err = run(capsys, *compile_args(permuted, out, "--weights", "1,x"))
    assert code == 2 and err == "fxfuse: error: --weights 1,x: expected numbers separated by commas\n"
    code, _, err = run(capsys, *compile_args(permuted, out, "--weights", "1,1,1"))
    assert code == 2 and err == "fxfuse: error: 3 fusion weights for 2 models\n"
    code, _, err = run(capsys, *compile_args(permuted, out, "--pin", "nope*"))
    assert code == 2 and err == "fxfuse: error: --pin nope*: matches no parameter axis\n"
    assert not out.exists()


def test_progress_goes_to_stderr(tmp_path, capsys, permuted):
    code, _, err = run(capsys, "compile", permuted, SPEC, "--target", "1", "-o", tmp_path / "out")
    assert code == 0
    assert "weight matching model 0 -> 1" in err and "checking aligned models" in err


def test_compile_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compile", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--cost", "--solver", "--pin", "--calib", "--calib-random", "--reg", "--weights",
                   "--method", "--report", "--eval", "--force", "--target"):
        assert option in out


def test_noise_driven_spaces_are_said_on_screen(tmp_path, capsys):
    """EfficientNet fused back by activations: spaces the signal does not determine are matched by weights, said
    as one warning line on stderr even with -q, and in the report; the model comes back exactly."""
    p = tmp_path / "permuted"
    code, _, err = run(capsys, "permute", "zoo:efficientnet", "-o", p, "--seed", "1", "-q")
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run(capsys, "compile", p, "zoo:efficientnet", "--target", "1", "-o", out, "-q",
                       "--cost", "activations", "--calib-random", "16")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "is not determined by its signal" in line]
    assert len(lines) == 1 and lines[0].startswith("fxfuse: warning: activation assignment of space(s) s"), err
    report = json.loads((out / "report.json").read_text())
    assert any("is not determined by its signal" in n for n in report["notes"])
    model, args = zoo.efficientnet(seed=0)
    assert compare_outputs(model, load_model(str(out)).module, args) <= 1e-4
