"""A model's head: which loss its output is read with, and that loss.

Three heads: classification (logits ``(N, C)``, labels ``(N,)``), masked LM
(logits ``(N, S, V)``, labels ``(N, S)`` with ``-100`` ignored) and causal LM
(the same, shifted by one token: position ``t`` predicts label ``t + 1``).
The loss is the mean cross-entropy over the scored positions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import FxfuseError
from .evaluate import logits_of

HEADS = ("classification", "mlm", "causal")


def detect_head(model: nn.Module) -> str:
    """The head its class name says: ``…CausalLM``/``…LMHead`` causal, ``…MaskedLM``/``…ForPreTraining``
    masked LM, anything else classification."""
    name = type(model).__name__
    if "CausalLM" in name or "LMHead" in name:
        return "causal"
    if "MaskedLM" in name or "ForPreTraining" in name:
        return "mlm"
    return "classification"


def scored(logits: torch.Tensor, labels: torch.Tensor, head: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (M, V), labels (M,))`` of every scored position (causal LM: shifted by one token)."""
    logits = logits.float()
    if head == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise FxfuseError(f"logits of shape {tuple(logits.shape)} do not fit labels of shape {tuple(labels.shape)} "
                          f"(head '{head}')")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def head_loss(out: Any, labels: torch.Tensor, head: str) -> torch.Tensor:
    """Mean cross-entropy of a model output over its labelled positions (differentiable)."""
    flat, target = scored(logits_of(out), labels, head)
    return F.cross_entropy(flat, target, ignore_index=-100)


def call_on(model: nn.Module, x: torch.Tensor, input_key: str | None) -> Any:
    """``model`` run on ``x`` (as the keyword ``input_key`` where given)."""
    return model(**{input_key: x}) if input_key else model(x)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, head: str,
             input_key: str | None = None, batch_size: int = 32) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` over the labelled tokens or samples, in batches."""
    model.eval()
    total_loss, total_right, total_n = 0.0, 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
        flat, target = scored(logits_of(call_on(model, x, input_key)), y, head)
        mask = target != -100
        n = int(mask.sum())
        if n == 0:
            continue
        total_loss += float(F.cross_entropy(flat, target, ignore_index=-100, reduction="sum"))
        total_right += float(((flat.argmax(-1) == target) & mask).sum())
        total_n += n
    if total_n == 0:
        raise FxfuseError("the data has no labelled token or sample (all labels are -100)")
    return total_loss / total_n, total_right / total_n
