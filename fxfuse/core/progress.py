"""Progress bars for long steps, behind the ``progress`` callables the API takes.

Library code calls ``bar(progress, "solving", total)``; a progress object
with a ``bar(description, total)`` method (the command line's) draws one
(tqdm, with rate and ETA), anything else gets a bar that does nothing.
"""
from __future__ import annotations

from typing import Any, Callable


class NoBar:
    """A bar that draws nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(progress: Callable[[str], None] | None, description: str, total: int | None) -> Any:
    """A bar from ``progress`` if it draws bars, else ``NoBar``; use as a context manager, ``update(n)``."""
    make = getattr(progress, "bar", None)
    return make(description, total) if callable(make) else NoBar()


def tqdm_bar(description: str, total: int | None, file, disable: bool) -> Any:
    """A tqdm bar on ``file`` that leaves no line behind."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=file, disable=disable, leave=False, dynamic_ncols=True,
                mininterval=0.5)
