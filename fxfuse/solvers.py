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
exact      unequal sizes, hard-ish             ``ot.emd`` with ``numItermax`` raised;
                                               a plan cut short raises a warning
sinkhorn   soft alignment                      ``ot.sinkhorn`` on ``M / max|M|``,
                                               ``reg`` ≈ 0.05–0.1; warns if not converged
=========  ==================================  ====================================
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


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def exact_plan(a: np.ndarray, b: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Exact OT plan (network simplex), with an iteration cap that scales with the problem."""
    import ot

    n_iter = max(100_000, 50 * M.shape[0] * M.shape[1])
    T, log = ot.emd(a, b, np.ascontiguousarray(M, dtype=np.float64), numItermax=n_iter, log=True)
    if log.get("warning"):
        warnings.warn(f"exact OT did not finish ({log['warning']}); the plan is approximate", SolverWarning)
    return T


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
        return None, barycentric(exact_plan(a, b, M), a)
    if solver == "sinkhorn":
        return None, barycentric(sinkhorn_plan(a, b, M, 0.06 if reg is None else reg), a)
    raise ValueError(f"unknown solver {solver!r} (exact, sinkhorn)")


def to_torch(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
