"""``method="auto"``: choose structure and size per layer from measured error, under one budget.

For every target matrix we measure a small menu of candidates - ``tq`` and ``kronecker`` at a few
factor shapes and ranks, ``svd`` at several ranks, and keeping the layer dense - as
(parameters, squared Frobenius error) pairs. The errors come almost for free from singular
values: for a fixed permutation, the rank-``r`` Kronecker error is the tail of the singular
values of the rearranged matrix, so one permutation search per factor shape serves every rank,
and one SVD of ``W`` serves every SVD rank.

The whole-model budget is then spread across layers to minimise the total squared error:
each layer's menu is reduced to its lower convex hull, and the budget goes, step by step, to the
upgrade with the largest error reduction per parameter (optimal for the convex relaxation, and
what keeps sensitive layers larger). Everything is deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from tqcompressor.decompose import KroneckerFactors, kronecker_sum, nearest_kronecker, permuted_kronecker, rearrange

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


def candidate_menu(weight: Tensor, b_shapes=KRONECKER_B_SHAPES, ranks=KRONECKER_RANKS,
                   svd_fractions=SVD_FRACTIONS, max_iterations: int = 10) -> tuple[list[Candidate], dict]:
    """All candidates for one matrix, and the permutation search results to reuse when compressing."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    norm_sq = float((w * w).sum()) or 1.0
    menu = [Candidate("dense", m * n, 0.0)]
    singular = torch.linalg.svdvals(w)
    tail = _tail_energy(singular)
    for fraction in svd_fractions:
        rank = max(1, int(fraction * m * n / (m + n)))
        if rank < min(m, n):
            menu.append(Candidate("svd", rank * (m + n), (tail[rank] / norm_sq) ** 0.5, rank))
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
        # plain Kronecker: identity permutations; every rank from one SVD of the rearrangement
        plain_tail = _tail_energy(torch.linalg.svdvals(rearrange(w, a_shape, b_shape)))
        # tq: one permutation search (at the largest usable rank), reused for every rank
        found = permuted_kronecker(w, a_shape, b_shape, max(usable), max_iterations)
        searches[b_shape] = found
        permuted = w[found.row_perm][:, found.col_perm]
        tq_tail = _tail_energy(torch.linalg.svdvals(rearrange(permuted, a_shape, b_shape)))
        for rank in usable:
            menu.append(Candidate("kronecker", rank * per_term, (plain_tail[rank] / norm_sq) ** 0.5, rank, a_shape, b_shape))
            menu.append(Candidate("tq", rank * per_term, (min(tq_tail[rank], plain_tail[rank]) / norm_sq) ** 0.5,
                                  rank, a_shape, b_shape))
    return menu, searches


def _tail_energy(singular: Tensor) -> list[float]:
    """``tail[r]`` = sum of squared singular values beyond the first ``r``."""
    sq = (singular.double() ** 2).flip(0).cumsum(0).flip(0).tolist()
    return sq + [0.0]


def factors_for(weight: Tensor, choice: Candidate, searches: dict) -> KroneckerFactors:
    """The Kronecker factors of a chosen tq/kronecker candidate, reusing its permutation search."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    row, col = torch.arange(m), torch.arange(n)
    a, b = nearest_kronecker(w, choice.a_shape, choice.b_shape, choice.rank)
    if choice.method == "tq" and choice.b_shape in searches:  # keep the permutation only if it helps
        found = searches[choice.b_shape]
        permuted = w[found.row_perm][:, found.col_perm]
        perm_a, perm_b = nearest_kronecker(permuted, choice.a_shape, choice.b_shape, choice.rank)
        if (permuted - kronecker_sum(perm_a, perm_b)).norm() <= (w - kronecker_sum(a, b)).norm():
            a, b, row, col = perm_a, perm_b, found.row_perm, found.col_perm
    dtype = weight.dtype
    return KroneckerFactors(a.to(dtype), b.to(dtype), row, col)


def allocate(menus: dict[str, list[Candidate]], norms_sq: dict[str, float], budget: int) -> dict[str, Candidate]:
    """Pick one candidate per layer, total parameters <= ``budget``, minimising the total squared
    error ``sum_l ||W_l||^2 err_l^2``: greedy along each layer's lower convex hull."""
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
