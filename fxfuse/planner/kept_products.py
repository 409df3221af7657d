"""Kept products: similarity products held with the maps they were made with, in memory or in a scratch file.

A weight-matching block's cost is a sum of per-piece products ``T_d S'_dᵀ``
(``fxfuse.planner.weight_cost``), each a function of the maps of the piece's
other spaces. ``KeptProducts`` keeps each product under its piece and dim
with a *tag* (those maps): ``get`` returns it, the same bits, while the tag
is unchanged. Up to ``room`` bytes stay in memory, first come first kept
(``put``: once the room is full, a stale product gives its place to the
next, so that it goes to the products whose maps settle); the others go to
an unnamed scratch file (removed by the system when it is closed; at most
``spill`` bytes and half the free space of its disk) and are read back on
use, so peak memory stays bounded while products whose maps did not change
are not made again. Without room in either, the product is not kept.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

SPILL_BYTES = 16 << 30  # scratch file limit: 16 GiB


@dataclass
class _Entry:
    tag: tuple
    tensor: torch.Tensor | None      # held in memory, or ``None`` when in the scratch file
    offset: int                      # its place in the scratch file (``-1``: in memory)
    shape: tuple[int, ...]
    dtype: torch.dtype
    reused: int = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


class KeptProducts:
    """Products under ``key`` (piece, dim) with a ``tag``; ``room`` bytes in memory, up to ``spill`` in a file."""

    def __init__(self, room: int, spill: int = SPILL_BYTES, same: Callable[[tuple, tuple], bool] | None = None):
        """``same(tag_a, tag_b)``: whether two tags are equal (default ``==``)."""
        self.room, self.spill = room, spill
        self.same = same or (lambda a, b: a == b)
        self.entries: dict[Hashable, _Entry] = {}
        self.held = 0          # bytes in memory
        self.spilled = 0       # bytes written to the scratch file (its size)
        self.stale: dict[Hashable, int] = {}  # key -> times its product in memory was found stale
        self.refused = 0       # products the memory room turned away (or stale ones it dropped)
        self._file = None

    def get(self, key: Hashable, tag: tuple) -> torch.Tensor | None:
        """The product kept under ``key`` if it was made with ``tag``, else ``None``."""
        e = self.entries.get(key)
        if e is None or not self.same(e.tag, tag):
            return None
        e.reused += 1
        return e.tensor if e.tensor is not None else self._read(e)

    def put(self, key: Hashable, tag: tuple, product: torch.Tensor) -> bool:
        """Keep ``product`` (on the CPU, contiguous) under ``key``, in place of what was there. Whether it is kept.

        A stale product takes its old slot, in the file or in memory; once the room has
        turned a product away, a stale product in memory is dropped from it instead, so
        that the room goes to the products whose maps settle first: one found stale
        twice so is kept in memory no more (in the scratch file if there is one)."""
        shape, dtype = tuple(product.shape), product.dtype
        size = _nbytes(shape, dtype)
        old = self.entries.get(key)
        if old is not None:
            same_size = old.nbytes == size
            if same_size and old.tensor is not None and not self.refused:
                old.tag, old.tensor, old.shape, old.dtype, old.reused = tag, product, shape, dtype, 0
                return True
            if same_size and old.tensor is None:
                old.tag, old.shape, old.dtype, old.reused = tag, shape, dtype, 0
                if self._write(product, old.offset):
                    return True
            self._drop(key)
            if old.tensor is not None:
                self.stale[key] = self.stale.get(key, 0) + 1
        elif self.stale.get(key, 0) < 2 and self.held + size <= self.room:
            self.held += size
            self.entries[key] = _Entry(tag, product, -1, shape, dtype)
            return True
        self.refused += 1
        if self.spilled + size <= self.spill and self._write(product, self.spilled):
            self.entries[key] = _Entry(tag, None, self.spilled, shape, dtype)
            self.spilled += size
            return True
        return False

    def close(self) -> None:
        """Drop every product and the scratch file."""
        self.entries.clear()
        self.held = self.spilled = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drop(self, key: Hashable) -> None:
        e = self.entries.pop(key)
        if e.tensor is not None:
            self.held -= e.nbytes

    def _write(self, product: torch.Tensor, offset: int) -> bool:
        """Write ``product``'s bytes at ``offset`` of the scratch file; ``False`` (and no more spilling) on failure."""
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile()
                # never more than half the free space of the disk it is on
                self.spill = min(self.spill, shutil.disk_usage(tempfile.gettempdir()).free // 2)
                if offset + product.numel() * product.element_size() > self.spill:
                    return False
            view = memoryview(product.contiguous().numpy()).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(self._file.fileno(), view[done:], offset + done)
            return True
        except OSError:  # a full disk: the products are made again instead
            self.spill = self.spilled
            return False

    def _read(self, e: _Entry) -> torch.Tensor:
        out = torch.empty(e.shape, dtype=e.dtype)
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], e.offset + done)
            if got <= 0:
                raise OSError("the scratch file of kept products is shorter than written")
            done += got
        return out

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n
