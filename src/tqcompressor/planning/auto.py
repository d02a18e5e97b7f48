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
* with calibration statistics (:mod:`tqcompressor.planning.calibration`), the relative *output* error
  ``E||(W - W') x||^2 / E||W x||^2``; SVD candidates are then activation-aware (they minimise
  exactly that), and each layer is weighted by ``grad_sq * E||W x||^2``, an estimate of how much
  the loss grows per unit of squared relative output error. Measured on SmolLM2-135M this is what
  makes ``auto`` work: weight error alone does not predict perplexity.

A tied token table is one more layer on the menu, measured in both of its roles (the LM head and
the lookup, :func:`embedding_candidates`).

The whole-model budget is then spread across layers to minimise the weighted total: each layer's
menu is reduced to its lower convex hull, and the budget goes, step by step, to the upgrade with
the largest reduction per parameter (optimal for the convex relaxation). Everything is
deterministic.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.linalg.decompose import OutputSketch
from tqcompressor.planning.calibration import EmbeddingStatistics, usable_statistics
from tqcompressor.planning.config import CompressionConfig, LayerSpec
from tqcompressor.planning.inventory import Inventory
from tqcompressor.planning.plan import LayerPlan, steps_upper_first
from tqcompressor.planning.planners import target_params
from tqcompressor.planning.registry import Planner, register_planner
from tqcompressor.structures import REGISTRY, Candidate, all_structures, get_structure
from tqcompressor.structures.lowrank import LowRankFactors, output_rows, row_weighted_svd


def candidate_menu(
    weight: Tensor,
    input_cov: Tensor | None = None,
    max_iterations: int = 10,
    methods: list[str] | None = None,
    embedding: bool = False,
) -> tuple[list[Candidate], dict]:
    """Every structure's candidates for one matrix (only those named in ``methods``, keeping the
    layer dense always included; for an ``embedding`` table only the structures ``auto``
    measures on one; none of a structure whose candidates another measured one includes, see
    ``Capabilities.covered_by``), and per structure the state its ``fit_candidate`` reuses (e.g.
    the permutation searches).

    Errors are relative Frobenius errors of the weight, or, given the covariance of the layer's
    inputs, relative *output* errors (and the SVD candidates are then activation-aware)."""
    sketch = OutputSketch(input_cov) if input_cov is not None else None
    measured = [structure for structure in all_structures() if _on_menu(structure, methods, embedding)]
    names = {structure.name for structure in measured}
    menu, states = [], {}
    for structure in measured:
        if structure.capabilities.covered_by in names:
            continue
        candidates, states[structure.name] = structure.candidates(weight, sketch, max_iterations)
        menu += candidates
    return menu, states


def _on_menu(structure, methods: list[str] | None, embedding: bool) -> bool:
    able = structure.capabilities
    return not able.compresses or (
        (methods is None or structure.name in methods) and (able.auto_embeddings or not embedding)
    )


def factors_for(weight: Tensor, choice: Candidate, states: dict, input_cov: Tensor | None = None):
    """The factors of a chosen candidate, fitted by its structure (activation-aware when
    ``input_cov`` is given)."""
    return REGISTRY[choice.method].fit_candidate(weight, choice, states.get(choice.method), input_cov)


def layer_scale(weight: Tensor, stats=None) -> float:
    """How much one unit of squared relative error of this layer costs in :func:`allocate`:
    ``||W||_F^2`` without calibration; ``grad_sq * tr(W C W^T)`` (expected loss increase) with it.
    A tied embedding's is the sum over its two roles (:func:`role_scales`)."""
    w = weight.detach().to(torch.float64)
    if stats is None:
        return float(w.square().sum())
    return stats.grad_sq * float((w @ stats.input_cov.double() * w).sum())


def embedding_candidates(
    weight: Tensor, menu: list[Candidate], states: dict, stats: EmbeddingStatistics, roles: tuple[float, float]
) -> list[Candidate]:
    """A tied embedding's candidates measured in both of its roles, as :func:`embedding_factors`
    fits them: as the head (``hidden -> logits``) the relative output error ``tr(D C D^T) / tr(W C W^T)``;
    as the lookup the relative error of the rows the calibration text read, weighted by how often.
    The two are combined by each role's loss sensitivity, ``roles`` (:func:`role_scales`):
    ``err^2 = (S_head e_head^2 + S_lookup e_lookup^2) / (S_head + S_lookup)``."""
    w = weight.detach().to(torch.float64)
    head_scale, lookup_scale = roles
    cov = stats.head.input_cov.to(torch.float32)
    head_energy = float((weight.float() @ cov * weight.float()).sum(dtype=torch.float64))
    rows = stats.lookup.token_counts.nonzero().squeeze(1)
    counts = stats.lookup.token_counts[rows]
    lookup_energy = float(counts @ w[rows].square().sum(1))
    ranks = [c for c in menu if c.method == "svd"]
    # every svd rank keeps the leading right singular vectors of one row-weighted SVD: fit the widest once
    widest = embedding_factors(weight, max(ranks, key=lambda c: c.params), states, stats, roles) if ranks else None
    measured = []
    for candidate in menu:
        if not REGISTRY[candidate.method].capabilities.compresses:
            measured.append(candidate)
            continue
        if candidate.method == "svd":
            rank = candidate.settings["rank"]
            factors = LowRankFactors(widest.u[:, :rank], widest.v[:rank])
        else:
            factors = embedding_factors(weight, candidate, states, stats, roles)
        error = weight.float() - factors.to_dense().float()
        head_error_sq = float((error @ cov * error).sum(dtype=torch.float64)) / head_energy
        lookup_error_sq = float(counts @ error[rows].double().square().sum(1)) / lookup_energy
        combined = (head_scale * head_error_sq + lookup_scale * lookup_error_sq) / (head_scale + lookup_scale)
        measured.append(dataclasses.replace(candidate, error=combined**0.5))
    return measured


def embedding_factors(
    weight: Tensor, candidate: Candidate, states: dict, stats: EmbeddingStatistics, roles: tuple[float, float]
):
    """The factors ``auto`` measures and installs for a candidate of a tied table. ``svd``: the
    row-weighted SVD (:func:`~tqcompressor.structures.lowrank.row_weighted_svd`) whose row weights
    add the two roles: the lookup's (how often the row is read) and the head's, with every row
    alike (its Frobenius proxy; the head's exact metric weighs columns, which a row weight cannot).
    Other structures: fitted in the head's metric. ``roles``: :func:`role_scales`."""
    if candidate.method != "svd":
        return factors_for(weight, candidate, states, stats.input_cov)
    w = weight.detach().to(torch.float64)
    head_scale, lookup_scale = roles
    counts = stats.lookup.token_counts
    row_weights = lookup_scale * counts / float(counts @ w.square().sum(1)) + head_scale / float(w.square().sum())
    return row_weighted_svd(weight, candidate.settings["rank"], row_weights)


def role_scales(weight: Tensor, stats: EmbeddingStatistics) -> tuple[float, float]:
    """(head, lookup): expected loss increase per unit squared relative error in each role."""
    w = weight.detach().to(torch.float64)
    head = stats.head.grad_sq * float((w @ stats.head.input_cov.double() * w).sum())
    looked_up = float(stats.lookup.token_counts @ w.square().sum(1)) / max(stats.lookup.tokens, 1)
    return head, stats.lookup.grad_sq * stats.output_scale**2 * looked_up


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
    return _fill({name: hulls[name][position[name]] for name in hulls}, menus, norms_sq, budget - spent)


def _fill(choice: dict[str, Candidate], menus: dict, norms_sq: dict, left: int) -> dict[str, Candidate]:
    """Spend what the hull steps left: the next hull point of a layer can cost more than the budget
    has left (one step of a 262k-row table is millions of parameters) while a candidate between two
    hull points still fits. Take the best such upgrade per parameter until none fits."""
    while True:
        best = None  # (gain per parameter, name, candidate)
        for name in sorted(menus):
            current = choice[name]
            for candidate in menus[name]:
                cost = candidate.params - current.params
                if 0 < cost <= left and candidate.error < current.error:
                    gain = (current.error**2 - candidate.error**2) * norms_sq[name] / cost
                    if best is None or gain > best[0]:
                        best = (gain, name, candidate)
        if best is None:
            return choice
        _, name, candidate = best
        left -= candidate.params - choice[name].params
        choice[name] = candidate


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


# ---------------------------------------------------------------------------------------------
# The auto planner: measure every layer's menu, allocate the budget, fit the choices

EMBEDDING_METRIC = "relative error as LM head and as lookup on the calibration text, weighted by loss sensitivity"


@dataclass
class Menus:
    """What ``auto`` measured per layer: the matrix measured (``diag(rows) W`` with output weights),
    its candidates, the structures' reusable state, the layer's weight in the allocation, and for a
    tied table its two roles' weights."""

    measured: dict[str, Tensor]
    candidates: dict[str, list[Candidate]]
    states: dict[str, dict]
    scales: dict[str, float]
    roles: dict[str, tuple[float, float]]
    rows: dict[str, Tensor]
    usable: dict[str, Any]


def auto_targets(inventory: Inventory, config: CompressionConfig, offer_embedding: bool) -> list[str]:
    """What ``auto`` measures: the targets, and with no targets named a tied token embedding too
    (keeping it dense is on its menu, so offering it never costs quality). An embedding is
    measured through the head tied to it, so an untied one, or a head about to be untied, is refused."""
    names = list(inventory.targets)
    embedding = inventory.tied_embedding if config.tie_lm_head else None
    refused = [name for name in names if name in inventory.embeddings and name != embedding]
    if refused:
        raise TQCError(
            f"method 'auto' measures an embedding through the LM head tied to it; {refused[0]} has none "
            "(or tie_lm_head is off): factor it with an explicit spec"
        )
    if offer_embedding and config.target_modules is None and embedding is not None:
        return [*names, embedding]
    return names


def _outside_targets(inventory: Inventory, names: list[str], target: int) -> int:
    """The parameters outside the target modules; one clear error if they alone exceed the budget."""
    fixed = inventory.params_outside(names)
    if target <= fixed:
        raise TQCError(
            f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
            "modules; raise the ratio or add target modules"
        )
    return fixed


def _auto_prepare(inventory: Inventory, config: CompressionConfig, calibration) -> list[str]:
    # statistics handed in were measured for the named targets: the embedding is offered with token ids
    names = auto_targets(inventory, config, offer_embedding=not isinstance(calibration, dict))
    _outside_targets(inventory, names, target_params(inventory, config))  # before calibrating: no work wasted
    return names if calibration is not None else []


def plan_auto(
    inventory: Inventory, config: CompressionConfig, stats: dict | None, progress: bool
) -> tuple[list[LayerPlan], dict]:
    """Measure every structure's candidates per layer and allocate the budget by error per
    parameter (see the module's docstring). The chosen factors are fitted here."""
    names = auto_targets(inventory, config, offer_embedding=stats is None or inventory.tied_embedding in stats)
    missing = [name for name in names if stats is not None and name not in stats]
    if missing:
        raise TQCError(f"the calibration statistics have none for {missing[0]}; pass calibration token ids")
    target = target_params(inventory, config)
    fixed = _outside_targets(inventory, names, target)
    menus = measure_menus(inventory, names, config, stats, progress)
    try:
        choices = allocate(menus.candidates, menus.scales, target - fixed)
    except ValueError as exc:
        raise TQCError(f"{exc}; raise the ratio") from None
    metric = "relative output error on the calibration text" if stats else "relative weight error"
    if menus.rows:
        metric = "relative output error on the calibration text, outputs weighted by gradient energy"
    steps = steps_upper_first(names, config.steps)
    layers, record = [], {}
    for name in names:
        measured_in = EMBEDDING_METRIC if name in menus.roles else metric
        record[name] = _record(name, choices[name], menus, measured_in)
        if REGISTRY[choices[name].method].capabilities.compresses:  # else kept dense
            layers.append(_chosen_layer(inventory, name, choices[name], menus, measured_in, steps[name]))
    return layers, record


def measure_menus(
    inventory: Inventory, names: list[str], config: CompressionConfig, stats: dict | None, progress: bool
) -> Menus:
    """Every layer's candidates, in the metric its statistics allow."""
    weights = {name: inventory.weights[name] for name in names}
    usable = {name: usable_statistics(stats[name], weights[name]) if stats else None for name in names}
    cov = {name: usable[name].input_cov if usable[name] is not None else None for name in names}
    # a tied table's two role weights (tr(W C W^T) over 262k rows for Gemma): measured once, used thrice
    roles = {name: role_scales(weights[name], s) for name, s in usable.items() if isinstance(s, EmbeddingStatistics)}
    rows = _output_weights(weights, usable, roles) if config.output_weights else {}
    # with output weights a layer is measured, budgeted and fitted as diag(rows) W in the output metric
    # (1/2 sum_i r_i E[(delta y_i)^2] = grad_sq * ||diag(rows) (W - W') x||^2), its factors scaled back
    # exactly: svd's U absorbs the scale, a Kronecker layer stores it (one parameter per output, counted)
    measured = {name: w * rows[name][:, None].to(w.dtype) if name in rows else w for name, w in weights.items()}
    candidates, states = {}, {}
    for name in tqdm(names, desc="measuring candidates", unit="layer", disable=not progress):
        embedding = name in inventory.embeddings
        candidates[name], states[name] = candidate_menu(
            measured[name], cov[name], config.max_iterations, config.auto_methods, embedding=embedding
        )
        if name in roles:
            candidates[name] = embedding_candidates(
                weights[name], candidates[name], states[name], usable[name], roles[name]
            )
        if name in rows:
            candidates[name] = [REGISTRY[c.method].row_scaled(c, weights[name].shape[0]) for c in candidates[name]]
    scales = {
        name: sum(roles[name]) if name in roles else layer_scale(w, stats[name] if stats else None)
        for name, w in measured.items()
    }
    return Menus(measured, candidates, states, scales, roles, rows, usable)


def _record(name: str, choice: Candidate, menus: Menus, measured_in: str) -> dict:
    """What the report shows of one layer: the choice, the metric, its weight and the whole menu."""
    record = {
        "chosen": choice.to_dict(),
        "metric": measured_in,
        "layer_weight": menus.scales[name],
        "menu": [c.to_dict() for c in menus.candidates[name]],
    }
    if name in menus.roles:  # what each role of the table adds to its weight
        record["role_weights"] = dict(zip(("head", "lookup"), menus.roles[name]))
    return record


def _chosen_layer(
    inventory: Inventory, name: str, choice: Candidate, menus: Menus, measured_in: str, step: int
) -> LayerPlan:
    """The plan of one layer ``auto`` compresses, with the chosen candidate's factors fitted."""
    reason = (
        f"auto: {choice.method} at {choice.params:,} params gives {measured_in} {choice.error:.3f}; "
        f"chosen by weighted error reduction per parameter among {len(menus.candidates[name])} candidates"
    )
    spec = LayerSpec(choice.method, step=step, reason=reason, **choice.settings)
    usable = menus.usable[name]
    if name in menus.roles:
        factors = embedding_factors(inventory.weights[name], choice, menus.states[name], usable, menus.roles[name])
    else:
        cov = usable.input_cov if usable is not None else None
        factors = factors_for(menus.measured[name], choice, menus.states[name], cov)
        if name in menus.rows:
            factors = REGISTRY[choice.method].divide_rows(factors, menus.rows[name])
    return LayerPlan(name, spec, factors)


def _output_weights(weights: dict, usable: dict, roles: dict) -> dict[str, Tensor]:
    """Per layer with calibration statistics (not a tied table, whose roles are weighed apart): the
    square roots of its outputs' damped gradient energies, mean square 1."""
    found = {name: output_rows(weights[name], s) for name, s in usable.items() if s is not None and name not in roles}
    return {name: rows.float() for name, rows in found.items() if rows is not None}


def _check_auto_options(config: CompressionConfig) -> None:
    for name in config.auto_methods or []:
        get_structure(name)  # one clear line for an unknown name


register_planner(
    Planner(
        "auto",
        "choose structure and size per layer from measured error, under one budget",
        plan_auto,
        _check_auto_options,
        is_method=True,
        prepare=_auto_prepare,
    )
)
