"""TQCompressor's permutation search: pure tensor code.

Find row and column permutations ``P_r``, ``P_c`` so that ``W[row_perm][:, col_perm]`` is as close
as possible to a short sum of Kronecker products; the Kronecker structures use it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tqcompressor.linalg.decompose import (
    damped_cov,
    kronecker_sum,
    nearest_kronecker,
    output_metric_kronecker,
    relative_error,
)

# permuted_kronecker's built-in start points, in the order searched: the one that wins on trained weights first
SEARCH_STARTS = ("similarity", "spectral", "identity")


class PermutedKronecker(NamedTuple):
    """``W[row_perm][:, col_perm] ~= sum_k A_k (x) B_k``; ``history``: relative error after each accepted step."""

    a: Tensor  # (rank, m1, n1)
    b: Tensor  # (rank, m2, n2)
    row_perm: Tensor  # (m,) int64
    col_perm: Tensor  # (n,) int64
    history: list[float]


def permuted_kronecker(
    weight: Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int = 1,
    max_iterations: int = 20,
    starts: list[tuple[Tensor, Tensor]] | None = None,
    start_names: tuple[str, ...] = SEARCH_STARTS,
    skip_worse_starts: bool = True,
) -> PermutedKronecker:
    """Search row and column permutations that make ``weight`` closest to a Kronecker sum.

    The search alternates, as in the TQCompressor paper: fit the factors to the currently
    permuted matrix (Van Loan); then, holding the factors, move every row (and then every column)
    of ``W`` to the position of the Kronecker sum it matches best - a linear assignment problem
    solved exactly with scipy's ``linear_sum_assignment``. Each step can only lower the error (the
    current permutation is one of the candidates); a step that does not lower it is rejected and
    the search stops. Everything is deterministic (no random start), so the same weight always
    gives the same factors.

    Alternation is local, so it starts from up to three points and keeps the best result: a
    similarity grouping that puts rows (columns) pointing the same way into one small block of
    ``B``, which is what makes trained weights fit the structure best; a spectral grouping that
    reads the Kronecker index structure off the singular vectors of ``W`` (exact for a scrambled
    ``A (x) B``); and the identity. With ``skip_worse_starts`` a later built-in start is searched
    from only if its fit before any search is already better than the best search so far: on
    SmolLM2's matrices the similarity start won all 84 searches and no start that began behind
    ended ahead (``bench/results/permutation_starts/permutation-starts.json``), and the result is still never worse
    than the identity's fit, plain ``kronecker``. ``start_names``: which built-in starts, in
    order (:func:`search_start`); ``starts``: more ``(row_perm, col_perm)`` start points (e.g.
    the permutations found earlier), always searched from.

    The search is local: from a start with a few labels wrong it finds a planted structure; from
    scratch only a noiseless single product is found for certain (measured in
    ``bench/decomposition.py --planted``).
    """
    w = weight.detach().to(torch.float64)
    built_in = [search_start(name, w, a_shape, b_shape) for name in start_names]
    best: PermutedKronecker | None = None
    for index, (row_perm, col_perm) in enumerate(built_in + list(starts or [])):
        start = _fit_at(w, row_perm, col_perm, a_shape, b_shape, rank)  # the search begins from it
        if skip_worse_starts and best is not None and index < len(built_in) and start[2] >= best.history[-1]:
            continue
        result = _alternate(w, a_shape, b_shape, rank, row_perm, col_perm, max_iterations, start)
        if best is None or result.history[-1] < best.history[-1]:
            best = result
    return best


def search_start(name: str, w: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """One of :func:`permuted_kronecker`'s built-in start points ``(row_perm, col_perm)``:
    ``identity``, ``spectral`` (:func:`spectral_grouping`) or ``similarity`` (rows, and columns,
    pointing the same way grouped into one block of B: :func:`similarity_grouping`)."""
    (m, n), (m1, n1), (m2, n2) = w.shape, a_shape, b_shape
    if name == "identity":
        return torch.arange(m), torch.arange(n)
    if name == "spectral":
        return spectral_grouping(w, a_shape, b_shape)
    if name == "similarity":
        return (
            similarity_grouping(w, m2) if m1 > 1 else torch.arange(m),
            similarity_grouping(w.T, n2) if n1 > 1 else torch.arange(n),
        )
    raise ValueError(f"unknown search start {name!r}; the starts are {', '.join(SEARCH_STARTS)}")


def _fit_at(w, row_perm, col_perm, a_shape, b_shape, rank) -> tuple[Tensor, Tensor, float]:
    """Van Loan's factors of ``w`` at these permutations and their relative error."""
    permuted = w[row_perm][:, col_perm]
    a, b = nearest_kronecker(permuted, a_shape, b_shape, rank)
    return a, b, relative_error(permuted, kronecker_sum(a, b))


def _alternate(w, a_shape, b_shape, rank, row_perm, col_perm, max_iterations, start) -> PermutedKronecker:
    """The alternating search from ``(row_perm, col_perm)``, whose fit ``start`` is :func:`_fit_at`'s."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    # A permutation inside one factor is absorbed by that factor, so with a factor dimension of
    # one the corresponding permutation cannot help: skip its (possibly huge) assignment problem.
    search_rows = m1 > 1 and m2 > 1
    search_cols = n1 > 1 and n2 > 1
    a, b, error = start
    history = [error]
    for _ in range(max_iterations):
        improved = False
        for axis, enabled in ((0, search_rows), (1, search_cols)):
            if not enabled:
                continue
            target = kronecker_sum(a, b)
            if axis == 0:
                new_row_perm, new_col_perm = assign(w[:, col_perm], target), col_perm
            else:
                new_row_perm, new_col_perm = row_perm, assign(w[row_perm].T, target.T)
            permuted = w[new_row_perm][:, new_col_perm]
            new_a, new_b = nearest_kronecker(permuted, a_shape, b_shape, rank)
            error = relative_error(permuted, kronecker_sum(new_a, new_b))
            if error < history[-1] * (1 - 1e-9):
                row_perm, col_perm, a, b = new_row_perm, new_col_perm, new_a, new_b
                history.append(error)
                improved = True
        if not improved:
            break
    return PermutedKronecker(a, b, row_perm, col_perm, history)


# least-squares steps in the output-metric search: to converge a start or the final permutations
# (stopped earlier when a step gains less than the tolerance), and after each permutation step, to
# judge it. On SmolLM2 matrices (q/gate/down_proj of block 10) 25 steps and 20 rounds reach the same
# error at 1.4x the time; a looser tolerance (1e-3) picked the worse start on up_proj of block 25.
CONVERGE_STEPS, STEP_STEPS = 10, 3


def output_metric_search(
    w: Tensor,
    input_cov: Tensor,
    starts: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    max_iterations: int = 3,
    tolerance: float = 1e-4,
) -> PermutedKronecker:
    """Permutations and factors that make ``sum_k A_k (x) B_k`` reproduce the *outputs* of ``w``
    on inputs with second moment ``input_cov``: minimise ``tr(D C D^T)``,
    ``D = W - P_r^T K P_c^T``.

    ``starts``: ``(row_perm, col_perm, a, b)`` start points (the rank is that of ``a``); each is
    converged in the output metric by exact alternating least squares
    (:func:`output_metric_kronecker`) and the best one is then searched further. Rows of ``W`` do
    not interact with ``C``, so the row step assigns each row
    to the Kronecker row with the least exact output cost ``(W_i - K_j) C (W_i - K_j)^T``. Columns
    carry their input channel's statistics with them, so the column step weights each column's
    squared distance by that channel's energy ``C_jj`` (the diagonal of ``C``). Each step refits
    the factors in the output metric and is kept only if the exact output error drops.
    ``history``: the relative output error after each accepted step.
    """
    w = w.detach().to(torch.float64)
    c = damped_cov(input_cov)
    _, m1, n1 = starts[0][2].shape
    _, m2, n2 = starts[0][3].shape
    problem = _OutputProblem(w, c, w @ c, tolerance)
    fitted = [(r, col, *problem.refit(r, col, a.double(), b.double(), CONVERGE_STEPS)) for r, col, a, b in starts]
    row_perm, col_perm, a, b, error = min(fitted, key=lambda f: f[4])
    history = [error]
    axes = [axis for axis, enabled in ((0, m1 > 1 and m2 > 1), (1, n1 > 1 and n2 > 1)) if enabled]
    for _ in range(max_iterations if axes else 0):
        improved = False
        for axis in axes:
            new_row, new_col = problem.propose(axis, row_perm, col_perm, kronecker_sum(a, b))
            new_a, new_b, new_error = problem.refit(new_row, new_col, a, b, STEP_STEPS)
            if new_error < history[-1] * (1 - tolerance):
                row_perm, col_perm, a, b = new_row, new_col, new_a, new_b
                history.append(new_error)
                improved = True
        if not improved:
            break
    if len(history) > 1:  # converge the factors of the final permutations
        a, b, error = problem.refit(row_perm, col_perm, a, b, CONVERGE_STEPS)
        history[-1] = min(history[-1], error)
    return PermutedKronecker(a, b, row_perm, col_perm, history)


class _OutputProblem(NamedTuple):
    """One matrix's output-metric search: ``w``, the damped input moment ``c``, ``w @ c``."""

    w: Tensor
    c: Tensor
    wc: Tensor
    tolerance: float

    def refit(self, row_perm: Tensor, col_perm: Tensor, a: Tensor, b: Tensor, iterations: int):
        """The factors for these permutations, refined from ``(a, b)``, and their relative output error."""
        a, b, history = output_metric_kronecker(
            self.w[row_perm][:, col_perm],
            self.c[col_perm][:, col_perm],
            a,
            b,
            iterations,
            self.tolerance,
            damping=0.0,
            product=self.wc[row_perm][:, col_perm],
        )
        return a, b, history[-1]

    def propose(self, axis: int, row_perm: Tensor, col_perm: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """New permutations for one axis (0: rows, by exact output cost; 1: columns, by energy-weighted distance)."""
        if axis == 0:
            c = self.c[col_perm][:, col_perm]
            return output_row_assignment(self.w[:, col_perm], c, k, self.wc[:, col_perm]), col_perm
        return row_perm, assign(self.w[row_perm].T, k.T, weights=self.c.diagonal())


def output_row_assignment(w: Tensor, c: Tensor, target: Tensor, product: Tensor | None = None) -> Tensor:
    """Permutation ``p`` minimising the output error ``tr(D C D^T)`` of ``D = w[p] - target``
    (columns of ``w`` and ``c`` already in ``target``'s order): exact, since each row's cost
    ``(w_i - t_j) C (w_i - t_j)^T`` does not depend on the other rows. ``product``: ``w @ c``."""
    wc = product if product is not None else w @ c
    return _assignment(((target @ c) * target).sum(1)[None, :] - 2.0 * wc @ target.T)


def _assignment(cost: Tensor) -> Tensor:
    """Permutation ``p`` with ``sum_s cost[p[s], s]`` minimal: item ``p[s]`` goes to position ``s``."""
    row_ind, col_ind = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(col_ind)] = torch.as_tensor(row_ind, dtype=torch.long)
    return perm


def assign(rows: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Permutation ``p`` minimising ``sum_s weights[p[s]] ||rows[p[s]] - target[s]||^2`` (an exact
    linear assignment; unweighted: ``||rows[p] - target||_F``). Each row carries its weight along.

    ``cost[r, s] = ||rows[r] - target[s]||^2 = const - 2 rows[r].target[s] + ||target[s]||^2``.
    """
    cost = (target * target).sum(1)[None, :] - 2.0 * rows @ target.T
    return _assignment(cost if weights is None else weights[:, None] * cost)


def similarity_grouping(vectors: Tensor, group_size: int) -> Tensor:
    """Order the rows of ``vectors`` so that each run of ``group_size`` rows points the same way.

    Greedy: take the largest remaining row, add the ``group_size - 1`` remaining rows with the
    highest cosine similarity to it. Rows within one block of ``B`` then differ mostly by a
    common pattern, which a few Kronecker terms capture.
    """
    count = vectors.shape[0]
    if group_size == 1:
        return torch.arange(count)
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    free = torch.ones(count, dtype=torch.bool)
    order: list[int] = []
    for seed in torch.argsort(vectors.norm(dim=1), descending=True).tolist():
        if not free[seed]:
            continue
        free[seed] = False
        scores = similarity[seed].masked_fill(~free, -float("inf"))
        mates = torch.topk(scores, group_size - 1).indices
        free[mates] = False
        order += [seed, *mates.tolist()]
    return torch.tensor(order, dtype=torch.long)


def spectral_grouping(w: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Start permutations read off the singular vectors of ``W``.

    For ``W = P_r (A (x) B) P_c`` the singular vectors are permuted Kronecker products of the
    factors' singular vectors. Dividing the left vector of ``u_A1 (x) u_B2`` by the top one,
    ``u_A1 (x) u_B1``, leaves ``u_B2[i2] / u_B1[i2]``: a function of the B-index ``i2`` alone, so
    rows with equal ratios share ``i2``. The same holds for the A-index and for the columns.
    For each index we pick the singular vector whose ratios fall most cleanly into the expected
    number of equal-sized groups, then resolve the two labels into one permutation.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return _grouping(u, m1, m2), _grouping(vh.T, n1, n2)


def _grouping(vectors: Tensor, size1: int, size2: int) -> Tensor:
    count = vectors.shape[0]
    if size1 == 1 or size2 == 1 or vectors.shape[1] < 2:
        return torch.arange(count)
    top = vectors[:, :1]
    safe = torch.where(top.abs() < 1e-12, torch.full_like(top, 1e-12), top)
    ratios = (vectors[:, 1:] / safe).T  # (candidates, count)
    # index 1 (the A-index) takes size1 values, each shared by size2 rows; index 2 the reverse
    label1 = _best_labels(ratios, groups=size1, group_size=size2)
    label2 = _best_labels(ratios, groups=size2, group_size=size1)
    # cost 0 where both labels agree with a position; the assignment makes it a permutation
    pos1 = torch.arange(size1).repeat_interleave(size2)
    pos2 = torch.arange(size2).repeat(size1)
    cost = (label1[:, None] != pos1[None]).double() + (label2[:, None] != pos2[None]).double()
    row_ind, col_ind = linear_sum_assignment(cost.numpy())
    perm = torch.empty(count, dtype=torch.long)
    perm[torch.as_tensor(col_ind)] = torch.as_tensor(row_ind, dtype=torch.long)
    return perm


def _best_labels(ratios: Tensor, groups: int, group_size: int) -> Tensor:
    """Labels from the candidate vector that splits most cleanly into ``groups`` equal groups.

    Score = widest spread inside a group / narrowest gap between neighbouring groups (sorted),
    so a vector with too few distinct values (gap 0) or too many (spread > 0) scores badly.
    """
    values, order = ratios.sort(dim=1)
    chunks = values.reshape(values.shape[0], groups, group_size)
    spread = (chunks[..., -1] - chunks[..., 0]).amax(dim=1)
    gaps = (chunks[:, 1:, 0] - chunks[:, :-1, -1]).amin(dim=1)
    score = spread / gaps.clamp_min(1e-300)
    score = torch.nan_to_num(score, nan=np.inf)
    best = int(score.argmin())
    labels = torch.empty(ratios.shape[1], dtype=torch.long)
    labels[order[best]] = torch.arange(groups).repeat_interleave(group_size)
    return labels
