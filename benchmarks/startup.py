"""Start-up of the command line: wall time of ``fxfuse --help`` and ``fxfuse rules check``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/startup.py [--runs 5] [--pythonpath DIR]

Each command runs ``--runs`` times in a fresh interpreter; the median and the
fastest run are printed, and which heavy modules the command imported.
``--pythonpath`` times another checkout of fxfuse (e.g. an older commit
unpacked with ``git archive``) under the same interpreter.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from fxfuse.commands.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in ("torch", "numpy", "scipy", "networkx", "transformers") if m in sys.modules]
sys.stderr.write("imported: " + (", ".join(heavy) or "none") + "\\n")
"""


def time_command(argv: list[str], runs: int, env: dict) -> tuple[list[float], str]:
    times, imported = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t)
        imported = done.stderr.strip().splitlines()[-1]
    return times, imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pythonpath", help="a directory holding the fxfuse package to time instead")
    args = parser.parse_args()
    env = dict(os.environ)
    root = Path(args.pythonpath).resolve() if args.pythonpath else ROOT
    if args.pythonpath:
        env["PYTHONPATH"] = str(root)
    commands = {"fxfuse --help": ["--help"], "fxfuse rules check rules/nn.yaml": ["rules", "check",
                                                                                 str(root / "rules" / "nn.yaml")]}
    print(f"{'command':<36} {'median':>8} {'fastest':>8}  imported")
    for name, argv in commands.items():
        times, imported = time_command(argv, args.runs, env)
        print(f"{name:<36} {statistics.median(times):7.2f}s {min(times):7.2f}s  {imported[len('imported: '):]}")


if __name__ == "__main__":
    main()
