"""Bad input end to end through the command line: exit 2, one line naming the file and the cause, and every
input file byte for byte as it was (sha256 before and after); no output, half-written or whole, left behind.

First the worst class, outputs that would destroy an input; then each case of the bad-input audit.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from clirun import refused, run, snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DIGITS = EXAMPLES / "digits-test.safetensors"
SPEC = "zoo:mlp"  # 64 -> 48 -> 32 -> 10


def sha256s(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def bad(capsys, root: Path, *argv) -> str:
    """``refused`` (exit 2, nothing on stdout, one line, nothing under ``root`` changed) with the inputs'
    checksums compared too; the line without its prefix."""
    before = sha256s(root)
    line = refused(capsys, root, *argv)
    assert sha256s(root) == before
    return line


@pytest.fixture
def models(tmp_path) -> Path:
    """Two fxfuse model directories (``a``, ``b``: the digits MLPs) beside their factory ``digits.py``."""
    for name in ("digits-mlp-a", "digits-mlp-b"):
        shutil.copytree(EXAMPLES / name, tmp_path / name[-1])
    shutil.copy(EXAMPLES / "digits.py", tmp_path / "digits.py")
    shutil.copy(DIGITS, tmp_path / "data.safetensors")
    return tmp_path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, one_thread) -> Path:
    """A tiny BERT classifier checkpoint."""
    import zoo

    root = tmp_path_factory.mktemp("hf")
    zoo.bert()[0].save_pretrained(root / "bert")
    return root


# ---------------------------------------------------------------- no input is ever overwritten


def test_report_over_an_input_weights_file_is_refused_even_with_force(capsys, models):
    a, b = models / "a", models / "b"
    line = bad(capsys, models, "compile", a, b, "-o", models / "out", "--report", a / "model.safetensors",
               "--force", "-q")
    assert line == (f"--report {a / 'model.safetensors'}: lies inside the input model {a}; an output never "
                    "replaces an input, even with --force: choose another path")


def test_output_that_is_an_input_fxfuse_directory_is_refused_even_with_force(capsys, models):
    a, b = models / "a", models / "b"
    line = bad(capsys, models, "compile", a, b, "-o", a, "--force", "-q")
    assert line == (f"-o {a}: is the input model {a}; an output never replaces an input, even with --force: "
                    "choose another path")
    # the output holding an input (an fxfuse directory replaced with --force would take the input with it)
    (models / "fxfuse.json").write_text("{}")
    line = bad(capsys, models, "permute", a, "-o", models, "--force", "-q")
    assert line.startswith(f"-o {models}: holds the input model {a}; ")


def test_output_reaching_an_input_through_a_symlink_is_refused(capsys, models):
    a, b = models / "a", models / "b"
    (models / "link").symlink_to(a)
    line = bad(capsys, models, "compile", a, b, "-o", models / "link" / "out", "-q")
    assert line.startswith(f"-o {models / 'link' / 'out'}: lies inside the input model {a}; ")
    (models / "alias").symlink_to(a, target_is_directory=True)
    line = bad(capsys, models, "compile", models / "alias", b, "-o", a, "--force", "-q")
    assert line.startswith(f"-o {a}: is the input model {models / 'alias'}; ")


def test_output_over_a_factory_file_named_by_a_manifest_is_refused(capsys, models):
    line = bad(capsys, models, "permute", models / "a", "-o", models / "digits.py", "--force", "-q")
    assert line.startswith(f"-o {models / 'digits.py'}: is the input model {models / 'a'} (its ")


@pytest.mark.parametrize("case", ["dot-factory", "graph-in-model", "report-calib", "report-eval", "plot-data",
                                  "report-recipe", "dot-rules"])
def test_every_output_flag_is_checked_against_every_input(capsys, models, case):
    a, b = models / "a", models / "b"
    data = models / "data.safetensors"
    rules = models / "extra.yaml"
    rules.write_text("- op: aten.relu.default\n  kind: broadcast\n")
    torch.save(torch.randn(32, 1, 8, 8), models / "calib.pt")
    recipe = models / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)]}))
    argv, flag, path, what = {
        "dot-factory": (["explain", a, "--dot", models / "digits.py"], "--dot", models / "digits.py", f"model {a}"),
        "graph-in-model": (["explain", a, "--graph", a / "g.graphml"], "--graph", a / "g.graphml", f"model {a}"),
        "report-calib": (["compile", a, b, "-o", models / "o", "--cost", "activations", "--calib", models / "calib.pt",
                          "--report", models / "calib.pt"], "--report", models / "calib.pt",
                         f"--calib {models / 'calib.pt'}"),
        "report-eval": (["compile", a, b, "-o", models / "o", "--eval", data, "--report", data], "--report", data,
                        f"--eval {data}"),
        "plot-data": (["barrier", a, b, "--data", data, "--plot", data], "--plot", data, f"--data {data}"),
        "report-recipe": (["compile", recipe, "-o", models / "o", "--report", recipe], "--report", recipe,
                          f"recipe {recipe}"),
        "dot-rules": (["explain", a, "--rules", rules, "--dot", rules], "--dot", rules, f"--rules {rules}"),
    }[case]
    line = bad(capsys, models, *argv, "--force", "-q")
    how = "lies inside" if case == "graph-in-model" else "is"
    assert line.startswith(f"{flag} {path}: {how} the input {what}"), line
    assert line.endswith("an output never replaces an input, even with --force: choose another path")


def test_force_replaces_only_what_fxfuse_wrote(capsys, models):
    a, b = models / "a", models / "b"
    notes = models / "notes.json"
    notes.write_text('{"mine": 1}\n')
    line = bad(capsys, models, "compile", a, b, "-o", models / "o", "--report", notes, "--force", "-q")
    assert line == f"{notes}: is not a report written by fxfuse; refusing to replace it"
    drawing = models / "drawing.dot"
    drawing.write_text("not a graph\n")
    line = bad(capsys, models, "explain", a, "--dot", drawing, "--force", "-q")
    assert line == f"{drawing}: is not a graph file written by fxfuse; refusing to replace it"
    # fxfuse's own report and graph are replaced
    report = models / "report.json"
    assert run(capsys, "compile", a, b, "-o", models / "o", "--report", report, "-q")[0] == 0
    assert run(capsys, "compile", a, b, "-o", models / "o", "--report", report, "--force", "-q")[0] == 0
    assert json.loads(report.read_text())["fxfuse"]["command"][-2:] == ["--force", "-q"]
    assert run(capsys, "explain", a, "--dot", models / "g.dot", "-q")[0] == 0
    assert run(capsys, "explain", a, "--dot", models / "g.dot", "--force", "-q")[0] == 0


# ---------------------------------------------------------------- --workers


def test_workers_beyond_the_calibration_batches_are_refused_before_any_process(tmp_path, capsys):
    started = time.perf_counter()
    line = bad(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "o", "--cost", "activations",
               "--workers", "100000", "-q")
    assert line == ("--workers 100000: 100000 workers for 16 calibration batches at most (256 samples): need at "
                    "least one batch per worker (more calibration data, or fewer workers)")
    assert time.perf_counter() - started < 30  # no process was started


def test_workers_beyond_the_processors_are_refused(tmp_path, capsys):
    cpus = len(os.sched_getaffinity(0))
    n = cpus + 1
    line = bad(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "o", "--cost", "activations",
               "--calib-random", str(16 * n), "--workers", str(n), "-q")
    assert line == f"--workers {n}: this machine runs this process on {cpus} processors; use at most {cpus} workers"


# ---------------------------------------------------------------- a full disk, a file-size limit


def _under_file_size_limit(argv: list[str], limit: int, cwd) -> subprocess.CompletedProcess:
    """``fxfuse argv`` in a fresh process whose files may grow to ``limit`` bytes at most (``RLIMIT_FSIZE``)."""
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
            "from fxfuse.commands.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_file_size_limit_during_the_save_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    before = sha256s(tmp_path)
    proc = _under_file_size_limit(["permute", SPEC, "-o", str(out), "-q"], 4096, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"fxfuse: error: {out}: cannot write it: File too large; nothing was written\n"
    assert sha256s(tmp_path) == before and list(tmp_path.iterdir()) == []


def test_file_size_limit_while_writing_hugging_face_shards_out_of_core(tmp_path, hf_dirs):
    out = tmp_path / "out"
    bert = str(hf_dirs / "bert")
    before = sha256s(hf_dirs)
    proc = _under_file_size_limit(["compile", bert, bert, "-o", str(out)], 65536, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "writing" in proc.stderr  # fused out of core, shard by shard
    assert proc.stderr.endswith(f"fxfuse: error: {out}: cannot write it: File too large; nothing was written\n")
    assert sha256s(hf_dirs) == before and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["fxfuse.models.io.save_state", "fxfuse.models.io.write_text_atomic"])
def test_disk_full_during_the_save_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, models, writer):
    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    report = models / "r.json"
    if writer.endswith("save_state"):
        monkeypatch.setattr("fxfuse.models.io.save_state", full)
        line = bad(capsys, models, "compile", models / "a", models / "b", "-o", models / "out", "-q")
        assert line == f"{models / 'out'}: cannot write it: No space left on device; nothing was written"
    else:  # the report beside the output: written with os.fdopen, which runs out of space
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kw):
            f = real_fdopen(fd, *args, **kw)
            f.write = full
            return f

        monkeypatch.setattr("fxfuse.models.io.os.fdopen", fdopen)
        line = bad(capsys, models, "explain", models / "a", "--dot", models / "g.dot", "-q")
        assert line == f"{models / 'g.dot'}: cannot write it: No space left on device; nothing was written"
    assert not report.exists() and not (models / "out").exists()
    assert not [p for p in models.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- symlink loops


def test_symlink_loops_are_named(tmp_path, capsys, models):
    loop = models / "loop"
    loop.symlink_to(models / "loop2")
    (models / "loop2").symlink_to(loop)
    line = bad(capsys, models, "compile", models / "a", models / "b", "-o", loop / "out", "-q")
    assert line == f"-o {loop / 'out'}: {loop} is a symlink loop (it points back to itself)"
    line = bad(capsys, models, "explain", loop, "-q")
    assert line == f"model {loop}: is a symlink loop (it points back to itself)"
    weights = models / "a" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(weights)
    line = bad(capsys, models, "explain", models / "a", "-q")
    assert line == f"model {models / 'a'} (its {weights}): is a symlink loop (it points back to itself)"


def test_symlink_loop_in_a_hugging_face_directory(tmp_path, capsys, hf_dirs):
    hf = shutil.copytree(hf_dirs / "bert", tmp_path / "bert")
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").symlink_to(hf / "model.safetensors")
    line = bad(capsys, tmp_path, "compile", hf, hf_dirs / "bert", "-o", tmp_path / "o", "-q")
    assert line == f"{hf}: {hf / 'model.safetensors'} is a symlink loop (it points back to itself)"


# ---------------------------------------------------------------- data checked before the work


def _shifted_labels(src: Path, dst: Path, shift: int) -> Path:
    data = load_file(str(src))
    data["labels"] = data["labels"] + shift
    save_file(data, str(dst))
    return dst


def test_refine_labels_outside_the_classes_are_refused_before_the_work(capsys, models):
    data = _shifted_labels(models / "data.safetensors", models / "shifted.safetensors", 20)
    want = "labels range over 20..29 but the model has 10 classes (0..9; -100 is ignored)"
    line = bad(capsys, models, "compile", models / "a", models / "b", "-o", models / "o", "--refine", "5",
               "--data", data, "-q")
    assert line == f"--data {data}: model 0: {want}"
    line = bad(capsys, models, "barrier", models / "a", models / "b", "--data", models / "data.safetensors",
               "--refine", "5", "--refine-data", data, "-q")
    assert line == f"--refine-data {data}: model 0: {want}"


def test_calibration_names_that_match_no_input_name_the_file(capsys, models):
    calib = models / "calib.pt"
    torch.save({"pixels": torch.randn(32, 1, 8, 8), "mask": torch.ones(32, 8)}, calib)
    line = bad(capsys, models, "compile", models / "a", models / "b", "-o", models / "o", "--cost", "activations",
               "--calib", calib, "-q")
    assert line == (f"--calib {calib}: calibration data has 'mask', 'pixels', which names no input of the models "
                    "(they take x)")


# ---------------------------------------------------------------- recipe and rule files


def test_recipe_or_rule_file_that_is_not_utf8(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"models: [zoo:mlp, zoo:mlp]\nseed: 1 # caf\xe9\n")
    line = bad(capsys, tmp_path, "compile", recipe, "-o", tmp_path / "o", "-q")
    assert line == f"{recipe}: not UTF-8 text: byte 0xe9 at byte offset 40 (line 2) is not valid UTF-8"
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(b"- op: aten.relu.default\n  kind: broadcast\n  note: \xff\n")
    line = bad(capsys, tmp_path, "rules", "check", rules)
    assert line == f"{rules}: not UTF-8 text: byte 0xff at byte offset 50 (line 3) is not valid UTF-8"
    line = bad(capsys, tmp_path, "explain", SPEC, "--rules", rules, "-q")
    assert line == f"{rules}: not UTF-8 text: byte 0xff at byte offset 50 (line 3) is not valid UTF-8"


def test_recipe_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: [zoo:mlp, zoo:mlp]\nseed: 1\ncost: weights\nseed: 2\n")
    line = bad(capsys, tmp_path, "compile", recipe, "-o", tmp_path / "o", "-q")
    assert line == f"{recipe}: line 4: invalid YAML: key 'seed' given twice (lines 2 and 4)"


def test_rule_file_ruling_one_op_twice_is_refused_naming_both(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- op: aten.relu.default\n  kind: broadcast\n"
                     "- op: [aten.gelu.default, aten.relu.default]\n  kind: broadcast\n")
    want = (f"{rules}: rule 1, field 'op': aten.relu.default is ruled twice: by rule 0 (line 1) and rule 1 (line 3); "
            "keep one")
    assert bad(capsys, tmp_path, "rules", "check", rules) == want
    assert bad(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "o", "--rules", rules, "-q") == want
    rules.write_text("- op: aten.relu.default\n  kind: broadcast\n  kind: pin\n")
    assert bad(capsys, tmp_path, "rules", "check", rules) == (
        f"{rules}: line 3: invalid YAML: key 'kind' given twice (lines 2 and 3)")


def test_rules_check_refuses_an_op_torch_does_not_have_unless_marked_custom(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- op: aten.relu.default\n  kind: broadcast\n- op: aten.lineer.default\n"
                     "  axes: {input: '... i', weight: 'o i', out: '... o'}\n")
    assert bad(capsys, tmp_path, "rules", "check", rules) == (
        f"{rules}: rule 1, field 'op': aten.lineer.default is not in torch.ops (a misspelt name?); a custom op that "
        "is registered later needs 'custom: true' in its rule")
    rules.write_text("- op: mylib.thing.default\n  kind: broadcast\n  custom: true\n")
    code, out, _ = run(capsys, "rules", "check", rules)
    assert code == 0 and out == (f"ok: {rules}: 1 rules for 1 ops (0 checked against their torch schema)\n"
                                 "  not in torch.ops here, so unchecked: mylib.thing.default\n")
    rules.write_text("- op: mylib.thing.default\n  kind: broadcast\n  custom: yes please\n")
    assert bad(capsys, tmp_path, "rules", "check", rules) == (
        f"{rules}: rule 0, field 'custom': expected true or false, got 'yes please'")


def test_shipped_rule_files_and_the_custom_op_example_pass_rules_check(capsys):
    files = sorted((ROOT / "rules").glob("*.yaml")) + [EXAMPLES / "custom_op" / "rules.yaml"]
    code, out, err = run(capsys, "rules", "check", *files)
    assert (code, err) == (0, ""), err
    assert out.count("ok: ") == len(files)


# ---------------------------------------------------------------- options


def test_fusion_weights_not_summing_to_one_mean_one_thing_everywhere(tmp_path, capsys, models):
    out = models / "out"
    code, _, err = run(capsys, "compile", models / "a", models / "b", "-o", out, "--weights", "0.3,0.3", "-q")
    assert code == 0, err
    assert err == ("fxfuse: warning: fusion weights 0.3,0.3 do not sum to 1: fusing with 0.5,0.5 (so recorded in "
                   "the recipe, the report and the model card)\n")
    saved = yaml.safe_load((out / "fxfuse-recipe.yaml").read_text())
    report = json.loads((out / "report.json").read_text())
    assert saved["weights"] == [0.5, 0.5] and report["weights"] == [0.5, 0.5]
    card = (out / "README.md").read_text()
    assert "| 0 | " in card and card.count("| 0.500 |") == 2
    # the saved recipe gives the same weights bit for bit, and the same weights as 0.5,0.5 given directly
    again = models / "again"
    assert run(capsys, "compile", out / "fxfuse-recipe.yaml", "-o", again, "-q")[0] == 0
    direct = models / "direct"
    assert run(capsys, "compile", models / "a", models / "b", "-o", direct, "--weights", "0.5,0.5", "-q")[0] == 0
    fused = load_file(str(out / "model.safetensors"))
    for other in (again, direct):
        state = load_file(str(other / "model.safetensors"))
        assert all(torch.equal(fused[k], state[k]) for k in fused)


@pytest.mark.parametrize("where", ["flag", "recipe"])
def test_negative_target_is_refused(tmp_path, capsys, where):
    if where == "flag":
        line = bad(capsys, tmp_path, "compile", SPEC, SPEC, "-o", tmp_path / "o", "--target", "-1", "-q")
        assert line == "--target -1: must be a model's index, 0 or more, got -1"
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("models: [zoo:mlp, zoo:mlp]\ntarget: -1\n")
        line = bad(capsys, tmp_path, "compile", recipe, "-o", tmp_path / "o", "-q")
        assert line == f"{recipe}: key 'target': must be a model's index, 0 or more, got -1"


# ---------------------------------------------------------------- Hugging Face directories


def _edited(src: Path, dst: Path, config=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("command", ["compile", "explain"])
def test_architecture_that_does_not_fit_the_model_type(tmp_path, capsys, hf_dirs, command):
    hf = _edited(hf_dirs / "bert", tmp_path / "bert", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    argv = ["compile", hf, hf_dirs / "bert", "-o", tmp_path / "o"] if command == "compile" else ["explain", hf]
    line = bad(capsys, tmp_path, *argv, "-q")
    assert line == (f"{hf}: config.json names the architecture GPT2LMHeadModel, which does not fit its model_type "
                    "'bert' (GPT2LMHeadModel takes 'gpt2')")


def test_unknown_architecture_is_named(tmp_path, capsys, hf_dirs):
    hf = _edited(hf_dirs / "bert", tmp_path / "bert", lambda c: c.update(architectures=["BertForTeaMaking"]))
    line = bad(capsys, tmp_path, "explain", hf, "-q")
    assert line == (f"{hf}: the checkpoint's tensors classifier.bias, classifier.weight would be lost (config.json "
                    "names the architecture BertForTeaMaking, which this transformers does not know, so the bare "
                    "base model BertModel was built)")


@pytest.mark.parametrize("command", ["compile", "explain"])
def test_truncated_safetensors_header(tmp_path, capsys, hf_dirs, command):
    hf = _edited(hf_dirs / "bert", tmp_path / "bert")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = ["compile", hf, hf_dirs / "bert", "-o", tmp_path / "o"] if command == "compile" else ["explain", hf]
    line = bad(capsys, tmp_path, *argv, "-q")
    assert line.startswith(f"{weights}: not a readable safetensors file (SafetensorError: "), line


# ---------------------------------------------------------------- what a new user is told


def test_show_depth_map_on_models_of_the_same_depth_says_so(tmp_path, capsys):
    code, out, _ = run(capsys, "compile", SPEC, SPEC, "-o", tmp_path / "o", "--show-depth-map", "-q")
    assert code == 0
    assert out.splitlines()[:2] == ["depth: every model has the target's depth, so each depth map is the identity",
                                    "width: every model has the target's widths"]


@pytest.mark.parametrize("where", ["flag", "recipe"])
def test_explicit_random_calibration_warns(tmp_path, capsys, where):
    warning = ("fxfuse: warning: --calib-random 64: calibrating on random inputs, not data the models were trained "
               "on; the maps follow what the models do on noise (pass --calib FILE with real inputs)\n")
    if where == "flag":
        argv = [SPEC, SPEC, "--cost", "activations", "--calib-random", "64"]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("models: [zoo:mlp, zoo:mlp]\ncost: activations\ncalib_random: 64\n")
        argv = [recipe]
    code, _, err = run(capsys, "compile", *argv, "-o", tmp_path / "o", "-q")
    assert code == 0 and warning in err


def test_explain_says_why_the_flattened_input_gives_two_alike_pinned_spaces(capsys):
    code, out, _ = run(capsys, "explain", EXAMPLES / "digits-mlp-a", "-q")
    assert code == 0
    assert "     1      8  fc1.weight:1 (factor 1 of 2): interface: graph input 'x'" in out
    assert "     2      8  fc1.weight:1 (factor 2 of 2): interface: graph input 'x'" in out
    assert ("  s1, s2 are the 2 factors of fc1.weight axis 1 (64 = 8 × 8): the graph flattens (or reshapes) 2 axes "
            "into that one, and each is a space of its own") in out


def test_outputs_record_no_absolute_local_path(tmp_path, capsys, models, monkeypatch):
    out = models / "fused"
    assert run(capsys, "compile", models / "a", models / "b", "-o", out, "-q")[0] == 0
    assert json.loads((out / "fxfuse.json").read_text())["factory"] == "../digits.py:mlp"
    front = yaml.safe_load((out / "README.md").read_text().split("---\n", 2)[1])
    assert "base_model" not in front  # local directories are no hub ids
    shutil.move(str(models), str(tmp_path.parent / f"{tmp_path.name}-moved"))  # the outputs move with the inputs
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    monkeypatch.chdir(moved)
    code, _, err = run(capsys, "explain", "fused", "-q")
    assert code == 0, err


def test_model_card_names_hub_ids_only():
    from fxfuse.recipes.card import hub_id

    assert hub_id("bert-base-uncased") == "bert-base-uncased" and hub_id("org/name-1.5") == "org/name-1.5"
    assert hub_id("zoo:mlp") is None and hub_id("/abs/dir") is None and hub_id("pkg/file.py:make@w.pt") is None
    assert hub_id(str(EXAMPLES / "digits-mlp-a")) is None


def test_last_line_time_counts_from_the_process_start(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "fxfuse.commands.cli", "compile", SPEC, SPEC, "-o", str(tmp_path / "o"),
                           "-q"], capture_output=True, text=True, env=env, timeout=300)
    wall = time.time() - started
    assert proc.returncode == 0, proc.stderr
    total, fusing = map(float, re.search(r"; ([\d.]+)s in all \(([\d.]+)s fusing\)$", proc.stdout.strip()).groups())
    assert fusing <= total <= wall + 0.1
    # start-up (imports) is counted: a fresh interpreter importing torch takes a good part of the run
    probe = time.time()
    subprocess.run([sys.executable, "-c", "import torch, fxfuse.commands.cli"], env=env, timeout=300, check=True)
    assert total - fusing >= 0.5 * (time.time() - probe)


@pytest.mark.parametrize("rule, reason", [
    ("{op: aten.linear.default, axes: {input: '... i', weight: 'o i x', bias: 'o', out: '... o'}}",
     "aten.linear.default: argument 'weight' has rank 3 in the rule ('o i x'), but the op takes rank 2 there"),
    ("{op: aten.conv2d.default, axes: {input: 'b c h w', weight: 'o c kh', out: 'b o oh ow'}, pin: [oh, ow, kh]}",
     "aten.conv2d.default: argument 'weight' has rank 3 in the rule ('o c kh'), but the op takes rank 4 there"),
    ("{op: aten.mm.default, axes: {self: 'k m', mat2: 'k n', out: 'm n'}}",
     "aten.mm.default: argument 'self' is 'k m' in the rule, but the op takes its axes as 'm k' (swapped axes?)"),
    ("{op: aten.bmm.default, axes: {self: 'b m k', mat2: 'b k n', out: 'b m n x'}}",
     "aten.bmm.default: 'out' has rank 4 in the rule ('b m n x'), but the op returns rank 3 for inputs of the "
     "rule's ranks (self (3, 7, 5), mat2 (3, 5, 11))"),
])
def test_rules_check_runs_the_op_for_wrong_ranks_and_swapped_axes(tmp_path, capsys, rule, reason):
    path = tmp_path / "r.yaml"
    path.write_text(f"- {rule}\n")
    assert bad(capsys, tmp_path, "rules", "check", path) == f"{path}: rule 0, field 'axes': {reason}"
