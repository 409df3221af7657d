"""Errors that reach the user as one line."""
from __future__ import annotations


class FxfuseError(Exception):
    """A user-facing error: ``str(err)`` is one line naming what is at fault."""


class RuleError(FxfuseError):
    """A rule file is malformed: names the file, rule index and field."""

    def __init__(self, path: str, index: int | None, field: str | None, message: str):
        where = str(path)
        if index is not None:
            where += f": rule {index}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.index, self.field = path, index, field


class TraceError(FxfuseError):
    """A model could not be captured as a graph."""


class SpecError(FxfuseError):
    """A model spec could not be loaded."""


class StrictError(FxfuseError):
    """``strict=True`` and some op had no rule."""


class UnsoundError(FxfuseError):
    """A moved copy of a model computes something else: names the space, its ops and their rules."""


class InputCheckError(FxfuseError):
    """A check the traced model makes on its inputs (``aten._assert_scalar``) fails on samples other than
    the example: names the node and the check."""
