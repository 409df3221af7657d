"""What the command line writes: checked paths, replaced only over fxfuse outputs, clean after signals,
loadable from anywhere, with the input's config and a report of how it was made."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clirun import refused, run, snapshot
from fxfuse.models.io import load_model
from fxfuse.frontend.verify import compare_outputs

SPEC = "zoo:mlp"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- paths checked up front


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_output_under_a_file_is_refused_before_the_work(tmp_path, capsys, flag):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    argv = ["compile", SPEC, SPEC, "-o", tmp_path / "file" / "out" if flag == "-o" else out, "-q"]
    if flag == "--report":
        argv += ["--report", tmp_path / "file" / "report.json"]
    assert refused(capsys, tmp_path, *argv) == f"{tmp_path / 'file'}: not a directory"


def test_dot_and_plot_paths_are_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    dot, png = tmp_path / "file" / "x.dot", tmp_path / "file" / "x.png"
    assert refused(capsys, tmp_path, "explain", SPEC, "--dot", dot, "-q") == f"{tmp_path / 'file'}: not a directory"
    digits = ROOT / "examples" / "digits-test.safetensors"
    assert refused(capsys, tmp_path, "barrier", SPEC, SPEC, "--data", digits, "--plot", png,
                   "-q") == f"{tmp_path / 'file'}: not a directory"


def test_unwritable_directory_is_refused(tmp_path, capsys):
    line = refused(capsys, tmp_path, "permute", SPEC, "-o", "/proc/fxfuse-out", "-q")
    assert line.startswith("/proc/fxfuse-out: cannot write in /proc: ")


@pytest.mark.parametrize("out", [".", ".."])
def test_working_directory_is_never_an_output(in_tmp, capsys, out):
    (in_tmp / "keep.txt").write_text("mine")
    line = refused(capsys, in_tmp.parent if out == ".." else in_tmp, "permute", SPEC, "-o", out, "--force", "-q")
    assert line == f"{out}: is the working directory or holds it; choose a new path"


# ---------------------------------------------------------------- --force


def test_force_replaces_only_an_fxfuse_output(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not fxfuse's")
    line = refused(capsys, tmp_path, "permute", SPEC, "-o", mine, "--force", "-q")
    assert line == f"{mine}: is not an fxfuse output (no fxfuse.json or fxfuse report.json); refusing to replace it"
    (tmp_path / "file").write_text("x")
    line = refused(capsys, tmp_path, "permute", SPEC, "-o", tmp_path / "file", "--force", "-q")
    assert line == f"{tmp_path / 'file'}: exists and is not a directory; refusing to replace it"
    out = tmp_path / "out"
    assert run(capsys, "permute", SPEC, "-o", out, "-q")[0] == 0
    assert run(capsys, "permute", SPEC, "-o", out, "-q", "--force", "--seed", "2")[0] == 0
    assert json.loads((out / "report.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "out"]


def test_output_directory_has_plain_mkdir_permissions(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run(capsys, "permute", SPEC, "-o", tmp_path / "out", "-q")[0] == 0
        assert run(capsys, "compile", SPEC, SPEC, "-o", tmp_path / "fused", "-q", "--report", tmp_path / "r.json")[0] == 0
    finally:
        os.umask(old)
    for path, mode in [("out", 0o755), ("fused", 0o755), ("r.json", 0o644), ("out/model.safetensors", 0o644)]:
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode, path


# ---------------------------------------------------------------- signals during the save

_SLOW_SAVE = """
import os, signal, sys
import fxfuse.models.io
from fxfuse.commands.cli import main

save = fxfuse.models.io.save_state
def save_then_signal(module, path):
    save(module, path)  # the weights file is written, the rename has not happened
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
fxfuse.models.io.save_state = save_then_signal
# Python raises KeyboardInterrupt on SIGINT unless the process started with SIGINT ignored (a job put in the
# background by a non-interactive shell): the test runs as from a terminal, wherever it is started
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,code,line", [("SIGTERM", 143, "fxfuse: terminated"),
                                           ("SIGINT", 130, "fxfuse: interrupted")])
def test_signal_during_the_save_leaves_nothing_behind(tmp_path, sig, code, line):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "fxfuse.json").write_text("{}")  # an earlier output, to be replaced with --force
    before = snapshot(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    spec = f"{ROOT / 'tests' / 'zoo.py'}:mlp"  # a fresh process: the zoo by its file
    proc = subprocess.run([sys.executable, "-c", _SLOW_SAVE, sig, "permute", spec, "-o", str(tmp_path / "old"),
                           "--force", "-q"], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == line + "\n"
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no hidden sibling either


# ---------------------------------------------------------------- what the output holds


def test_hf_output_keeps_the_input_config(tmp_path, capsys, one_thread):
    import zoo

    gpt2 = zoo.gpt2()[0]
    gpt2.config.use_cache = True
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "permute", tmp_path / "gpt2", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "gpt2" / "config.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True


def test_factory_file_output_loads_from_another_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "    return net, (torch.randn(4, 6),)\n")
    monkeypatch.chdir(tmp_path / "work")
    assert run(capsys, "permute", "net.py:build", "-o", "out", "-q")[0] == 0
    monkeypatch.chdir(tmp_path)
    moved = load_model("work/out")
    original = load_model(f"{tmp_path / 'work' / 'net.py'}:build")
    assert compare_outputs(original.module, moved.module, original.args) <= 1e-5
    assert not torch.equal(original.module[0].weight, moved.module[0].weight)


NET = """import torch


class Net(torch.nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, hidden), torch.nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build(seed=0, hidden=8):
    torch.manual_seed(seed)
    return Net(hidden).eval(), (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),)
"""


def _model_dir(folder: Path, factory: str, seed: int) -> dict[str, torch.Tensor]:
    """A model directory as the shipped examples are: a manifest naming ``factory`` and the weights of ``seed``."""
    from fxfuse.models.io import save_state

    net = folder.parent / "net.py"
    scope: dict = {}
    exec(compile(net.read_text(), str(net), "exec"), scope)
    model = scope["build"](seed, hidden=8)[0]
    folder.mkdir()
    save_state(model, folder / "model.safetensors")
    (folder / "fxfuse.json").write_text(json.dumps({"factory": factory, "kwargs": {"hidden": 8},
                                                    "weights": "model.safetensors"}))
    return model.state_dict()


def test_relative_factory_file_is_read_from_the_manifests_directory(tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "net.py").write_text(NET)
    states = [_model_dir(models / name, "../net.py:build", seed) for seed, name in enumerate(["a", "b"], start=1)]
    moved = tmp_path / "moved"
    models.rename(moved)  # the directories move with the file they name
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    a, b = load_model("../moved/a"), load_model(str(moved / "b"))
    for loaded, state in zip((a, b), states):
        assert loaded.module.state_dict().keys() == state.keys()
        assert all(torch.equal(loaded.module.state_dict()[k], state[k]) for k in state)
    # the file is loaded once: one class for both, and for the file named directly
    assert type(a.module).__name__ == "Net" and type(a.module) is type(b.module)
    assert type(load_model(f"{moved / 'net.py'}:build").module) is type(a.module)
    code, _, err = run(capsys, "compile", "../moved/a", "../moved/b", "-o", "fused", "-q")
    assert code == 0, err
    # an output names the file relative to itself (no absolute local path recorded), and loads from anywhere
    manifest = json.loads(Path("fused/fxfuse.json").read_text())
    assert manifest["factory"] == "../../moved/net.py:build" and manifest["kwargs"] == {"hidden": 8}
    monkeypatch.chdir(tmp_path)
    assert type(load_model("elsewhere/fused").module) is type(a.module)


def test_shipped_examples_load_from_any_directory(in_tmp):
    examples = ROOT / "examples"
    dirs = sorted(p.parent for p in examples.glob("*/fxfuse.json"))
    assert len(dirs) >= 6
    for folder in dirs:
        assert json.loads((folder / "fxfuse.json").read_text())["factory"].startswith("../digits.py:")
    loaded = [load_model(str(folder)) for folder in dirs]
    assert {type(m.module).__name__ for m in loaded} == {"DigitsMLP", "DigitsViT"}
    assert len({type(m.module) for m in loaded}) == 2  # examples/digits.py loaded once
    assert {m.factory.rpartition(":")[0] for m in loaded} == {str(examples / "digits.py")}


class PickledMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def example_inputs(self):
        return (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),)


def test_pickled_model_output_has_a_manifest_fxfuse_reads_back(tmp_path, capsys):
    model = PickledMLP().eval()
    torch.save(model, tmp_path / "mlp.pt")
    code, _, err = run(capsys, "permute", tmp_path / "mlp.pt", "-o", tmp_path / "out", "-q", "--trust-pickle")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "fxfuse.json").read_text())["pickle"] == "../mlp.pt"  # beside the output
    moved = load_model(str(tmp_path / "out"), trust_pickle=True)
    assert compare_outputs(model, moved.module, moved.args) <= 1e-5
    assert not torch.equal(model.net[0].weight, moved.module.net[0].weight)
    assert "--trust-pickle" in refused(capsys, tmp_path, "explain", tmp_path / "out", "-q")


def test_report_records_versions_and_command(tmp_path, capsys):
    import transformers

    argv = ["compile", SPEC, SPEC, "-o", str(tmp_path / "out"), "-q", "--seed", "4"]
    assert run(capsys, *argv)[0] == 0
    made = json.loads((tmp_path / "out" / "report.json").read_text())["fxfuse"]
    import fxfuse

    assert made == {"version": fxfuse.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__, "command": ["fxfuse", *argv]}
