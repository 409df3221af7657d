"""Running ``fxfuse.commands.cli.main`` in-process in tests, and snapshots of what it may have written."""
from __future__ import annotations

from pathlib import Path


def run(capsys, *argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of one command."""
    from fxfuse.commands.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under ``root`` (hidden ones included) with its bytes, and every directory (``None``)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(capsys, root: Path, *argv) -> str:
    """Run a command that must fail: exit 2, nothing on stdout, one line on stderr, nothing under ``root``
    written or changed. Returns the line without its ``fxfuse: error: `` prefix."""
    before = snapshot(root)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, ""), err
    assert err.startswith("fxfuse: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert snapshot(root) == before
    return err[len("fxfuse: error: "):-1]
