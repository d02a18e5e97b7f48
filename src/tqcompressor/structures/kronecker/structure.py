"""The structures ``tq``, ``kronecker`` and ``kronecker_prune``: budget sizes, ``auto``'s candidates, registration."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tqcompressor.errors import TQCError
from tqcompressor.linalg.decompose import (
    complete_shapes,
    damped_cov,
    kronecker_sum,
    nearest_kronecker,
    output_metric_kronecker,
    relative_error,
)
from tqcompressor.linalg.permutation import permuted_kronecker
from tqcompressor.structures.base import Candidate, Capabilities, Structure, register
from tqcompressor.structures.kronecker.fit import KroneckerFactors, fit_kronecker, kronecker_errors, pruning_start
from tqcompressor.structures.kronecker.kernels import kronecker_macs, kronecker_order
from tqcompressor.structures.kronecker.modules import KroneckerEmbedding, KroneckerLinear
from tqcompressor.structures.kronecker.settings import (
    AUTO_B_SHAPES,
    AUTO_LEAST_SQUARES_STEPS,
    AUTO_RANKS,
    AUTO_STARTS,
    B_SIDES,
    MAX_RANK,
    SPEED_B_WIDTHS,
    KroneckerSettings,
)
from tqcompressor.structures.lowrank import output_rows


class Kronecker(Structure):
    settings_type = KroneckerSettings
    module_types = (KroneckerLinear, KroneckerEmbedding)

    def __init__(self, name: str, search: bool, help: str, pruning: bool = False) -> None:
        self.name, self.search, self.help, self.pruning = name, search, help, pruning
        searched = ", permutations searched in the same metric" if search else ""
        self.capabilities = Capabilities(
            embeddings=True,
            # tq's candidates (a permutation search per B shape, output-metric refits) ran out of 24 GB
            # on SmolLM2's 49152 x 576 table; auto offers tables plain Kronecker, svd and dense
            auto_embeddings=not search and not pruning,
            offers_candidates=not pruning,
            # tq's candidates start from kronecker's (unpermuted) fit and keep it unless a permutation
            # or a refit does better: measuring both would only double the cost
            covered_by="tq" if not search and not pruning else "",
            calibrated_in_run=True,
            calibrated_note=(
                " (sub-matrices kept by their energy on the calibration text's inputs)"
                if pruning
                else f" (factors fitted to the outputs on the calibration text by least squares{searched})"
            ),
        )

    def check(self, settings: KroneckerSettings, shape: tuple[int, int]) -> None:
        complete_shapes(shape, settings.a_shape, settings.b_shape)

    def settings_of(self, module: nn.Module) -> KroneckerSettings:
        scaled = getattr(module, "row_scale", None) is not None
        return KroneckerSettings(module.rank, tuple(module.a.shape[1:]), tuple(module.b.shape[1:]), scaled)

    def describe(self, settings: dict) -> str:
        b_shape = settings.get("b_shape")
        shape = f" B{b_shape[0]}x{b_shape[1]}" if b_shape else ""
        return f"{self.name}{shape} r{settings['rank']}" + (" rows" if settings.get("row_scale") else "")

    def fit(
        self, weight: Tensor, settings: KroneckerSettings, stats=None, max_iterations: int = 20
    ) -> KroneckerFactors:
        if settings.row_scale:
            plain = dataclasses.replace(settings, row_scale=False)
            return fit_row_scaled(lambda w: self.fit(w, plain, stats, max_iterations), weight, stats)
        if self.pruning:
            a_shape, b_shape = complete_shapes(tuple(weight.shape), settings.a_shape, settings.b_shape)
            cov = stats.input_cov if stats is not None else None
            return pruning_start(weight, a_shape, b_shape, settings.rank, cov).to(weight.dtype)
        return fit_kronecker(
            weight,
            settings.a_shape,
            settings.b_shape,
            settings.rank,
            self.search,
            max_iterations,
            input_cov=stats.input_cov if stats is not None else None,
        )

    def module(self, factors: KroneckerFactors, bias: Tensor | None, kind: str) -> nn.Module:
        if kind == "embedding":
            if factors.row_scale is not None:
                raise TQCError("row_scale applies to linear layers, not to an embedding: leave it out there")
            return KroneckerEmbedding.from_factors(factors)
        return KroneckerLinear.from_factors(factors, bias, kind)

    def for_budget(self, shape, keep, prefer):
        m, n = shape
        budget = keep * m * n
        best = None  # (params, -size of B, settings)
        b_shapes = (
            [(1, w) for w in SPEED_B_WIDTHS] if prefer == "speed" else [(m2, n2) for m2 in B_SIDES for n2 in B_SIDES]
        )
        for m2, n2 in b_shapes:
            if m2 * n2 < 2 or m % m2 or n % n2:
                continue
            m1, n1 = m // m2, n // n2
            per_term = m1 * n1 + m2 * n2
            rank = min(int(budget // per_term), m2 * n2 - 1, m1 * n1, MAX_RANK)
            if rank < 1:
                continue
            key = (rank * per_term, -(m2 * n2))
            if best is None or key > best[:2]:
                best = (*key, KroneckerSettings(rank, (m1, n1), (m2, n2)))
        if best is None:
            return None
        kind = "one-row B shapes (fast: FLOPs follow parameters)" if prefer == "speed" else "Kronecker shapes"
        return best[2], f"most parameters among {kind} that"

    def candidates(self, weight: Tensor, sketch=None, max_iterations: int = 10) -> tuple[list[Candidate], dict]:
        """Every B shape of :data:`AUTO_B_SHAPES` at every rank of :data:`AUTO_RANKS` that fits. For
        ``tq`` one permutation search per B shape (at its largest rank) serves every rank, and a
        rank's error is never worse than without permutations. With ``sketch`` (calibration) each
        ``tq`` candidate is fitted in the output metric as ``auto`` would install it
        (:func:`candidate_factors`) and that error is measured; ``kronecker``'s stay Van Loan's
        (``tq``'s candidates include the unpermuted fit, refined, so refining ``kronecker``'s too
        would double the cost for nothing). ``state``: each candidate's permutations, so that
        :meth:`fit_candidate` installs exactly what was measured. The pruning start offers none: it
        is a start for distillation, and ``auto`` measures what a layer is before any."""
        if not self.capabilities.offers_candidates:
            return [], None
        w = weight.detach().to(torch.float64)
        m, n = w.shape
        menu, starts = [], {}
        identity = (torch.arange(m), torch.arange(n))
        for b_shape in AUTO_B_SHAPES:
            m2, n2 = b_shape
            if m % m2 or n % n2:
                continue
            a_shape = (m // m2, n // n2)
            usable = [r for r in AUTO_RANKS if r < m2 * n2 and r <= a_shape[0] * a_shape[1]]
            if not usable:
                continue
            errors = kronecker_errors(w, a_shape, b_shape, usable, *identity, sketch)
            starts.update({(b_shape, r): identity for r in usable})
            if self.search:
                found = permuted_kronecker(w, a_shape, b_shape, max(usable), max_iterations, start_names=AUTO_STARTS)
                permuted = kronecker_errors(w, a_shape, b_shape, usable, found.row_perm, found.col_perm, sketch)
                for r in usable:
                    if permuted[r] < errors[r]:
                        errors[r], starts[(b_shape, r)] = permuted[r], (found.row_perm, found.col_perm)
            for rank in usable:
                if sketch is not None and self.search:
                    errors[rank] = candidate_factors(
                        w, sketch.cov, a_shape, b_shape, rank, starts[(b_shape, rank)]
                    ).history[-1]
                menu.append(
                    Candidate(
                        self.name,
                        rank * (a_shape[0] * a_shape[1] + m2 * n2),
                        errors[rank],
                        {"rank": rank, "a_shape": list(a_shape), "b_shape": list(b_shape)},
                        macs=kronecker_macs(a_shape, b_shape, rank, kronecker_order(a_shape, b_shape, rank)),
                    )
                )
        return menu, starts

    def fit_candidate(
        self, weight: Tensor, candidate: Candidate, state: dict, input_cov: Tensor | None
    ) -> KroneckerFactors:
        """The factors measured for ``candidate``: Van Loan's fit at the permutations the menu chose,
        refined in the output metric when ``input_cov`` is given."""
        w = weight.detach().to(torch.float64)
        a_shape, b_shape = tuple(candidate.settings["a_shape"]), tuple(candidate.settings["b_shape"])
        rank = candidate.settings["rank"]
        rows, cols = state[(b_shape, rank)]
        cov = damped_cov(input_cov) if input_cov is not None and self.search else None
        return candidate_factors(w, cov, a_shape, b_shape, rank, (rows, cols)).to(weight.dtype)

    def row_scaled(self, candidate: Candidate, out_features: int) -> Candidate:
        return row_scaled_candidate(candidate, out_features)

    def divide_rows(self, factors: KroneckerFactors, rows: Tensor) -> KroneckerFactors:
        return factors.divide_rows(rows)


def row_scaled_candidate(candidate: Candidate, out_features: int) -> Candidate:
    """A Kronecker-family candidate installed with a row scale: one parameter more per output."""
    settings = {**candidate.settings, "row_scale": True}
    return Candidate(candidate.method, candidate.params + out_features, candidate.error, settings, candidate.macs)


def fit_row_scaled(fit: Callable[[Tensor], Any], weight: Tensor, stats) -> Any:
    """``fit`` (weight -> factors with ``divide_rows``) with a row scale: of ``diag(rows) W``, scaled
    back by ``1/rows``, when ``stats`` hold output gradient energies (:func:`output_rows`); else of
    ``W``, with the scale at one."""
    rows = output_rows(weight, stats)
    if rows is None:
        return fit(weight).divide_rows(torch.ones(weight.shape[0], dtype=weight.dtype))
    return fit(weight * rows[:, None].to(weight.dtype)).divide_rows(rows)


def candidate_factors(
    w: Tensor,
    cov: Tensor | None,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int,
    perms: tuple[Tensor, Tensor],
) -> KroneckerFactors:
    """``auto``'s fit of one Kronecker candidate: Van Loan's factors of ``w`` at the permutations
    ``perms``, then (given the damped covariance ``cov``) :data:`AUTO_LEAST_SQUARES_STEPS` steps of
    least squares in the output metric. Deterministic: the menu and the installed layer agree.
    ``history``: the relative error (output error with ``cov``)."""
    rows, cols = perms
    permuted = w[rows][:, cols]
    a, b = nearest_kronecker(permuted, a_shape, b_shape, rank)
    if cov is None:
        return KroneckerFactors(a, b, rows, cols, [relative_error(permuted, kronecker_sum(a, b))])
    a, b, history = output_metric_kronecker(
        permuted,
        cov[cols][:, cols],
        a,
        b,
        AUTO_LEAST_SQUARES_STEPS,
        tolerance=1e-3,
        damping=0.0,
        solve_dtype=torch.float32,
    )
    return KroneckerFactors(a, b, rows, cols, [history[-1]])


register(Kronecker("tq", search=True, help="permuted Kronecker products (TQCompressor): search P_r, P_c"))
register(Kronecker("kronecker", search=False, help="plain Kronecker products (KnGPT-2), no permutations"))
register(
    Kronecker(
        "kronecker_prune",
        search=False,
        pruning=True,
        help="Kronecker products started as Krony-PT does: A = strided sub-matrices of W, B = unit selectors "
        "(a start to distil from)",
    )
)
