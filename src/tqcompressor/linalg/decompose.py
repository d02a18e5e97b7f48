"""Matrix math shared by the structures: pure tensor code, no nn.Module, no registry.

A weight ``W`` of shape ``(m1*m2, n1*n2)`` (the ``nn.Linear`` orientation: out x in) is
approximated by a sum of Kronecker products ``sum_k A_k (x) B_k`` with ``A_k: (m1, n1)`` and
``B_k: (m2, n2)`` (Van Loan & Pitsianis), or, for the low-rank family, by ``U V``. Everything
that measures an *output* error uses the second moment ``C = E[x x^T]`` of the layer's inputs:
``E||(W - W') x||^2 = tr(D C D^T)`` with ``D = W - W'``.

Each structure's own fit lives with it in :mod:`tqcompressor.structures`; the permutation search
of TQCompressor is in :mod:`tqcompressor.linalg.permutation`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tqcompressor.errors import TQCError

WHITENING_DAMPING = 1e-4  # relative ridge on an input covariance: keeps S^-1 finite, barely moves the metric


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


def complete_shapes(
    shape: tuple[int, int], a_shape: tuple[int, int] | None, b_shape: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fill in the missing factor shape and check that ``A (x) B`` has ``shape``."""
    if a_shape is None and b_shape is None:
        raise TQCError("Kronecker methods need a_shape or b_shape (e.g. b_shape=(2, 4))")
    if a_shape is None:
        a_shape = _other_factor(shape, b_shape, "b_shape")
    if b_shape is None:
        b_shape = _other_factor(shape, a_shape, "a_shape")
    a_shape, b_shape = tuple(int(x) for x in a_shape), tuple(int(x) for x in b_shape)
    m, n = shape
    if a_shape[0] * b_shape[0] != m or a_shape[1] * b_shape[1] != n:
        raise TQCError(
            f"a_shape {a_shape} (x) b_shape {b_shape} gives "
            f"{(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1])}, not the weight shape {shape}"
        )
    return a_shape, b_shape


def _other_factor(shape: tuple[int, int], given: tuple[int, int], label: str) -> tuple[int, int]:
    """The factor shape that, Kronecker-multiplied with ``given``, makes ``shape``."""
    (m, n), (p, q) = shape, given
    if p <= 0 or q <= 0 or m % p or n % q:
        raise TQCError(
            f"{label} {tuple(given)} does not divide the weight shape {shape}; "
            "pick factor sizes that divide each dimension"
        )
    return (m // p, n // q)


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
        raise TQCError(
            f"rank {rank} exceeds the largest useful Kronecker rank "
            f"{min(m1 * n1, m2 * n2)} for factors {a_shape} and {b_shape}"
        )
    u, s, vh = torch.linalg.svd(rearrange(w, a_shape, b_shape), full_matrices=False)
    root = s[:rank].sqrt()  # split each singular value evenly so A and B have similar scale
    a = (u[:, :rank] * root).T.reshape(rank, m1, n1)
    b = (vh[:rank] * root[:, None]).reshape(rank, m2, n2)
    return a.contiguous(), b.contiguous()


def whitening(input_cov: Tensor, damping: float = WHITENING_DAMPING) -> tuple[Tensor, Tensor]:
    """``(S, S^-1)`` with ``S S^T = C + damping * mean(diag C) * I`` (float64)."""
    values, vectors = damped_eigen(input_cov, damping)
    return vectors * values.sqrt(), (vectors / values.sqrt()).T


def damped_eigen(input_cov: Tensor, damping: float = WHITENING_DAMPING) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``C + damping * mean(diag C) * I``.

    The damping keeps directions the calibration text never excited from blowing up ``S^-1``."""
    c, scale = _covariance(input_cov)
    values, vectors = torch.linalg.eigh(c / scale + damping * torch.eye(len(c), dtype=c.dtype))
    return values.clamp_min(damping) * scale, vectors


def damped_cov(input_cov: Tensor, damping: float = WHITENING_DAMPING) -> Tensor:
    """``C + damping * mean(diag C) * I`` in float64: the metric the output-error fits minimise
    (the same ridge as :func:`damped_eigen`, without an eigendecomposition)."""
    c, scale = _covariance(input_cov)
    return c + (damping * scale) * torch.eye(len(c), dtype=c.dtype)


def _covariance(input_cov: Tensor) -> tuple[Tensor, float]:
    """``input_cov`` in float64 (checked square) and the scale its ridge is relative to."""
    c = input_cov.detach().to(torch.float64)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise TQCError(f"an input covariance must be square, got shape {tuple(c.shape)}")
    return c, float(c.diagonal().mean()) or 1.0


def output_metric_kronecker(
    w: Tensor,
    input_cov: Tensor,
    a: Tensor,
    b: Tensor,
    max_iterations: int = 25,
    tolerance: float = 1e-4,
    damping: float = WHITENING_DAMPING,
    product: Tensor | None = None,
    solve_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, list[float]]:
    """Refine ``sum_k A_k (x) B_k ~= w`` (already permuted) in the output metric
    ``tr(D C D^T)``, ``D = w - sum_k A_k (x) B_k``, ``C`` the damped input second moment (as the
    activation-aware SVD uses it), by exact alternating least squares from ``(a, b)``.

    With B fixed the best A solves one linear system of size ``rank*n1`` (shared by every row
    block of A) whose matrix and right-hand side contract ``C`` and ``w C`` with B; then the same
    for B. Each half-step can only lower the error; it stops when a full step lowers the relative
    error by less than ``tolerance`` or after ``max_iterations``. Float64 throughout, except that
    ``solve_dtype=torch.float32`` factors the systems in single precision (float64 again if that
    factorisation fails): faster on large systems, and the error changes only at second order in
    the solve's error (the tests hold it within 1e-4 relative of float64's). ``product``:
    ``w @ C`` (damped) when the caller has it. Returns ``(a, b, history)`` with the relative output
    error before and after each step (the last one exact, in float64).
    """
    w = w.detach().to(torch.float64)
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    c = damped_cov(input_cov, damping)
    p = product if product is not None else w @ c
    total = max(float((p * w).sum()), 1e-300)
    c_blocks = c.reshape(n1, n2, n1, n2).permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2)  # [(j1,j1'), (j2,j2')]
    p_blocks = p.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)  # [(i1,j1), (i2,j2)]
    a, b = a.to(torch.float64).clone(), b.to(torch.float64).clone()

    blocks = _KroneckerBlocks(c_blocks, p_blocks, rank, (m1, n1), (m2, n2))
    gram, rhs = blocks.a_system(b)
    history = [_expanded_error(gram, rhs, a.transpose(1, 2).reshape(rank * n1, m1), total)]
    for _ in range(max_iterations):
        a = _solve_psd(gram, rhs, solve_dtype).reshape(rank, n1, m1).transpose(1, 2).contiguous()
        gram, rhs = blocks.b_system(a)
        x = _solve_psd(gram, rhs, solve_dtype)
        b = x.reshape(rank, n2, m2).transpose(1, 2).contiguous()
        history.append(_expanded_error(gram, rhs, x, total))
        # keep each term's two factors at the same scale (the product is unchanged)
        ratio = (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
        a, b = a / ratio[:, None, None], b * ratio[:, None, None]
        gram, rhs = blocks.a_system(b)
        if history[-1] > history[-2] * (1 - tolerance):
            break
    d = w - kronecker_sum(a, b)  # the last error exactly (the expansion above cancels when it is tiny)
    history[-1] = (max(float((d @ c * d).sum()), 0.0) / total) ** 0.5
    return a, b, history


class _KroneckerBlocks(NamedTuple):
    """``C`` and ``W C`` with the A-indices in front (``c``: [(j1,j1'), (j2,j2')], ``p``: [(i1,j1), (i2,j2)]),
    so that every contraction of the alternating solve is one matrix product. With the factor ``x`` of
    one side stacked as the unknowns of the system (gram, rhs) that the other side sets up,
    ``tr(D C D^T) = tr(W C W^T) - 2 <x, rhs> + <x, gram x>``: each step's error costs no product with C."""

    c: Tensor
    p: Tensor
    rank: int
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]

    def a_system(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """G[(k,j1),(l,j1')] = sum_{i2,j2,j2'} B_k[i2,j2] C[(j1,j2),(j1',j2')] B_l[i2,j2']."""
        rank, (m1, n1), (m2, n2) = self.rank, self.a_shape, self.b_shape
        pairs = torch.einsum("kpq,lps->klqs", b, b).reshape(rank * rank, n2 * n2)
        gram = (self.c @ pairs.T).reshape(n1, n1, rank, rank).permute(2, 0, 3, 1).reshape(rank * n1, rank * n1)
        rhs = (self.p @ b.reshape(rank, m2 * n2).T).reshape(m1, n1, rank).permute(2, 1, 0)
        return gram, rhs.reshape(rank * n1, m1)

    def b_system(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """H[(k,j2),(l,j2')] = sum_{i1,j1,j1'} A_k[i1,j1] C[(j1,j2),(j1',j2')] A_l[i1,j1']."""
        rank, (m1, n1), (m2, n2) = self.rank, self.a_shape, self.b_shape
        stacked = a.permute(1, 0, 2).reshape(m1, rank * n1)
        pairs = (stacked.T @ stacked).reshape(rank, n1, rank, n1).permute(0, 2, 1, 3).reshape(rank * rank, n1 * n1)
        gram = (pairs @ self.c).reshape(rank, rank, n2, n2).permute(0, 2, 1, 3).reshape(rank * n2, rank * n2)
        rhs = (a.reshape(rank, m1 * n1) @ self.p).reshape(rank, m2, n2).permute(0, 2, 1)
        return gram, rhs.reshape(rank * n2, m2)


def _expanded_error(gram: Tensor, rhs: Tensor, x: Tensor, total: float) -> float:
    return (max(total - 2 * float((x * rhs).sum()) + float((x * (gram @ x)).sum()), 0.0) / total) ** 0.5


def _solve_psd(gram: Tensor, rhs: Tensor, solve_dtype: torch.dtype) -> Tensor:
    """``gram^-1 rhs`` for a symmetric positive (semi)definite ``gram``: Cholesky, half the work of a
    general solve (in ``solve_dtype`` first, float64 if that factorisation fails)."""
    ridged = gram.clone()
    ridged.diagonal().add_(1e-12 * float(gram.diagonal().mean()) or 1e-300)  # only guards exact singularity
    if solve_dtype != torch.float64:
        factor, info = torch.linalg.cholesky_ex(ridged.to(solve_dtype))
        if int(info) == 0:
            return torch.cholesky_solve(rhs.to(solve_dtype), factor).to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(ridged)
    if int(info) != 0:  # not numerically positive definite after all: a general solve
        return torch.linalg.lstsq(gram, rhs).solution
    return torch.cholesky_solve(rhs, factor)


def output_error(weight: Tensor, approx: Tensor, input_cov: Tensor) -> float:
    """Relative output error ``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - approx``."""
    w, d, c = weight.double(), weight.double() - approx.double(), input_cov.double()
    return float(((d @ c * d).sum() / (w @ c * w).sum().clamp_min(1e-300)).clamp_min(0).sqrt())


def fit_error(weight: Tensor, approx: Tensor, input_cov: Tensor | None = None) -> float:
    """The relative error a fit minimises: Frobenius without ``input_cov``, output error with it."""
    return relative_error(weight, approx) if input_cov is None else output_error(weight, approx, input_cov)


def tail_energy(singular: Tensor) -> list[float]:
    """``tail[r]`` = sum of squared singular values beyond the first ``r``."""
    sq = (singular.double() ** 2).flip(0).cumsum(0).flip(0).tolist()
    return sq + [0.0]


class OutputSketch:
    """``tr(D C D^T)`` for many ``D``, cheaply: exact on the top ``k`` eigen-directions of ``C``,
    the rest counted at their mean eigenvalue (exact when ``k`` covers ``C``). Measures the
    candidates of ``auto`` in the output metric."""

    def __init__(self, input_cov: Tensor, k: int = 128) -> None:
        self.cov = damped_cov(input_cov)  # the metric itself, for fits that solve in it
        values, vectors = damped_eigen(input_cov)  # ascending
        self.root = vectors * values.sqrt()  # C = root root^T
        k = min(k, len(values))
        self.top = self.root[:, -k:]
        self.basis = vectors[:, -k:]
        self.rest = float(values[:-k].mean()) if k < len(values) else 0.0

    def energy(self, d: Tensor, col_perm: Tensor | None = None) -> float:
        """``tr(D C D^T)``; ``col_perm``: ``d``'s columns are those of ``W[:, col_perm]``."""
        top, basis = (self.top, self.basis) if col_perm is None else (self.top[col_perm], self.basis[col_perm])
        outside = float(d.square().sum() - (d @ basis).square().sum())
        return float((d @ top).square().sum()) + self.rest * max(outside, 0.0)
