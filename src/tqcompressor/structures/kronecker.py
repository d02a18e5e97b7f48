"""``tq``, ``kronecker`` and ``kronecker_prune``: ``W ~= P_r (sum_k A_k (x) B_k) P_c``.

``kronecker`` is the nearest sum of Kronecker products (Van Loan & Pitsianis, as KnGPT-2);
``tq`` (TQCompressor) also searches the row and column permutations ``P_r``, ``P_c``
(:mod:`tqcompressor.linalg.permutation`); ``kronecker_prune`` starts from Krony-PT's pruning (each ``B_k``
a unit selector, each ``A_k`` a strided sub-matrix of ``W``), a start for distillation, not a fit.
All build :class:`KroneckerLinear` for linear layers and :class:`KroneckerEmbedding` for a token
embedding, whose tied LM head shares its factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tqcompressor.errors import TQCError
from tqcompressor.layers import (
    FactoredModule,
    bias_of,
    compose_gathers,
    dense_weight_of,
    gather_columns,
    gather_last,
    unless_identity,
)
from tqcompressor.linalg.decompose import (
    complete_shapes,
    damped_cov,
    fit_error,
    inverse_permutation,
    kronecker_sum,
    nearest_kronecker,
    output_metric_kronecker,
    rearrange,
    relative_error,
    tail_energy,
)
from tqcompressor.linalg.permutation import output_metric_search, permuted_kronecker
from tqcompressor.structures.base import Candidate, Factors, Structure, register
from tqcompressor.structures.lowrank import output_rows

# Budget solver: small-factor sides it may pick for B (A takes the rest), and the most Kronecker
# terms it will use: the method is about a *short* sum of Kronecker products.
B_SIDES = (1, 2, 3, 4)
MAX_RANK = 8
# prefer="speed": B is one row wide (1 x n2). A rank-r Kronecker layer costs
# r * min(1/m1 + 1/n2, 1/n1 + 1/m2) of the dense FLOPs (B or A contracted first, whichever is
# cheaper); with m2 = 1 that is about its parameter fraction, so the layer gets faster as it gets
# smaller (with a 3x3 B and rank 5 it costs 1.7x the dense layer).
SPEED_B_WIDTHS = (2, 3, 4, 6, 8, 9, 12, 16)
# auto's menu: B shapes and ranks measured per matrix. No 2x2: its rank r has the parameters of
# 2x4 and 4x2 at rank 2r (measured without it: decomposition-auto-menu-after.json).
AUTO_B_SHAPES = ((2, 4), (4, 2), (1, 2))
AUTO_RANKS = (1, 2, 3, 4, 6, 8)
# the permutation search's starts for auto's menu: the identity's fit is measured apart
AUTO_STARTS = ("similarity", "spectral")
OUTPUT_SEARCH_ROUNDS = 3  # permutation rounds in the output metric (each costs a least-squares refit)
AUTO_LEAST_SQUARES_STEPS = 3  # with calibration: output-metric refinement of each tq candidate (most of the gain)


@dataclass
class KroneckerSettings:
    """Shapes in (out, in) orientation, as ``nn.Linear`` stores them; for an embedding (vocab, dim).
    Give ``a_shape`` or ``b_shape`` (or both); the other follows from the weight's shape."""

    rank: int = 1
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    # one trainable scale per output row, y_i = s_i (K x)_i: what lets a Kronecker fit of the row-weighted
    # diag(w) W map back to W exactly (output weights); fitted with calibration as 1/w, else all ones
    row_scale: bool = False

    def __post_init__(self) -> None:
        self.row_scale = bool(self.row_scale)
        if int(self.rank) < 1:
            raise TQCError(f"rank must be a positive integer, got {self.rank}")
        self.a_shape = tuple(int(x) for x in self.a_shape) if self.a_shape is not None else None
        self.b_shape = tuple(int(x) for x in self.b_shape) if self.b_shape is not None else None
        if self.a_shape is None and self.b_shape is None:
            raise TQCError("a Kronecker layer spec needs a_shape or b_shape (e.g. b_shape: [2, 4])")


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


# ---------------------------------------------------------------------------------------------
# Fitting: pure tensor math


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


# ---------------------------------------------------------------------------------------------
# The modules: contraction kernels, KroneckerLinear, KroneckerEmbedding


def kronecker_order(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int) -> str:
    """Which factor a Kronecker forward contracts first: ``"a"`` or ``"b"``.

    Whichever needs fewer multiply-adds per token; on a tie A first, whose one big multiply reads
    the input once (B first runs one pass per row of B).
    """
    return "b" if kronecker_macs(a_shape, b_shape, rank, "b") < kronecker_macs(a_shape, b_shape, rank, "a") else "a"


def kronecker_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int, order: str) -> int:
    """Multiply-adds per token of a rank-``rank`` Kronecker forward contracting ``order`` first."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if order == "a":
        return rank * (n2 * n1 * m1 + m2 * n2 * m1)
    return rank * (n1 * n2 * m2 + m2 * n1 * m1)


def kronecker_layouts(
    a_shape: tuple[int, int], b_shape: tuple[int, int], order: str
) -> tuple[Tensor | None, Tensor | None]:
    """Column orders the contraction works in: ``(input_layout, output_layout)``.

    ``x[:, input_layout]`` is the input as :func:`kronecker_contract` reads it and
    ``y[:, output_layout]`` puts its output back in natural order; ``None`` means natural order.
    Layers fold these into their permutation gathers, so the reordering is free there.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    # A first reads x as (q, j) for column j*n2 + q; both orders write y as (p, i) for row i*m2 + p
    input_layout = torch.arange(n1 * n2).view(n1, n2).T.reshape(-1) if order == "a" and n2 > 1 else None
    output_layout = torch.arange(m1 * m2).view(m2, m1).T.reshape(-1) if m2 > 1 else None
    return input_layout, output_layout


def kronecker_contract(x: Tensor, a: Tensor, b: Tensor, order: str) -> Tensor:
    """``(sum_k A_k (x) B_k)`` applied to the rows of ``x: (N, n1*n2)`` in the layouts of
    :func:`kronecker_layouts`, as plain matrix multiplies on contiguous views (no transposes
    of activations): with ``X`` the (n1, n2) matrix of one token, ``(A (x) B) vec(X) = vec(A X B^T)``.
    """
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    tokens = x.shape[0]
    if order == "a":
        # s[(t, q), (k, i)] = sum_j x[t, j, q] A_k[i, j]; then y[t, p, i] = sum_(q,k) B_k[p, q] s[t, (q, k), i].
        # A arranged as [j, (k, i)] is a view of A as stored (no copy)
        s = x.reshape(tokens * n2, n1) @ a.permute(2, 0, 1).reshape(n1, rank * m1)
        b_rows = b.permute(1, 2, 0).reshape(m2, n2 * rank)
        return torch.matmul(b_rows, s.view(tokens, n2 * rank, m1)).reshape(tokens, m2 * m1)
    # B first, one row p of B at a time: t[(t, j), k] = sum_q x[t, j, q] B_k[p, q] is already laid
    # out as (t, (j, k)), so the big multiply with all A_k side by side needs no activation copy
    rows = x.reshape(tokens * n1, n2)
    if tokens < n1:
        # few tokens (generation): setting all A_k side by side would copy A, more data than the
        # activations, so multiply each term with A as stored and add the terms up
        outs = [
            torch.bmm((rows @ b[:, p, :].T).view(tokens, n1, rank).permute(2, 0, 1), a.transpose(1, 2)).sum(0)
            for p in range(m2)
        ]
    else:
        a_cat = a.permute(1, 2, 0).reshape(m1, n1 * rank)
        outs = [(rows @ b[:, p, :].T).view(tokens, n1 * rank) @ a_cat.T for p in range(m2)]
    return outs[0] if m2 == 1 else torch.cat(outs, dim=1)


def gathered_kronecker(
    x: Tensor, a: Tensor, b: Tensor, order: str, input_gather: Tensor | None, output_gather: Tensor | None
) -> Tensor:
    """:func:`kronecker_contract` on 2-D ``x`` between one gather on each side (``None``: none)."""
    if input_gather is not None:
        x = gather_columns(x, input_gather)
    y = kronecker_contract(x, a, b, order)
    return y if output_gather is None else gather_columns(y, output_gather)


def kronecker_matmul(
    x: Tensor, a: Tensor, b: Tensor, input_index: Tensor | None = None, output_index: Tensor | None = None
) -> Tensor:
    """``x[..., input_index] @ (sum_k A_k (x) B_k)^T``, then ``[..., output_index]`` (``None``: no
    permutation), for ``x: (..., n1*n2)`` without forming the Kronecker sum. The permutations are
    fused with the contraction's layouts here, on every call; layers keep the fused gathers."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    order = kronecker_order((m1, n1), (m2, n2), rank)
    input_layout, output_layout = kronecker_layouts((m1, n1), (m2, n2), order)
    y = gathered_kronecker(
        x.reshape(-1, n1 * n2),
        a,
        b,
        order,
        compose_gathers(input_index, input_layout, x.device),
        compose_gathers(output_layout, output_index, x.device),
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])


class KroneckerLinear(FactoredModule):
    """``y = s * P_r (sum_k A_k (x) B_k) P_c x + bias``: a drop-in for ``nn.Linear`` / ``Conv1D``; the
    per-output scale ``s`` only when built with ``row_scale`` (fits in a row-weighted metric).

    The permutations are integer index buffers applied as gathers; an identity permutation is
    not stored at all and costs nothing. At run time each permutation is fused with the column
    order the contraction works in (:func:`kronecker_layouts`), so a layer does at most one
    gather on each side.
    """

    def __init__(
        self,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        bias: bool = True,
        row_perm: bool = True,
        col_perm: bool = True,
        kind: str = "linear",
        dtype: torch.dtype | None = None,
        row_scale: bool = False,
    ) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = a_shape, b_shape
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.kind = kind
        self.a = nn.Parameter(torch.zeros(rank, m1, n1, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(rank, m2, n2, dtype=dtype))
        self.row_scale = nn.Parameter(torch.ones(m1 * m2, dtype=dtype)) if row_scale else None
        self.bias = nn.Parameter(torch.zeros(m1 * m2, dtype=dtype)) if bias else None
        # input_index gathers x into Kronecker order; output_index scatters back to W's rows
        self.register_buffer("input_index", torch.arange(n1 * n2) if col_perm else None)
        self.register_buffer("output_index", torch.arange(m1 * m2) if row_perm else None)
        self.order = kronecker_order((m1, n1), (m2, n2), rank)
        self.refresh_derived()

    def refresh_derived(self) -> None:
        """Recompute the fused gathers from the permutations. Loading calls it; call it yourself
        only if you write into ``input_index`` / ``output_index`` by hand."""
        input_layout, output_layout = kronecker_layouts(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.order)
        device = self.a.device
        self.register_buffer(
            "input_gather", unless_identity(compose_gathers(self.input_index, input_layout, device)), persistent=False
        )
        self.register_buffer(
            "output_gather",
            unless_identity(compose_gathers(output_layout, self.output_index, device)),
            persistent=False,
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_derived()

    @classmethod
    def from_factors(
        cls, factors: KroneckerFactors, bias: Tensor | None = None, kind: str = "linear"
    ) -> KroneckerLinear:
        n, m = factors.col_perm.numel(), factors.row_perm.numel()
        keep_rows = not torch.equal(factors.row_perm, torch.arange(m))
        keep_cols = not torch.equal(factors.col_perm, torch.arange(n))
        layer = cls(
            tuple(factors.a.shape[1:]),
            tuple(factors.b.shape[1:]),
            factors.rank,
            bias is not None,
            keep_rows,
            keep_cols,
            kind,
            factors.a.dtype,
            factors.row_scale is not None,
        )
        with torch.no_grad():
            layer.a.copy_(factors.a)
            layer.b.copy_(factors.b)
            if factors.row_scale is not None:
                layer.row_scale.copy_(factors.row_scale)
            if bias is not None:
                layer.bias.copy_(bias)
            if keep_cols:
                layer.input_index.copy_(factors.col_perm)
            if keep_rows:
                layer.output_index.copy_(inverse_permutation(factors.row_perm))
        layer.refresh_derived()
        return layer

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        method: str = "tq",
        a_shape: tuple[int, int] | None = None,
        b_shape: tuple[int, int] | None = None,
        rank: int = 1,
        max_iterations: int = 20,
    ) -> KroneckerLinear:
        """Factor a dense ``nn.Linear`` / ``Conv1D``: ``tq`` searches permutations, ``kronecker`` does not."""
        if method not in ("tq", "kronecker"):
            raise TQCError(f"KroneckerLinear takes method 'tq' or 'kronecker', not {method!r}")
        weight, kind = dense_weight_of(module)
        factors = fit_kronecker(weight, a_shape, b_shape, rank, search=method == "tq", max_iterations=max_iterations)
        return cls.from_factors(factors, bias_of(module), kind)

    def config(self) -> dict:
        """Constructor arguments, as ``tqcompressor.json`` stores them."""
        return {
            "a_shape": list(self.a.shape[1:]),
            "b_shape": list(self.b.shape[1:]),
            "rank": self.rank,
            "bias": self.bias is not None,
            "row_perm": self.output_index is not None,
            "col_perm": self.input_index is not None,
            "kind": self.kind,
            **({"row_scale": True} if self.row_scale is not None else {}),  # older files have no such key
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> KroneckerLinear:
        return cls(
            tuple(config["a_shape"]),
            tuple(config["b_shape"]),
            config["rank"],
            config["bias"],
            config["row_perm"],
            config["col_perm"],
            config["kind"],
            dtype,
            config.get("row_scale", False),
        )

    permutes_outputs = True

    def input_permutation(self) -> Tensor | None:
        return self.input_gather

    def permute_outputs(self, gather: Tensor) -> None:
        """Make this layer return ``y[..., gather]`` by changing its stored state (folding)."""
        with torch.no_grad():
            current = self.output_index.cpu() if self.output_index is not None else torch.arange(self.out_features)
            if self.b.shape[1] == 1:
                # one-row B: output row i is row i of A, so the whole output permutation moves into
                # A's rows and the layer keeps no output gather (a gather here would cost as much
                # as the one removed from the consumer)
                self.a.copy_(self.a[:, current[gather].to(self.a.device)])
                self.register_buffer("output_index", None)
            else:  # composes with the output gather the layer does anyway (its layout, m2 > 1)
                self._set_index("output_index", current[gather])
            for vector in (self.row_scale, self.bias):
                if vector is not None:
                    vector.copy_(vector[gather.to(vector.device)])
        self.refresh_derived()

    def take_input_gathered(self) -> None:
        """From now on the input arrives already gathered by ``input_gather`` (folding moved that
        gather into the producers): the permutation becomes the inverse of the contraction layout,
        which makes the fused gather the identity (and refresh drops it)."""
        input_layout, _ = kronecker_layouts(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.order)
        index = inverse_permutation(input_layout) if input_layout is not None else torch.arange(self.in_features)
        self._set_index("input_index", index)
        self.refresh_derived()

    def _set_index(self, name: str, index: Tensor) -> None:
        if getattr(self, name) is None:
            self.register_buffer(name, index.to(self.a.device))
        else:
            getattr(self, name).copy_(index)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def factors(self) -> KroneckerFactors:
        return stored_factors(self.a, self.b, self.output_index, self.input_index, self.row_scale)

    def to_dense(self) -> Tensor:
        """The (out, in) weight this layer represents, for export and checks only."""
        return self.factors().to_dense()

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds per input row in the forward (the dense layer needs in * out)."""
        return kronecker_macs(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.rank, self.order)

    def forward(self, x: Tensor) -> Tensor:
        y = gathered_kronecker(
            x.reshape(-1, self.in_features), self.a, self.b, self.order, self.input_gather, self.output_gather
        )
        if self.row_scale is not None:
            y = y * self.row_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, A={tuple(self.a.shape[1:])}, "
            f"B={tuple(self.b.shape[1:])}, rank={self.rank}" + (", row_scale" if self.row_scale is not None else "")
        )


class KroneckerEmbedding(FactoredModule):
    """Token embedding ``E ~= P_r (sum_k A_k (x) B_k) P_c`` looked up one row at a time.

    With ``B: (1, 2)`` and ``A: (V, d/2)`` (the paper's setting) every token keeps its own row of
    ``A`` and the column permutation decides which embedding dimensions share a ``B`` pattern.
    """

    def __init__(
        self,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        row_perm: bool = False,
        col_perm: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = a_shape, b_shape
        self.num_embeddings, self.embedding_dim = m1 * m2, n1 * n2
        self.kind = "embedding"
        self.a = nn.Parameter(torch.zeros(rank, m1, n1, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(rank, m2, n2, dtype=dtype))
        # token -> row of the Kronecker sum; Kronecker column -> embedding dimension
        self.register_buffer("token_index", torch.arange(m1 * m2) if row_perm else None)
        self.register_buffer("input_index", torch.arange(n1 * n2) if col_perm else None)
        self.register_buffer("output_index", torch.arange(n1 * n2) if col_perm else None)
        self.output_scale = 1.0  # lookups are multiplied by it (Gemma 3's sqrt(hidden)); the tied head is not

    @classmethod
    def from_embedding(
        cls,
        module: nn.Embedding,
        method: str = "tq",
        a_shape=None,
        b_shape=None,
        rank: int = 1,
        max_iterations: int = 20,
    ) -> KroneckerEmbedding:
        if method not in ("tq", "kronecker"):
            raise TQCError(f"KroneckerEmbedding takes method 'tq' or 'kronecker', not {method!r}")
        return cls.from_factors(
            fit_kronecker(
                module.weight.detach(), a_shape, b_shape, rank, search=method == "tq", max_iterations=max_iterations
            )
        )

    def config(self) -> dict:
        return {
            "a_shape": list(self.a.shape[1:]),
            "b_shape": list(self.b.shape[1:]),
            "rank": self.rank,
            "row_perm": self.token_index is not None,
            "col_perm": self.input_index is not None,
            **({"output_scale": self.output_scale} if self.output_scale != 1.0 else {}),
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> KroneckerEmbedding:
        layer = cls(
            tuple(config["a_shape"]),
            tuple(config["b_shape"]),
            config["rank"],
            config["row_perm"],
            config["col_perm"],
            dtype,
        )
        layer.output_scale = float(config.get("output_scale", 1.0))
        return layer

    @classmethod
    def from_factors(cls, factors: KroneckerFactors) -> KroneckerEmbedding:
        m, n = factors.shape
        keep_rows = not torch.equal(factors.row_perm, torch.arange(m))
        keep_cols = not torch.equal(factors.col_perm, torch.arange(n))
        layer = cls(
            tuple(factors.a.shape[1:]), tuple(factors.b.shape[1:]), factors.rank, keep_rows, keep_cols, factors.a.dtype
        )
        with torch.no_grad():
            layer.a.copy_(factors.a)
            layer.b.copy_(factors.b)
            if keep_rows:
                layer.token_index.copy_(inverse_permutation(factors.row_perm))
            if keep_cols:
                layer.input_index.copy_(factors.col_perm)
                layer.output_index.copy_(inverse_permutation(factors.col_perm))
        return layer

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def weight(self) -> Tensor:
        """Dense table, built on demand: HF helpers (resize, tie checks) look for ``.weight``."""
        return self.to_dense()

    def factors(self) -> KroneckerFactors:
        return stored_factors(self.a, self.b, self.token_index, self.input_index)

    def to_dense(self) -> Tensor:
        return self.factors().to_dense()

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.token_index[input_ids] if self.token_index is not None else input_ids
        m2 = self.b.shape[1]
        a_rows = self.a[:, rows // m2]  # (rank, ..., n1)
        b_rows = self.b[:, rows % m2]  # (rank, ..., n2)
        out = torch.einsum("k...j,k...q->...jq", a_rows, b_rows).flatten(-2)
        out = gather_last(out, self.output_index)
        return out * self.output_scale if self.output_scale != 1.0 else out

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T``: logits for an LM head tied to this embedding."""
        return kronecker_matmul(hidden, self.a, self.b, self.input_index, self.token_index)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, A={tuple(self.a.shape[1:])}, "
            f"B={tuple(self.b.shape[1:])}, rank={self.rank}"
        )


# ---------------------------------------------------------------------------------------------
# The structure


class Kronecker(Structure):
    settings_type = KroneckerSettings
    module_types = (KroneckerLinear, KroneckerEmbedding)
    embeddings = True
    calibrated_in_run = True

    def __init__(self, name: str, search: bool, help: str, pruning: bool = False) -> None:
        self.name, self.search, self.help, self.pruning = name, search, help, pruning
        # tq's candidates (a permutation search per B shape, output-metric refits) ran out of 24 GB
        # on SmolLM2's 49152 x 576 table; auto offers tables plain Kronecker, svd and dense
        self.auto_embeddings = not search and not pruning
        self.offers_candidates = not pruning
        # tq's candidates start from kronecker's (unpermuted) fit and keep it unless a permutation
        # or a refit does better: measuring both would only double the cost
        self.covered_by = "tq" if not search and not pruning else ""
        searched = ", permutations searched in the same metric" if search else ""
        self.calibrated_note = (
            " (sub-matrices kept by their energy on the calibration text's inputs)"
            if pruning
            else f" (factors fitted to the outputs on the calibration text by least squares{searched})"
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
        if not self.offers_candidates:
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
