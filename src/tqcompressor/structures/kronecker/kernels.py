"""The contraction kernels: ``y = P_r (sum_k A_k (x) B_k) P_c x`` without building the dense matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from tqcompressor.layers import (
    compose_gathers,
    gather_columns,
)


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
