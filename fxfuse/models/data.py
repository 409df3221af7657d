"""Tensor files for calibration and evaluation (``.safetensors`` or a weights-only ``.pt``).

A calibration file holds one tensor of inputs ``(N, …)`` (token ids or images),
or several named ones, matched to the models' inputs by name
(``fxfuse.models.calibration``: ``input_ids``, ``decoder_input_ids``,
``attention_mask``, …; with one input, the tensor under ``inputs``,
``input_ids``, ``pixel_values``, ``x`` or ``images``); ``labels`` are left out.
An evaluation file holds inputs as above and ``labels`` (or ``y``): ``(N,)``
class ids, or ``(N, S)`` token ids for language models (``-100`` is ignored).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..core.checks import one_line
from ..core.errors import FxfuseError

INPUT_KEYS = ("inputs", "input_ids", "pixel_values", "x", "images")
LABEL_KEYS = ("labels", "y", "targets")


class PickledObjects(Exception):
    """A torch file holding Python objects (a pickled module), not only tensors."""

    def __str__(self) -> str:
        return ("it holds pickled Python objects, not only tensors (save a tensor, a dict of tensors or a state "
                "dict, or use .safetensors)")


def read_tensors(path: Path):
    """The content of a ``.safetensors`` file, or of a torch file read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PickledObjects() from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FxfuseError(f"{path}: no such file")
    try:
        data = read_tensors(path)
    except Exception as exc:
        raise FxfuseError(f"{path}: cannot read tensors: {one_line(exc)}") from None
    if isinstance(data, torch.Tensor):
        return {"inputs": data}
    if isinstance(data, (list, tuple)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return {"inputs": data[0], "labels": data[1]}
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()) and data:
        return dict(data)
    raise FxfuseError(f"{path}: expected a tensor, a pair (inputs, labels) or a mapping of tensors")


def _pick(data: dict[str, torch.Tensor], keys, path, what: str) -> torch.Tensor:
    for k in keys:
        if k in data:
            return data[k]
    if what == "inputs" and len(data) == 1:
        return next(iter(data.values()))
    raise FxfuseError(f"{path}: no {what} tensor (looked for {', '.join(keys)}; found {', '.join(sorted(data))})")


def load_calibration(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """The file's one input tensor, or its named input tensors (labels left out), each non-empty."""
    found = load_tensors(path)
    data = {k: v for k, v in found.items() if k not in LABEL_KEYS}
    if not data:
        raise FxfuseError(f"{path}: no inputs tensor (found only labels: {', '.join(sorted(found))})")
    for k, x in data.items():
        if x.dim() < 1 or x.shape[0] == 0:
            raise FxfuseError(f"{path}: calibration inputs{'' if len(data) == 1 else f' {k!r}'} are empty")
    return next(iter(data.values())) if len(data) == 1 else data


def load_labelled(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` with matching first dimensions, non-empty, labels integer."""
    data = load_tensors(path)
    x = _pick(data, INPUT_KEYS, path, "inputs")
    y = _pick(data, LABEL_KEYS, path, "labels")
    if x.dim() < 1 or x.shape[0] == 0:
        raise FxfuseError(f"{path}: inputs are empty")
    if y.shape[0] != x.shape[0]:
        raise FxfuseError(f"{path}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise FxfuseError(f"{path}: labels must be integer class or token ids, got {y.dtype}")
    return x, y
