"""Kronecker factors and how they are fitted: pure tensor math, in weight space or in the output metric."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tqcompressor.errors import TQCError
from tqcompressor.linalg.decompose import (
    complete_shapes,
    fit_error,
    inverse_permutation,
    kronecker_sum,
    nearest_kronecker,
    rearrange,
    relative_error,
    tail_energy,
)
from tqcompressor.linalg.permutation import output_metric_search, permuted_kronecker
from tqcompressor.structures.base import Factors
from tqcompressor.structures.kronecker.settings import OUTPUT_SEARCH_ROUNDS


@dataclass
class KroneckerFactors(Factors):
    """``W ~= diag(row_scale) (sum_k A_k (x) B_k)[inv(row_perm)][:, inv(col_perm)]``."""

    a: Tensor  # (rank, m1, n1)
    b: Tensor  # (rank, m2, n2)
    row_perm: Tensor  # (m,) int64; W[row_perm] lines up with the rows of the Kronecker sum
    col_perm: Tensor  # (n,) int64
    history: list[float] = field(default_factory=list)  # relative error after each accepted step
    row_scale: Tensor | None = None  # (m,) in W's row order; None: no scale

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[1] * self.b.shape[1], self.a.shape[2] * self.b.shape[2])

    def to_dense(self) -> Tensor:
        k = kronecker_sum(self.a, self.b)
        dense = k[inverse_permutation(self.row_perm)][:, inverse_permutation(self.col_perm)]
        return dense if self.row_scale is None else dense * self.row_scale.to(dense.dtype)[:, None]

    def to(self, dtype: torch.dtype) -> KroneckerFactors:
        scale = self.row_scale.to(dtype) if self.row_scale is not None else None
        return KroneckerFactors(self.a.to(dtype), self.b.to(dtype), self.row_perm, self.col_perm, self.history, scale)

    def divide_rows(self, rows: Tensor) -> KroneckerFactors:
        """``diag(1/rows) K``: a fit of the row-scaled ``diag(rows) W`` mapped back to ``W`` exactly, by
        a row scale (scaling A or B instead would break the Kronecker structure)."""
        scale = 1.0 / rows.to(self.a.dtype)
        if self.row_scale is not None:
            scale = scale * self.row_scale
        return KroneckerFactors(self.a, self.b, self.row_perm, self.col_perm, self.history, scale.contiguous())


def stored_factors(
    a: Tensor, b: Tensor, row_index: Tensor | None, col_index: Tensor | None, row_scale: Tensor | None = None
) -> KroneckerFactors:
    """The factors a module holds: ``row_index`` maps rows back to ``W``'s (the inverse of
    ``row_perm``), ``col_index`` is ``col_perm``; ``None`` is the identity."""
    m, n = a.shape[1] * b.shape[1], a.shape[2] * b.shape[2]
    row = inverse_permutation(row_index) if row_index is not None else torch.arange(m)
    col = col_index if col_index is not None else torch.arange(n)
    scale = row_scale.detach() if row_scale is not None else None
    return KroneckerFactors(a.detach(), b.detach(), row.cpu(), col.cpu(), row_scale=scale)


def fit_kronecker(
    weight: Tensor,
    a_shape: tuple[int, int] | None,
    b_shape: tuple[int, int] | None,
    rank: int = 1,
    search: bool = True,
    max_iterations: int = 20,
    input_scale: Tensor | None = None,
    input_cov: Tensor | None = None,
) -> KroneckerFactors:
    """Factor ``weight`` (out x in); ``search``: TQCompressor's permutation search. Give one of the
    shapes and the other is derived. ``input_cov`` (the second moment of the layer's inputs on
    calibration text) fits in the output metric (:func:`output_metric_fit`). ``input_scale`` (one
    positive number per input column, e.g. each input channel's RMS) fits the column-weighted
    matrix instead (see :func:`scaled_kronecker`)."""
    if weight.dim() != 2:
        raise TQCError(f"a Kronecker fit expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
    a_shape, b_shape = complete_shapes(tuple(weight.shape), a_shape, b_shape)
    w = weight.detach().to(torch.float64)
    if input_cov is not None:
        factors = output_metric_fit(w, input_cov, a_shape, b_shape, rank, search, max_iterations)
    elif input_scale is not None:
        factors = scaled_kronecker(w, input_scale, a_shape, b_shape, rank, search, max_iterations)
    elif search:
        factors = KroneckerFactors(*permuted_kronecker(w, a_shape, b_shape, rank, max_iterations))
    else:
        a, b = nearest_kronecker(w, a_shape, b_shape, rank)
        factors = KroneckerFactors(
            a, b, torch.arange(w.shape[0]), torch.arange(w.shape[1]), [relative_error(w, kronecker_sum(a, b))]
        )
    return factors.to(weight.dtype)


def pruning_start(
    weight: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int = 1, input_cov: Tensor | None = None
) -> KroneckerFactors:
    """Krony-PT's pruning start: ``B_k`` the unit matrix ``E_(p_k, q_k)`` and ``A_k = W[p_k::m2, q_k::n2]``,
    so ``sum_k A_k (x) B_k`` keeps ``rank`` of the ``m2 * n2`` strided sub-matrices of ``W`` exactly
    and zeroes the rest (``rank = 1``, B 1x2: every other column). The offsets kept are those with
    the most energy, each column weighted by its input's second moment when ``input_cov`` is given.
    Krony-PT found it trains better than Van Loan's start though it fits far worse; ``history``:
    the relative error (output error with ``input_cov``)."""
    w = weight.detach().to(torch.float64)
    (m1, n1), (m2, n2) = a_shape, b_shape
    if rank > m2 * n2:
        raise TQCError(f"the pruning start keeps at most m2 * n2 = {m2 * n2} sub-matrices, got rank {rank}")
    column_weight = torch.ones(w.shape[1], dtype=w.dtype) if input_cov is None else input_cov.diagonal().double()
    blocks = w.reshape(m1, m2, n1, n2)  # blocks[i, p, j, q] = W[i*m2 + p, j*n2 + q]
    energy = (blocks.pow(2) * column_weight.reshape(1, 1, n1, n2)).sum(dim=(0, 2))  # (m2, n2)
    kept = energy.flatten().argsort(descending=True)[:rank].sort().values
    a = torch.stack([blocks[:, int(k) // n2, :, int(k) % n2] for k in kept])
    b = torch.zeros(rank, m2, n2, dtype=w.dtype)
    b.view(rank, -1)[torch.arange(rank), kept] = 1.0
    identity = (torch.arange(w.shape[0]), torch.arange(w.shape[1]))
    return KroneckerFactors(a.contiguous(), b, *identity, [fit_error(w, kronecker_sum(a, b), input_cov)])


def output_metric_fit(
    weight: Tensor,
    input_cov: Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int = 1,
    search: bool = True,
    max_iterations: int = 20,
) -> KroneckerFactors:
    """The Kronecker fit with the least output error ``tr(D C D^T)`` we can find, ``C`` the input
    second moment. Each start is converged by exact least squares in that metric: no permutation
    (Van Loan's factors) and, for ``tq``, the weight-space permutation search of the RMS-weighted
    matrix (:func:`scaled_kronecker`); ``tq`` has ``kronecker``'s start, so it never ends worse.
    For ``tq`` the permutations are then searched in the output metric itself
    (:func:`tqcompressor.linalg.permutation.output_metric_search`). ``history``: relative output error."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    starts = [(torch.arange(m), torch.arange(n), *nearest_kronecker(w, a_shape, b_shape, rank))]
    if search:
        weighted = scaled_kronecker(w, input_rms(input_cov), a_shape, b_shape, rank, True, max_iterations)
        starts.append((weighted.row_perm, weighted.col_perm, weighted.a, weighted.b))
    found = output_metric_search(w, input_cov, starts, min(max_iterations, OUTPUT_SEARCH_ROUNDS) if search else 0)
    return KroneckerFactors(*found)


def scaled_kronecker(
    weight: Tensor,
    input_scale: Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int = 1,
    search: bool = True,
    max_iterations: int = 20,
) -> KroneckerFactors:
    """Kronecker fit weighted by input-column scales, folded into the factors (no extra buffer).

    The permutation search (``search``) runs on ``W diag(s)``. The fit then uses the nearest
    Kronecker-structured scale ``d_A (x) d_B`` of the permuted ``s`` (a rank-1 fit), because
    ``(A' (x) B') (D_A (x) D_B)^-1 = (A' D_A^-1) (x) (B' D_B^-1)``: the weighting costs nothing at
    run time. ``history`` holds the relative error of the weighted fit.
    """
    w = weight.detach().to(torch.float64)
    s = input_scale.detach().to(torch.float64).flatten()
    if s.numel() != w.shape[1] or not bool((s > 0).all()):
        raise TQCError(f"input_scale must hold {w.shape[1]} positive numbers (one per input column), got {s.numel()}")
    if search:
        found = permuted_kronecker(w * s, a_shape, b_shape, rank, max_iterations)
        row_perm, col_perm = found.row_perm, found.col_perm
    else:
        row_perm, col_perm = torch.arange(w.shape[0]), torch.arange(w.shape[1])
    d_a, d_b = kronecker_scaling(s[col_perm], a_shape[1], b_shape[1])
    scaled = w[row_perm][:, col_perm] * torch.kron(d_a, d_b)
    a, b = nearest_kronecker(scaled, a_shape, b_shape, rank)
    history = [relative_error(scaled, kronecker_sum(a, b))]
    return KroneckerFactors((a / d_a).contiguous(), (b / d_b).contiguous(), row_perm, col_perm, history)


def kronecker_scaling(scale: Tensor, n1: int, n2: int) -> tuple[Tensor, Tensor]:
    """Positive ``d_a`` (n1), ``d_b`` (n2) with ``d_a (x) d_b`` closest to ``scale`` (length n1*n2):
    the leading singular pair of ``scale`` as an n1 x n2 matrix (positive, by Perron-Frobenius)."""
    u, sv, vh = torch.linalg.svd(scale.reshape(n1, n2).to(torch.float64), full_matrices=False)
    root = sv[0].sqrt()
    floor = float(scale.min()) ** 0.5 * 1e-3  # keep every channel's scale positive
    return (u[:, 0].abs() * root).clamp_min(floor), (vh[0].abs() * root).clamp_min(floor)


def input_rms(input_cov: Tensor) -> Tensor:
    """Each input channel's RMS on the calibration text; a channel never seen still gets a little weight."""
    rms = input_cov.diagonal().clamp_min(0).sqrt()
    return rms.clamp_min(1e-6 * float(rms.mean()) + 1e-30)


def kronecker_errors(
    w: Tensor, a_shape, b_shape, ranks: list[int], row_perm: Tensor, col_perm: Tensor, sketch=None
) -> dict[int, float]:
    """Relative error of the rank-r Kronecker fit of ``w[row_perm][:, col_perm]``, for every r in
    ``ranks``, from one SVD of the rearrangement; in the output metric when ``sketch`` is given."""
    permuted = w[row_perm][:, col_perm]
    if sketch is None:  # Frobenius: the tail of the rearrangement's singular values
        tail = tail_energy(torch.linalg.svdvals(rearrange(permuted, a_shape, b_shape)))
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
