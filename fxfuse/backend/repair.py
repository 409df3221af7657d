"""Statistics repair: undo the variance collapse of averaged units, folded into the weights.

Even aligned units of two models are only partly correlated, so their average
has a smaller spread than either parent's, and the shrinkage compounds with
depth. After fusion, for every *repair point* (a producer whose units pass an
elementwise nonlinearity or a norm), this pass measures per unit ``j`` the mean
and standard deviation on calibration inputs in every aligned parent ``m``
(``μ_mj``, ``σ_mj``) and in the fused model (``μ_j``, ``σ_j``), and rescales the
fused unit to the interpolated statistics ``μ*_j = Σ_m w_m μ_mj``,
``σ*_j = Σ_m w_m σ_mj``:

    y_j ← a_j (y_j − μ_j) + μ*_j,   a_j = σ*_j / σ_j,

folded into the producer: ``W[j] ← a_j W[j]``, ``b_j ← a_j b_j + μ*_j − a_j μ_j``
(rows of a linear or convolution weight, or a batch norm's ``γ``, ``β``). The
fused model keeps its class and state-dict keys. Points are repaired in graph
order, each measured after the points before it were corrected. BatchNorm
running statistics are first reset to the fused model's own statistics on the
calibration inputs (``running_var`` unbiased, as PyTorch keeps it).

Repair points (found on the exported graph, see ``repair_points``):
``aten.linear`` / ``aten.addmm`` / convolutions whose weight and bias are plain
parameters used once, and eval-mode batch norms; their output reaches a
nonlinearity (ReLU, GELU, SiLU, tanh, …) or a norm (LayerNorm, RMSNorm,
GroupNorm, BatchNorm) through shape ops and residual adds. A producer read
only by a batch norm is left to that batch norm (which re-normalises it). A
producer without bias gets the scale only (reported). Needs calibration inputs:
there is no data-free variant here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import FxfuseError
from ..frontend.trace import BUFFER, PARAMETER, TracedModel, trace
from ..planner.activations import _Capture, _Stored, _Streamed, on_device

NONLINEAR = frozenset({"relu", "relu_", "gelu", "silu", "tanh", "sigmoid", "hardtanh", "hardswish", "hardsigmoid",
                       "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "prelu", "relu6"})
BATCH_NORMS = frozenset({"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                         "native_batch_norm"})
NORMS = BATCH_NORMS | {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
                       "instance_norm"}
# ops that carry units through in place: shape ops, residual adds, dropout, and elementwise arithmetic (a
# nonlinearity written out, as GPT-2's tanh GELU ``0.5·x·(1 + tanh(…))``, is still reached)
PASSTHROUGH = frozenset({"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "clone",
                         "contiguous", "dropout", "add", "sub", "mul", "div", "pow", "neg", "rsub",
                         "unsqueeze", "squeeze", "expand", "_to_copy", "to",
                         "alias", "detach", "unflatten", "slice", "select", "cat", "split", "split_with_sizes",
                         "getitem", "chunk", "unbind"})
CONVOLUTIONS = frozenset({"conv1d", "conv2d", "conv3d"})
EPS = 1e-12


class RepairError(FxfuseError):
    """Repair cannot run (no calibration inputs, a model that cannot be traced at their shape)."""


@dataclass(frozen=True)
class RepairPoint:
    """A producer node: its output's unit dim, and the parameters that write those units.

    ``weight_dim``: the dim of ``weight`` holding the output units (0 for linear
    and convolution weights, 1 for ``addmm``'s ``(in, out)`` matrix, 0 for a
    batch norm's ``γ``). ``running``: a batch norm's ``(running_mean,
    running_var, eps)``.
    """

    node: str
    op: str
    unit_dim: int
    weight: str | None
    weight_dim: int
    bias: str | None
    running: tuple[str, str] | None = None
    writes_stream: bool = False  # a linear or convolution whose output only reaches norms, through a residual add


def _op_name(node: torch.fx.Node) -> str:
    """The op's base name: ``aten.linear.default`` -> ``linear``, ``operator.getitem`` -> ``getitem``."""
    target = node.target
    return getattr(target, "_opname", None) or getattr(target, "__name__", str(target))


def _param_of(node: Any, placeholders: Mapping[str, Any]) -> str | None:
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    ph = placeholders.get(node.name)
    return ph.target if ph is not None and ph.kind in (PARAMETER, BUFFER) else None


def _reaches_nonlinearity(node: torch.fx.Node, limit: int = 64) -> bool:
    """Does ``node``'s output reach a nonlinearity or a norm through shape ops and adds?"""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        for user in n.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            name = _op_name(user)
            if name in NONLINEAR or name in NORMS:
                return True
            if name in PASSTHROUGH:
                stack.append(user)
    return False


def _writes_normalised_stream(node: torch.fx.Node, limit: int = 64) -> bool:
    """Does ``node`` write a residual stream that only norms read: its output reaches no nonlinearity, and
    reaches a LayerNorm or RMSNorm through a residual add (attention output projections and MLP outputs of
    pre- and post-norm transformers)?"""
    seen, stack, normed = set(), [(node, False)], False
    while stack and len(seen) < limit:
        n, added = stack.pop()
        for user in n.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            name = _op_name(user)
            if name in NONLINEAR or name in BATCH_NORMS or name in ("group_norm", "instance_norm"):
                return False
            if name in NORMS:
                normed = normed or added
            elif name in PASSTHROUGH:
                stack.append((user, added or name == "add"))
    return normed


def _only_batch_norm_reads(node: torch.fx.Node) -> bool:
    users = [u for u in node.users if u.op == "call_function"]
    return bool(users) and all(_op_name(u) in BATCH_NORMS for u in users)


def repair_points(traced: TracedModel) -> list[RepairPoint]:
    """Every producer whose units pass a nonlinearity or a norm, in graph order."""
    ph = traced.placeholders
    uses: dict[str, int] = {}
    for n in traced.graph.nodes:
        if n.op == "call_function":
            for a in n.all_input_nodes:
                p = _param_of(a, ph)
                if p is not None:
                    uses[p] = uses.get(p, 0) + 1
    tied = {name for names in traced.aliases.values() for name in names} | set(traced.aliases)
    points = []
    for n in traced.graph.nodes:
        if n.op != "call_function":
            continue
        name, op, args = _op_name(n), str(n.target), list(n.args)
        if name in BATCH_NORMS and len(args) >= 5:
            w, b, rm, rv = (_param_of(a, ph) for a in args[1:5])
            if rm is None or rv is None:
                continue
            point = RepairPoint(n.name, op, 1, w, 0, b, (rm, rv))
        elif name == "layer_norm" and len(args) >= 3:
            point = RepairPoint(n.name, op, -1, _param_of(args[2], ph), 0,
                                _param_of(args[3], ph) if len(args) > 3 else None)
        elif name == "rms_norm" and len(args) >= 3:
            point = RepairPoint(n.name, op, -1, _param_of(args[2], ph), 0, None)
        elif name == "group_norm" and len(args) >= 3:
            point = RepairPoint(n.name, op, 1, _param_of(args[2], ph), 0,
                                _param_of(args[3], ph) if len(args) > 3 else None)
        elif name == "linear" and len(args) >= 2:
            point = RepairPoint(n.name, op, -1, _param_of(args[1], ph), 0,
                                _param_of(args[2], ph) if len(args) > 2 else None)
        elif name == "addmm" and len(args) >= 3:
            point = RepairPoint(n.name, op, -1, _param_of(args[2], ph), 1, _param_of(args[0], ph))
        elif name in CONVOLUTIONS and len(args) >= 2:
            point = RepairPoint(n.name, op, 1, _param_of(args[1], ph), 0,
                                _param_of(args[2], ph) if len(args) > 2 else None)
        else:
            continue
        if name in CONVOLUTIONS or name in ("linear", "addmm"):
            point = replace(point, writes_stream=_writes_normalised_stream(n))
        if point.running is None and (point.weight is None or _only_batch_norm_reads(n)):
            continue
        shared = [p for p in (point.weight, point.bias) if p is not None and (uses.get(p, 0) > 1 or p in tied)]
        if shared or not (_reaches_nonlinearity(n) or name in NORMS):
            if point.running is None:
                continue
            point = replace(point, weight=None, bias=None)  # reset the running statistics only
        points.append(point)
    return points


def scale_sites(traced: TracedModel, state: Mapping[str, torch.Tensor]):
    """The repair points that own their weight, as sites of learned per-unit scales
    (``fxfuse.backend.scales.ScaleSite``, ``units`` read from ``state``), in graph order."""
    from .scales import ScaleSite

    return tuple(ScaleSite(p.node, p.weight, p.weight_dim, p.bias, int(state[p.weight].shape[p.weight_dim]))
                 for p in repair_points(traced) if p.weight is not None and p.weight in state
                 and state[p.weight].is_floating_point())


# ---------------------------------------------------------------- running the graph with other weights


def run_graph(traced: TracedModel, state: Mapping[str, torch.Tensor], args: tuple, kwargs: Mapping[str, Any],
              wanted: set[str]) -> dict[str, torch.Tensor]:
    """Values of the ``wanted`` nodes of ``traced``'s graph with its parameters and buffers taken from ``state``
    (a state that is no dict is read by each op that uses a tensor, as the traced skeleton's dtype)."""
    ep = traced.exported
    flat = list(ep._graph_module_flat_inputs(tuple(args), dict(kwargs)))
    phs = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    streamed = not isinstance(state, dict)
    gm = _on_cpu(traced) if streamed else ep.graph_module
    for i, node in enumerate(phs):
        p = traced.placeholders.get(node.name)
        if p is not None and p.kind in (PARAMETER, BUFFER) and p.target in state:
            flat[i] = _Stored(p.target, flat[i].dtype) if streamed else state[p.target]
    cap = _Streamed(gm, wanted, state, None) if streamed else _Capture(gm, wanted)
    with torch.no_grad():
        cap.run(*flat)
    return cap.values


_LAST_MOVED: list = [None, None]  # (exported program, its graph module run on the CPU): the last one made


def _on_cpu(traced: TracedModel):
    """The graph of a model traced on ``meta`` weights, its devices made the CPU (``fxfuse.planner.activations.on_device``)."""
    from types import SimpleNamespace

    if _LAST_MOVED[0] is not traced.exported:
        _LAST_MOVED[:] = [traced.exported, on_device(SimpleNamespace(traced=traced), None, True)[1]]
    return _LAST_MOVED[1]


def _units(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``(samples, units)`` float64: every position other than ``dim`` a sample."""
    return value.detach().double().movedim(dim, -1).reshape(-1, value.shape[dim])


class _Moments:
    def __init__(self):
        self.n, self.s, self.q = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        self.n += x.shape[0]
        self.s = self.s + x.sum(0)
        self.q = self.q + (x * x).sum(0)

    def mean_std(self, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.q / self.n - mean * mean).clamp(min=0.0)
        if unbiased and self.n > 1:
            var = var * self.n / (self.n - 1)
        return mean, var.sqrt()


def unit_stats(traced: TracedModel, state: Mapping[str, torch.Tensor], batches, points: Sequence[RepairPoint],
               inputs_of: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per repair point: ``(mean, std)`` of its output units (``inputs_of``: of its first input) over ``batches``."""
    graph_nodes = {n.name: n for n in traced.graph.nodes}
    names = {p.node: (graph_nodes[p.node].args[0].name if inputs_of else p.node) for p in points}
    moments = {p.node: _Moments() for p in points}
    for args, kwargs in batches:
        values = run_graph(traced, state, args, kwargs, set(names.values()))
        for p in points:
            moments[p.node].add(_units(values[names[p.node]], p.unit_dim))
    return {k: m.mean_std() for k, m in moments.items()}


# ---------------------------------------------------------------- repair


@dataclass(frozen=True)
class RepairResult:
    state: dict[str, torch.Tensor]
    report: dict


def _fold(state: dict, point: RepairPoint, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``y ← scale·y + shift`` on the point's output units, folded into its weight and bias (by ``state.fold``
    where the state makes its tensors on access)."""
    if hasattr(state, "fold"):
        state.fold(point, scale, shift)
        return
    w = state[point.weight]
    shape = [1] * w.dim()
    shape[point.weight_dim] = -1
    state[point.weight] = (w.double() * scale.view(shape)).to(w.dtype)
    if point.bias is not None:
        b = state[point.bias]
        state[point.bias] = (b.double() * scale + shift).to(b.dtype)


def _reset_running(state: dict, point: RepairPoint, traced, batches) -> None:
    """Set a batch norm's running mean and (unbiased) variance to its input's statistics on ``batches``."""
    graph_nodes = {n.name: n for n in traced.graph.nodes}
    src = graph_nodes[point.node].args[0].name
    m = _Moments()
    for args, kwargs in batches:
        m.add(_units(run_graph(traced, state, args, kwargs, {src})[src], 1))
    mean, std = m.mean_std(unbiased=True)
    rm, rv = point.running
    state[rm] = mean.to(state[rm].dtype)
    state[rv] = (std * std).to(state[rv].dtype)


def repair_state(traced: TracedModel, fused: Mapping[str, torch.Tensor], parents: Sequence[Mapping[str, torch.Tensor]],
                 weights: Sequence[float], batches) -> RepairResult:
    """Repair ``fused`` (a state of ``traced``'s model) against ``parents`` (aligned states) mixed by ``weights``.

    ``batches``: calibration batches ``[(args, kwargs), …]`` of the shape ``traced``
    was exported at. Returns the corrected state and a report per point: the
    largest relative change of a unit's std before repair (``collapse``: mean of
    ``1 − σ_j / σ*_j``) and whether the shift could be folded. ``fused`` is copied,
    unless it takes the changes itself (``fold`` and item assignment;
    ``fxfuse.backend.streamrepair``): then it is changed and returned as the state.
    """
    if not batches:
        raise RepairError("repair needs calibration inputs (--calib FILE): none were given")
    if len(parents) != len(weights):
        raise RepairError(f"{len(weights)} weights for {len(parents)} parents")
    points = repair_points(traced)
    repaired = [p for p in points if p.weight is not None]
    wanted = sum(weights)
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for w, st in zip(weights, parents):
        if not w:
            continue
        for key, (mu, sd) in unit_stats(traced, st, batches, repaired).items():
            tm, ts = targets.get(key, (0.0, 0.0))
            targets[key] = (tm + (w / wanted) * mu, ts + (w / wanted) * sd)
    state = fused if hasattr(fused, "fold") else {k: v.clone() for k, v in fused.items()}
    entries = []
    for point in points:
        if point.running is not None:
            _reset_running(state, point, traced, batches)
        if point.weight is None:
            entries.append({"node": point.node, "op": point.op, "units": None, "reset_running_stats": True})
            continue
        (mu, sd), = unit_stats(traced, state, batches, [point]).values()
        mu_t, sd_t = targets[point.node]
        live = sd > EPS
        scale = torch.where(live, sd_t / sd.clamp(min=EPS), torch.ones_like(sd))
        shift = mu_t - scale * mu if point.bias is not None else torch.zeros_like(mu)
        _fold(state, point, scale, shift)
        collapse = float((1 - sd[live] / sd_t[live].clamp(min=EPS)).mean()) if bool(live.any()) else 0.0
        entries.append({"node": point.node, "op": point.op, "weight": point.weight, "units": int(sd.numel()),
                        "std_collapse_before": collapse, "scale_mean": float(scale.mean()),
                        "shift_folded": point.bias is not None, "writes_stream": point.writes_stream,
                        "reset_running_stats": point.running is not None})
    notes = [f"repair: {e['node']} ({e['weight']}) has no bias: only its scale was corrected"
             for e in entries if e.get("units") and not e["shift_folded"]]
    return RepairResult(state, {"points": entries, "notes": notes, "batches": len(batches)})


def trace_for(module: nn.Module, batches) -> TracedModel:
    """``module`` exported at the calibration batch shape (repair runs its graph on those batches)."""
    args, kwargs = batches[0]
    return trace(module, args, kwargs)


def repair(module: nn.Module, parents: Sequence[nn.Module | Mapping[str, torch.Tensor]], weights: Sequence[float],
           batches, traced: TracedModel | None = None) -> tuple[nn.Module, dict]:
    """A repaired copy of ``module`` (same class and keys) and the report; see ``repair_state``."""
    from .emit import build_module

    if not batches:
        raise RepairError("repair needs calibration inputs (--calib FILE): none were given")
    traced = traced or trace_for(module, batches)
    states = [p.state_dict() if isinstance(p, nn.Module) else p for p in parents]
    result = repair_state(traced, module.state_dict(), states, weights, batches)
    return build_module(module, result.state), result.report
