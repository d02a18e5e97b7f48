"""``tq_lowrank``: a permuted Kronecker sum plus a low-rank residual,
``W ~= P_r (sum_k A_k (x) B_k) P_c + U V``.

The Kronecker part captures the repeated block structure, the low-rank part what it misses.
Fit: the Kronecker part first (as ``tq``: permutation search; with calibration, input columns
weighted by their RMS), then the truncated SVD of the residual ``W - K`` (with calibration,
activation-aware: it minimises the output error of the whole layer given ``K``), then
alternations between the two; with calibration both parts are refitted in the output metric
(see :func:`fit_kronecker_lowrank`).

``auto`` measures this structure at one B shape, a few Kronecker ranks and several residual ranks.
To stay cheap its candidates use no permutation search and no alternation (one SVD of the
rearranged matrix, then one SVD of the residual per Kronecker rank serves every residual rank),
and the factors it installs are exactly those it measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tqcompressor.errors import TQCError
from tqcompressor.layers import FactoredModule
from tqcompressor.linalg.decompose import (
    fit_error,
    kronecker_sum,
    nearest_kronecker,
    output_metric_kronecker,
    tail_energy,
    whitening,
)
from tqcompressor.structures.base import Candidate, Capabilities, Factors, Structure, get_structure, register
from tqcompressor.structures.kronecker.fit import KroneckerFactors, fit_kronecker, input_rms
from tqcompressor.structures.kronecker.kernels import kronecker_macs, kronecker_order
from tqcompressor.structures.kronecker.modules import KroneckerLinear
from tqcompressor.structures.kronecker.settings import KroneckerSettings
from tqcompressor.structures.kronecker.structure import fit_row_scaled, row_scaled_candidate
from tqcompressor.structures.lowrank import LowRankFactors, LowRankLinear, divide_rows, truncated_svd

AUTO_B_SHAPES = ((2, 4), (4, 2))  # the first that divides the matrix is measured
AUTO_KRONECKER_RANKS = (1, 2, 3)
AUTO_RESIDUAL_FRACTIONS = (0.05, 0.1, 0.2, 0.3)  # of m*n
ALTERNATION_ROUNDS = 30  # Kronecker <-> residual refits after the first fit
ALTERNATION_GAIN = 1e-4  # stop once a round lowers the error by less than this fraction
ALS_STEPS_PER_ROUND = 3  # with calibration: output-metric least-squares steps of the Kronecker part per round


@dataclass
class KroneckerLowRankSettings:
    rank: int = 1  # Kronecker terms
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    residual_rank: int = 1
    row_scale: bool = False  # a scale per output row on the Kronecker part (as tq's), the residual's U absorbs it

    def __post_init__(self) -> None:
        KroneckerSettings(self.rank, self.a_shape, self.b_shape)  # the same checks as tq's
        self.row_scale = bool(self.row_scale)
        self.a_shape = tuple(int(x) for x in self.a_shape) if self.a_shape is not None else None
        self.b_shape = tuple(int(x) for x in self.b_shape) if self.b_shape is not None else None
        if int(self.residual_rank) < 1:
            raise TQCError(f"residual_rank must be a positive integer, got {self.residual_rank}")


@dataclass
class KroneckerLowRankFactors(Factors):
    kronecker: KroneckerFactors
    lowrank: LowRankFactors

    def to_dense(self) -> Tensor:
        return self.kronecker.to_dense() + self.lowrank.to_dense()

    def divide_rows(self, rows: Tensor) -> KroneckerLowRankFactors:
        """``diag(1/rows) (K + U V)``: a fit of ``diag(rows) W`` mapped back to ``W`` exactly."""
        return KroneckerLowRankFactors(self.kronecker.divide_rows(rows), divide_rows(self.lowrank, rows))


def fit_kronecker_lowrank(
    weight: Tensor,
    settings: KroneckerLowRankSettings,
    input_cov: Tensor | None = None,
    search: bool = True,
    max_iterations: int = 20,
    weighted_kronecker: bool = True,
    rounds: int = ALTERNATION_ROUNDS,
) -> KroneckerLowRankFactors:
    """Kronecker part first (as ``tq``, or plain without ``search``), then the best
    rank-``residual_rank`` ``U V`` of the residual; then up to ``rounds`` alternations, each
    refitting the Kronecker factors (the permutations stay) to ``W - U V`` and ``U V`` to
    ``W - K``. Without ``input_cov`` both half-steps minimise the Frobenius error; with it both
    minimise the output error ``tr(D C D^T)`` (:func:`output_metric_kronecker`, activation-aware
    SVD), so the error never grows; the best round is kept. ``weighted_kronecker``: with
    ``input_cov``, the first Kronecker fit weights input columns by their RMS (as ``tq`` does)."""
    w = weight.detach().to(torch.float64)
    scale = input_rms(input_cov) if input_cov is not None and weighted_kronecker else None
    kron = fit_kronecker(w, settings.a_shape, settings.b_shape, settings.rank, search, max_iterations, scale)
    whitened = whitening(input_cov) if input_cov is not None else None  # once: every round uses the same inputs
    low = truncated_svd(w - kron.to_dense(), settings.residual_rank, input_cov, whitened=whitened)
    best, best_error = (kron, low), fit_error(w, kron.to_dense() + low.to_dense(), input_cov)
    a_shape, b_shape = tuple(kron.a.shape[1:]), tuple(kron.b.shape[1:])
    for _ in range(rounds):
        target = (w - low.to_dense())[kron.row_perm][:, kron.col_perm]
        if input_cov is None:
            a, b = nearest_kronecker(target, a_shape, b_shape, settings.rank)
        else:
            cov = input_cov.double()[kron.col_perm][:, kron.col_perm]
            a, b, _ = output_metric_kronecker(target, cov, kron.a.double(), kron.b.double(), ALS_STEPS_PER_ROUND)
        kron = KroneckerFactors(a, b, kron.row_perm, kron.col_perm)
        low = truncated_svd(w - kron.to_dense(), settings.residual_rank, input_cov, whitened=whitened)
        error = fit_error(w, kron.to_dense() + low.to_dense(), input_cov)
        improved = error < best_error * (1 - ALTERNATION_GAIN)
        if error < best_error:
            best, best_error = (kron, low), error
        if not improved:
            break
    kron, low = best
    return KroneckerLowRankFactors(
        kron.to(weight.dtype), LowRankFactors(low.u.to(weight.dtype), low.v.to(weight.dtype), [best_error])
    )


class KroneckerLowRankLinear(FactoredModule):
    """``y = K x + U (V x) + bias``: a :class:`KroneckerLinear` and a :class:`LowRankLinear` side by side."""

    def __init__(self, kronecker: KroneckerLinear, lowrank: LowRankLinear) -> None:
        super().__init__()
        self.kronecker, self.lowrank = kronecker, lowrank  # the bias lives in the low-rank part
        self.in_features, self.out_features, self.kind = lowrank.in_features, lowrank.out_features, lowrank.kind

    @classmethod
    def from_factors(
        cls, factors: KroneckerLowRankFactors, bias: Tensor | None = None, kind: str = "linear"
    ) -> KroneckerLowRankLinear:
        return cls(
            KroneckerLinear.from_factors(factors.kronecker, None, kind),
            LowRankLinear.from_factors(factors.lowrank, bias, kind),
        )

    def config(self) -> dict:
        return {"kronecker": self.kronecker.config(), "lowrank": self.lowrank.config()}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> KroneckerLowRankLinear:
        return cls(
            KroneckerLinear.from_config(config["kronecker"], dtype), LowRankLinear.from_config(config["lowrank"], dtype)
        )

    @property
    def bias(self) -> Tensor | None:
        return self.lowrank.bias

    def to_dense(self) -> Tensor:
        return self.kronecker.to_dense() + self.lowrank.to_dense()

    @property
    def macs_per_token(self) -> int:
        return self.kronecker.macs_per_token + self.lowrank.macs_per_token

    def forward(self, x: Tensor) -> Tensor:
        return self.kronecker(x) + self.lowrank(x)


class KroneckerLowRank(Structure):
    name = "tq_lowrank"
    help = "permuted Kronecker products plus a low-rank residual"
    settings_type = KroneckerLowRankSettings
    module_types = (KroneckerLowRankLinear,)
    capabilities = Capabilities(
        calibrated_in_run=True,
        calibrated_note=" (both parts fitted in the output metric of the calibration text, alternately)",
    )

    def check(self, settings: KroneckerLowRankSettings, shape: tuple[int, int]) -> None:
        get_structure("tq").check(KroneckerSettings(settings.rank, settings.a_shape, settings.b_shape), shape)

    def settings_of(self, module: KroneckerLowRankLinear) -> KroneckerLowRankSettings:
        k = module.kronecker
        scaled = k.row_scale is not None
        return KroneckerLowRankSettings(k.rank, tuple(k.a.shape[1:]), tuple(k.b.shape[1:]), module.lowrank.rank, scaled)

    def describe(self, settings: dict) -> str:
        b_shape = settings.get("b_shape")
        shape = f" B{b_shape[0]}x{b_shape[1]}" if b_shape else ""
        rows = " rows" if settings.get("row_scale") else ""
        return f"tq{shape} r{settings['rank']} + svd r{settings['residual_rank']}{rows}"

    def fit(self, weight: Tensor, settings, stats=None, max_iterations: int = 20) -> KroneckerLowRankFactors:
        cov = stats.input_cov if stats is not None else None
        if settings.row_scale:
            return fit_row_scaled(
                lambda w: fit_kronecker_lowrank(w, settings, cov, max_iterations=max_iterations), weight, stats
            )
        return fit_kronecker_lowrank(weight, settings, cov, max_iterations=max_iterations)

    def module(self, factors: KroneckerLowRankFactors, bias: Tensor | None, kind: str) -> KroneckerLowRankLinear:
        return KroneckerLowRankLinear.from_factors(factors, bias, kind)

    def for_budget(self, shape, keep, prefer):
        """Half of the layer's budget to the Kronecker part (tq's shapes), the rest to the residual."""
        m, n = shape
        found = get_structure("tq").for_budget(shape, keep / 2, prefer)
        if found is None:
            return None
        kron = found[0]
        kron_params = kron.rank * (kron.a_shape[0] * kron.a_shape[1] + kron.b_shape[0] * kron.b_shape[1])
        residual_rank = int((keep * m * n - kron_params) // (m + n))
        if residual_rank < 1:
            return None
        settings = KroneckerLowRankSettings(kron.rank, kron.a_shape, kron.b_shape, residual_rank)
        return settings, "half the budget to Kronecker shapes, the rest to the residual's SVD rank, so that it"

    def candidates(self, weight: Tensor, sketch=None, max_iterations: int = 10) -> tuple[list[Candidate], None]:
        w = weight.detach().to(torch.float64)
        m, n = w.shape
        b_shape = next(((p, q) for p, q in AUTO_B_SHAPES if m % p == 0 and n % q == 0), None)
        if b_shape is None:
            return [], None
        a_shape = (m // b_shape[0], n // b_shape[1])
        total = float(w.square().sum()) if sketch is None else float((w @ sketch.root).square().sum())
        menu = []
        for rank in AUTO_KRONECKER_RANKS:
            if rank >= b_shape[0] * b_shape[1]:
                continue
            a, b = nearest_kronecker(w, a_shape, b_shape, rank)
            residual = w - kronecker_sum(a, b)
            tail = tail_energy(torch.linalg.svdvals(residual if sketch is None else residual @ sketch.root))
            kron_params = rank * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
            kron_macs = kronecker_macs(a_shape, b_shape, rank, kronecker_order(a_shape, b_shape, rank))
            for residual_rank in sorted({max(1, int(f * m * n / (m + n))) for f in AUTO_RESIDUAL_FRACTIONS}):
                params = kron_params + residual_rank * (m + n)
                if residual_rank >= min(m, n) or params >= m * n:
                    continue
                settings = {
                    "rank": rank,
                    "a_shape": list(a_shape),
                    "b_shape": list(b_shape),
                    "residual_rank": residual_rank,
                }
                menu.append(
                    Candidate(
                        self.name,
                        params,
                        (tail[residual_rank] / max(total, 1e-300)) ** 0.5,
                        settings,
                        macs=kron_macs + residual_rank * (m + n),
                    )
                )
        return menu, None

    def fit_candidate(self, weight: Tensor, candidate: Candidate, state, input_cov) -> KroneckerLowRankFactors:
        settings = self.make_settings(candidate.settings)
        return fit_kronecker_lowrank(weight, settings, input_cov, search=False, weighted_kronecker=False, rounds=0)

    def row_scaled(self, candidate: Candidate, out_features: int) -> Candidate:
        return row_scaled_candidate(candidate, out_features)

    def divide_rows(self, factors: KroneckerLowRankFactors, rows: Tensor) -> KroneckerLowRankFactors:
        return factors.divide_rows(rows)


register(KroneckerLowRank())
