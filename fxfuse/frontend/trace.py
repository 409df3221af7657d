"""Capture a model as a torch.fx graph at ATen level with ``torch.export``.

``trace(model, args)`` returns a ``TracedModel``: the exported graph, which
placeholder is which parameter / buffer / input (by state-dict name), and the
aliases of tied parameters (one tensor under several state-dict names).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.errors import TraceError

USER_INPUT, PARAMETER, BUFFER, CONSTANT = "input", "parameter", "buffer", "constant"


def op_name(target: Any) -> str:
    """The name rules use for a node's target: ``aten.linear.default``, ``higher_order.cond``, ``module.fn``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"{getattr(target, 'namespace', 'higher_order')}.{target.name()}"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', str(target))}".strip(".")


ASSERT_METADATA = "aten._assert_tensor_metadata.default"  # export's dtype/device assertions: they read, never use


def call_op(n: Any) -> str:
    """``str(target)`` of a ``call_function`` node (``aten.mul.Tensor``), ``""`` for anything else."""
    return str(n.target) if isinstance(n, torch.fx.Node) and n.op == "call_function" else ""


def node_shape(n: Any) -> tuple[int, ...] | None:
    """The traced shape of a node's tensor value, ``None`` where it has none."""
    val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


@dataclass(frozen=True)
class Placeholder:
    """A graph input: ``kind`` is input/parameter/buffer/constant; ``target`` its state-dict name."""

    name: str
    kind: str
    target: str | None
    persistent: bool = True


@dataclass(frozen=True)
class TracedModel:
    module: nn.Module
    args: tuple
    kwargs: Mapping[str, Any]
    graph_module: torch.fx.GraphModule
    placeholders: Mapping[str, Placeholder]
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exported: Any = None  # the torch.export.ExportedProgram

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph


def tied_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{canonical name: (other names of the same tensor, ...)}`` over parameters and buffers."""
    groups: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    return {names[0]: tuple(names[1:]) for names in groups.values() if len(names) > 1}


@contextlib.contextmanager
def _no_logging() -> Iterator[None]:
    """torch.export logs pages of graph code and guards before it raises: its failure is one line here."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def trace(model: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> TracedModel:
    """Export ``model`` in eval mode on ``args``; raises ``TraceError`` with a hint on failure."""
    kwargs = dict(kwargs or {})
    was_training = model.training
    forget_derived(model).eval()  # the graph reads the parameters, not a tensor cached from them
    try:
        with warnings.catch_warnings(), _no_logging():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one line
        raise TraceError(_explain_failure(model, exc)) from exc
    finally:
        model.train(was_training)
    sig = ep.graph_signature
    placeholders: dict[str, Placeholder] = {}
    for spec in sig.input_specs:
        name = spec.arg.name if hasattr(spec.arg, "name") else None
        if name is None:
            continue
        kind = {
            "PARAMETER": PARAMETER, "BUFFER": BUFFER, "CONSTANT_TENSOR": CONSTANT,
            "CUSTOM_OBJ": CONSTANT, "TOKEN": CONSTANT,
        }.get(spec.kind.name, USER_INPUT)
        persistent = bool(spec.persistent) if kind == BUFFER else kind == PARAMETER
        placeholders[name] = Placeholder(name, kind, spec.target, persistent)
    return TracedModel(model, tuple(args), kwargs, ep.graph_module, placeholders, tied_aliases(model), ep)


def _explain_failure(model: nn.Module, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    first = text.split(". ")[0][:240] if text else type(exc).__name__
    hint = "models must be exportable with torch.export (no data-dependent Python control flow)"
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) or "cache" in text.lower():
        hint = "for decoder models set use_cache=False in the config"
    elif "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        hint = "a Python branch depends on tensor values; rewrite it with torch.where or torch.cond"
    return f"cannot trace {type(model).__name__}: {type(exc).__name__}: {first} (hint: {hint})"
