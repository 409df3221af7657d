"""Learned refinement of an alignment: gradient descent on the loss of the interpolated model.

Starting from the data-free alignment, every map of every source model gets a
*latent* matrix ``L`` (initialised to the map itself; ``fxfuse.backend.latents``). Each step projects every
latent to the nearest exact element of its group,

    P = project(L, group) = argmax_{P ∈ group} ⟨P, L⟩        (permutations: a linear assignment)
                          = U Vᵀ  where L = U Σ Vᵀ            (orthogonal maps)

moves every source by its projected maps (``fxfuse.backend.emit``'s per-axis matrices,
built here differentiably), interpolates with the target at a random point and
takes one Adam step on the latents with the model's own loss (classification,
masked LM or causal LM, ``fxfuse.models.heads.head_loss``) on a batch of labelled
data. The gradient passes the projection straight through
(``P + L − stop_gradient(L)``). Two models are mixed at ``λ ~ U[w_B − 0.1,
w_B + 0.1]`` (``[0.4, 0.6]`` for uniform weights); more models at their fusion
weights each jittered by a factor ``U[0.8, 1.2]`` and renormalised.

The final maps are exact group elements (the last projection), so the aligned
models still compute what their originals do and the self-check still holds.
Groups: ``permutation`` (a space of equal sizes, also nested inside heads),
``matching`` (spaces of different sizes: a hard many-to-one map, projected by
``fxfuse.core.solvers.matching``), and with ``groups="full"`` the maps of
``fxfuse.planner.procrustes``: ``orthogonal`` (a residual stream, the in-head q/k and
v/o maps, one per head, ``(n_heads, m, m)``; spaces that allow any invertible
map are refined orthogonally, a well-conditioned subgroup) and
``orthogonal_ones`` (a LayerNorm stream: ``Q·1 = 1``, the rotation acting on
``1^⊥``). Axes that read an orthogonal map's units move by the map itself (its
inverse transpose). An orthogonal map learns at its own rate (``lr_orthogonal``),
either projected like the others (``orthogonal="project"``) or as
``Q = Q₀ exp(A − Aᵀ)`` about its data-free map ``Q₀`` with ``A`` from zero
(``"exp"``, which never leaves the group; measured on digits ViT pairs, it
refined to higher accuracy than the projection at every rate tried). The final
orthogonal maps are projected once more in float64. Soft (sinkhorn) maps are no
group element and are refused; the inner matchings of heads under a matching
of heads stay as solved (their parent is refined).

With ``scales`` the interpolated model also learns a scale and a shift per
output unit of every repair point (``fxfuse.backend.scales``): applied to the
mixed weights at the strength ``λ(1 − λ)/(w(1 − w))`` of the sampled point, they
change the fused model only, never the maps or the aligned parents.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.device import to as to_device
from ..frontend.spaces import Analysis
from ..planner.plan import Alignment
from .scales import ScaleSite, UnitScales, apply as apply_scales, strength
from .latents import (GROUPS, ORTHO_TOL, Latent, Mover, RefineError, about, generator_shape, latents_of, project,  # noqa: F401
                      rotation, straight_through, stretched)  # (also imported from here)

ORTHOGONAL = ("orthogonal", "orthogonal_ones", "rotary")
CONTINUOUS = ORTHOGONAL + ("invertible",)  # maps learnt by a generator about their initial map (not projected)
PARAMETRISATIONS = ("project", "exp")
LAMBDA_HALF_WIDTH = 0.1   # two models: λ ~ U[w_B − 0.1, w_B + 0.1]
WEIGHT_JITTER = 0.2       # more models: w_m · U[1 − 0.2, 1 + 0.2], renormalised


@dataclass(frozen=True)
class RefineConfig:
    """``steps`` Adam steps (learning rate ``lr``) on batches of ``batch_size`` from ``(inputs, labels)``.

    ``head``: how to read the loss (``None``: from the target's class);
    ``seed``: batches and interpolation points; ``eval_samples``: samples of the
    data on which the loss before and after is reported; ``on_step(step, steps,
    loss)`` is called after every step (a progress bar). Orthogonal maps (``groups
    full``) learn at ``lr_orthogonal``, parametrised by ``orthogonal``:
    ``"project"`` (a latent matrix projected to ``U Vᵀ`` each step, straight-through
    gradient) or ``"exp"`` (``Q₀ exp(A − Aᵀ)``, ``A`` learnt from zero).
    ``scales``: also learn per-unit scales and shifts of the fused model
    (``fxfuse.backend.scales``) at ``lr_scales``, jointly with the maps.
    ``condition``: spaces whose group is invertible (the in-head value/output
    maps) learn over invertible maps ``Q₀·R·exp(S)`` of condition number at most
    ``condition`` (``fxfuse.backend.latents.stretched``; needs ``"exp"``), at
    ``lr_orthogonal``; ``None``: orthogonally, like the others.
    """

    steps: int
    inputs: torch.Tensor
    labels: torch.Tensor
    head: str | None = None
    lr: float = 0.2
    batch_size: int = 32
    seed: int = 0
    eval_samples: int = 512
    on_step: Callable[[int, int, float], None] | None = None
    lr_orthogonal: float = 0.03
    orthogonal: str = "exp"
    scales: bool = False
    lr_scales: float = 0.01
    condition: float | None = None


# ---------------------------------------------------------------- refinement


@dataclass(frozen=True)
class Refined:
    """The refined maps, the report, and the learnt unit scales of the fused model (``None``: not asked)."""

    alignments: tuple[Alignment | None, ...]
    report: dict
    scales: UnitScales | None = None


def _mix_weights(weights: Sequence[float], target: int, g: torch.Generator) -> list[float]:
    if len(weights) == 2:
        src = 1 - target
        lam = weights[src] + LAMBDA_HALF_WIDTH * (2 * float(torch.rand((), generator=g)) - 1)
        lam = min(max(lam, 0.0), 1.0)
        out = [0.0, 0.0]
        out[src], out[target] = lam, 1 - lam
        return out
    jitter = [w * (1 + WEIGHT_JITTER * (2 * float(torch.rand((), generator=g)) - 1)) for w in weights]
    return [w / sum(jitter) for w in jitter]


def _mix(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], like: Mapping[str, torch.Tensor],
         rows: tuple[tuple[str, ...], torch.Tensor] | None = None):
    """``Σ_m w_m · state_m``; ``rows = (keys, has)``: those keys' rows divided by ``Σ_m w_m has[m]`` (a row
    averaged over the models that have it, ``fxfuse.models.vocab``)."""
    out = {}
    for key, ref in like.items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key].to(ref.dtype) for w, s in zip(weights, states) if w)
            if rows is not None and key in rows[0]:
                cover = sum(w * rows[1][m].to(ref.dtype) for m, w in enumerate(weights)).to(ref.device)
                out[key] = out[key] / cover.clamp(min=1e-12).reshape(-1, *([1] * (ref.dim() - 1)))
        else:
            out[key] = ref
    return out


def refine(module: nn.Module, analyses: Sequence[Analysis], states: Sequence[Mapping[str, torch.Tensor]],
           alignments: Sequence[Alignment | None], target: int, weights: Sequence[float], config: RefineConfig,
           call: Callable[[nn.Module, dict, torch.Tensor], Any], frozen: Sequence[Mapping[str, torch.Tensor]] = (),
           progress: Callable[[str], None] | None = None, levels: Mapping[int, int] | None = None,
           device: torch.device | None = None, rows: tuple[tuple[str, ...], torch.Tensor] | None = None,
           sites: Sequence[ScaleSite] = ()) -> Refined:
    """Refine every source's ``alignment`` into the target's basis (see the module doc).

    ``module``: a model of the target's class (its forward runs with the mixed
    state); ``states[m]``: model ``m``'s own state (the target's for ``target``);
    ``call(module, state, x)``: runs ``module`` with ``state`` on inputs ``x``;
    ``frozen[m]``: entries of source ``m``'s aligned state that do not move
    (identity blocks that take the target's weights); ``levels``: each space's
    group level (``fxfuse.frontend.groups``; which orthogonal maps keep the ones vector);
    ``device``: where the states, the latents and the forward and backward
    passes live (``None``: in place, on the CPU); the projections' assignments
    run on the CPU; ``rows``: vocabulary rows mixed per row (``_mix``); ``sites``: where
    ``config.scales`` learns unit scales (``fxfuse.backend.repair.scale_sites`` of the target).
    """
    from ..models.heads import head_loss

    say = progress or (lambda _msg: None)
    if config.steps < 1:
        raise RefineError(f"--refine {config.steps}: need at least one step")
    if config.inputs.shape[0] < 1:
        raise RefineError("refinement needs labelled data: the data is empty")
    if config.orthogonal not in PARAMETRISATIONS:
        raise RefineError(f"unknown parametrisation {config.orthogonal!r} of orthogonal maps "
                          f"(one of {', '.join(PARAMETRISATIONS)})")
    if config.condition is not None and (not config.condition > 1 or config.orthogonal != "exp"):
        raise RefineError(f"--refine-condition {config.condition}: need a bound above 1, with --refine-orthogonal exp")
    head = config.head
    if device is not None:
        states = [{k: to_device(v, device) for k, v in st.items()} for st in states]
        frozen = [{k: to_device(v, device) for k, v in fr.items()} for fr in frozen]
    movers, latents, kinds, bases = _latent_maps(analyses, states, alignments, target, levels, config.orthogonal,
                                                 device, config.condition)
    perm_params = [L for i, per in latents.items() for s, L in per.items() if kinds[i][s].group not in CONTINUOUS]
    ortho_params = [L for i, per in latents.items() for s, L in per.items() if kinds[i][s].group in CONTINUOUS]
    if not perm_params and not ortho_params:
        raise RefineError("nothing to refine: no source model has a free space")
    if config.scales and not sites:
        raise RefineError("--refine-scales: the target has no units to scale (no linear, convolution or norm whose "
                          "output reaches a nonlinearity or a norm)")
    sites = tuple(sites) if config.scales else ()
    log_scale = [torch.zeros(site.units, device=device, requires_grad=True) for site in sites]
    shift = [torch.zeros(site.units, device=device, requires_grad=True) for site in sites]
    src = 1 - target if len(states) == 2 else None
    at = weights[src] if src is not None and 0 < weights[src] < 1 else None

    def scaled(state: dict, mix: Sequence[float]) -> dict:
        if not sites:
            return state
        return apply_scales(state, sites, log_scale, shift, strength(mix[src], at) if at is not None else 1.0)

    opt = torch.optim.Adam([g for g in ({"params": perm_params, "lr": config.lr},
                                        {"params": ortho_params, "lr": config.lr_orthogonal},
                                        {"params": log_scale + shift, "lr": config.lr_scales}) if g["params"]])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    g = torch.Generator().manual_seed(config.seed)
    probe = copy.deepcopy(forget_derived(module)).eval()
    if device is not None:
        probe.to(device)
    for p in probe.parameters():
        p.requires_grad_(False)
    n = config.inputs.shape[0]
    frozen = list(frozen) or [{} for _ in states]

    def moved_states(project_fn) -> list[Mapping[str, torch.Tensor]]:
        out = []
        for i, st in enumerate(states):
            if i not in movers:
                out.append(st)
                continue
            mats, read_mats = {}, {}
            for sid, L in latents[i].items():
                if kinds[i][sid].group == "invertible":
                    write, read = stretched(L, config.condition)
                    base = bases[i][sid].to(L.dtype)
                    mats[sid], read_mats[sid] = (base @ write).float(), (base @ read).float()
                else:
                    M = _matrix(L, kinds[i][sid].group, bases[i].get(sid), project_fn).float()
                    stretch = kinds[i][sid].stretch
                    mats[sid] = M * stretch if stretch != 1.0 else M
                    if stretch != 1.0:  # an embedding between widths: readers by (Q⁺)ᵀ = Q̃ / stretch
                        read_mats[sid] = M / stretch
            moved = movers[i](mats, read_mats)
            moved.update(frozen[i])
            out.append(moved)
        return out

    def eval_loss(mix: Sequence[float]) -> float:
        with torch.no_grad():
            mixed = scaled(_mix(moved_states(project), mix, states[target], rows), mix)
            m = min(n, config.eval_samples)
            total = 0.0
            for s in range(0, m, config.batch_size):
                x, y = (to_device(t[s:min(m, s + config.batch_size)], device) for t in (config.inputs, config.labels))
                total += float(head_loss(call(probe, mixed, x), y, head)) * x.shape[0]
            return total / m

    ends = [eval_loss([float(m == i) for m in range(len(states))]) for i in range(len(states))]
    chord = sum(w * e for w, e in zip(weights, ends))
    before = eval_loss(weights)  # (the scales start at the identity)
    t0 = time.perf_counter()
    losses = []
    order = torch.randperm(n, generator=g)
    pos = 0
    for step in range(config.steps):
        if pos + config.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + config.batch_size]
        pos += config.batch_size
        mix = _mix_weights(weights, target, g)
        mixed = scaled(_mix(moved_states(straight_through), mix, states[target], rows), mix)
        loss = head_loss(call(probe, mixed, to_device(config.inputs[idx], device)),
                         to_device(config.labels[idx], device), head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if config.on_step:
            config.on_step(step + 1, config.steps, losses[-1])
        elif (step + 1) % max(1, config.steps // 10) == 0:
            say(f"refining: step {step + 1}/{config.steps}, loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    seconds = time.perf_counter() - t0
    after = eval_loss(weights)
    refined, changed = _projected(alignments, latents, kinds, bases, config.condition)
    k = max(1, len(losses) // 10)
    report = {"steps": config.steps, "seconds": seconds, "lr": config.lr, "batch_size": config.batch_size,
              "seed": config.seed, "samples": int(n), "head": head,
              "loss_first_steps": sum(losses[:k]) / k, "loss_last_steps": sum(losses[-k:]) / k,
              "loss_at_weights_before": before, "loss_at_weights_after": after, "loss_of_models": ends,
              "barrier_at_weights_before": before - chord, "barrier_at_weights_after": after - chord,
              "eval_samples": min(n, config.eval_samples),
              "units_changed": {i: {f"s{s}": c for s, c in per.items()} for i, per in changed.items()}}
    if config.condition is not None:
        conds = [float(torch.linalg.cond(al.maps[sid].q.double()).max())
                 for i, al in enumerate(refined) if i in kinds for sid, k in kinds[i].items() if k.group == "invertible"]
        report["invertible"] = {"bound": config.condition, "spaces": len(conds),
                                "largest_condition": max(conds, default=1.0)}
    learnt = None
    if sites:
        learnt = UnitScales(sites, tuple(u.detach().cpu().clone() for u in log_scale),
                            tuple(c.detach().cpu().clone() for c in shift), at)
        report["scales"] = {"lr": config.lr_scales, "strength": "λ(1 − λ) / (w(1 − w))" if at is not None else "1",
                            **learnt.summary()}
    return Refined(tuple(refined), report, learnt)


def _matrix(latent: torch.Tensor, group: str, base: torch.Tensor | None, project_fn) -> torch.Tensor:
    """The map a latent stands for: ``project_fn(L)`` (a projection), or ``Q₀ · rotation(A)`` where the
    orthogonal map is parametrised by a generator ``A`` about its initial map ``Q₀ = base``."""
    if base is None:
        return project_fn(latent, group)
    return about(base.to(latent.dtype), rotation(latent, group))


def _latent_maps(analyses: Sequence[Analysis], states, alignments: Sequence[Alignment | None], target: int,
                 levels: Mapping[int, int] | None = None, orthogonal: str = "project",
                 device: torch.device | None = None, condition: float | None = None):
    """Per source model ``i``: a ``Mover`` of its weights, its latents (leaf tensors with gradients, one per
    space, initialised at its alignment's maps; with ``orthogonal="exp"`` an orthogonal map's latent is a
    generator starting at zero about the initial map), their kinds and those initial maps;
    ``(movers, latents, kinds, bases)``."""
    movers, latents, kinds, bases = {}, {}, {}, {}
    for i, al in enumerate(alignments):
        if i == target or al is None:
            continue
        k, init, pairs = latents_of(al, levels, invertible=condition is not None)
        widths = {s: init[s].shape[-2] for s, lat in k.items() if lat.stretch != 1.0}
        movers[i] = Mover(analyses[i], states[i], pairs, set(k),
                          frozenset(s for s, lat in k.items() if lat.group in CONTINUOUS), device, widths)
        kinds[i], latents[i], bases[i] = k, {}, {}
        for sid, lat in k.items():
            if lat.group in CONTINUOUS and orthogonal == "exp":
                bases[i][sid] = to_device(init[sid], device)
                latents[i][sid] = torch.zeros(generator_shape(init[sid].shape, lat.group), device=device,
                                              requires_grad=True)
            else:
                latents[i][sid] = to_device(init[sid].float().clone(), device).requires_grad_(True)
    return movers, latents, kinds, bases


def _final_orthogonal(latent: torch.Tensor, group: str, base: torch.Tensor | None) -> torch.Tensor:
    """The learnt orthogonal map in float64, projected once more so it is orthogonal to rounding."""
    M = latent.detach().double() if base is None else about(base.double(), rotation(latent.detach().double(), group))
    return project(M, group).cpu()


def _projected(alignments: Sequence[Alignment | None], latents, kinds, bases=None,
               condition: float | None = None) -> tuple[list, dict]:
    """The alignments with every learnt latent projected to its group; and, per model and space, how many units
    (for an orthogonal map: how many of its rows, one per unit) changed."""
    refined, changed = [], {}
    for i, al in enumerate(alignments):
        if i not in latents:
            refined.append(al)
            continue
        maps = dict(al.maps)
        for sid, L in latents[i].items():
            old = al.maps[sid]
            if kinds[i][sid].group in CONTINUOUS:
                base = (bases or {}).get(i, {}).get(sid)
                if kinds[i][sid].group == "invertible":  # exact as it is: no projection (float64)
                    Q = (base.double() @ stretched(L.detach().double(), condition)[0]).cpu()
                else:
                    Q = _final_orthogonal(L, kinds[i][sid].group, base) * kinds[i][sid].stretch
                new = replace(old, q=Q.to(old.q.dtype), similarity_aligned=float("nan"), solver=old.solver + ", refined")
                moved = int((~torch.isclose(Q, old.q.double(), atol=1e-6).all(-1)).sum())
                maps[sid] = new
                changed.setdefault(i, {})[sid] = moved
                continue
            P = project(L, kinds[i][sid].group).cpu()
            if kinds[i][sid].group == "matching":
                new = replace(old, matrix=P.to(old.matrix.dtype), similarity_aligned=float("nan"))
                moved = int((P.argmax(-1) != old.matrix.argmax(-1)).sum())
            else:
                perm = P.argmax(-1)
                new = replace(old, perm=perm.to(old.perm.dtype), similarity_aligned=float("nan"))
                moved = int((perm != old.perm).sum())
            maps[sid] = new
            changed.setdefault(i, {})[sid] = moved
        refined.append(Alignment(maps, al.passes, al.cost, al.solver, al.notes, al.seconds))
    return refined, changed


def refine_fusion(models: Sequence[nn.Module], analyses: Sequence[Analysis], states, alignments, depth_plans,
                  target: int, weights: Sequence[float], config: RefineConfig, args: tuple, kwargs: Mapping[str, Any],
                  progress: Callable[[str], None] | None = None, levels: Mapping[int, int] | None = None,
                  device: torch.device | None = None, rows: tuple[tuple[str, ...], torch.Tensor] | None = None,
                  sites: Sequence[ScaleSite] = ()) -> Refined:
    """``refine`` inside ``fxfuse.compile``: the target's class runs the mixed state on the main input;
    ``sites``: where ``config.scales`` learns unit scales."""
    from ..models.heads import detect_head, HEADS
    from ..models.calibration import with_input
    from ..models.calibration import main_input

    head = config.head or detect_head(models[target])
    if head not in HEADS:
        raise RefineError(f"unknown head {head!r} (one of {', '.join(HEADS)})")
    key, example = main_input(args, kwargs)
    if tuple(config.inputs.shape[1:]) != tuple(example.shape[1:]) and config.inputs.dim() != example.dim():
        raise RefineError(f"refinement inputs have shape {tuple(config.inputs.shape)}; the models take (N, "
                          f"{', '.join(map(str, example.shape[1:]))})")

    tied = {name for names in analyses[target].traced.aliases.values() for name in names}

    def call(module: nn.Module, state: dict, x: torch.Tensor):
        a, kw = with_input(args, kwargs, key, x)
        if device is not None:
            a = tuple(to_device(v, device) if isinstance(v, torch.Tensor) else v for v in a)
            kw = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        forget_derived(module)  # nothing cached from the weights of an earlier step
        return torch.func.functional_call(module, {k: v for k, v in state.items() if k not in tied}, a, kw)

    frozen = []
    for i, plan in enumerate(depth_plans):
        keep = {}
        if plan is not None:
            zeroed = set(plan.relayered.zeroed)
            for block in plan.relayered.identity_blocks:
                keep.update({k: v for k, v in states[target].items()
                             if k.startswith(block + ".") and k not in zeroed and v.is_floating_point()})
        frozen.append(keep)
    return refine(models[target], analyses, states, alignments, target, weights, replace(config, head=head), call,
                  frozen, progress, levels, device, rows, sites)
