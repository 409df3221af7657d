"""Checks of user data against the loaded models, run before any tracing or solving.

Each raises ``FxfuseError`` with one line naming the file (or model) at fault:
weights that hold NaN or inf, labelled data whose inputs the model cannot
take (shape, dtype, token ids beyond the vocabulary, sequences longer than the
positions) or whose labels lie outside its classes, and calibration sets too
small for a correlation.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from .errors import FxfuseError

IGNORE = -100  # label of a token or sample that no loss or accuracy reads
MIN_CALIB_INPUTS = 2  # a Pearson correlation needs two samples; one gives no signal at all

T = TypeVar("T")


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def guarded(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, any failure but ``FxfuseError`` turned into one line starting with ``what``."""
    try:
        return fn()
    except FxfuseError:
        raise
    except Exception as exc:
        raise FxfuseError(f"{what}: {one_line(exc)}") from None


def check_finite_weights(module: nn.Module, spec: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = "NaN" if torch.isnan(t).any() else "inf"
            raise FxfuseError(f"{spec}: the weights hold {bad} ({name}); a model with non-finite weights "
                              "cannot be checked")


def _config_limits(module: nn.Module) -> tuple[int | None, int | None]:
    """``(vocabulary size, positions)`` of a Hugging Face model, else ``None``s."""
    config = getattr(module, "config", None)
    vocab = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return vocab, positions


def check_inputs(module: nn.Module, x: torch.Tensor, where: str) -> None:
    """Token ids within the vocabulary and sequences within the positions (for models with a config)."""
    if x.is_floating_point() or x.dtype == torch.bool or x.numel() == 0:
        return
    if int(x.min()) < 0:
        raise FxfuseError(f"{where}: negative token id {int(x.min())} in the inputs")
    vocab, positions = _config_limits(module)
    if vocab and int(x.max()) >= vocab:
        raise FxfuseError(f"{where}: token id {int(x.max())} is beyond the model's vocabulary ({vocab} tokens)")
    if positions and x.dim() >= 2 and x.shape[-1] > positions:
        raise FxfuseError(f"{where}: sequences of {x.shape[-1]} tokens are longer than the model's "
                          f"{positions} positions")


def check_labels(logits: torch.Tensor, y: torch.Tensor, where: str, shift: bool = False) -> None:
    """Labels fit the logits' shape and lie in ``[0, classes)`` (``-100`` ignored)."""
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    if logits.dim() != y.dim() + 1 or tuple(logits.shape[1:-1]) != tuple(y.shape[1:]):
        raise FxfuseError(f"{where}: labels of shape {tuple(y.shape)} do not fit the model's outputs "
                          f"({tuple(logits.shape)} for {logits.shape[0]} samples)")
    classes = logits.shape[-1]
    used = y[y != IGNORE]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= classes):
        raise FxfuseError(f"{where}: labels range over {int(used.min())}..{int(used.max())} but the model has "
                          f"{classes} classes (0..{classes - 1}; {IGNORE} is ignored)")


def check_calibration_size(inputs: int, where: str) -> None:
    """At least ``MIN_CALIB_INPUTS`` inputs: with one, no unit varies and every correlation is 0."""
    if inputs < MIN_CALIB_INPUTS:
        raise FxfuseError(f"{where}: {inputs} calibration input is too few for a correlation (at least "
                          f"{MIN_CALIB_INPUTS} are needed; a few hundred give a useful one)")
