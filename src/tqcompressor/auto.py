"""``method="auto"``: choose structure and size per layer from measured error, under one budget.

For every target matrix we measure a small menu of candidates - ``tq`` and ``kronecker`` at a few
factor shapes and ranks, ``svd`` at several ranks, and keeping the layer dense - as
(parameters, relative error) pairs. The errors come almost for free from singular values: for a
fixed permutation, the rank-``r`` Kronecker error is the tail of the singular values of the
rearranged matrix, so one permutation search per factor shape serves every rank, and one SVD
serves every SVD rank.

Two metrics:

* without calibration text, the relative Frobenius error of the weight, and layers weighted by
  ``||W||^2`` (total squared weight error);
* with calibration statistics (:mod:`tqcompressor.calibration`), the relative *output* error
  ``E||(W - W') x||^2 / E||W x||^2``; SVD candidates are then activation-aware (they minimise
  exactly that), and each layer is weighted by ``grad_sq * E||W x||^2``, an estimate of how much
  the loss grows per unit of squared relative output error. Measured on SmolLM2-135M this is what
  makes ``auto`` work: weight error alone does not predict perplexity.

The whole-model budget is then spread across layers to minimise the weighted total: each layer's
menu is reduced to its lower convex hull, and the budget goes, step by step, to the upgrade with
the largest reduction per parameter (optimal for the convex relaxation). Everything is
deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from tqcompressor.decompose import (KroneckerFactors, LowRankFactors, kronecker_sum, nearest_kronecker, output_error,
                                    damped_eigen, permuted_kronecker, rearrange, truncated_svd)

KRONECKER_B_SHAPES = ((2, 4), (4, 2), (1, 2), (2, 2))
KRONECKER_RANKS = (1, 2, 3, 4, 6, 8)
SVD_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class Candidate:
    method: str  # tq | kronecker | svd | dense
    params: int
    error: float  # relative Frobenius error
    rank: int = 0
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def candidate_menu(weight: Tensor, input_cov: Tensor | None = None, b_shapes=KRONECKER_B_SHAPES,
                   ranks=KRONECKER_RANKS, svd_fractions=SVD_FRACTIONS,
                   max_iterations: int = 10) -> tuple[list[Candidate], dict]:
    """All candidates for one matrix, and the permutation search results to reuse when compressing.

    Errors are relative Frobenius errors of the weight, or, given the covariance of the layer's
    inputs, relative *output* errors (and the SVD candidates are then activation-aware)."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    menu = [Candidate("dense", m * n, 0.0)]
    if input_cov is None:
        singular, sketch = torch.linalg.svdvals(w), None
    else:
        sketch = _OutputSketch(input_cov)
        singular = torch.linalg.svdvals(w @ sketch.root)
    tail = _tail_energy(singular)
    for fraction in svd_fractions:
        rank = max(1, int(fraction * m * n / (m + n)))
        if rank < min(m, n):
            menu.append(Candidate("svd", rank * (m + n), (tail[rank] / tail[0]) ** 0.5, rank))
    searches: dict[tuple, KroneckerFactors] = {}
    for b_shape in b_shapes:
        m2, n2 = b_shape
        if m % m2 or n % n2:
            continue
        a_shape = (m // m2, n // n2)
        usable = [r for r in ranks if r < m2 * n2 and r <= a_shape[0] * a_shape[1]]
        if not usable:
            continue
        per_term = a_shape[0] * a_shape[1] + m2 * n2
        # tq: one permutation search (at the largest usable rank), reused for every rank
        found = permuted_kronecker(w, a_shape, b_shape, max(usable), max_iterations)
        searches[b_shape] = found
        identity = (torch.arange(m), torch.arange(n))
        # every rank's error from one SVD of the rearrangement (plain Kronecker: identity permutations)
        plain = _kronecker_errors(w, a_shape, b_shape, usable, *identity, sketch)
        permuted = _kronecker_errors(w, a_shape, b_shape, usable, found.row_perm, found.col_perm, sketch)
        for rank in usable:
            menu.append(Candidate("kronecker", rank * per_term, plain[rank], rank, a_shape, b_shape))
            menu.append(Candidate("tq", rank * per_term, min(permuted[rank], plain[rank]), rank, a_shape, b_shape))
    return menu, searches


def _kronecker_errors(w: Tensor, a_shape, b_shape, ranks: list[int], row_perm: Tensor, col_perm: Tensor,
                      sketch: "_OutputSketch | None") -> dict[int, float]:
    """Relative error of the rank-r Kronecker fit of ``w[row_perm][:, col_perm]``, for every r in ``ranks``."""
    permuted = w[row_perm][:, col_perm]
    if sketch is None:  # Frobenius: the tail of the rearrangement's singular values
        tail = _tail_energy(torch.linalg.svdvals(rearrange(permuted, a_shape, b_shape)))
        return {r: (tail[r] / tail[0]) ** 0.5 for r in ranks}
    # output metric: subtract the Kronecker terms one by one and measure the residual
    u, s, vh = torch.linalg.svd(rearrange(permuted, a_shape, b_shape), full_matrices=False)
    residual, errors = permuted.clone(), {}
    total = sketch.energy(permuted, col_perm)
    for r in range(max(ranks)):
        a = (u[:, r] * s[r]).reshape(a_shape)
        residual -= torch.kron(a, vh[r].reshape(b_shape))
        if r + 1 in ranks:
            errors[r + 1] = (sketch.energy(residual, col_perm) / total) ** 0.5
    return errors


class _OutputSketch:
    """``tr(D C D^T)`` for many ``D``, cheaply: exact on the top ``k`` eigen-directions of ``C``,
    the rest counted at their mean eigenvalue (exact when ``k`` covers ``C``)."""

    def __init__(self, input_cov: Tensor, k: int = 128) -> None:
        values, vectors = damped_eigen(input_cov)  # ascending
        self.root = vectors * values.sqrt()  # C = root root^T
        k = min(k, len(values))
        self.top = self.root[:, -k:]
        self.basis = vectors[:, -k:]
        self.rest = float(values[:-k].mean()) if k < len(values) else 0.0

    def energy(self, d: Tensor, col_perm: Tensor) -> float:
        top, basis = self.top[col_perm], self.basis[col_perm]  # d's columns are in permuted order
        outside = float(d.square().sum() - (d @ basis).square().sum())
        return float((d @ top).square().sum()) + self.rest * max(outside, 0.0)


def _tail_energy(singular: Tensor) -> list[float]:
    """``tail[r]`` = sum of squared singular values beyond the first ``r``."""
    sq = (singular.double() ** 2).flip(0).cumsum(0).flip(0).tolist()
    return sq + [0.0]


def factors_for(weight: Tensor, choice: Candidate, searches: dict,
                input_cov: Tensor | None = None) -> KroneckerFactors | LowRankFactors:
    """The factors of a chosen candidate: activation-aware SVD when ``input_cov`` is given, and for
    tq the permutation search from the menu (kept only where it beats no permutation)."""
    if choice.method == "svd":
        return truncated_svd(weight, choice.rank, input_cov)
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    row, col = torch.arange(m), torch.arange(n)
    a, b = nearest_kronecker(w, choice.a_shape, choice.b_shape, choice.rank)
    if choice.method == "tq" and choice.b_shape in searches:
        found = searches[choice.b_shape]
        perm_a, perm_b = nearest_kronecker(w[found.row_perm][:, found.col_perm], choice.a_shape, choice.b_shape,
                                           choice.rank)
        candidate = KroneckerFactors(perm_a, perm_b, found.row_perm, found.col_perm)
        if _error(w, candidate.to_dense(), input_cov) <= _error(w, kronecker_sum(a, b), input_cov):
            a, b, row, col = perm_a, perm_b, found.row_perm, found.col_perm
    dtype = weight.dtype
    return KroneckerFactors(a.to(dtype), b.to(dtype), row, col)


def _error(w: Tensor, approx: Tensor, input_cov: Tensor | None) -> float:
    return float((w - approx).norm()) if input_cov is None else output_error(w, approx, input_cov)


def layer_scale(weight: Tensor, stats=None) -> float:
    """How much one unit of squared relative error of this layer costs in :func:`allocate`:
    ``||W||_F^2`` without calibration; ``grad_sq * tr(W C W^T)`` (expected loss increase) with it."""
    w = weight.detach().to(torch.float64)
    if stats is None:
        return float(w.square().sum())
    return stats.grad_sq * float((w @ stats.input_cov.double() * w).sum())


def allocate(menus: dict[str, list[Candidate]], norms_sq: dict[str, float], budget: int) -> dict[str, Candidate]:
    """Pick one candidate per layer, total parameters <= ``budget``, minimising
    ``sum_l norms_sq[l] * err_l^2`` (see :func:`layer_scale`): greedy along each layer's lower convex hull."""
    hulls = {name: _lower_hull(menu, norms_sq[name]) for name, menu in menus.items()}
    position = {name: 0 for name in hulls}
    spent = sum(hull[0].params for hull in hulls.values())
    if spent > budget:
        cheapest = min(spent, sum(min(c.params for c in menu) for menu in menus.values()))
        raise ValueError(f"even the smallest candidates need {cheapest:,} parameters, over the budget of {budget:,}")
    heap = []

    def push(name: str) -> None:
        hull, i = hulls[name], position[name]
        if i + 1 < len(hull):
            gain = (hull[i].error ** 2 - hull[i + 1].error ** 2) * norms_sq[name]
            cost = hull[i + 1].params - hull[i].params
            heapq.heappush(heap, (-gain / cost, name))

    for name in sorted(hulls):
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], position[name]
        cost = hull[i + 1].params - hull[i].params
        if spent + cost > budget:
            continue  # this upgrade does not fit; cheaper upgrades elsewhere still may
        spent += cost
        position[name] = i + 1
        push(name)
    return {name: hulls[name][position[name]] for name in hulls}


def _lower_hull(menu: list[Candidate], norm_sq: float) -> list[Candidate]:
    """Candidates on the lower convex hull of (params, squared error), cheapest first."""
    ordered = sorted(menu, key=lambda c: (c.params, c.error, c.method))
    pareto: list[Candidate] = []
    for c in ordered:
        if not pareto or c.error < pareto[-1].error - 1e-6:  # ignore numerically-zero gains
            pareto.append(c)
    hull: list[Candidate] = []
    for c in pareto:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = _point(hull[-2], norm_sq), _point(hull[-1], norm_sq)
            x3, y3 = _point(c, norm_sq)
            # drop the middle point if it lies on or above the segment from the first to the new one
            if (y2 - y1) * (x3 - x1) >= (y3 - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _point(c: Candidate, norm_sq: float) -> tuple[float, float]:
    return float(c.params), c.error ** 2 * norm_sq
