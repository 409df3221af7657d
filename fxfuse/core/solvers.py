"""Solvers: from a cost matrix to an alignment.

All take ``M`` of shape ``(n_t, n_s)``, ``M[j, k]`` the cost of sending source
unit ``k`` to target unit ``j``, and marginals ``a`` (target, sums to 1) and
``b`` (source), POT's ``(a, b, M, reg)`` order. A plan ``T`` (``n_t × n_s``,
``T·1 = a``, ``Tᵀ·1 = b``) becomes the *barycentric map* ``A = diag(1/a)·T``:
row ``j`` of ``A`` sums to 1, so an aligned unit is a weighted **average** of
source units, never a sum (also when fusing a wide model into a narrow one).

=========  ==================================  ====================================
solver     use                                 notes
=========  ==================================  ====================================
assignment equal sizes, hard                   scipy ``linear_sum_assignment``; exact
matching   unequal sizes, hard                 every unit of the larger side goes
                                               whole to one unit of the smaller side,
                                               which gets at least one; exact, by one
                                               square assignment
sinkhorn   soft alignment                      ``ot.sinkhorn`` on ``M / max|M|``,
                                               ``reg`` ≈ 0.05–0.1; warns if not converged
=========  ==================================  ====================================

``solve(M, "exact")`` uses ``assignment`` for equal sizes and ``matching`` for
unequal ones; ``solve(M, "sinkhorn")`` the entropic plan with uniform marginals.

*Producers and consumers.* A map ``A`` moves the axes that **write** units
(rows of a linear layer, biases, norm scales): ``W' = A W``, each target unit
the average of its source units. Axes that **read** units (the input columns
of the next layer) move by the column-normalised ``C = A·diag(1/1ᵀA)``, so
every source unit's contribution is passed on whole. With a matching that
copies a unit into several target units (a wider target) the copies split its
outgoing weights, and the aligned model computes exactly what the source did;
merging several units into one (a narrower target) averages what they write
and sums what they are read by, which is exact where they were duplicates.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class SolverWarning(UserWarning):
    """A solver stopped before convergence."""


def assignment(M: np.ndarray) -> np.ndarray:
    """Permutation ``p`` minimising ``Σ_j M[j, p[j]]`` (``M`` square): target ``j`` takes source ``p[j]``."""
    rows, cols = linear_sum_assignment(M)
    p = np.empty(M.shape[0], dtype=np.int64)
    p[rows] = cols
    return p


def matching(M: np.ndarray) -> np.ndarray:
    """Hard many-to-one map minimising ``Σ M[j, k]`` over its pairs; ``A`` (``n_t × n_s``, rows sum to 1).

    Target wider (``n_t > n_s``): every target unit copies one source unit, every
    source unit is used at least once (``A`` one-hot rows). Target narrower:
    every source unit goes to one target unit, every target unit gets at least
    one, ``A[j, k] = 1/|cluster j|``. Both are one square assignment: the
    smaller side's units are mandatory slots and the surplus slots cost each
    unit its best pair.
    """
    n_t, n_s = M.shape
    A = np.zeros((n_t, n_s))
    if n_t >= n_s:
        extra = np.repeat(M.min(1, keepdims=True), n_t - n_s, axis=1)
        cols = assignment(np.concatenate([M, extra], axis=1))
        src = np.where(cols < n_s, cols, M.argmin(1))
        A[np.arange(n_t), src] = 1.0
        return A
    extra = np.repeat(M.min(0, keepdims=True), n_s - n_t, axis=0)
    rows = assignment(np.concatenate([M, extra], axis=0).T)  # source k -> slot rows[k]
    dst = np.where(rows < n_t, rows, M.argmin(0))
    A[dst, np.arange(n_s)] = 1.0
    return A / A.sum(1, keepdims=True)


def consumer(A: torch.Tensor) -> torch.Tensor:
    """``C = A·diag(1/1ᵀA)``: how an axis that reads units moves (see the module doc)."""
    return A / A.sum(0, keepdim=True).clamp(min=torch.finfo(A.dtype).tiny)


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def sinkhorn_plan(a: np.ndarray, b: np.ndarray, M: np.ndarray, reg: float, n_iter: int = 5000,
                  tol: float = 1e-9) -> np.ndarray:
    """Entropic OT on the max-normalised cost ``M / max|M|`` (so ``reg`` is scale-free)."""
    import ot

    scale = float(np.abs(M).max()) or 1.0
    Mn = (M - M.min()) / scale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T, log = ot.sinkhorn(a, b, Mn, reg, numItermax=n_iter, stopThr=tol, log=True, method="sinkhorn_log")
    err = float(log["err"][-1]) if log.get("err") else 0.0
    if caught or err > 1e-6 or not np.isfinite(T).all():
        warnings.warn(f"sinkhorn (reg={reg}) did not converge: marginal error {err:.1e}", SolverWarning)
    return T


def barycentric(T: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``diag(1/a)·T``: each target unit an average of source units."""
    return T / a[:, None]


def solve(M: np.ndarray, solver: str, reg: float | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Align with ``solver``; returns ``(perm or None, A)`` with ``A`` the ``n_t × n_s`` barycentric map."""
    n_t, n_s = M.shape
    if solver == "exact" and n_t == n_s:
        p = assignment(M)
        A = np.zeros((n_t, n_s))
        A[np.arange(n_t), p] = 1.0
        return p, A
    a, b = uniform(n_t), uniform(n_s)
    if solver == "exact":
        return None, matching(M)
    if solver == "sinkhorn":
        return None, barycentric(sinkhorn_plan(a, b, M, 0.06 if reg is None else reg), a)
    raise ValueError(f"unknown solver {solver!r} (exact, sinkhorn)")


def to_torch(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
