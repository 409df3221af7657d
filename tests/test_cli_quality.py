"""The command line's quality preset: best by default with data, what it chose in the report, card and recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import digits
from clirun import refused, run
from fxfuse.recipes.recipe import BEST_REFINE_STEPS, Recipe, refine_config, settled

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
A, B = EXAMPLES / "digits-vit-a", EXAMPLES / "digits-vit-b"


@pytest.fixture
def files(tmp_path):
    x, y, _, _ = digits.load_split()
    save_file({"inputs": x[:80].contiguous()}, tmp_path / "calib.safetensors")
    save_file({"inputs": x[100:160].contiguous(), "labels": y[100:160].contiguous()}, tmp_path / "data.safetensors")
    return tmp_path / "calib.safetensors", tmp_path / "data.safetensors"


def _weights(out: Path) -> dict:
    return load_file(out / "model.safetensors") if (out / "model.safetensors").exists() else torch.load(
        next(out.glob("*.pt")), weights_only=True)


def test_quality_is_settled_from_the_data_and_the_mode_options():
    assert settled(Recipe(models=("a", "b"))).quality == "fast"
    assert settled(Recipe(models=("a", "b"), calib="c.pt")).quality == "best"
    assert settled(Recipe(models=("a", "b"), refine_data="d.pt")).quality == "best"
    assert settled(Recipe(models=("a", "b"), calib="c.pt", cost="activations")).quality == "fast"
    assert settled(Recipe(models=("a", "b"), calib="c.pt", repair=True)).quality == "fast"
    assert settled(Recipe(models=("a", "b"), calib="c.pt", quality="fast")).quality == "fast"
    assert settled(Recipe(models=("a", "b"), quality="best")).quality == "best"


def test_best_with_labelled_data_refines_by_default(files):
    recipe = settled(Recipe(models=("a", "b"), refine_data=str(files[1])))
    assert refine_config(recipe).steps == BEST_REFINE_STEPS
    assert refine_config(Recipe(models=("a", "b"))) is None


def test_calibration_inputs_alone_give_the_best_fusion_and_say_what_was_kept(tmp_path, capsys, files):
    calib, _ = files
    code, out, err = run(capsys, "compile", A, B, "--calib", calib, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["quality"]
    assert q["preset"] == "best" and q["score"].startswith("KL of the prediction to the parents' mixed prediction "
                                                           "on 16 held-out calibration samples")
    scored = [c for c in q["candidates"] if c["score"] is not None]
    assert [c["name"] for c in q["candidates"]][:3] == ["weights, groups perm", "weights, groups full",
                                                        "activations, groups perm"]
    kept = [c for c in q["candidates"] if c["kept"]]
    assert len(kept) == 1 and kept[0]["name"] == q["chosen"] and kept[0]["score"] == min(c["score"] for c in scored)
    assert f"quality best: kept {q['chosen']} (" in out and f"wrote {tmp_path / 'out'} (quality best: " in out
    for note in report["notes"]:
        if note.startswith("quality best: "):
            assert f"fxfuse: warning: {note}" in err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Stages" in card and f"Chosen by the `best` quality preset: **{q['chosen']}**" in card
    saved = Recipe.load(tmp_path / "out" / "fxfuse-recipe.yaml")
    assert saved.quality is None and settled(saved).quality == "best"  # saved as given: it settles the same way
    # the saved recipe reproduces the weights bit for bit
    code, _, err = run(capsys, "compile", tmp_path / "out" / "fxfuse-recipe.yaml", "-o", tmp_path / "again", "-q")
    assert code == 0, err
    first, again = _weights(tmp_path / "out"), _weights(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_quality_fast_keeps_todays_weights(tmp_path, capsys, files):
    calib, _ = files
    code, _, err = run(capsys, "compile", A, B, "--calib", calib, "--quality", "fast", "-o", tmp_path / "fast", "-q")
    assert code == 0, err
    assert "--calib is ignored with --cost weights" in err
    code, _, err = run(capsys, "compile", A, B, "-o", tmp_path / "plain", "-q")
    assert code == 0, err
    fast, plain = _weights(tmp_path / "fast"), _weights(tmp_path / "plain")
    assert all(torch.equal(fast[k], plain[k]) for k in plain)
    assert "quality" not in json.loads((tmp_path / "plain" / "report.json").read_text())


def test_best_with_labelled_data_scores_refinement_by_held_out_loss(tmp_path, capsys, files):
    calib, data = files
    code, out, err = run(capsys, "compile", A, B, "--calib", calib, "--data", data, "--quality", "best",
                         "--refine", "3", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]
    assert q["score"] == "loss on 12 held-out labelled samples"
    refined = [c for c in q["candidates"] if "refine 3" in c["name"]]
    assert refined and all(c["options"]["refine_steps"] == 3 for c in refined)
    assert any(c["score"] is not None for c in refined)


@pytest.mark.parametrize("extra,line", [
    (("--groups", "full"), "--quality best chooses --cost, --groups and --repair itself (with the ot method): drop "
                           "--groups full, or use --quality fast"),
    ((), "--quality best scores every stage on held-out inputs: give calibration inputs (--calib FILE) or "
         "labelled data (--data FILE); random inputs score nothing"),
    (("--calib-random", "8"), "--quality best scores every stage on held-out inputs: give calibration inputs "
                              "(--calib FILE) or labelled data (--data FILE); random inputs score nothing"),
])
def test_best_refuses_what_it_cannot_do(tmp_path, capsys, extra, line):
    assert refused(capsys, tmp_path, "compile", A, B, "--quality", "best", *extra, "-o", tmp_path / "out") == line


def test_repair_after_refinement_is_warned(tmp_path, capsys, files):
    calib, data = files
    code, _, err = run(capsys, "compile", A, B, "--calib", calib, "--data", data, "--refine", "1", "--repair",
                       "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert err.splitlines()[0] == (
        "fxfuse: warning: --repair runs after --refine and rescales units that the refinement fitted unrepaired: on "
        "the digits ViTs it lowered the refined accuracy (docs/quality.md); --quality best keeps it only where it "
        "helps on held-out data")
    assert "quality" not in json.loads((tmp_path / "out" / "report.json").read_text())


def test_a_calibration_file_that_fits_no_input_is_named_before_the_search(tmp_path, capsys):
    x, y, _, _ = digits.load_split()
    bad = tmp_path / "labels-as-inputs.safetensors"
    save_file({"inputs": y[:40].contiguous()}, bad)
    line = refused(capsys, tmp_path, "compile", A, B, "--calib", bad, "-o", tmp_path / "out", "-q")
    assert line.startswith(f"--calib {bad}: ") and "the models take (N, 1, 8, 8)" in line
    assert not (tmp_path / "out").exists()
