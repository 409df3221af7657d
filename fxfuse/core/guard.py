"""Input data is never overwritten: outputs checked against every input, symlinks resolved, before any work.

An *input* is every file or directory a command reads: each model (its
directory, its pickle, its ``file.py`` factory, its ``@weights`` file, and for
an fxfuse directory the factory or pickle its manifest names), a recipe file,
rule files, calibration, evaluation and labelled data. An *output* (``-o``,
``--report``, ``--dot``, ``--graph``, ``--plot``) that is, holds or lies inside
an input is refused with one line, ``--force`` or not: ``--force`` replaces only
fxfuse's own earlier output (``fxfuse.models.atomic``).

Paths are compared after resolving symbolic links; a path through a symlink
loop is refused with one line naming the loop (``real``).
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import FxfuseError

MANIFEST = "fxfuse.json"


@dataclass(frozen=True)
class Input:
    """One path a command reads: ``path`` resolved, ``what`` how the user gave it (for the message)."""

    path: Path
    what: str


def loop_in(path: str | Path) -> Path | None:
    """The first prefix of ``path`` (``a``, ``a/b``, …) that is a symbolic-link loop, else ``None``."""
    path = Path(path)
    prefix = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        prefix = prefix / part
        try:
            os.stat(prefix)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return prefix
            return None  # missing or unreadable: the reader says so
    return None


def loop_text(path: str | Path, loop: Path) -> str:
    """What to say of ``path`` whose prefix ``loop`` (``loop_in``) is a symlink loop."""
    return ("" if loop == Path(path) else f"{loop} ") + "is a symlink loop (it points back to itself)"


def check_no_loop(path: str | Path, name: str | None = None) -> None:
    """Refuse ``path`` (one line, named ``name``) when it or one of its parents is a symlink loop."""
    loop = loop_in(path)
    if loop is not None:
        raise FxfuseError(f"{name or path}: {loop_text(path, loop)}")


def real(path: str | Path, name: str | None = None) -> Path:
    """``path`` absolute with every symbolic link resolved (it need not exist); a loop is refused."""
    check_no_loop(path, name)
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # a loop reached through '..' or made meanwhile
        raise FxfuseError(f"{name or path}: {loop_text(path, Path(path))}") from None


def model_paths(spec: str) -> list[Path]:
    """The files and directories model ``spec`` is read from (see ``fxfuse.models.io``): the spec's directory or
    file, its ``file.py`` factory and ``@weights`` file, and what an fxfuse manifest in it names."""
    path = Path(spec)
    if loop_in(path) is not None or path.exists():
        found = [path]
        if path.is_dir() and (path / MANIFEST).is_file():
            found += _manifest_paths(path)
        return found
    target, _, weights = spec.partition("@")
    module = target.rpartition(":")[0]
    found = [Path(module)] if module.endswith(".py") else []
    return found + ([Path(weights)] if weights else [])


def _manifest_paths(folder: Path) -> list[Path]:
    """The factory file or pickle an fxfuse manifest names (a relative file is read from its folder)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return []  # the loader refuses it with its own line
    if not isinstance(manifest, dict):
        return []
    found = []
    pickle, factory = manifest.get("pickle"), manifest.get("factory")
    if isinstance(pickle, str):
        found.append(folder / pickle)
    if isinstance(factory, str) and factory.rpartition(":")[0].endswith(".py"):
        found.append(folder / factory.rpartition(":")[0])
    weights = manifest.get("weights")
    if isinstance(weights, str):
        found.append(folder / weights)
    return found


def model_inputs(specs: Iterable[str]) -> list[Input]:
    """Every path the models ``specs`` are read from, resolved (a symlink loop is refused, named)."""
    out = []
    for spec in specs:
        for p in model_paths(spec):
            what = f"model {spec}" if str(p) == spec else f"model {spec} (its {p})"
            out.append(Input(real(p, what), what))
    return out


def file_inputs(flag: str, paths: Iterable[str | None]) -> list[Input]:
    """Data or rule files given with ``flag``, resolved."""
    return [Input(real(p, f"{flag} {p}"), f"{flag} {p}") for p in paths if p]


def check_outputs(outputs: Iterable[tuple[str, str | None]], inputs: Iterable[Input]) -> None:
    """Refuse an output (``(flag, path)``) that is, holds or lies inside an input; resolve symlinks first."""
    inputs = list(inputs)
    for flag, out in outputs:
        if not out:
            continue
        target = real(out, f"{flag} {out}")
        for inp in inputs:
            if target == inp.path:
                how = "is"
            elif inp.path in target.parents:
                how = "lies inside"
            elif target in inp.path.parents:
                how = "holds"
            else:
                continue
            raise FxfuseError(f"{flag} {out}: {how} the input {inp.what}; an output never replaces an input, "
                              "even with --force: choose another path")
