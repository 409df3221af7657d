"""The ``fxfuse`` command line: a thin layer over the Python API (one module per command: ``fxfuse.commands``)."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from ..core.errors import FxfuseError
from . import barrier_command, compile_command, explain_command, permute_command, rules_command
from .compile_command import compile_recipe  # noqa: F401  (imported from here)
from .shared import EPILOG, version

_IMPORTED = time.time()  # a stand-in for the process start where /proc does not tell it


def process_start() -> float:
    """When this process started (``time.time()`` scale): from ``/proc`` on Linux, else when this module was
    imported (the command's own imports come after it)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - since_boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse", description="Align and fuse trained PyTorch models from their torch.fx graphs.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"fxfuse {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (explain_command, permute_command, compile_command, barrier_command, rules_command):
        command.add_parser(sub)
    return parser


def _negative_values(argv: list[str]) -> list[str]:
    """``--weights -1,2`` as ``--weights=-1,2`` (argparse would take ``-1,2`` for an option)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] == "--weights" and re.fullmatch(r"-[0-9.][0-9.,eE+-]*", a):
            out[-1] = f"--weights={a}"
        else:
            out.append(a)
    return out


def _quiet_libraries() -> None:
    """--quiet: no progress bars or load reports from transformers (torch's export logging is always off)."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from ..models.atomic import Terminated, interrupts

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fxfuse rules list | head` ends quietly
    started = process_start() if argv is None else time.time()  # a command line: from the process start
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["fxfuse", *argv]
    args.started = started
    warnings.filterwarnings("ignore")
    if getattr(args, "quiet", False):
        _quiet_libraries()
    try:
        with interrupts():
            return args.func(args)
    except FxfuseError as exc:
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("fxfuse: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("fxfuse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file system failure no check foresaw: still one line
        print(f"fxfuse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
