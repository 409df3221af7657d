"""Recipes: the schema, YAML round trip, validation, command-line overrides, the Python API,
the model card and reproducing an output from its saved recipe."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import fxfuse
from fxfuse.recipes import recipe as recipe_mod
from fxfuse.recipes.card import model_card
from fxfuse.commands.cli import build_parser, compile_recipe
from fxfuse.models.io import load_model
from fxfuse.recipes.recipe import OPTIONS, RECIPE_FILE, Recipe, RecipeError

from clirun import refused, run

SPEC = "zoo:mlp"
FLAGS = ["--target", "1", "--weights", "0.25,0.75", "--cost", "activations", "--calib-random", "32", "--seed", "3"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def permuted(tmp_path, capsys) -> Path:
    out = tmp_path / "permuted"
    assert run(capsys, "permute", SPEC, "-o", out, "--seed", "1", "-q")[0] == 0
    return out


def parse(*argv) -> argparse.Namespace:
    return build_parser().parse_args(["compile", *map(str, argv)])


# ---------------------------------------------------------------- the schema and the object


def test_every_option_is_declared_once_and_every_flag_comes_from_the_schema():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    assert set(recipe_mod.BY_NAME) == set(names)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    compile_parser = sub.choices["compile"]
    flags = [s for a in compile_parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))
    for o in OPTIONS:
        if o.cli_flag:
            action = next(a for a in compile_parser._actions if o.cli_flag in a.option_strings)
            assert (action.dest, action.help) == (o.name, o.help)
            assert list(action.choices or ()) == list(o.choices)
    # a recipe field for every option, with the schema's default
    assert [f for f in Recipe.__dataclass_fields__] == names
    assert Recipe().to_dict() == {o.name: list(o.default) if isinstance(o.default, tuple) else o.default
                                  for o in OPTIONS}


def test_recipe_is_frozen_and_validated():
    r = Recipe(models=["a", "b"], weights=[1, 3], pin="s0")
    assert r.models == ("a", "b") and r.weights == (1.0, 3.0) and r.pin == ("s0",)
    with pytest.raises(Exception, match="cannot assign"):
        r.solver = "sinkhorn"
    with pytest.raises(RecipeError, match=r"^Recipe: key 'solver': 'foo' is not one of exact, sinkhorn$"):
        Recipe(solver="foo")
    with pytest.raises(RecipeError, match=r"^Recipe: key 'reg': must be a positive number, got -1.0$"):
        Recipe(reg=-1)


def test_yaml_round_trip(tmp_path):
    r = Recipe(models=("a", "pkg.mod:f@w.safetensors"), target=1, cost="activations", calib_random=64,
               solver="sinkhorn", reg=0.1, weights=(0.5, 1.5), pin=("s1", "net.0.*:0"), heads="flat",
               depth_cost="ot", seed=7, rules=("extra.yaml",), strict=True, max_passes=9)
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    back = Recipe.load(path)
    assert back == r
    assert back.to_yaml() == r.to_yaml()
    assert yaml.safe_load(path.read_text()) == r.to_dict()


@pytest.mark.parametrize("text,message", [
    ("models: [a, b]\nsolver: foo\n", "key 'solver': 'foo' is not one of exact, sinkhorn"),
    ("models: [a, b]\ncost: data\n", "key 'cost': 'data' is not one of weights, activations"),
    ("models: [a, b]\nsolvr: exact\n", "unknown key 'solvr' (known: models, target, cost, calib"),
    ("models: [a, b]\ntarget: first\n", "key 'target': expected an integer, got 'first'"),
    ("models: [a, b]\nweights: [1, x]\n", "key 'weights': expected a list of numbers, got [1, 'x']"),
    ("models: [a, b]\nstrict: 1\n", "key 'strict': expected true or false, got 1"),
    ("models: [a, b]\nreg: 0\n", "key 'reg': must be a positive number, got 0.0"),
    ("models: [a, b]\ncalib: x.pt\ncalib_random: 8\n", "key 'calib': excludes 'calib_random'"),
    ("models: [a, b\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping of options, got list"),
    ("models: [a]\n", "key 'models': need at least two model specs, got 1"),
])
def test_bad_recipes_name_the_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = refused(capsys, tmp_path, "compile", path, "-o", tmp_path / "out")
    assert line.startswith(f"{path}: ") and message in line


def test_a_missing_recipe_file_is_named(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert refused(capsys, tmp_path, "compile", path, "-o", tmp_path / "out") == (
        f"{path}: cannot read: No such file or directory")


def test_flags_override_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(Recipe(models=("a", "b"), solver="sinkhorn", reg=0.2, calib="c.pt", pin=("s0",)).to_yaml())
    r = compile_recipe(parse(path, "-o", "out", "--solver", "exact", "--calib-random", "16", "--pin", "s2"))
    assert (r.solver, r.reg, r.calib, r.calib_random, r.pin, r.models) == ("exact", 0.2, None, 16, ("s2",),
                                                                           ("a", "b"))
    assert compile_recipe(parse(path, "-o", "out")) == Recipe.load(path)  # nothing given: the recipe as it is
    assert compile_recipe(parse("a", "b", "-o", "out")) == Recipe(models=("a", "b"))
    with pytest.raises(RecipeError, match=r"a recipe file must be the only MODEL argument"):
        compile_recipe(parse(path, "b", "-o", "out"))
    with pytest.raises(RecipeError, match=r"^--weights 1,x: expected numbers separated by commas$"):
        compile_recipe(parse("a", "b", "-o", "out", "--weights", "1,x"))


# ---------------------------------------------------------------- outputs, cards, reproduction


def test_saved_recipe_reproduces_the_output_bit_for_bit(tmp_path, capsys, monkeypatch):
    (tmp_path / "models.py").write_text("import zoo\n\n\ndef other():\n    return zoo.mlp(seed=1)\n")
    monkeypatch.chdir(tmp_path)  # a model given by a relative path
    out = tmp_path / "out"
    code, _, err = run(capsys, "compile", "models.py:other", SPEC, "-o", out, "-q", *FLAGS)
    assert code == 0, err
    saved = Recipe.load(out / RECIPE_FILE)
    assert saved == Recipe(models=(f"{tmp_path / 'models.py'}:other", SPEC), target=1, weights=(0.25, 0.75),
                           cost="activations", calib_random=32, seed=3)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the saved recipe resolves from any directory
    code, _, err = run(capsys, "compile", out / RECIPE_FILE, "-o", "again", "-q")
    assert code == 0, err
    assert sha256(elsewhere / "again" / "model.safetensors") == sha256(out / "model.safetensors")
    assert (elsewhere / "again" / RECIPE_FILE).read_text() == (out / RECIPE_FILE).read_text()

    # a flag given with the recipe changes the result, and the saved recipe says so
    code, _, err = run(capsys, "compile", out / RECIPE_FILE, "-o", "other", "-q", "--seed", "4")
    assert code == 0, err
    assert sha256(elsewhere / "other" / "model.safetensors") != sha256(out / "model.safetensors")
    assert Recipe.load(elsewhere / "other" / RECIPE_FILE) == saved.override({"seed": 4})


def test_python_api_takes_a_recipe(tmp_path, capsys, permuted):
    out = tmp_path / "out"
    assert run(capsys, "compile", permuted, SPEC, "-o", out, "-q", *FLAGS)[0] == 0
    saved = Recipe.load(out / RECIPE_FILE)
    from_specs = fxfuse.compile(saved)  # models loaded from their specs
    expected = load_model(str(out)).module.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_specs.module.state_dict().items())

    models = [load_model(s).module for s in saved.models]
    args = load_model(SPEC).args
    by_recipe = fxfuse.compile(models, args, recipe=saved)
    by_keywords = fxfuse.compile(models, args, target=1, weights=[0.25, 0.75], cost="activations", calib=32, seed=3)
    for k, v in by_keywords.module.state_dict().items():
        assert torch.equal(v, by_recipe.module.state_dict()[k]) and torch.equal(v, expected[k])
    with pytest.raises(RecipeError, match=r"option 'seed' is given both in the recipe and as a keyword"):
        fxfuse.compile(models, args, recipe=saved, seed=4)


def test_model_card_of_an_output(tmp_path, capsys, permuted):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    model = load_model(SPEC).module
    with torch.no_grad():
        y = model(x).argmax(-1)
    data = tmp_path / "eval.pt"
    torch.save({"inputs": x, "labels": y}, data)
    out = tmp_path / "out"
    assert run(capsys, "compile", permuted, SPEC, "-o", out, "-q", "--target", "1", "--eval", data)[0] == 0
    card = (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert card == model_card(report, Recipe.load(out / RECIPE_FILE))

    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert {"fxfuse", "merge"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory and a factory are no hub ids
    block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert Recipe.from_dict(yaml.safe_load(block)) == Recipe.load(out / RECIPE_FILE)
    assert f"| {report['fxfuse']['version']} | {torch.__version__} |" in card
    assert f"{report['coverage']:.1%} of the target's parameters" in card
    error = report["self_check"][0]["error"]
    assert f"| 0 | exact | {error:.1e} | – | – |" in card
    assert f"| 1 | `{SPEC}` | 0.500 | target (basis and class) |" in card
    assert f"Accuracy on `{data}` (64 samples):" in card
    assert "| fused (fxfuse) | 100.0% |" in card
    assert "## Loss barrier" not in card  # compile computes none


def test_model_card_shows_a_barrier_and_notes_when_the_report_has_them():
    r = Recipe(models=("a", "b"))
    report = {"weights": [0.5, 0.5], "target": 0, "coverage": 0.5, "notes": ["a note"],
              "fxfuse": {"version": "0", "torch": "t", "transformers": None},
              "self_check": [{"model": 0, "hard": True, "error": 0.0},
                             {"model": 1, "hard": False, "drift": 0.02}],
              "barrier": {"vanilla": 1.25, "aligned": 0.125}}
    card = model_card(report, r)
    assert "| vanilla | 1.2500 |" in card and "| fxfuse | 0.1250 |" in card
    assert "| 1 | soft, width or depth | – | 2.0e-02 | – |" in card
    assert "- a note" in card and "| 0 | t | – |" in card


def test_outputs_are_written_together(tmp_path, capsys, permuted):
    """A run that fails after loading writes no card, recipe or model."""
    line = refused(capsys, tmp_path, "compile", permuted, SPEC, "-o", tmp_path / "out", "-q", "--pin", "nope*")
    assert line == "--pin nope*: matches no parameter axis"
    assert not os.path.exists(tmp_path / "out")


def test_the_documented_recipe_is_the_example_file_and_valid():
    root = Path(__file__).resolve().parents[1]
    example = (root / "examples" / "digits-recipe.yaml").read_text()
    readme = (root / "docs" / "commands.md").read_text()
    assert f"```yaml\n{example}```" in readme
    r = Recipe.load(root / "examples" / "digits-recipe.yaml")
    assert r.models == ("examples/digits-mlp-a", "examples/digits-mlp-b") and r.calib_random == 256
    assert all((root / m).is_dir() for m in r.models)
