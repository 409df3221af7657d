"""Residual writers: which parameters write the residual branches of a block (``BlockGraph``).

Read from a block's nodes in the exported graph: for each ``add(stream, branch)`` inside the block --
``stream`` reaches the block's input without a contraction, ``branch`` does not -- the writers are
the parameter arguments of the first op with parameters back from ``branch`` (a linear's weight and
bias, a layer scale). ``fxfuse.planner.depth.writer_params`` zeroes them to make identity blocks.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch


_CONTRACTIONS = {
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "embedding", "mv", "addmv",
    "scaled_dot_product_attention",
}
# Ops that move the stream without changing values: the only ones allowed between residual adds.
_MOVES = {
    "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "view", "_unsafe_view", "reshape", "clone",
    "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "getitem", "lift_fresh_copy",
}
# Ops that rearrange their first input (a zero input gives a zero output); parameters are seen through them.
_REARRANGES = _MOVES | {
    "view_as", "reshape_as", "permute", "transpose", "t", "movedim", "expand", "expand_as", "squeeze", "unsqueeze",
    "flatten", "unflatten", "select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "roll",
    "flip", "repeat", "tile", "index", "index_select", "gather",
}
# A zero branch stays zero through these (activations with f(0) = 0 included).
_PASS_THROUGH = _REARRANGES | {"relu", "gelu", "silu", "tanh", "neg", "hardtanh", "leaky_relu", "elu"}
_SCALINGS = {"mul", "div"}       # pass through when the other operand is a Python number
_BIAS_ADDS = {"add", "sub"}      # ``mm(x, W) + b``: the bias and the product both write


def _op(node: torch.fx.Node) -> str:
    """Base op name: ``aten.add.Tensor -> "add"``, ``operator.getitem -> "getitem"``."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1]


def _is_contraction(node: torch.fx.Node) -> bool:
    name = _op(node).rstrip("_")
    return name in _CONTRACTIONS or name.startswith(("conv", "_conv")) or "scaled_dot_product" in name


def _clean_path(raw: Any) -> str:
    path = str(raw).replace("L['self'].", "").replace("L__self___", "")
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")


def _module_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean_path(v[0] if isinstance(v, tuple) else v) for v in stack.values()]


def block_nodes(nodes: Sequence[torch.fx.Node], block: str) -> set[torch.fx.Node]:
    """The call nodes whose module stack contains module ``block`` (or a module inside it)."""
    return {n for n in nodes if n.op == "call_function"
            and any(p == block or p.startswith(block + ".") for p in _module_paths(n))}


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Node arguments in order, lists flattened."""
    out: list[torch.fx.Node] = []

    def add(a):
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                add(b)

    for a in list(node.args) + list(node.kwargs.values()):
        add(a)
    return out


class BlockGraph:
    """The nodes of one block in a traced graph, classified as residual stream or branch.

    A node is *stream* if some path back from it leaves the block (or reaches
    a model input) without a contraction; computed in one pass over the
    topologically ordered ``nodes``.
    """

    def __init__(self, nodes: Sequence[torch.fx.Node], inside: set[torch.fx.Node], params: Mapping[str, str],
                 user_inputs: set[str]):
        self.nodes, self.inside, self.params = nodes, inside, params
        self.stream: dict[torch.fx.Node, bool] = {}
        for node in nodes:
            if node.op == "placeholder":
                self.stream[node] = node.name in user_inputs
            elif node.op != "call_function":
                self.stream[node] = False
            elif node not in inside:
                self.stream[node] = True
            else:
                reaches = any(self.stream.get(a, False) for a in _tensor_args(node))
                self.stream[node] = reaches and not _is_contraction(node)

    def param_of(self, node: torch.fx.Node) -> str | None:
        """The parameter's state-dict name if ``node`` is a parameter (possibly viewed / cast), else None."""
        while node.op == "call_function" and _op(node) in _REARRANGES and _tensor_args(node):
            node = _tensor_args(node)[0]
        return self.params.get(node.name) if node.op == "placeholder" else None

    def writers(self, branch: torch.fx.Node) -> tuple[str, ...] | None:
        """Parameters of the first op with parameter arguments back from ``branch``; None if there is none.

        The walk passes zero-preserving ops without parameters (views,
        dropout, casts, scalings by a number); a bias add also continues into
        its other operand.
        """
        node = branch
        while node in self.inside:
            args = _tensor_args(node)
            names = [p for p in (self.param_of(a) for a in args) if p is not None]
            name = _op(node).rstrip("_")
            if names:
                if name in _BIAS_ADDS:
                    rest = [a for a in args if self.param_of(a) is None]
                    more = self.writers(rest[0]) if len(rest) == 1 else None
                    return None if more is None else tuple(dict.fromkeys(names + list(more)))
                return tuple(dict.fromkeys(names))
            if name in _SCALINGS and len(args) == 1:
                node = args[0]
            elif name in _PASS_THROUGH and args:
                node = args[0]
            else:
                return None
        return None

    def residual_branch(self, add: torch.fx.Node) -> torch.fx.Node | None:
        """The branch operand if ``add`` is ``stream + branch`` (both shaped like its output), else None."""
        args = _tensor_args(add)
        if len(args) != 2 or any(self.param_of(a) is not None for a in args):
            return None
        shape = _shape(add)
        if shape is None or any(_shape(a) != shape for a in args):
            return None
        stream = [self.stream[a] for a in args]
        return args[stream.index(False)] if stream.count(True) == 1 else None

    def is_pre_norm(self) -> bool:
        """Every stream value leaving the block is the block input plus residual branches, nothing else.

        From each stream exit, walking back along the stream passes only
        residual adds and value-preserving moves (views, dropout, casts) until
        it leaves the block: no norm or activation sits on the stream (as in a
        post-norm block), so zero branches make the block the identity.
        """
        for exit_ in self.nodes:
            if not (exit_ in self.inside and self.stream[exit_]):
                continue
            if all(u in self.inside for u in exit_.users):
                continue
            node = exit_
            while node in self.inside:
                branch = self.residual_branch(node) if _op(node) in ("add", "add_") else None
                if branch is not None:
                    node = next(a for a in _tensor_args(node) if a is not branch)
                elif _op(node) in _MOVES and _tensor_args(node):
                    node = _tensor_args(node)[0]
                else:
                    return False
        return True

    def writers_of_block(self, pre_norm_only: bool = True) -> tuple[str, ...]:
        """Writers of every residual add among ``nodes``; ``()`` unless zeroing them all gives the identity.

        With ``pre_norm_only=False`` a block with a norm on its stream (post-norm) keeps its
        writers: zeroing them leaves only the norms, an identity up to normalisation.
        """
        if pre_norm_only and not self.is_pre_norm():
            return ()
        names: list[str] = []
        for node in self.nodes:
            if not (node in self.inside and _op(node) in ("add", "add_")):
                continue
            branch = self.residual_branch(node)
            if branch is None:
                continue
            found = self.writers(branch)
            if found is None:
                return ()
            names.extend(found)
        return tuple(dict.fromkeys(names))


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
