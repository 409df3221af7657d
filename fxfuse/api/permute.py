"""Apply permutations of spaces to a model's parameters.

A permutation ``p`` of a space (a ``LongTensor`` of its size) acts on every
member axis by gathering, ``W'[j] = W[p[j]]``; structured axes are unfolded
into one dim per space first (``fxfuse.planner.layout``). A space nested under a
parent (inside-head dims under heads) gets one permutation per parent index.

``permute`` checks the permuted copy (``fxfuse.frontend.verify.check_moved``) and
refuses to return one that computes something else.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core.derived import loaded_copy
from ..frontend.rules import RuleSet, load_rules
from ..frontend.spaces import Analysis, analyze
from ..frontend.verify import check_moved
from ..planner.layout import permute_tensor

Permutations = Mapping[int, torch.Tensor]


def random_permutations(analysis: Analysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """One uniformly random permutation for each free space of size > 1, drawn in space order."""
    g = torch.Generator().manual_seed(int(seed))
    perms: dict[int, torch.Tensor] = {}
    for s in analysis.spaces:
        if not (s.free and s.size > 1):
            continue
        if s.parent is None:
            perms[s.id] = torch.randperm(s.size, generator=g)
        else:
            rows = analysis.spaces[s.parent].size
            perms[s.id] = torch.stack([torch.randperm(s.size, generator=g) for _ in range(rows)])
    return perms


def permute_state_dict(analysis: Analysis, state: Mapping[str, torch.Tensor],
                       perms: Permutations) -> dict[str, torch.Tensor]:
    """A new state dict with every laid-out tensor gathered along its axes; others copied as they are."""
    out = dict(state)
    parents = analysis.parents
    for name, layout in analysis.layouts.items():
        t = permute_tensor(state[name], layout.axes, perms, parents)
        for key in (name,) + layout.aliases:
            if key in out:
                out[key] = t
    return out


def apply_permutations(analysis: Analysis, perms: Permutations) -> nn.Module:
    """A deep copy of the analysed model with ``perms`` applied to its weights."""
    model = analysis.traced.module
    return loaded_copy(model, permute_state_dict(analysis, model.state_dict(), perms))


def checked_permutation(analysis: Analysis, perms: Permutations, rules: RuleSet) -> tuple[nn.Module, float]:
    """``apply_permutations``, then the self-check on the traced example inputs: ``(copy, relative error)``.

    Raises ``UnsoundError`` naming the space at fault and the ops (and rule files) it passes through.
    """
    model, traced = analysis.traced.module, analysis.traced
    moved = apply_permutations(analysis, perms)
    err = check_moved(model, moved, traced.args, traced.kwargs, analysis=analysis, rules=rules, spaces=perms,
                      move_one=lambda s: apply_permutations(analysis, {s: perms[s]}),
                      what=f"permuting {type(model).__name__}")
    return moved, err


def permute(model: nn.Module, example_args: tuple, seed: int = 0, rules: RuleSet | None = None,
            example_kwargs=None) -> nn.Module:
    """A copy of ``model`` with weights permuted along every free space; it computes the same function
    (checked: ``UnsoundError`` if it does not, naming the space and the rules at fault)."""
    rules = rules if rules is not None else load_rules()
    analysis = analyze(model, example_args, rules=rules, example_kwargs=example_kwargs)
    return checked_permutation(analysis, random_permutations(analysis, seed), rules)[0]


def move_by_group_elements(model: nn.Module, example_args: tuple, seed: int = 0, rules=None, example_kwargs=None,
                           strict: bool = False, largest: int | None = None, untie: bool = False
                           ) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with its norm scales folded, moved by a random element of every space's group.

    The copy must compute what ``model`` does (relative error ≤ 1e-4); otherwise
    the space whose map breaks it is found and the error names the ops and rule
    files it passes through (a rule declares a group larger than its op has).
    """
    from ..passes.analyse import canonical_analysis
    from ..planner.groupmaps import aligned_state_groups, random_group_maps
    from ..frontend.groups import INVERTIBLE
    from ..planner.plan import Alignment

    rules = rules if rules is not None else load_rules()
    kwargs = dict(example_kwargs or {})
    analysis, folded = canonical_analysis(model, tuple(example_args), kwargs, rules, strict, untie)
    base = folded.module
    maps = random_group_maps(analysis, seed, INVERTIBLE if largest is None else largest)

    def moved_by(chosen) -> nn.Module:
        state = aligned_state_groups(analysis, base.state_dict(), Alignment(chosen, 0, "random", "random"))
        return loaded_copy(base, state).eval()

    moved = moved_by(maps)
    err = check_moved(model, moved, example_args, kwargs, analysis=analysis, rules=rules, spaces=maps,
                      move_one=lambda s: moved_by({s: maps[s]}),
                      what=f"moving {type(model).__name__} by random group elements")
    groups: dict[str, int] = {}
    for s in maps:
        name = analysis.group(s).name if maps[s].q is not None else "perm"
        groups[name] = groups.get(name, 0) + 1
    return moved, {"moved": len(maps), "groups": groups, "folded": len(folded.folds), "error": err}
