"""Property tests: random chains of cat/split/slice/view/transpose/reshape, linears and grouped 1×1
convolutions (groups inside groups) permute soundly.

Each example is a tiny model ``x (B, 6) -> step -> ... -> flatten -> linear -> (B, 3)`` whose steps
are drawn by ``hypothesis``; a random permutation of every free space must leave its function
unchanged, and a permuted copy must fuse back onto the model exactly.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxfuse
from fxfuse.api.permute import apply_permutations, random_permutations
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, WIDTH = 3, 6
SIZES = (2, 3, 4, 6)
KINDS = ("linear", "relu", "cat_branches", "cat_self", "split_swap", "view", "flatten", "transpose",
         "reshape_all", "sum", "grouped", "slice_swap", "slice_overlap", "slice_drop")
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Chain(nn.Module):
    """Applies ``steps`` (``(kind, args)``) to ``x (B, WIDTH)``; linears act on the last dim."""

    def __init__(self, steps: list[tuple[str, tuple]], linears: list[tuple[int, int]], final: int,
                 convs: list[tuple[int, int, int]] = ()):
        super().__init__()
        self.steps = steps
        self.lin = nn.ModuleList(nn.Linear(i, o) for i, o in linears)
        self.conv = nn.ModuleList(nn.Conv2d(i, o, 1, groups=g) for i, o, g in convs)
        self.head = nn.Linear(final, 3)

    def forward(self, x):
        h = x
        for kind, a in self.steps:
            if kind == "linear":
                h = self.lin[a[0]](h)
            elif kind == "relu":
                h = torch.relu(h)
            elif kind == "cat_branches":
                h = torch.cat([self.lin[a[0]](h), torch.tanh(self.lin[a[1]](h))], -1)
            elif kind == "cat_self":
                h = torch.cat([h, torch.relu(h)], a[0])
            elif kind == "split_swap":
                d, k = a
                first, second = torch.split(h, [k, h.shape[d] - k], d)
                h = torch.cat([second, torch.sigmoid(first)], d)
            elif kind == "view":
                d, f = a
                h = h.view(*h.shape[:d], f, h.shape[d] // f, *h.shape[d + 1:])
            elif kind == "flatten":
                h = h.flatten(a[0], a[0] + 1)
            elif kind == "transpose":
                h = h.transpose(a[0], a[1])
            elif kind == "reshape_all":
                h = h.reshape(h.shape[0], -1)
            elif kind == "sum":
                h = h.sum(a[0])
            elif kind in ("slice_swap", "slice_overlap", "slice_drop"):
                d, k = a

                def part(start, stop):
                    return h[(slice(None),) * d + (slice(start, stop),)]

                if kind == "slice_swap":
                    h = torch.cat([part(k, None), torch.sigmoid(part(None, k))], d)
                elif kind == "slice_overlap":  # the element at k is read by both slices
                    h = torch.cat([torch.tanh(part(None, k + 1)), part(k, None)], d)
                else:
                    h = part(k, None)
            elif kind == "grouped":  # a grouped 1×1 convolution over the features of (B, n)
                h = torch.relu(self.conv[a[0]](h[:, :, None, None]).flatten(1))
        return self.head(h.reshape(h.shape[0], -1))


@st.composite
def chains(draw) -> Chain:
    """A random chain: the shape is tracked while steps are drawn so that every step fits."""
    shape = [WIDTH]  # non-batch dims
    steps, linears, convs = [], [], []

    def linear(n_in: int) -> int:
        linears.append((n_in, draw(st.sampled_from(SIZES))))
        return len(linears) - 1

    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(KINDS))
        dims = list(range(1, len(shape) + 1))  # dims of the tensor, batch excluded
        if kind == "linear":
            i = linear(shape[-1])
            steps.append((kind, (i,)))
            shape[-1] = linears[i][1]
        elif kind == "relu":
            steps.append((kind, ()))
        elif kind == "cat_branches":
            i, j = linear(shape[-1]), linear(shape[-1])
            steps.append((kind, (i, j)))
            shape[-1] = linears[i][1] + linears[j][1]
        elif kind == "cat_self" and shape[0] * 2 * len(shape) <= 48:
            d = draw(st.sampled_from(dims))
            steps.append((kind, (d,)))
            shape[d - 1] *= 2
        elif kind == "split_swap":
            d = draw(st.sampled_from([d for d in dims if shape[d - 1] >= 2] or [None]))
            if d is not None:
                k = draw(st.integers(1, shape[d - 1] - 1))
                steps.append((kind, (d, k)))
        elif kind in ("slice_swap", "slice_overlap", "slice_drop"):
            d = draw(st.sampled_from([d for d in dims if shape[d - 1] >= 2] or [None]))
            if d is not None and (kind != "slice_overlap" or shape[d - 1] < 12):
                k = draw(st.integers(1, shape[d - 1] - 1))
                steps.append((kind, (d, k)))
                shape[d - 1] += {"slice_swap": 0, "slice_overlap": 1, "slice_drop": -k}[kind]
        elif kind == "view":
            options = [(d, f) for d in dims for f in (2, 3) if shape[d - 1] % f == 0 and shape[d - 1] > f]
            if options and len(shape) < 4:
                d, f = draw(st.sampled_from(options))
                steps.append((kind, (d, f)))
                shape[d - 1:d] = [f, shape[d - 1] // f]
        elif kind == "flatten" and len(shape) >= 2:
            d = draw(st.sampled_from(dims[:-1]))
            steps.append((kind, (d,)))
            shape[d - 1:d + 1] = [shape[d - 1] * shape[d]]
        elif kind == "transpose" and len(shape) >= 2:
            d0, d1 = draw(st.lists(st.sampled_from(dims), min_size=2, max_size=2, unique=True))
            steps.append((kind, (d0, d1)))
            shape[d0 - 1], shape[d1 - 1] = shape[d1 - 1], shape[d0 - 1]
        elif kind == "reshape_all" and len(shape) >= 2:
            steps.append((kind, ()))
            shape = [int(torch.tensor(shape).prod())]
        elif kind == "sum" and len(shape) >= 2:
            d = draw(st.sampled_from(dims))
            steps.append((kind, (d,)))
            del shape[d - 1]
        elif kind == "grouped" and len(shape) == 1 and shape[0] % 2 == 0:
            g = draw(st.sampled_from([g for g in (2, 3, 4) if shape[0] % g == 0]))
            convs.append((shape[0], g * draw(st.integers(1, 3)), g))
            steps.append((kind, (len(convs) - 1,)))
            shape[0] = convs[-1][1]
    final = int(torch.tensor(shape).prod())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return Chain(steps, linears, final, convs).eval()


def example() -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(0)),)


@PROPERTY
@given(model=chains(), seed=st.integers(0, 1000))
def test_random_permutations_keep_the_function(model, seed):
    args = example()
    analysis = fxfuse.analyze(model, args)
    permuted = apply_permutations(analysis, random_permutations(analysis, seed))
    assert compare_outputs(model, permuted, args) < 1e-5, model.steps


@settings(PROPERTY, max_examples=20)
@given(model=chains(), seed=st.integers(0, 1000), cost=st.sampled_from(["weights", "activations"]))
def test_a_permuted_copy_fuses_back_exactly(model, seed, cost):
    args = example()
    permuted = fxfuse.permute(model, args, seed=seed)  # checked: raises if the copy computes something else
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxfuse.compile([model, permuted], args, cost=cost, calib=64, seed=0)
    fused, original = result.module.state_dict(), model.state_dict()
    for name, t in original.items():
        assert torch.allclose(fused[name], t, atol=1e-6), (name, model.steps)
