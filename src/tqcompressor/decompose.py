"""Matrix decompositions: pure tensor code, no nn.Module.

A weight ``W`` of shape ``(m1*m2, n1*n2)`` (the ``nn.Linear`` orientation: out x in) is
approximated by

    W[row_perm][:, col_perm]  ~=  K = sum_k  A_k (x) B_k,   A_k: (m1, n1),  B_k: (m2, n2)

* ``kronecker``: nearest sum of Kronecker products (Van Loan & Pitsianis), no permutation.
* ``tq``: TQCompressor - additionally search ``row_perm`` / ``col_perm`` so that the permuted
  matrix is as close to Kronecker structure as possible (alternating factor fit and linear
  assignment, see :func:`permuted_kronecker`).
* ``svd``: truncated SVD ``W ~= U V`` (the low-rank baseline); given the covariance of the layer's
  inputs it minimises the output error instead (activation-aware SVD).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tqcompressor.errors import TQCError

METHODS = ("tq", "kronecker", "svd")
WHITENING_DAMPING = 1e-4  # relative ridge on an input covariance: keeps S^-1 finite, barely moves the metric


@dataclass
class KroneckerFactors:
    """``W ~= (sum_k A_k (x) B_k)[inv(row_perm)][:, inv(col_perm)]``."""

    a: Tensor  # (rank, m1, n1)
    b: Tensor  # (rank, m2, n2)
    row_perm: Tensor  # (m,) int64; W[row_perm] lines up with the rows of the Kronecker sum
    col_perm: Tensor  # (n,) int64
    history: list[float] = field(default_factory=list)  # relative error after each accepted step

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[1] * self.b.shape[1], self.a.shape[2] * self.b.shape[2])

    @property
    def num_params(self) -> int:
        """Trainable numbers stored; the permutations are integer index buffers, not parameters."""
        return self.a.numel() + self.b.numel()

    def to_dense(self) -> Tensor:
        k = kronecker_sum(self.a, self.b)
        return k[inverse_permutation(self.row_perm)][:, inverse_permutation(self.col_perm)]


@dataclass
class LowRankFactors:
    """``W ~= u @ v``."""

    u: Tensor  # (m, rank)
    v: Tensor  # (rank, n)
    history: list[float] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[1])

    @property
    def num_params(self) -> int:
        return self.u.numel() + self.v.numel()

    def to_dense(self) -> Tensor:
        return self.u @ self.v


Factorization = KroneckerFactors | LowRankFactors


def decompose(
    weight: Tensor,
    method: str = "tq",
    a_shape: tuple[int, int] | None = None,
    b_shape: tuple[int, int] | None = None,
    rank: int = 1,
    max_iterations: int = 20,
    input_scale: Tensor | None = None,
) -> Factorization:
    """Factor ``weight`` (out x in) with ``method`` in ``tq``, ``kronecker`` or ``svd``.

    For ``svd`` the shapes are ignored and ``rank`` is the SVD rank. For the Kronecker methods
    ``a_shape`` and ``b_shape`` must multiply out to ``weight.shape``; give one and the other is
    derived. ``input_scale`` (one positive number per input column, e.g. the RMS of each input
    channel on calibration text) makes the Kronecker methods fit the column-weighted matrix, i.e.
    care more about the inputs that are large (see :func:`scaled_kronecker`).
    """
    if weight.dim() != 2:
        raise TQCError(f"decompose expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if method not in METHODS:
        raise TQCError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if rank < 1:
        raise TQCError(f"rank must be at least 1, got {rank}")
    if method == "svd":
        return truncated_svd(weight, rank)
    a_shape, b_shape = complete_shapes(tuple(weight.shape), a_shape, b_shape)
    if input_scale is not None:
        return _cast(scaled_kronecker(weight, input_scale, a_shape, b_shape, rank,
                                      search=method == "tq", max_iterations=max_iterations), weight.dtype)
    if method == "kronecker":
        w = weight.detach().to(torch.float64)
        a, b = nearest_kronecker(w, a_shape, b_shape, rank)
        factors = KroneckerFactors(a, b, torch.arange(w.shape[0]), torch.arange(w.shape[1]))
        factors.history = [relative_error(w, kronecker_sum(a, b))]
        return _cast(factors, weight.dtype)
    return _cast(permuted_kronecker(weight, a_shape, b_shape, rank, max_iterations), weight.dtype)


def scaled_kronecker(weight: Tensor, input_scale: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int],
                     rank: int = 1, search: bool = True, max_iterations: int = 20) -> KroneckerFactors:
    """Kronecker fit weighted by input-column scales, folded into the factors (no extra buffer).

    The permutation search (``search``) runs on ``W diag(s)``. The fit then uses the nearest
    Kronecker-structured scale ``d_A (x) d_B`` of the permuted ``s`` (a rank-1 fit), because
    ``(A' (x) B') (D_A (x) D_B)^-1 = (A' D_A^-1) (x) (B' D_B^-1)``: the weighting costs nothing at
    run time. ``history`` holds the relative error of the weighted fit.
    """
    w = weight.detach().to(torch.float64)
    s = input_scale.detach().to(torch.float64).flatten()
    if s.numel() != w.shape[1] or not bool((s > 0).all()):
        raise TQCError(f"input_scale must hold {w.shape[1]} positive numbers (one per input column), "
                       f"got {s.numel()}")
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


def complete_shapes(
    shape: tuple[int, int], a_shape: tuple[int, int] | None, b_shape: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fill in the missing factor shape and check that ``A (x) B`` has ``shape``."""
    m, n = shape
    if a_shape is None and b_shape is None:
        raise TQCError("Kronecker methods need a_shape or b_shape (e.g. b_shape=(2, 4))")
    if a_shape is None:
        m2, n2 = b_shape
        if m2 <= 0 or n2 <= 0 or m % m2 or n % n2:
            raise TQCError(f"b_shape {tuple(b_shape)} does not divide the weight shape {shape}; "
                           "pick factor sizes that divide each dimension")
        a_shape = (m // m2, n // n2)
    if b_shape is None:
        m1, n1 = a_shape
        if m1 <= 0 or n1 <= 0 or m % m1 or n % n1:
            raise TQCError(f"a_shape {tuple(a_shape)} does not divide the weight shape {shape}; "
                           "pick factor sizes that divide each dimension")
        b_shape = (m // m1, n // n1)
    a_shape, b_shape = tuple(int(x) for x in a_shape), tuple(int(x) for x in b_shape)
    if a_shape[0] * b_shape[0] != m or a_shape[1] * b_shape[1] != n:
        raise TQCError(f"a_shape {a_shape} (x) b_shape {b_shape} gives "
                       f"{(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1])}, not the weight shape {shape}")
    return a_shape, b_shape


# ---------------------------------------------------------------------------------------------
# Building blocks


def kronecker_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum_k kron(a[k], b[k])`` for stacked factors ``a: (r, m1, n1)``, ``b: (r, m2, n2)``."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("kij,kpq->ipjq", a, b).reshape(m1 * m2, n1 * n2)


def inverse_permutation(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def relative_error(w: Tensor, approx: Tensor) -> float:
    return float((w - approx).norm() / w.norm().clamp_min(1e-30))


def rearrange(w: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> Tensor:
    """Van Loan's rearrangement: ``R[(i1, j1), (i2, j2)] = W[(i1, i2), (j1, j2)]``.

    ``A (x) B`` becomes the rank-one matrix ``vec(A) vec(B)^T``, so the nearest sum of ``r``
    Kronecker products is the rank-``r`` truncated SVD of ``R``.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def nearest_kronecker(
    w: Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int
) -> tuple[Tensor, Tensor]:
    """Best ``sum_{k<rank} A_k (x) B_k`` in Frobenius norm (Van Loan & Pitsianis 1993)."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if rank > min(m1 * n1, m2 * n2):
        raise TQCError(f"rank {rank} exceeds the largest useful Kronecker rank "
                       f"{min(m1 * n1, m2 * n2)} for factors {a_shape} and {b_shape}")
    u, s, vh = torch.linalg.svd(rearrange(w, a_shape, b_shape), full_matrices=False)
    root = s[:rank].sqrt()  # split each singular value evenly so A and B have similar scale
    a = (u[:, :rank] * root).T.reshape(rank, m1, n1)
    b = (vh[:rank] * root[:, None]).reshape(rank, m2, n2)
    return a.contiguous(), b.contiguous()


def truncated_svd(weight: Tensor, rank: int, input_cov: Tensor | None = None,
                  damping: float = WHITENING_DAMPING) -> LowRankFactors:
    """Best rank-``rank`` ``U V``. Without ``input_cov`` it minimises ``||W - U V||_F``; with the
    second moment ``C = E[x x^T]`` of the layer's inputs it minimises the *output* error
    ``E||(W - U V) x||^2`` (activation-aware, as in SVD-LLM): the SVD of ``W S`` with ``C = S S^T``,
    mapped back by ``S^-1``. ``history`` holds the relative error in the metric that was minimised."""
    w = weight.detach().to(torch.float64)
    if rank > min(w.shape):
        raise TQCError(f"SVD rank {rank} exceeds min{tuple(w.shape)}")
    if input_cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        back = None
    else:
        root_cov, back = whitening(input_cov, damping)
        u, s, vh = torch.linalg.svd(w @ root_cov, full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, vh[:rank] * root[:, None]
    if back is not None:
        right = right @ back
    history = [float((s[rank:].square().sum() / s.square().sum().clamp_min(1e-300)).sqrt())]
    return LowRankFactors(left.to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous(), history)


def whitening(input_cov: Tensor, damping: float = WHITENING_DAMPING) -> tuple[Tensor, Tensor]:
    """``(S, S^-1)`` with ``S S^T = C + damping * mean(diag C) * I`` (float64)."""
    values, vectors = damped_eigen(input_cov, damping)
    return vectors * values.sqrt(), (vectors / values.sqrt()).T


def damped_eigen(input_cov: Tensor, damping: float = WHITENING_DAMPING) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``C + damping * mean(diag C) * I``.

    The damping keeps directions the calibration text never excited from blowing up ``S^-1``."""
    c = input_cov.detach().to(torch.float64)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise TQCError(f"an input covariance must be square, got shape {tuple(c.shape)}")
    scale = float(c.diagonal().mean()) or 1.0
    values, vectors = torch.linalg.eigh(c / scale + damping * torch.eye(len(c), dtype=c.dtype))
    return values.clamp_min(damping) * scale, vectors


def output_error(weight: Tensor, approx: Tensor, input_cov: Tensor) -> float:
    """Relative output error ``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - approx``."""
    w, d, c = weight.double(), weight.double() - approx.double(), input_cov.double()
    return float(((d @ c * d).sum() / (w @ c * w).sum().clamp_min(1e-300)).clamp_min(0).sqrt())


def _cast(f: KroneckerFactors, dtype: torch.dtype) -> KroneckerFactors:
    return KroneckerFactors(f.a.to(dtype), f.b.to(dtype), f.row_perm, f.col_perm, f.history)


# ---------------------------------------------------------------------------------------------
# TQCompressor: permutation search


def permuted_kronecker(
    weight: Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    rank: int = 1,
    max_iterations: int = 20,
) -> KroneckerFactors:
    """Search row and column permutations that make ``weight`` closest to a Kronecker sum.

    The search alternates, as in the TQCompressor paper: fit the factors to the currently
    permuted matrix (Van Loan); then, holding the factors, move every row (and then every column)
    of ``W`` to the position of the Kronecker sum it matches best - a linear assignment problem
    solved exactly with scipy's ``linear_sum_assignment``. Each step can only lower the error (the
    current permutation is one of the candidates); a step that does not lower it is rejected and
    the search stops. Everything is deterministic (no random start), so the same weight always
    gives the same factors.

    Alternation is local, so it starts from three points and keeps the best result:
    the identity (so ``tq`` is never worse than plain ``kronecker``); a spectral grouping that
    reads the Kronecker index structure off the singular vectors of ``W`` (exact for a scrambled
    ``A (x) B``); and a similarity grouping that puts rows (columns) pointing the same way into
    one small block of ``B``, which is what makes trained weights fit the structure best.
    """
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    (m1, n1), (m2, n2) = a_shape, b_shape
    starts = [
        (torch.arange(m), torch.arange(n)),
        spectral_grouping(w, a_shape, b_shape),
        (similarity_grouping(w, m2) if m1 > 1 else torch.arange(m),
         similarity_grouping(w.T, n2) if n1 > 1 else torch.arange(n)),
    ]
    best: KroneckerFactors | None = None
    for row_perm, col_perm in starts:
        result = _alternate(w, a_shape, b_shape, rank, row_perm, col_perm, max_iterations)
        if best is None or result.history[-1] < best.history[-1]:
            best = result
    return best


def _alternate(w, a_shape, b_shape, rank, row_perm, col_perm, max_iterations) -> KroneckerFactors:
    (m1, n1), (m2, n2) = a_shape, b_shape
    # A permutation inside one factor is absorbed by that factor, so with a factor dimension of
    # one the corresponding permutation cannot help: skip its (possibly huge) assignment problem.
    search_rows = m1 > 1 and m2 > 1
    search_cols = n1 > 1 and n2 > 1
    a, b = nearest_kronecker(w[row_perm][:, col_perm], a_shape, b_shape, rank)
    history = [relative_error(w[row_perm][:, col_perm], kronecker_sum(a, b))]
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
    return KroneckerFactors(a, b, row_perm, col_perm, history)


def assign(rows: Tensor, target: Tensor) -> Tensor:
    """Permutation ``p`` minimising ``||rows[p] - target||_F`` (an exact linear assignment).

    ``cost[r, s] = ||rows[r] - target[s]||^2 = const - 2 rows[r].target[s] + ||target[s]||^2``.
    """
    cost = (target * target).sum(1)[None, :] - 2.0 * rows @ target.T
    row_ind, col_ind = linear_sum_assignment(cost.cpu().numpy())
    perm = torch.empty(rows.shape[0], dtype=torch.long)
    perm[torch.as_tensor(col_ind)] = torch.as_tensor(row_ind, dtype=torch.long)
    return perm


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
