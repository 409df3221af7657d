"""Safe output paths: checked up front, written to a temporary sibling, renamed into place.

* ``check_output_path`` refuses, with one line and before any work, a path
  that exists (unless ``force``), a directory or file ``force`` would replace
  that fxfuse did not write, a path through a symlink loop, the working directory or one above it, a parent that
  is missing or not writable.
* ``temp_dir`` / ``temp_file`` make the sibling with the permissions a plain
  ``mkdir`` / ``open`` would give (not ``mkdtemp``'s 0700 / 0600).
* ``replace`` and ``discard`` run with SIGINT and SIGTERM held back, so a
  signal cannot leave a half-renamed output or a hidden sibling behind;
  ``interrupts`` turns SIGTERM into ``Terminated`` (a ``KeyboardInterrupt``)
  so that the same cleanup runs for both.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from ..core.errors import FxfuseError

MANIFEST = "fxfuse.json"
REPORT = "report.json"
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanup code runs."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_fxfuse_output(path: Path) -> bool:
    """A directory fxfuse wrote: it holds ``fxfuse.json`` or fxfuse's ``report.json``."""
    if (path / MANIFEST).is_file():
        return True
    return is_fxfuse_report(path / REPORT)


def is_fxfuse_report(path: Path) -> bool:
    """A file holding a report fxfuse wrote (JSON with its ``fxfuse`` provenance, or a report's own keys)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and ("fxfuse" in report or {"self_check", "spaces"} <= set(report))


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _is_graph_text(path: Path) -> bool:
    """DOT (``[strict] [di]graph``), GraphML, or node-link JSON, as ``explain --dot/--graph`` write them."""
    head = _head(path).lstrip()
    if head.startswith((b"graph", b"digraph", b"strict")) or b"<graphml" in head:
        return True
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "nodes" in data


OWNED = {  # files fxfuse writes, and how to know one it wrote (--force replaces nothing else)
    "report": (is_fxfuse_report, "a report"),
    "graph": (_is_graph_text, "a graph file"),
    "plot": (lambda p: _head(p, 8) == b"\x89PNG\r\n\x1a\n", "a PNG plot"),
}


def check_output_path(out: str | Path, force: bool, directory: bool = False, owned: str | None = None) -> Path:
    """Refuse (one line) any output path that cannot or must not be written; call before any work.

    ``directory``: ``out`` is a model directory (``--force`` replaces only an earlier fxfuse output);
    ``owned``: a key of ``OWNED``, the kind of file ``--force`` may replace (one fxfuse wrote).
    """
    from ..core.guard import real

    out = Path(out)
    name = str(out)
    resolved = real(out)
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FxfuseError(f"{name}: is the working directory or holds it; choose a new path")
    if out.exists() or out.is_symlink():
        if not force:
            raise FxfuseError(f"{name}: already exists (use --force to replace it)")
        if directory and not out.is_dir():
            raise FxfuseError(f"{name}: exists and is not a directory; refusing to replace it")
        if directory and not is_fxfuse_output(out):
            raise FxfuseError(f"{name}: is not an fxfuse output (no {MANIFEST} or fxfuse {REPORT}); "
                              "refusing to replace it")
        if not directory and out.is_dir():
            raise FxfuseError(f"{name}: is a directory; refusing to replace it with a file")
        if not directory and owned is not None and not OWNED[owned][0](out):
            raise FxfuseError(f"{name}: is not {OWNED[owned][1]} written by fxfuse; refusing to replace it")
    parent = out.parent
    if not parent.exists():
        raise FxfuseError(f"{parent}: no such directory")
    if not parent.is_dir():
        raise FxfuseError(f"{parent}: not a directory")
    try:  # the only sure test of writability (root, read-only mounts): make a file there
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FxfuseError(f"{name}: cannot write in {parent}: {exc.strerror or exc}") from None
    return out


def write_failure(out: Path, exc: BaseException) -> BaseException:
    """A failure while writing ``out`` as one line naming it and the cause (a full disk, a file-size limit,
    an I/O error), or ``exc`` itself where it is no write failure."""
    import re

    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc)
    elif type(exc).__name__ == "SafetensorError" and (code := re.search(r"os error (\d+)", str(exc))):
        cause = os.strerror(int(code.group(1)))
    else:
        return exc
    return FxfuseError(f"{out}: cannot write it: {cause}; nothing was written")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered when the block ends; POSIX only)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def temp_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out`` with a plain ``mkdir``'s permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def temp_file(out: Path) -> tuple[int, Path]:
    """``(fd, path)`` of a hidden sibling file of ``out`` (same suffix) with a plain ``open``'s permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, Path(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard(tmp: Path) -> None:
    """Remove a temporary sibling, signals held so that the removal completes."""
    with signals_held():
        _remove(tmp)


def _plain_modes(tmp: Path) -> None:
    """Files in a temporary directory get a plain ``open``'s permissions (some writers use 0600)."""
    mode = 0o666 & ~_umask()
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (``--force``) is removed only after the move succeeds."""
    if tmp.is_dir():
        _plain_modes(tmp)
    with signals_held():
        if not out.exists():
            os.replace(tmp, out)
            return
        backup = out.with_name(f".{out.name}.old")
        if backup.exists():
            _remove(backup)
        os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(backup, out)
            raise
        _remove(backup)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while the block runs (SIGINT already interrupts)."""
    def on_term(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
