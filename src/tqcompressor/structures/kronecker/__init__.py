"""``tq``, ``kronecker`` and ``kronecker_prune``: ``W ~= P_r (sum_k A_k (x) B_k) P_c``.

``kronecker`` is the nearest sum of Kronecker products (Van Loan & Pitsianis, as KnGPT-2);
``tq`` (TQCompressor) also searches the row and column permutations ``P_r``, ``P_c``
(:mod:`tqcompressor.linalg.permutation`); ``kronecker_prune`` starts from Krony-PT's pruning (each ``B_k``
a unit selector, each ``A_k`` a strided sub-matrix of ``W``), a start for distillation, not a fit.
All build :class:`KroneckerLinear` for linear layers and :class:`KroneckerEmbedding` for a token
embedding, whose tied LM head shares its factors.
"""

from tqcompressor.structures.kronecker import structure  # noqa: F401  (registers tq, kronecker, kronecker_prune)
from tqcompressor.structures.kronecker.fit import (
    KroneckerFactors,
    fit_kronecker,
    input_rms,
    kronecker_errors,
    kronecker_scaling,
    output_metric_fit,
    pruning_start,
    scaled_kronecker,
    stored_factors,
)
from tqcompressor.structures.kronecker.kernels import (
    gathered_kronecker,
    kronecker_contract,
    kronecker_layouts,
    kronecker_macs,
    kronecker_matmul,
    kronecker_order,
)
from tqcompressor.structures.kronecker.modules import KroneckerEmbedding, KroneckerLinear
from tqcompressor.structures.kronecker.settings import (
    AUTO_B_SHAPES,
    AUTO_LEAST_SQUARES_STEPS,
    AUTO_RANKS,
    AUTO_STARTS,
    B_SIDES,
    MAX_RANK,
    OUTPUT_SEARCH_ROUNDS,
    SPEED_B_WIDTHS,
    KroneckerSettings,
)
from tqcompressor.structures.kronecker.structure import (
    Kronecker,
    candidate_factors,
    fit_row_scaled,
    row_scaled_candidate,
)

__all__ = [
    "AUTO_B_SHAPES",
    "AUTO_LEAST_SQUARES_STEPS",
    "AUTO_RANKS",
    "AUTO_STARTS",
    "B_SIDES",
    "Kronecker",
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "KroneckerSettings",
    "MAX_RANK",
    "OUTPUT_SEARCH_ROUNDS",
    "SPEED_B_WIDTHS",
    "candidate_factors",
    "fit_kronecker",
    "fit_row_scaled",
    "gathered_kronecker",
    "input_rms",
    "kronecker_contract",
    "kronecker_errors",
    "kronecker_layouts",
    "kronecker_macs",
    "kronecker_matmul",
    "kronecker_order",
    "kronecker_scaling",
    "output_metric_fit",
    "pruning_start",
    "row_scaled_candidate",
    "scaled_kronecker",
    "stored_factors",
]
