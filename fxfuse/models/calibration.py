"""Calibration batches: every batched input of the example, cut from the same samples.

An input is *batched* when it is a tensor whose first dim is the batch size ``B``
of the first tensor input (token ids, attention masks, decoder ids, images).
Calibration data is one of

* ``N``: ``N`` random samples of every batched input (floats ``~ N(0, 1)``;
  integers uniform over the example's range, so a mask of ones stays ones);
* a tensor ``(N, …)``: the samples of the one batched input (shaped like the
  example; token ids ``(N, S)`` of any length ``S``);
* a mapping ``{name: (N, …)}``: inputs by the name of ``forward``'s parameter
  (positional inputs) or keyword; a name that ``forward`` takes but the example
  leaves out is added as a keyword argument (an ``attention_mask``). With one
  unnamed tensor, or one under a generic key (``inputs``, ``input_ids``,
  ``pixel_values``, ``x``, ``images``), it is the first batched input.

Batch ``b`` holds samples ``[b·n, (b+1)·n)`` of every input, ``n = max(B,
CALIB_BATCH)`` (at most ``N``); an incomplete last batch is dropped.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.errors import FxfuseError
from .data import INPUT_KEYS, LABEL_KEYS

CALIB_BATCH = 16  # calibration batch size: the models are traced once more at this shape
DEFAULT_CALIB_RANDOM = 256  # random calibration inputs when none are given

Calibration = torch.Tensor | int | Mapping[str, torch.Tensor] | None


class CalibrationError(FxfuseError):
    """Calibration data that does not fit the models' inputs."""


@dataclass(frozen=True, eq=False)  # identity: two slots never compare equal
class Slot:
    """One input of the example: ``key`` a position or a keyword, ``name`` how data files call it."""

    key: int | str
    name: str
    example: torch.Tensor | None  # None: a keyword the example leaves out


def forward_names(model: torch.nn.Module) -> tuple[tuple[str, ...], frozenset[str]]:
    """``(positional parameter names in order, every parameter name)`` of ``model.forward``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return (), frozenset()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return positional, named


def batched_inputs(args: tuple, kwargs: Mapping[str, Any], positional: Sequence[str] = ()) -> list[Slot]:
    """The example's batched tensor inputs, the first tensor input first."""
    slots = [Slot(i, positional[i] if i < len(positional) else f"arg{i}", a)
             for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    slots += [Slot(k, k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    if not slots:
        raise CalibrationError("the example inputs hold no tensor")
    batch = slots[0].example.shape[0] if slots[0].example.dim() else None
    return [s for s in slots if s is slots[0] or (s.example.dim() and s.example.shape[0] == batch)]


def _random(example: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    shape = (n,) + tuple(example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=g, dtype=example.dtype)
    lo, hi = int(example.min()), int(example.max()) + 1
    return torch.randint(lo, max(hi, lo + 1), shape, generator=g).to(example.dtype)


def _match(calib: Mapping[str, torch.Tensor], slots: list[Slot], accepted: frozenset[str]) -> dict[Slot, torch.Tensor]:
    """Mapping entries matched to input slots by name (see the module doc)."""
    data = {k: v for k, v in calib.items() if k not in LABEL_KEYS}
    by_name = {s.name: s for s in slots}
    out: dict[Slot, torch.Tensor] = {}
    for k in list(data):
        if k in by_name:
            out[by_name[k]] = data.pop(k)
        elif k in accepted:
            out[Slot(k, k, None)] = data.pop(k)
    main = slots[0]
    if main not in out:
        generic = [k for k in INPUT_KEYS if k in data] or (list(data) if len(data) == 1 and not out else [])
        if generic:
            out[main] = data.pop(generic[0])
    names = ", ".join(s.name for s in slots)
    if data:
        raise CalibrationError(f"calibration data has {', '.join(repr(k) for k in sorted(data))}, which names no "
                               f"input of the models (they take {names})")
    missing = [s.name for s in slots if s not in out]
    if missing:
        raise CalibrationError(f"calibration data has no {', '.join(repr(m) for m in missing)} (the models take "
                               f"{names}; give one tensor per input, by name)")
    return out


def _check(name: str | None, x: Any, example: torch.Tensor | None) -> torch.Tensor:
    """``x`` checked against its example input; ``name`` is said where there are several inputs."""
    what = "calibration data" + (f" for {name!r}" if name else "")
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"{what} must be a tensor")
    if x.dim() < 1 or x.shape[0] == 0:
        raise CalibrationError(f"{what} is empty")
    if example is not None:
        token_ids = x.dim() == example.dim() == 2 and not example.is_floating_point()  # any sequence length
        if tuple(x.shape[1:]) != tuple(example.shape[1:]) and not token_ids:
            raise CalibrationError(f"{what} has shape {tuple(x.shape)}; the models take "
                                   f"(N, {', '.join(map(str, example.shape[1:]))})")
        if x.is_floating_point() != example.is_floating_point():
            raise CalibrationError(f"{what} has dtype {x.dtype}; the models take "
                                   f"{example.dtype}")
        x = x.to(example.dtype)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError(f"{what} holds NaN or inf")
    return x


def main_input(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int | str, torch.Tensor]:
    """The first tensor among the inputs: its position or name, and the tensor."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise CalibrationError("the example inputs hold no tensor")


def with_input(args: tuple, kwargs: Mapping[str, Any], key: int | str, value: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the input at ``key`` (a position or a keyword) replaced by ``value``."""
    args, kwargs = list(args), dict(kwargs)
    if isinstance(key, int):
        args[key] = value
    else:
        kwargs[key] = value
    return tuple(args), kwargs


def samples(calib: Calibration) -> int:
    """How many samples ``calib`` holds: the random count (``None``: the default), the tensor's rows, or
    the first named input's (named inputs must agree; ``calibration_batches`` checks that)."""
    if calib is None or isinstance(calib, int):
        return DEFAULT_CALIB_RANDOM if calib is None else int(calib)
    first = next(iter(calib.values())) if isinstance(calib, Mapping) else calib
    return int(first.shape[0])


def calibration_batches(calib: Calibration, args: tuple, kwargs: Mapping[str, Any], seed: int = 0,
                        forward: Callable | torch.nn.Module | None = None) -> list[tuple[tuple, dict]]:
    """Batches ``(args, kwargs)`` shaped like the example, every batched input from the same samples.

    ``forward``: the model (or its ``forward``) whose parameter names name the inputs of a mapping.
    """
    positional, accepted = forward_names(forward) if forward is not None else ((), frozenset())
    slots = batched_inputs(args, kwargs, positional)
    if calib is None or isinstance(calib, int):
        n = DEFAULT_CALIB_RANDOM if calib is None else int(calib)
        if n < 1:
            raise CalibrationError(f"--calib-random {n}: need at least one sample")
        g = torch.Generator().manual_seed(seed)
        data = {s: _random(s.example, n, g) for s in slots}
    elif isinstance(calib, Mapping):
        data = {s: _check(s.name, x, s.example) for s, x in _match(calib, slots, accepted).items()}
    else:
        if len(slots) > 1:
            raise CalibrationError(f"the models take {len(slots)} batched inputs ({', '.join(s.name for s in slots)}): "
                                   "give calibration data with one tensor per input, by name")
        data = {slots[0]: _check(None, calib, slots[0].example)}
    sizes = {s.name: int(x.shape[0]) for s, x in data.items()}
    if len(set(sizes.values())) > 1:
        raise CalibrationError("calibration inputs have different numbers of samples ("
                               + ", ".join(f"{k}: {v}" for k, v in sizes.items()) + ")")
    n = next(iter(sizes.values()))
    example = slots[0].example
    batch = min(max(example.shape[0] if example.dim() else 1, CALIB_BATCH), n)
    out = []
    for b in range(n // batch):
        a, kw = tuple(args), dict(kwargs)
        for slot, x in data.items():
            a, kw = with_input(a, kw, slot.key, x[b * batch:(b + 1) * batch])
        out.append((a, kw))
    return out
