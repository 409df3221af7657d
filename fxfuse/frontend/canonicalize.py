"""Canonicalising pass: fold per-channel norm scales into the linear layers that read them.

``y = LN(x)·γ + β`` read only by linear layers ``z = W y + b`` equals
``LN(x)`` read by ``W' = W·diag(γ)``, ``b' = b + W β``. After the fold the norm
keeps ``γ = 1`` (and ``β = 0`` where every reader has a bias to take it, else
``β/γ``: a shift moves with the space as a vector), so it
commutes with orthogonal maps again (``fxfuse.frontend.groups``). The same holds for
RMSNorm and for a per-channel scale written as ``weight * h`` (HF's RMSNorm).

A scale is left alone, and the reason kept for ``explain``, where a fold is
impossible: its output is also read by something other than a linear layer
(a residual add, as in post-norm BERT), reaches a graph output, or a reader's
weight is tied to another use (the fold would untie it). With ``untie=True``
such a reader gets its own copy of the weight first (the module keeps its
class; an HF config's ``tie_word_embeddings`` becomes false) and the fold
goes ahead; every untied weight is reported.

The pass works on a traced model and returns a new module of the same class
(``load_state_dict(strict=True)``), checked to compute what the original did.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.errors import FxfuseError
from .trace import PARAMETER, TracedModel
from .verify import CHECK_TOL, compare_outputs

NORMS = {"aten.layer_norm.default": (2, 3), "aten.rms_norm.default": (2, None),
         "aten.native_layer_norm.default": (2, 3)}  # op -> (weight position, bias position)
PASS_THROUGH = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.clone.default",
                "aten.contiguous.default", "aten.to.dtype", "aten._to_copy.default", "aten.alias.default",
                "aten.dropout.default", "aten.select.int", "aten.slice.Tensor", "aten.expand.default",
                "aten.unsqueeze.default", "aten.squeeze.dim", "aten.type_as.default"}

MOVES_OTHER_AXES = {"aten.transpose.int", "aten.permute.default"}  # pass through while the last axis stays last


@dataclass(frozen=True)
class Fold:
    """``scale`` (and ``shift``, where it was folded too) moved into the weights of ``readers``."""

    scale: str
    shift: str | None
    readers: tuple[str, ...]
    untied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    scale: str
    node: str
    reason: str


@dataclass(frozen=True)
class Canonical:
    module: nn.Module
    folds: tuple[Fold, ...]
    refused: tuple[Refusal, ...]
    error: float  # relative output change of the folded model (≤ CHECK_TOL)

    def report(self) -> dict:
        return {"folded": [{"scale": f.scale, "shift": f.shift, "readers": list(f.readers), "untied": list(f.untied)}
                           for f in self.folds],
                "refused": [{"scale": r.scale, "node": r.node, "reason": r.reason} for r in self.refused],
                "error": self.error}


def _param(traced: TracedModel, node) -> str | None:
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    ph = traced.placeholders.get(node.name)
    return ph.target if ph is not None and ph.kind == PARAMETER else None


def _scale_sites(traced: TracedModel):
    """``(output node, scale param, shift param or None, width)`` for every per-channel scale in the graph."""
    for node in traced.graph.nodes:
        if node.op != "call_function":
            continue
        op = str(node.target)
        if op in NORMS:
            wpos, bpos = NORMS[op]
            shape = node.args[1] if len(node.args) > 1 else None
            weight = node.args[wpos] if len(node.args) > wpos else node.kwargs.get("weight")
            bias = (node.args[bpos] if bpos is not None and len(node.args) > bpos else node.kwargs.get("bias"))
            gamma = _param(traced, weight)
            if gamma is None or not isinstance(shape, (list, tuple)) or len(shape) != 1:
                continue
            out = node
            if op == "aten.native_layer_norm.default":
                outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
                if len(outs) != 1:
                    continue
                out = outs[0]
            yield out, gamma, _param(traced, bias), int(shape[0])
        elif op == "aten.mul.Tensor" and len(node.args) == 2:
            for a, b in (node.args, node.args[::-1]):
                gamma = _param(traced, a)
                val, other = getattr(a, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
                if (gamma is not None and val is not None and other is not None and val.dim() == 1
                        and other.dim() >= 1 and other.shape[-1] == val.shape[0] and val.shape[0] > 1):
                    yield node, gamma, None, int(val.shape[0])
                    break


def _readers(traced: TracedModel, out, width: int):
    """The linear readers ``(kind, weight, bias)`` of ``out`` along its last axis, or a reason there are none."""
    readers, stack, seen = [], [out], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            op = str(user.target) if user.op == "call_function" else user.op
            if op == "aten.linear.default" and user.args[0] is node:
                w = _param(traced, user.args[1])
                b = _param(traced, user.args[2]) if len(user.args) > 2 else None
                if w is None:
                    return None, f"read by {op} at {user.name} whose weight is not a parameter"
                readers.append(("linear", w, b, _module_of(user)))
            elif op == "aten.addmm.default" and user.args[1] is node:
                w, b = _param(traced, user.args[2]), _param(traced, user.args[0])
                if w is None:
                    return None, f"read by {op} at {user.name} whose weight is not a parameter"
                readers.append(("addmm", w, b, _module_of(user)))
            elif op in MOVES_OTHER_AXES:  # a transpose or permute that leaves the normalised axis last
                rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else 0
                dims = list(user.args[1:3]) if op == "aten.transpose.int" else list(user.args[1])
                dims = [d % rank for d in dims] if rank else [rank - 1]
                last = rank - 1
                keeps = (last not in dims) if op == "aten.transpose.int" else (dims and dims[-1] == last)
                if not keeps:
                    return None, f"read by {op} at {user.name}, which moves the normalised axis"
                stack.append(user)
            elif op in PASS_THROUGH:
                val = user.meta.get("val")
                dim = user.args[1] if len(user.args) > 1 else None
                if (not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[-1] != width
                        or (op in ("aten.select.int", "aten.slice.Tensor")
                            and isinstance(dim, int) and dim in (-1, node.meta["val"].dim() - 1))):
                    return None, f"read by {op} at {user.name}, which changes the normalised axis"
                stack.append(user)
            elif op == "output":
                return None, "its output is a graph output"
            else:
                return None, f"its output is also read by {op} at {user.name}"
    return readers, ""


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return str(list(stack.values())[-1][0]).replace("L['self'].", "").replace("L__self___", "")


def _untie(module: nn.Module, names: list[str]) -> None:
    """Give each parameter ``names`` its own copy (it was one tensor under several names)."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        setattr(sub, attr, nn.Parameter(getattr(sub, attr).detach().clone()))
    config = getattr(module, "config", None)
    if names and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


@dataclass(frozen=True)
class FoldStep:
    """One fold to apply: ``readers`` as ``(kind, weight, bias)`` (kind ``linear``: ``W·diag(γ)``, ``addmm``:
    ``diag(γ)·W``); ``fold_shift``: β moves into the readers' biases (else it stays, divided by γ, where given)."""

    fold: Fold
    readers: tuple[tuple[str, str, str | None], ...]
    beta: str | None
    fold_shift: bool


def plan_folds(traced: TracedModel, untie: bool, scale_of) -> tuple[list[FoldStep], list[Refusal], set[str]]:
    """The folds of ``traced`` (decided on its graph; ``scale_of(name)`` reads a scale, for the zeros test), the
    scales refused and the weights to untie first; nothing is changed."""
    tied = {n for name, aliases in traced.aliases.items() for n in (name,) + tuple(aliases)}
    uses: dict[str, int] = {}
    for node in traced.graph.nodes:
        name = _param(traced, node)
        if name is not None:
            uses[name] = uses.get(name, 0) + len(node.users)
    steps, refused = [], []
    untie_done: set[str] = set()
    for out, gamma, beta, width in _scale_sites(traced):
        readers, why = _readers(traced, out, width)
        if readers is not None and not readers:
            why = "its output is not read by a linear layer"
        untied = []
        if readers:
            shared = [w for _, w, _, _ in readers if w in tied or uses.get(w, 0) != 1]
            own = {w: f"{path}.weight" for _, w, _, path in readers if w in shared}
            if shared and untie and all(o in tied and o not in untie_done for o in own.values()):
                readers = [(k, own.get(w, w), b, p) for k, w, b, p in readers]
                untied = sorted(own.values())
            elif shared:
                why = (f"the fold would untie or change the shared weight {shared[0]}"
                       + ("" if untie else " (allow it with --untie)"))
            if not why and (uses.get(gamma, 0) != 1 or gamma in tied):
                why = f"the scale {gamma} is used more than once"
        if why:
            refused.append(Refusal(gamma, out.name, why))
            continue
        fold_shift = beta is not None and all(b is not None for _, _, b, _ in readers)
        if beta is not None and not fold_shift and not bool((scale_of(gamma) != 0).all()):
            refused.append(Refusal(gamma, out.name, "a reader has no bias to take the shift and the scale "
                                                    "has zeros"))
            continue
        untie_done.update(untied)
        fold = Fold(gamma, beta if fold_shift else None, tuple(w for _, w, _, _ in readers), tuple(untied))
        steps.append(FoldStep(fold, tuple((k, w, b) for k, w, b, _ in readers), beta, fold_shift))
    return steps, refused, untie_done


def canonicalize(traced: TracedModel, untie: bool = False) -> Canonical:
    """Fold every foldable per-channel scale of ``traced.module``; see the module doc."""
    model = traced.module
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps, refused, untie_done = plan_folds(traced, untie, lambda name: state[name])
    folds = [step.fold for step in steps]
    for step in steps:
        gamma, beta, fold_shift = step.fold.scale, step.beta, step.fold_shift
        g = state[gamma].double()
        if beta is not None and not fold_shift:  # γ⊙y + β = γ⊙(y + β/γ): the shift stays, divided by γ
            state[beta] = (state[beta].double() / g).to(state[beta].dtype)
        for kind, w, b in step.readers:
            W = state[w].double()
            if fold_shift:
                shift = state[beta].double()
                add = W @ shift if kind == "linear" else shift @ W
                state[b] = (state[b].double() + add).to(state[b].dtype)
            W = W * g[None, :] if kind == "linear" else W * g[:, None]
            state[w] = W.to(state[w].dtype)
        state[gamma] = torch.ones_like(state[gamma])
        if fold_shift:
            state[beta] = torch.zeros_like(state[beta])
    if not folds:
        return Canonical(model, (), tuple(refused), 0.0)
    folded = copy.deepcopy(forget_derived(model))
    _untie(folded, sorted(untie_done))
    folded.load_state_dict(state, strict=True)
    forget_derived(folded).eval()
    err = compare_outputs(model, folded, traced.args, traced.kwargs)
    if not err <= CHECK_TOL:
        raise FxfuseError(f"folding norm scales into their readers changed {type(model).__name__}'s function "
                          f"(relative error {err:.2e}); first fold: {folds[0].scale} into {', '.join(folds[0].readers)}")
    return Canonical(folded, tuple(folds), tuple(refused), err)
