"""Evaluation of a model on labelled data: classification accuracy and loss from the model's own head."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def _call(model: nn.Module, x: torch.Tensor, like) -> Any:
    """Call ``model`` on ``x`` placed where ``like`` (a LoadedModel or None) puts its main input."""
    if like is not None and like.kwargs and not like.args:
        key = next(iter(like.kwargs))
        return model(**{key: x})
    return model(x)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, like=None, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    outs = [logits_of(_call(model, x[i:i + batch_size], like)) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, like=None) -> float:
    """Share of samples (or non-ignored tokens) whose arg-max logit is the label."""
    logits = predict(model, x, like)
    if logits.dim() == y.dim() + 1:
        mask = y != -100
        return float(((logits.argmax(-1) == y) & mask).sum() / mask.sum().clamp(min=1))
    raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit labels of shape {tuple(y.shape)}")


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, like=None) -> float:
    logits = predict(model, x, like)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100))
