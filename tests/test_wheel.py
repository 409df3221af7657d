"""The wheel holds what the source tree holds: every module of the package and every shipped rule file."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_rule_file(tmp_path):
    """Built from a copy of what the repository tracks, so a stale ``build/`` of an earlier build adds nothing."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fxfuse", src / "fxfuse", ignore=ignore)
    shutil.copytree(ROOT / "rules", src / "rules", ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fxfuse-*.whl")
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fxfuse").rglob("*.py")}
    source |= {f"fxfuse/shipped_rules/{p.name}" for p in (ROOT / "rules").iterdir() if p.suffix in (".yaml", ".md")}
    assert source - inside == set(), f"missing from the wheel: {sorted(source - inside)}"
    assert inside - source == set(), f"in the wheel only: {sorted(inside - source)}"
