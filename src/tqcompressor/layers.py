"""Drop-in factored layers. None of them ever builds the dense weight in its forward pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from tqcompressor.decompose import KroneckerFactors, LowRankFactors, decompose, inverse_permutation
from tqcompressor.errors import TQCError


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """The weight in (out, in) orientation and the kind of layer it came from."""
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out) and computes x @ W + b
        return module.weight.detach().T, "conv1d"
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear"
    raise TQCError(f"cannot factor a {type(module).__name__}; only nn.Linear and GPT-2 Conv1D layers are supported")


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


def kronecker_layouts(a_shape: tuple[int, int], b_shape: tuple[int, int], order: str) -> tuple[Tensor | None, Tensor | None]:
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
        outs = [torch.bmm((rows @ b[:, p, :].T).view(tokens, n1, rank).permute(2, 0, 1), a.transpose(1, 2)).sum(0)
                for p in range(m2)]
    else:
        a_cat = a.permute(1, 2, 0).reshape(m1, n1 * rank)
        outs = [(rows @ b[:, p, :].T).view(tokens, n1 * rank) @ a_cat.T for p in range(m2)]
    return outs[0] if m2 == 1 else torch.cat(outs, dim=1)


def gather_columns(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` for a 2-D ``x``. ``torch.gather`` with a broadcast index is several times
    faster on CPU than ``index_select`` on the last dim of a 3-D activation."""
    return torch.gather(x, 1, index.expand(x.shape[0], -1))


def compose_gathers(first: Tensor | None, second: Tensor | None, device: torch.device) -> Tensor | None:
    """The one gather equal to gathering by ``first`` and then by ``second`` (``None``: identity)."""
    if first is None or second is None:
        index = first if second is None else second
    else:
        index = first[second.to(first.device)]
    return None if index is None else index.to(device)


def _unless_identity(index: Tensor | None) -> Tensor | None:
    """``None`` for the identity gather (e.g. after folding), so that it is skipped. A meta
    tensor (a model built before its weights load) is kept; loading refreshes the gathers."""
    if index is None or (not index.is_meta and torch.equal(index.cpu(), torch.arange(index.numel()))):
        return None
    return index


def gathered_kronecker(x: Tensor, a: Tensor, b: Tensor, order: str, input_gather: Tensor | None,
                       output_gather: Tensor | None) -> Tensor:
    """:func:`kronecker_contract` on 2-D ``x`` between one gather on each side (``None``: none)."""
    if input_gather is not None:
        x = gather_columns(x, input_gather)
    y = kronecker_contract(x, a, b, order)
    return y if output_gather is None else gather_columns(y, output_gather)


def kronecker_matmul(x: Tensor, a: Tensor, b: Tensor, input_index: Tensor | None = None,
                     output_index: Tensor | None = None) -> Tensor:
    """``x[..., input_index] @ (sum_k A_k (x) B_k)^T``, then ``[..., output_index]`` (``None``: no
    permutation), for ``x: (..., n1*n2)`` without forming the Kronecker sum. The permutations are
    fused with the contraction's layouts here, on every call; layers keep the fused gathers."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    order = kronecker_order((m1, n1), (m2, n2), rank)
    input_layout, output_layout = kronecker_layouts((m1, n1), (m2, n2), order)
    y = gathered_kronecker(x.reshape(-1, n1 * n2), a, b, order, compose_gathers(input_index, input_layout, x.device),
                           compose_gathers(output_layout, output_index, x.device))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class KroneckerLinear(nn.Module):
    """``y = P_r (sum_k A_k (x) B_k) P_c x + bias``: a drop-in for ``nn.Linear`` / ``Conv1D``.

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
    ) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = a_shape, b_shape
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.kind = kind
        self.a = nn.Parameter(torch.zeros(rank, m1, n1, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(rank, m2, n2, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(m1 * m2, dtype=dtype)) if bias else None
        # input_index gathers x into Kronecker order; output_index scatters back to W's rows
        self.register_buffer("input_index", torch.arange(n1 * n2) if col_perm else None)
        self.register_buffer("output_index", torch.arange(m1 * m2) if row_perm else None)
        self.order = kronecker_order((m1, n1), (m2, n2), rank)
        self.refresh_gathers()

    def refresh_gathers(self) -> None:
        """Recompute the fused gathers from the permutations. Loading calls it; call it yourself
        only if you write into ``input_index`` / ``output_index`` by hand."""
        input_layout, output_layout = kronecker_layouts(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.order)
        device = self.a.device
        self.register_buffer("input_gather", _unless_identity(compose_gathers(self.input_index, input_layout, device)),
                             persistent=False)
        self.register_buffer("output_gather", _unless_identity(compose_gathers(output_layout, self.output_index, device)),
                             persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_gathers()

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, bias: Tensor | None = None, kind: str = "linear") -> KroneckerLinear:
        n, m = factors.col_perm.numel(), factors.row_perm.numel()
        keep_rows = not torch.equal(factors.row_perm, torch.arange(m))
        keep_cols = not torch.equal(factors.col_perm, torch.arange(n))
        layer = cls(tuple(factors.a.shape[1:]), tuple(factors.b.shape[1:]), factors.rank, bias is not None,
                    keep_rows, keep_cols, kind, factors.a.dtype)
        with torch.no_grad():
            layer.a.copy_(factors.a)
            layer.b.copy_(factors.b)
            if bias is not None:
                layer.bias.copy_(bias)
            if keep_cols:
                layer.input_index.copy_(factors.col_perm)
            if keep_rows:
                layer.output_index.copy_(inverse_permutation(factors.row_perm))
        layer.refresh_gathers()
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
        weight, kind = dense_weight_of(module)
        if method not in ("tq", "kronecker"):
            raise TQCError(f"KroneckerLinear takes method 'tq' or 'kronecker', not {method!r}")
        factors = decompose(weight, method, a_shape, b_shape, rank, max_iterations)
        bias = module.bias.detach() if module.bias is not None else None
        return cls.from_factors(factors, bias, kind)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def factors(self) -> KroneckerFactors:
        m, n = self.out_features, self.in_features
        row = inverse_permutation(self.output_index) if self.output_index is not None else torch.arange(m)
        col = self.input_index if self.input_index is not None else torch.arange(n)
        return KroneckerFactors(self.a.detach(), self.b.detach(), row.cpu(), col.cpu())

    def to_dense(self) -> Tensor:
        """The (out, in) weight this layer represents, for export and checks only."""
        return self.factors().to_dense()

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds per input row in the forward (the dense layer needs in * out)."""
        return kronecker_macs(tuple(self.a.shape[1:]), tuple(self.b.shape[1:]), self.rank, self.order)

    def forward(self, x: Tensor) -> Tensor:
        y = gathered_kronecker(x.reshape(-1, self.in_features), self.a, self.b, self.order, self.input_gather,
                               self.output_gather)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, A={tuple(self.a.shape[1:])}, "
                f"B={tuple(self.b.shape[1:])}, rank={self.rank}")


def _gather_last(x: Tensor, index: Tensor | None) -> Tensor:
    """``x[..., index]`` (``x`` itself for ``None``)."""
    if index is None:
        return x
    return gather_columns(x.reshape(-1, x.shape[-1]), index).reshape(*x.shape[:-1], index.numel())


class LowRankLinear(nn.Module):
    """``y = U (V x) + bias``: the truncated-SVD baseline as a drop-in layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 kind: str = "linear", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.u = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias: Tensor | None = None, kind: str = "linear") -> LowRankLinear:
        m, n = factors.shape
        layer = cls(n, m, factors.rank, bias is not None, kind, factors.u.dtype)
        with torch.no_grad():
            layer.u.copy_(factors.u)
            layer.v.copy_(factors.v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int) -> LowRankLinear:
        weight, kind = dense_weight_of(module)
        bias = module.bias.detach() if module.bias is not None else None
        return cls.from_factors(decompose(weight, "svd", rank=rank), bias, kind)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def to_dense(self) -> Tensor:
        return (self.u @ self.v).detach()

    @property
    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


class KroneckerEmbedding(nn.Module):
    """Token embedding ``E ~= P_r (sum_k A_k (x) B_k) P_c`` looked up one row at a time.

    With ``B: (1, 2)`` and ``A: (V, d/2)`` (the paper's setting) every token keeps its own row of
    ``A`` and the column permutation decides which embedding dimensions share a ``B`` pattern.
    """

    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int = 1,
                 row_perm: bool = False, col_perm: bool = True, dtype: torch.dtype | None = None) -> None:
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

    @classmethod
    def from_embedding(cls, module: nn.Embedding, method: str = "tq", a_shape=None, b_shape=None,
                       rank: int = 1, max_iterations: int = 20) -> KroneckerEmbedding:
        if method not in ("tq", "kronecker"):
            raise TQCError(f"KroneckerEmbedding takes method 'tq' or 'kronecker', not {method!r}")
        factors = decompose(module.weight.detach(), method, a_shape, b_shape, rank, max_iterations)
        return cls.from_factors(factors)

    @classmethod
    def from_factors(cls, factors: KroneckerFactors) -> KroneckerEmbedding:
        m, n = factors.shape
        keep_rows = not torch.equal(factors.row_perm, torch.arange(m))
        keep_cols = not torch.equal(factors.col_perm, torch.arange(n))
        layer = cls(tuple(factors.a.shape[1:]), tuple(factors.b.shape[1:]), factors.rank, keep_rows, keep_cols,
                    factors.a.dtype)
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
        m, n = self.num_embeddings, self.embedding_dim
        row = inverse_permutation(self.token_index) if self.token_index is not None else torch.arange(m)
        col = self.input_index if self.input_index is not None else torch.arange(n)
        return KroneckerFactors(self.a.detach(), self.b.detach(), row.cpu(), col.cpu())

    def to_dense(self) -> Tensor:
        return self.factors().to_dense()

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.token_index[input_ids] if self.token_index is not None else input_ids
        m2 = self.b.shape[1]
        a_rows = self.a[:, rows // m2]  # (rank, ..., n1)
        b_rows = self.b[:, rows % m2]  # (rank, ..., n2)
        out = torch.einsum("k...j,k...q->...jq", a_rows, b_rows).flatten(-2)
        return _gather_last(out, self.output_index)

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T``: logits for an LM head tied to this embedding."""
        return kronecker_matmul(hidden, self.a, self.b, self.input_index, self.token_index)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, A={tuple(self.a.shape[1:])}, "
                f"B={tuple(self.b.shape[1:])}, rank={self.rank}")


class TiedKroneckerHead(nn.Module):
    """An LM head tied to a :class:`KroneckerEmbedding`: shares its factors, stores nothing."""

    def __init__(self, embedding: KroneckerEmbedding, bias: Tensor | None = None) -> None:
        super().__init__()
        # kept outside the module tree so the factors are saved and counted once
        self._embedding = [embedding]
        self.kind = "tied_head"
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def embedding(self) -> KroneckerEmbedding:
        return self._embedding[0]

    @property
    def weight(self) -> Tensor:
        return self.embedding.to_dense()

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.embedding.project(hidden)
        return logits + self.bias if self.bias is not None else logits
