"""The tensors of a safetensors checkpoint, read one at a time on access.

One ``model.safetensors`` file, or shards listed by ``model.safetensors.index.json``
(as Hugging Face writes them). Reading a tensor opens its file and closes it
again; shapes and dtypes come from the headers, without reading a tensor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..core.checks import one_line
from ..core.errors import SpecError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors checkpoint, read on access (each read opens and closes its file).

    ``files`` maps each key to its file; ``aliases`` maps other state-dict names
    to a stored key (tied weights are stored once); ``dtype`` casts floating
    tensors on reading.
    """

    def __init__(self, files: Mapping[str, Path], aliases: Mapping[str, str] | None = None,
                 dtype: torch.dtype | None = None):
        self.files, self.aliases, self.dtype = dict(files), dict(aliases or {}), dtype
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    @classmethod
    def from_dir(cls, path: Path, dtype: torch.dtype | None = None) -> "CheckpointTensors | None":
        """A checkpoint directory's tensors (index or single file); ``None`` if it has no safetensors."""
        from safetensors import safe_open

        path = Path(path)
        if (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SpecError(f"{path / INDEX}: unreadable index ({type(exc).__name__}: {exc})") from None
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing:
                raise SpecError(f"{path / INDEX}: names shard {missing[0]}, which is not there")
            return cls({k: path / f for k, f in weight_map.items()}, dtype=dtype)
        if (path / WEIGHTS).is_file():
            try:
                with safe_open(str(path / WEIGHTS), "pt") as f:
                    return cls({k: path / WEIGHTS for k in f.keys()}, dtype=dtype)
            except Exception as exc:  # a truncated or corrupt header
                raise SpecError(f"{path / WEIGHTS}: not a readable safetensors file ({one_line(exc)})") from None
        return None

    def with_aliases(self, aliases: Mapping[str, str]) -> "CheckpointTensors":
        return CheckpointTensors(self.files, {**self.aliases, **aliases}, self.dtype)

    def _key(self, name: str) -> str:
        if name in self.files:
            return name
        if name in self.aliases and self.aliases[name] in self.files:
            return self.aliases[name]
        raise KeyError(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self._key(name)
        with safe_open(str(self.files[key]), "pt") as f:
            t = f.get_tensor(key)
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.files or self.aliases.get(name) in self.files)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    holds_tensors = False

    def _header(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        from safetensors import safe_open

        key = self._key(name)
        if key not in self._meta:
            with safe_open(str(self.files[key]), "pt") as f:
                sl = f.get_slice(key)
                self._meta[key] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
        return self._meta[key]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._header(name)[0]

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype as stored."""
        return self._header(name)[1]

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype as read (after the cast)."""
        stored = self.stored_dtype(name)
        return self.dtype if self.dtype is not None and stored.is_floating_point else stored
