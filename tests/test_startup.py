"""The command line answers ``--help`` without importing torch, and ``rules check`` imports it only for the op schemas."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[1] / "rules" / "nn.yaml"
PROBE = """
import sys
from fxfuse.commands.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "numpy", "scipy", "ot", "networkx", "transformers") if m in sys.modules)
print("imported:", ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"], ["--version"]])
def test_no_heavy_imports(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "imported: "


def test_rules_check_imports_torch_only_for_the_op_schemas():
    """Each rule is checked against its op's schema in ``torch.ops``: torch (and the numpy it loads) is
    imported for that, and nothing else heavy."""
    done = subprocess.run([sys.executable, "-c", PROBE, "rules", "check", str(RULES)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {RULES}: ")
    assert done.stdout.splitlines()[-1] in ("imported: numpy,torch", "imported: torch")


def test_package_names_are_imported_on_first_use():
    probe = ("import sys, fxfuse; assert 'torch' not in sys.modules; "
             "import fxfuse.api.permute, fxfuse.frontend.trace, fxfuse.api.barrier; "
             "assert callable(fxfuse.permute) and callable(fxfuse.trace) and callable(fxfuse.barrier); "
             "assert fxfuse.compile.__module__ == 'fxfuse.api.fuse' and fxfuse.Recipe.__module__ == 'fxfuse.recipes.recipe'; "
             "print(sorted(set(fxfuse.__all__) - set(dir(fxfuse))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_compiling_plain_torch_models_does_not_import_transformers(tmp_path):
    """transformers (seconds of start-up) is imported only when a Hugging Face model is given."""
    models = tmp_path / "models.py"
    models.write_text("import torch\n\n"
                      "def mlp():\n"
                      "    torch.manual_seed(0)\n"
                      "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), "
                      "(torch.randn(3, 4),)\n")
    done = subprocess.run([sys.executable, "-c", PROBE, "compile", f"{models}:mlp", f"{models}:mlp", "-o",
                           str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "report.json").is_file()
    assert "transformers" not in done.stdout.splitlines()[-1].removeprefix("imported: ").split(",")
