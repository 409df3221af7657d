"""Cross-layer alignment: fuse models whose block lists differ in depth.

A *block list* is a container (``nn.ModuleList`` / ``nn.Sequential``) of
structurally identical blocks, e.g. a transformer's layers. To fuse a target
with ``m`` blocks and a source with ``n`` blocks the source is *relayered* to
``m`` blocks first (CLAFusion):

1. ``block_outputs``: run both models on the same batches and record each
   block's output as a ``(samples, features)`` matrix.
2. ``block_cost_matrix``: dissimilarity of every (deep block, shallow block)
   pair, ``1 - linear CKA`` or an exact-OT distance between their units.
3. ``cross_layer_dp``: an order-preserving matching of the shallow blocks into
   the deep ones that minimises the summed cost.
4. ``depth_map`` packs the result as a ``DepthMap``; ``relayer`` builds the
   relayered source: a deeper source drops its unmatched blocks, a shallower
   one gets *identity blocks* -- copies of a block with the parameters that
   write its residual branches (``writer_params``) set to zero, so that a
   pre-norm residual block ``x + f(x)`` becomes ``x``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.errors import FxfuseError
from ..frontend.trace import PARAMETER, USER_INPUT, trace
from .residual_writers import BlockGraph, block_nodes

__all__ = [
    "BlockList", "DepthMap", "FusionDepthError", "Relayered", "block_cost_matrix", "block_outputs",
    "cross_layer_dp", "depth_map", "find_block_lists", "linear_cka", "ot_block_cost", "relayer", "writer_params",
]

COSTS = ("cka", "ot")
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "depth")
TIE_RTOL = 1e-12


class FusionDepthError(FxfuseError):
    """Models of different depth cannot be aligned or relayered: names the module path or block at fault."""


# ---------------------------------------------------------------- block lists


@dataclass(frozen=True)
class BlockList:
    """A container of ``size`` identical blocks at module path ``path`` (blocks are ``path.0 ... path.{size-1}``)."""

    path: str
    size: int


def _signature(module: nn.Module) -> tuple:
    """``(class, ((param name, shape), ...))`` with names relative to ``module``."""
    return type(module), tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    signatures = {_signature(child) for child in module.children()}
    if len(signatures) != 1:
        return False
    (_, params), = signatures
    return len(params) > 0


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_block_lists(model: nn.Module) -> tuple[BlockList, ...]:
    """Every block list in ``model``, sorted by path; a found list's blocks are not searched further.

    A block list is an ``nn.ModuleList`` / ``nn.Sequential`` of >= 1 children
    of one class with the same parameter names and shapes, and >= 1 parameter.
    """
    found: list[BlockList] = []

    def visit(module: nn.Module, path: str) -> None:
        if _is_block_list(module):
            found.append(BlockList(path, len(module)))
            return
        for name, child in module.named_children():
            visit(child, _join(path, name))

    visit(model, "")
    return tuple(sorted(found, key=lambda b: b.path))


def _block_container(model: nn.Module, path: str) -> nn.Module:
    try:
        container = model.get_submodule(path)
    except AttributeError as exc:
        raise FusionDepthError(f"{path}: no such module in {type(model).__name__}") from exc
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise FusionDepthError(f"{path}: {type(container).__name__} is not an nn.ModuleList or nn.Sequential")
    return container


# ---------------------------------------------------------------- block outputs


def _first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` itself, or the first tensor inside a tuple / list / mapping (e.g. a ``ModelOutput``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items: Iterable = value.values()
    else:
        items = value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _as_samples(t: torch.Tensor) -> torch.Tensor:
    """``(..., features) -> (samples, features)`` float64: every leading dim is a sample dim."""
    t = t.detach().to("cpu", torch.float64)
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def block_outputs(model: nn.Module, path: str, batches: Sequence[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """One ``(samples, features)`` float64 matrix per block of the list at ``path``.

    The model runs in eval mode without gradients on each ``(args, kwargs)``
    batch; a block's output (its first tensor if it returns several) is
    flattened over all leading dims and concatenated over the batches.
    """
    container = _block_container(model, path)
    if not batches:
        raise FusionDepthError(f"{path}: no batches to compute block outputs on")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(len(container))]

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is None:
                raise FusionDepthError(f"{_join(path, str(i))}: block returned no tensor")
            chunks[i].append(_as_samples(t))
        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(container)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                model(*args, **dict(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for i, c in enumerate(chunks):
        if len(c) != len(batches):
            raise FusionDepthError(f"{_join(path, str(i))}: block ran {len(c)} times on {len(batches)} batches")
    return [torch.cat(c, dim=0) for c in chunks]


# ---------------------------------------------------------------- block costs


def _centred(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(dim=0, keepdim=True)


def _check_pair(X: torch.Tensor, Y: torch.Tensor) -> None:
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise FusionDepthError(f"block outputs must be (n, p) and (n, q) matrices, "
                               f"got {tuple(X.shape)} and {tuple(Y.shape)}")


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Centred linear CKA of ``X (n, p)``, ``Y (n, q)``: ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` in [0, 1].

    Invariant to orthogonal transforms and isotropic scaling of either side;
    0 when either side is constant over the samples.
    """
    _check_pair(X, Y)
    X, Y = _centred(X.double()), _centred(Y.double())
    denom = float(torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y))
    if denom == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(Y.T @ X) ** 2) / denom


def _unit_columns(X: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit norm (constant columns become 0)."""
    Xc = _centred(X.double())
    norms = torch.linalg.vector_norm(Xc, dim=0, keepdim=True)
    return torch.where(norms > 0, Xc / norms.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(Xc))


def ot_block_cost(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Exact OT distance between the units of ``X (n, p)`` and ``Y (n, q)``, in [0, 2].

    Ground cost ``M[i, j] = 1 - corr(X[:, i], Y[:, j])`` (Pearson over the n
    samples; a constant unit correlates 0 with everything); marginals uniform,
    ``1/p`` and ``1/q``; the value is ``min_T <T, M>`` (POT ``ot.emd2``).
    """
    import ot

    _check_pair(X, Y)
    corr = (_unit_columns(X).T @ _unit_columns(Y)).numpy()
    M = np.ascontiguousarray(np.clip(1.0 - corr, 0.0, 2.0))
    p, q = M.shape
    n_iter = max(100_000, 50 * p * q)
    return float(np.clip(ot.emd2(np.full(p, 1.0 / p), np.full(q, 1.0 / q), M, numItermax=n_iter), 0.0, 2.0))


def _pair_cost(cost: str):
    if cost == "cka":
        return lambda X, Y: 1.0 - linear_cka(X, Y)
    if cost == "ot":
        return ot_block_cost
    raise FusionDepthError(f"unknown block cost {cost!r}; expected one of {', '.join(COSTS)}")


def block_cost_matrix(deep: Sequence[torch.Tensor], shallow: Sequence[torch.Tensor], cost: str) -> np.ndarray:
    """``C (m, n)`` with ``C[l, k] = cost(deep[l], shallow[k])``; ``cost`` is ``"cka"`` (1 - CKA) or ``"ot"``."""
    pair = _pair_cost(cost)
    C = np.empty((len(deep), len(shallow)))
    for l, X in enumerate(deep):
        for k, Y in enumerate(shallow):
            C[l, k] = pair(X, Y)
    return C


# ---------------------------------------------------------------- matching


def _ties(a: float, b: float) -> bool:
    """``a <= b`` up to a relative ``TIE_RTOL``."""
    return a <= b + TIE_RTOL * max(1.0, abs(a), abs(b))


def _check_costs(C: np.ndarray) -> np.ndarray:
    C = np.asarray(C, dtype=np.float64)
    if C.ndim != 2:
        raise FusionDepthError(f"cost matrix must be 2-D (deep blocks x shallow blocks), got shape {C.shape}")
    m, n = C.shape
    if n < 1 or m < n:
        raise FusionDepthError(f"cost matrix must be m x n with m >= n >= 1 (deep rows, shallow columns), "
                               f"got {m} x {n}")
    if not np.isfinite(C).all():
        raise FusionDepthError("cost matrix has non-finite entries")
    return C


def cross_layer_dp(C: np.ndarray, anchor_last: bool = True) -> tuple[int, ...]:
    """Order-preserving matching of ``n`` shallow blocks into ``m >= n`` deep blocks.

    ``C (m, n)``: ``C[l, k]`` is the cost of matching deep block ``l`` with
    shallow block ``k``. Returns ``match`` with ``match[k]`` the deep block of
    shallow block ``k``: strictly increasing, ``match[0] == 0`` (first to
    first, so ``n == 1`` gives ``(0,)``), minimising ``Σ_k C[match[k], k]``.
    With ``anchor_last`` also ``match[n-1] == m-1`` (last to last).

    ``F[k, l]`` is the least cost of shallow ``0..k`` within deep ``0..l``:
    ``F[0, l] = C[0, 0]``, ``F[k, l] = min(F[k, l-1], F[k-1, l-1] + C[l, k])``,
    O(mn) time. Backtracking breaks ties (equal up to a relative 1e-12)
    towards the earliest deep block, so a real block wins over an identity
    copy of it placed right after it.
    """
    C = _check_costs(C)
    m, n = C.shape
    F = np.full((n, m), np.inf)
    F[0, :] = C[0, 0]
    for k in range(1, n):
        for l in range(k, m):
            take = F[k - 1, l - 1] + C[l, k]
            F[k, l] = min(F[k, l - 1], take) if l > k else take
    match = [0] * n
    l = m - 1
    for k in range(n - 1, 0, -1):
        while l > k and not (anchor_last and k == n - 1) and _ties(F[k, l - 1], F[k - 1, l - 1] + C[l, k]):
            l -= 1
        match[k] = l
        l -= 1
    return tuple(match)


# ---------------------------------------------------------------- depth maps


@dataclass(frozen=True)
class DepthMap:
    """How the source's block list at ``path`` is laid out at the target's depth.

    ``source_of[l]`` is the source block placed at target position ``l``, or
    ``None`` for an identity block; ``dropped`` lists the source blocks left
    out (only when the source is deeper). ``costs[l][s]`` is the block cost of
    target block ``l`` against source block ``s`` (``cost`` names it).
    """

    path: str
    target_size: int
    source_size: int
    source_of: tuple[int | None, ...]
    dropped: tuple[int, ...]
    costs: tuple[tuple[float, ...], ...]
    cost: str

    def __post_init__(self):
        where, last = self.path, self.source_size - 1
        if len(self.source_of) != self.target_size:
            raise FusionDepthError(f"{where}: {len(self.source_of)} source_of entries for {self.target_size} blocks")
        placed = [s for s in self.source_of if s is not None]
        if placed != sorted(set(placed)) or any(not 0 <= s <= last for s in placed):
            raise FusionDepthError(f"{where}: source_of {self.source_of} is not increasing within 0..{last}")
        if sorted(placed + list(self.dropped)) != list(range(self.source_size)):
            raise FusionDepthError(f"{where}: placed {placed} and dropped {self.dropped} do not cover 0..{last}")
        if len(self.costs) != self.target_size or any(len(row) != self.source_size for row in self.costs):
            raise FusionDepthError(f"{where}: costs must be {self.target_size} x {self.source_size}")

    def matched_costs(self) -> tuple[float | None, ...]:
        """Per target block, the cost of its pair (``None`` for an identity block)."""
        return tuple(None if s is None else self.costs[l][s] for l, s in enumerate(self.source_of))


def depth_map(target: nn.Module, source: nn.Module, path: str, batches: Sequence[tuple[tuple, dict]],
              cost: str = "cka", anchor_last: bool = True) -> DepthMap:
    """Align the block lists at ``path`` of ``target`` and ``source`` on the same ``batches``.

    The deeper model's blocks are the DP's rows: a deeper source keeps its
    matched blocks and drops the rest; a deeper target gets identity blocks
    (``None``) where no source block matched; equal depths map one to one.
    """
    _pair_cost(cost)
    t_out, s_out = block_outputs(target, path, batches), block_outputs(source, path, batches)
    m_t, m_s = len(t_out), len(s_out)
    if m_t >= m_s:
        costs = block_cost_matrix(t_out, s_out, cost)                 # (m_t, m_s)
        source_of: list[int | None] = [None] * m_t
        for k, l in enumerate(cross_layer_dp(costs, anchor_last)):
            source_of[l] = k
        dropped: tuple[int, ...] = ()
    else:
        by_source = block_cost_matrix(s_out, t_out, cost)             # (m_s, m_t)
        costs = by_source.T
        source_of = list(cross_layer_dp(by_source, anchor_last))
        dropped = tuple(sorted(set(range(m_s)) - set(source_of)))
    rows = tuple(tuple(float(c) for c in row) for row in costs)
    return DepthMap(path, m_t, m_s, tuple(source_of), dropped, rows, cost)


def writer_params(model: nn.Module, path: str, example_args: tuple, example_kwargs: dict | None = None,
                  pre_norm_only: bool = True) -> dict[int, tuple[str, ...]]:
    """``{block index: state-dict names of the parameters that write its residual branches}``.

    For each ``add(stream, branch)`` inside block ``path.i`` -- ``stream`` reaches
    the block's input without a contraction, ``branch`` does not -- the
    writers are the parameter arguments of the first op with parameters back
    from ``branch`` (a linear's weight and bias, a layer scale). Zeroing them
    makes a pre-norm block ``x + f(x)`` the identity. A block maps to ``()``
    when it has no such add, when a branch's writers cannot be found, or when
    something other than residual adds sits on its stream (a post-norm block,
    a ReLU after the add): zeroing would not give the identity there, unless
    ``pre_norm_only=False`` (then a post-norm block keeps its writers and its
    identity is approximate: only the norms remain).
    """
    size = len(_block_container(model, path))
    traced = trace(model, example_args, example_kwargs)
    params = {p.name: p.target for p in traced.placeholders.values() if p.kind == PARAMETER}
    user_inputs = {p.name for p in traced.placeholders.values() if p.kind == USER_INPUT}
    nodes = list(traced.graph.nodes)
    return {i: BlockGraph(nodes, block_nodes(nodes, _join(path, str(i))), params, user_inputs).writers_of_block(pre_norm_only)
            for i in range(size)}


# ---------------------------------------------------------------- relayering


@dataclass(frozen=True)
class Relayered:
    """The relayered source: ``identity_blocks`` are module paths; ``zeroed`` their zeroed parameters (new names)."""

    module: nn.Module
    identity_blocks: tuple[str, ...]
    zeroed: tuple[str, ...]


def _placed_bases(source_of: Sequence[int | None]) -> list[int]:
    """Per target position, the source block its block is copied from: itself, or the last placed before (else 0)."""
    bases, last = [], 0
    for s in source_of:
        last = last if s is None else s
        bases.append(last)
    return bases


def _identity_block(block: nn.Module, dm: DepthMap, position: int, base: int,
                    writers: Mapping[str, Mapping[int, tuple[str, ...]]]) -> tuple[nn.Module, list[str]]:
    """A copy of ``block`` (source block ``base``) with its writers zeroed; returns the new writer names."""
    old, new = _join(dm.path, str(base)), _join(dm.path, str(position))
    if dm.path not in writers:
        raise FusionDepthError(f"{dm.path}: no writer parameters given, so no identity block can be built at {new}")
    names = tuple(writers[dm.path].get(base, ()))
    if not names:
        raise FusionDepthError(f"{old}: block has no residual branch to zero (not a pre-norm residual block), "
                               f"so no identity block can be built at {new}")
    block = copy.deepcopy(forget_derived(block))
    zeroed = []
    for name in names:
        if not name.startswith(old + "."):
            raise FusionDepthError(f"{old}: writer {name} is not a parameter of this block")
        rel = name[len(old) + 1:]
        try:
            param = block.get_parameter(rel)
        except AttributeError as exc:
            raise FusionDepthError(f"{old}: writer {name} is not a parameter of this block") from exc
        with torch.no_grad():
            param.zero_()
        zeroed.append(_join(new, rel))
    return block, zeroed


def _set_layer_idx(block: nn.Module, index: int) -> None:
    for m in block.modules():
        if isinstance(vars(m).get("layer_idx"), int):
            m.layer_idx = index


def _replace(model: nn.Module, path: str, container: nn.Module) -> nn.Module:
    """Put ``container`` at ``path`` (``model`` itself when ``path`` is empty); returns the model."""
    if not path:
        return container
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, container)
    return model


def _update_depth(model: nn.Module, old: int, new: int, bases: Sequence[int]) -> None:
    """Depth fields of (already copied) HF configs and a plain ``model.depth`` equal to ``old`` become ``new``."""
    configs = {id(c): c for m in model.modules() if (c := vars(m).get("config")) is not None}
    for cfg in configs.values():
        for field in DEPTH_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(cfg, field, new)
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == old:
            setattr(cfg, "layer_types", type(layer_types)(layer_types[b] for b in bases))
    depth = vars(model).get("depth")
    if isinstance(depth, int) and not isinstance(depth, bool) and depth == old:
        model.depth = new


def relayer(source: nn.Module, maps: Sequence[DepthMap],
            writers: Mapping[str, Mapping[int, tuple[str, ...]]]) -> Relayered:
    """A deep copy of ``source`` with each mapped block list rebuilt at the target's depth.

    Target position ``l`` holds a copy of source block ``source_of[l]``, or an
    identity block: a copy of the last placed source block before it (else
    block 0) with ``writers[path][that block]`` zeroed. Refuses (raises) when
    that block has no writers.
    """
    paths = [dm.path for dm in maps]
    if len(set(paths)) != len(paths):
        raise FusionDepthError(f"a block list is mapped more than once: {', '.join(paths)}")
    model = copy.deepcopy(forget_derived(source))
    identities: list[str] = []
    zeroed: list[str] = []
    for dm in maps:
        old = _block_container(model, dm.path)
        if len(old) != dm.source_size:
            raise FusionDepthError(f"{dm.path}: map for {dm.source_size} source blocks, the model has {len(old)}")
        bases = _placed_bases(dm.source_of)
        blocks = []
        for l, (s, base) in enumerate(zip(dm.source_of, bases)):
            if s is None:
                block, names = _identity_block(old[base], dm, l, base, writers)
                identities.append(_join(dm.path, str(l)))
                zeroed.extend(names)
            else:
                block = copy.deepcopy(old[s])
            _set_layer_idx(block, l)
            blocks.append(block)
        container = nn.Sequential(*blocks) if isinstance(old, nn.Sequential) else nn.ModuleList(blocks)
        model = _replace(model, dm.path, container)
        _update_depth(model, dm.source_size, dm.target_size, bases)
    return Relayered(model, tuple(identities), tuple(zeroed))
