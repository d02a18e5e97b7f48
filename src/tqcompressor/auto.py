"""``method="auto"``: choose structure and size per layer from measured error, under one budget.

For every target matrix we measure a small menu of candidates from every registered structure
(:mod:`tqcompressor.structures`: ``tq`` and ``kronecker`` at a few factor shapes and ranks, ``svd``
at several ranks, keeping the layer dense, ...) as (parameters, relative error) pairs. Each
structure measures its own candidates cheaply: for a fixed permutation, the rank-``r`` Kronecker
error is the tail of the singular values of the rearranged matrix, so one permutation search per
factor shape serves every rank, and one SVD serves every SVD rank.

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

import torch
from torch import Tensor

from tqcompressor.decompose import OutputSketch
from tqcompressor.structures import REGISTRY, Candidate, all_structures


def candidate_menu(
    weight: Tensor, input_cov: Tensor | None = None, max_iterations: int = 10, methods: list[str] | None = None
) -> tuple[list[Candidate], dict]:
    """Every structure's candidates for one matrix (only those named in ``methods``, keeping the
    layer dense always included), and per structure the state its ``fit_candidate`` reuses (e.g.
    the permutation searches).

    Errors are relative Frobenius errors of the weight, or, given the covariance of the layer's
    inputs, relative *output* errors (and the SVD candidates are then activation-aware)."""
    sketch = OutputSketch(input_cov) if input_cov is not None else None
    menu, states = [], {}
    for structure in all_structures():
        if methods is not None and structure.compresses and structure.name not in methods:
            continue
        candidates, states[structure.name] = structure.candidates(weight, sketch, max_iterations)
        menu += candidates
    return menu, states


def factors_for(weight: Tensor, choice: Candidate, states: dict, input_cov: Tensor | None = None):
    """The factors of a chosen candidate, fitted by its structure (activation-aware when
    ``input_cov`` is given)."""
    return REGISTRY[choice.method].fit_candidate(weight, choice, states.get(choice.method), input_cov)


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
    return float(c.params), c.error**2 * norm_sq
