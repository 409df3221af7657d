"""Bad input on the command line: one line on stderr, exit 2, nothing written, checked before the work.

And runs that are legitimate but not what they may seem: a warning on stderr.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clirun import refused, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP_A, MLP_B = str(EXAMPLES / "digits-mlp-a"), str(EXAMPLES / "digits-mlp-b")
DIGITS = EXAMPLES / "digits-test.safetensors"
SPEC = "zoo:mlp"  # 64 -> 48 -> 32 -> 10


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, one_thread) -> Path:
    """Tiny Hugging Face checkpoints: a BERT classifier (3 classes, 97 tokens, 64 positions) and a GPT-2."""
    import zoo

    root = tmp_path_factory.mktemp("hf")
    zoo.bert()[0].save_pretrained(root / "bert")
    gpt2 = zoo.gpt2()[0]
    gpt2.config.use_cache = True  # as GPT-2 checkpoints are shipped
    gpt2.save_pretrained(root / "gpt2")
    return root


def _edited_copy(src: Path, dst: Path, drop=(), reshape=None, config=None) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for name in drop:
        del state[name]
    for name, shape in (reshape or {}).items():
        state[name] = torch.zeros(shape)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fresh_env() -> dict[str, str]:
    """The environment of a new shell (an in-process -q run set transformers' quiet variables here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    return dict(env, OMP_NUM_THREADS="1")


# ---------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("missing", ["classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"])
def test_hf_checkpoint_missing_a_tensor_is_refused(tmp_path, capsys, hf_dirs, missing):
    bad = _edited_copy(hf_dirs / "bert", tmp_path / "bad", drop=[missing])
    line = refused(capsys, tmp_path, "compile", bad, hf_dirs / "bert", "-o", tmp_path / "out", "-q")
    assert line == (f"{bad}: the checkpoint lacks {missing} (BertForSequenceClassification would fill them with "
                    "random values)")
    if missing == "classifier.weight":  # a fresh process without -q: progress, not transformers' load report
        proc = subprocess.run([sys.executable, "-m", "fxfuse.commands.cli", "explain", str(bad)], capture_output=True,
                              text=True, timeout=120, env=_fresh_env())
        assert proc.returncode == 2 and "LOAD REPORT" not in proc.stderr
        assert proc.stderr.endswith(f"fxfuse: error: {line}\n")


def test_hf_tensor_of_another_shape_than_the_config_is_refused(tmp_path, capsys, hf_dirs):
    bad = _edited_copy(hf_dirs / "bert", tmp_path / "bad", reshape={"classifier.weight": (4, 32)})
    line = refused(capsys, tmp_path, "compile", bad, hf_dirs / "bert", "-o", tmp_path / "out", "-q")
    assert line == (f"{bad}: tensors of the checkpoint do not have the shapes of its config.json: "
                    "classifier.weight (4, 32) (the config gives (3, 32))")


def test_hf_config_without_architectures_is_refused_rather_than_dropping_the_head(tmp_path, capsys, hf_dirs):
    bad = _edited_copy(hf_dirs / "bert", tmp_path / "bad", config=lambda c: c.pop("architectures"))
    line = refused(capsys, tmp_path, "permute", bad, "-o", tmp_path / "out", "-q")
    assert line == (f"{bad}: the checkpoint's tensors classifier.bias, classifier.weight would be lost (config.json "
                    "names no 'architectures', so the bare base model was built; add the class with the model's head)")


def test_compile_prints_unruled_ops_and_that_nothing_moved(tmp_path, capsys):
    spec = f"{EXAMPLES / 'custom_op' / 'model.py'}:build"
    code, _, err = run(capsys, "compile", spec, spec, "-o", tmp_path / "out", "-q")
    assert code == 0
    lines = err.splitlines()
    assert lines[0].startswith("fxfuse: warning: 1 op(s) without a usable rule, their axes pinned: "
                               "fxfuse_demo.scaled_gelu.default at ")
    assert lines[1:] == ["fxfuse: warning: no free space: nothing can move (coverage 0%)",
                         "fxfuse: warning: no space moved: every map is the identity, so the fused model is the "
                         "plain average"]


def test_permute_says_when_nothing_can_move(tmp_path, capsys):
    spec = f"{EXAMPLES / 'custom_op' / 'model.py'}:build"
    code, out, err = run(capsys, "permute", spec, "-o", tmp_path / "out", "-q")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'out'}: 0 spaces permuted")
    lines = err.splitlines()
    assert lines[0].startswith("fxfuse: warning: 1 op(s) without a usable rule, their axes pinned: ")
    assert lines[1:] == ["fxfuse: warning: no free space: nothing can move (coverage 0%)",
                         f"fxfuse: warning: {spec}: no free space of size > 1, nothing to permute: the output is a "
                         "copy"]


def test_compile_prints_spaces_without_activation_signal(tmp_path, capsys):
    calib = tmp_path / "zeros.pt"
    torch.save(torch.zeros(32, 64), calib)  # every hidden unit is its bias: constant
    code, _, err = run(capsys, "compile", SPEC, SPEC, "-o", tmp_path / "out", "-q", "--cost", "activations",
                       "--calib", calib)
    assert code == 0
    assert err.splitlines() == [
        "fxfuse: warning: no activation signal for space(s) s0, s2 (constant on the calibration data, or read at no "
        "node): matched by weights",
        "fxfuse: warning: no space moved: every map is the identity, so the fused model is the plain average"]


def test_report_notes_are_printed_once(tmp_path, capsys):
    code, _, err = run(capsys, "compile", SPEC, SPEC, SPEC, "-o", tmp_path / "out", "-q", "--cost", "activations",
                       "--calib-random", "20")
    assert code == 0
    note = "calibration used 16 of 20 inputs (whole batches of 16); give a multiple of 16 to use them all"
    assert err.splitlines().count(f"fxfuse: warning: {note}") == 1
    assert note in json.loads((tmp_path / "out" / "report.json").read_text())["notes"]


@pytest.mark.parametrize("flag,value", [("--calib-random", "1"), ("--calib", "one.pt")])
def test_too_few_calibration_inputs_are_refused(tmp_path, capsys, flag, value):
    torch.save(torch.randn(1, 64), tmp_path / "one.pt")
    if flag == "--calib":
        value = str(tmp_path / value)
    line = refused(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "out", "--cost", "activations",
                   flag, value)
    assert line == (f"{value if flag == '--calib' else '--calib-random 1'}: 1 calibration input is too few for a "
                    "correlation (at least 2 are needed; a few hundred give a useful one)")


def _digits_with(tmp_path: Path, inputs=None, labels=None) -> Path:
    data = load_file(DIGITS)
    x, y = data["inputs"], data["labels"]
    path = tmp_path / "data.safetensors"
    save_file({"inputs": x if inputs is None else inputs(x), "labels": y if labels is None else labels(y)}, path)
    return path


@pytest.mark.parametrize("shift,shown", [(10, "10..19"), (-1, "-1..8")])
def test_eval_labels_outside_the_classes_are_refused_before_the_work(tmp_path, capsys, shift, shown):
    data = _digits_with(tmp_path, labels=lambda y: y + shift)
    line = refused(capsys, tmp_path, "compile", MLP_A, MLP_B, "-o", tmp_path / "out", "--eval", data, "-q")
    assert line == (f"--eval {data}: model 0 ({MLP_A}): labels range over {shown} but the model has 10 classes "
                    "(0..9; -100 is ignored)")


# ---------------------------------------------------------------- no traceback


def test_eval_inputs_the_model_cannot_take_are_refused(tmp_path, capsys):
    data = _digits_with(tmp_path, inputs=lambda x: x[..., :7].contiguous())  # 7x8 images
    line = refused(capsys, tmp_path, "compile", MLP_A, MLP_B, "-o", tmp_path / "out", "--eval", data, "-q")
    assert line.startswith(f"--eval {data}: model 0 ({MLP_A}) cannot run on the inputs: RuntimeError: mat1 and "
                           "mat2 shapes cannot be multiplied (2x56 and 64x128)")


@pytest.mark.parametrize("case", ["label too large", "negative label"])
def test_barrier_labels_out_of_range(tmp_path, capsys, case):
    data = _digits_with(tmp_path, labels=lambda y: y + 1 if case == "label too large" else y - 1)
    line = refused(capsys, tmp_path, "barrier", MLP_A, MLP_B, "--data", data, "-q")
    shown = "1..10" if case == "label too large" else "-1..8"
    assert line == f"the labels for model A: labels range over {shown} but the model has 10 classes (0..9; -100 is ignored)"


@pytest.mark.parametrize("case", ["token id", "length"])
def test_barrier_token_ids_beyond_the_vocabulary_or_positions(tmp_path, capsys, hf_dirs, case):
    seq = 80 if case == "length" else 12
    ids = torch.randint(0, 97, (4, seq))
    if case == "token id":
        ids[2, 5] = 500
    data = tmp_path / "data.pt"
    torch.save({"inputs": ids, "labels": ids.clamp(max=96)}, data)
    gpt2 = hf_dirs / "gpt2"
    line = refused(capsys, tmp_path, "barrier", gpt2, gpt2, "--data", data, "-q")
    assert line == {"token id": "the data for model A: token id 500 is beyond the model's vocabulary (97 tokens)",
                    "length": "the data for model A: sequences of 80 tokens are longer than the model's 64 "
                              "positions"}[case]


def test_pickled_module_where_tensors_are_expected(tmp_path, capsys):
    torch.save(torch.nn.Linear(64, 64), tmp_path / "module.pt")
    line = refused(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "out", "--cost", "activations",
                   "--calib", tmp_path / "module.pt")
    assert line == (f"{tmp_path / 'module.pt'}: cannot read tensors: PickledObjects: it holds pickled Python "
                    "objects, not only tensors (save a tensor, a dict of tensors or a state dict, or use .safetensors)")
    line = refused(capsys, tmp_path, "permute", f"{SPEC}@{tmp_path / 'module.pt'}", "-o", tmp_path / "out", "-q")
    assert line.startswith(f"{SPEC}@{tmp_path / 'module.pt'}: cannot read weights {tmp_path / 'module.pt'}: "
                           "PickledObjects: it holds pickled Python objects")


def test_unexportable_model_fails_with_one_line_and_no_torch_logging(tmp_path, capsys):
    (tmp_path / "branchy.py").write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        h = self.a(x)\n"
        "        return self.b(h * 2 if h.sum() > 0 else h)\n"
        "def build():\n"
        "    return Branchy(), (torch.randn(2, 4),)\n")
    spec = f"{tmp_path / 'branchy.py'}:build"
    code, out, err = run(capsys, "permute", spec, "-o", tmp_path / "out")
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert [line[:1] for line in lines[:-1]] == ["["] * (len(lines) - 1)  # progress lines only
    assert lines[-1].startswith("fxfuse: error: cannot trace Branchy: ")
    assert lines[-1].endswith("(hint: a Python branch depends on tensor values; rewrite it with torch.where or "
                              "torch.cond)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- options and messages


def test_options_without_effect_warn(tmp_path, capsys):
    torch.save(torch.randn(32, 64), tmp_path / "calib.pt")
    code, _, err = run(capsys, "compile", SPEC, SPEC, "-o", tmp_path / "out", "-q", "--reg", "0.1",
                       "--calib", tmp_path / "calib.pt", "--quality", "fast")
    assert code == 0
    assert err.splitlines()[:2] == [
        "fxfuse: warning: --reg is ignored with --solver exact (it regularises sinkhorn)",
        "fxfuse: warning: --calib is ignored with --cost weights (weight matching reads no data; only models of "
        "different depths and --repair use calibration inputs)"]


def test_activations_without_calibration_say_they_use_random_inputs(tmp_path, capsys):
    code, _, err = run(capsys, "compile", SPEC, SPEC, "-o", tmp_path / "out", "-q", "--cost", "activations")
    assert code == 0
    assert err.splitlines()[0] == ("fxfuse: warning: --cost activations without --calib: correlating on 256 random "
                                   "inputs (pass --calib FILE with real inputs)")


def test_hf_calibration_of_another_sequence_length(tmp_path, capsys, hf_dirs):
    bert = hf_dirs / "bert"
    permuted = tmp_path / "permuted"
    assert run(capsys, "permute", bert, "-o", permuted, "-q")[0] == 0
    calib = tmp_path / "calib.pt"
    torch.save(torch.randint(3, 97, (32, 24)), calib)  # the example input has 16 tokens
    code, out, err = run(capsys, "compile", permuted, bert, "-o", tmp_path / "out", "-q", "--cost", "activations",
                         "--calib", calib)
    assert code == 0, err
    assert err == ""  # -q: no transformers progress bars or load reports either
    assert "self-check error of exact maps: model 0 " in out
    torch.save(torch.randint(3, 97, (32, 80)), calib)
    line = refused(capsys, tmp_path, "compile", permuted, bert, "-o", tmp_path / "out2", "--cost", "activations",
                   "--calib", calib, "-q")
    assert line == f"--calib {calib}: sequences of 80 tokens are longer than the model's 64 positions"


def test_final_line_and_report_separate_errors_from_drift(tmp_path, capsys, hf_dirs):
    bert = hf_dirs / "bert"
    code, out, _ = run(capsys, "compile", bert, bert, "-o", tmp_path / "soft", "-q", "--solver", "sinkhorn")
    assert code == 0
    assert ("; self-check error of exact maps: model 0 0.0e+00; output drift of soft, width or depth maps "
            "(not an error): model 1 ") in out
    code, out, _ = run(capsys, "compile", bert, bert, "-o", tmp_path / "vanilla", "-q", "--method", "vanilla")
    assert code == 0
    assert out.startswith(f"wrote {tmp_path / 'vanilla'} (vanilla average, no alignment); ")


def test_units_moved_never_exceed_the_space_size(tmp_path, capsys, hf_dirs):
    bert = hf_dirs / "bert"
    permuted = tmp_path / "permuted"
    assert run(capsys, "permute", bert, "-o", permuted, "-q", "--seed", "3")[0] == 0
    assert run(capsys, "compile", permuted, bert, "-o", tmp_path / "out", "-q", "--target", "1")[0] == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    nested = [s for s in report["spaces"] if s["parent"] is not None and s["models"]]
    assert nested  # inside-head dims: one permutation per head
    for s in report["spaces"]:
        for m in s["models"]:
            assert 0 <= m["units_moved"] <= s["size"], s
    assert any(m["units_moved"] > 0 for s in nested for m in s["models"])


def test_vanilla_eval_row_is_labelled_vanilla(tmp_path, capsys):
    code, out, _ = run(capsys, "compile", MLP_A, MLP_B, "-o", tmp_path / "out", "-q", "--method", "vanilla",
                       "--eval", DIGITS)
    assert code == 0
    labels = [line.split("  ")[1] for line in out.splitlines()[1:4]]
    assert labels[2] == "fused (vanilla average)" and "fused (fxfuse)" not in out


def test_permute_with_nan_weights_says_so(tmp_path, capsys):
    state = load_file(EXAMPLES / "digits-mlp-a" / "model.safetensors")
    name = next(k for k in sorted(state) if state[k].dim() == 2)
    state[name][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    spec = f"digits:mlp@{tmp_path / 'nan.safetensors'}"
    line = refused(capsys, tmp_path, "permute", spec, "-o", tmp_path / "out", "-q")
    assert line == f"{spec}: the weights hold NaN ({name}); a model with non-finite weights cannot be checked"


@pytest.mark.parametrize("factory,why", [
    ("../nowhere.py:mlp", "no such file {folder}/../nowhere.py"),
    (3, "unreadable manifest (TypeError: 'factory' must be a string, not int)"),
])
def test_manifest_factory_that_cannot_be_found_is_named(tmp_path, capsys, factory, why):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(EXAMPLES / "digits-mlp-a" / "model.safetensors", folder / "model.safetensors")
    (folder / "fxfuse.json").write_text(json.dumps({"factory": factory, "kwargs": {}, "weights": "model.safetensors"}))
    line = refused(capsys, tmp_path, "permute", folder, "-o", tmp_path / "out", "-q")
    named = folder if isinstance(factory, str) else folder / "fxfuse.json"
    assert line == f"{named}: {why.format(folder=folder)}"


def test_negative_fusion_weights_reach_the_check(tmp_path, capsys):
    line = refused(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "out", "--weights", "-1,2", "-q")
    assert line == "fusion weights must be non-negative with a positive sum, got [-1.0, 2.0]"
