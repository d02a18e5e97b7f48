"""``tq``, ``kronecker`` and ``kronecker_prune``: ``W ~= P_r (sum_k A_k (x) B_k) P_c``.

``kronecker`` is the nearest sum of Kronecker products (Van Loan & Pitsianis, as KnGPT-2);
``tq`` (TQCompressor) also searches the row and column permutations ``P_r``, ``P_c``
(:mod:`tqcompressor.linalg.permutation`); ``kronecker_prune`` starts from Krony-PT's pruning (each ``B_k``
a unit selector, each ``A_k`` a strided sub-matrix of ``W``), a start for distillation, not a fit.
All build :class:`KroneckerLinear` for linear layers and :class:`KroneckerEmbedding` for a token
embedding, whose tied LM head shares its factors.
"""

from tqcompressor.structures.kronecker import structure  # noqa: F401  (registers tq, kronecker, kronecker_prune)
from tqcompressor.structures.kronecker.fit import KroneckerFactors
from tqcompressor.structures.kronecker.modules import KroneckerEmbedding, KroneckerLinear
from tqcompressor.structures.kronecker.settings import KroneckerSettings

__all__ = ["KroneckerEmbedding", "KroneckerFactors", "KroneckerLinear", "KroneckerSettings"]
