"""Drop-in factored layers. None of them ever builds the dense weight in its forward pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn
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


def kronecker_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x @ (sum_k A_k (x) B_k)^T`` for ``x: (..., n1*n2)`` without forming the Kronecker sum.

    Uses ``(A (x) B) vec(X) = vec(A X B^T)`` as two plain matrix multiplies: contract the small
    factor first (``X B^T`` for all k at once), then one big multiply with all ``A_k`` side by
    side. With a one-row ``B`` (m2 = 1) no activation is transposed at all.
    """
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    t = x.reshape(-1, n2) @ b.permute(2, 1, 0).reshape(n2, m2 * rank)  # (N*n1, m2*r): [(b,j), (p,k)]
    a_cat = a.permute(1, 2, 0).reshape(m1, n1 * rank)  # [i, (j,k)]
    if m2 == 1:
        y = t.reshape(-1, n1 * rank) @ a_cat.T  # (N, m1)
    else:
        t = t.reshape(-1, n1, m2, rank).transpose(1, 2).reshape(-1, n1 * rank)  # (N*m2, n1*r)
        y = (t @ a_cat.T).reshape(-1, m2, m1).transpose(1, 2)  # (N, m1, m2)
    return y.reshape(*lead, m1 * m2)


class KroneckerLinear(nn.Module):
    """``y = P_r (sum_k A_k (x) B_k) P_c x + bias``: a drop-in for ``nn.Linear`` / ``Conv1D``.

    The permutations are integer index buffers applied as gathers; an identity permutation is
    not stored at all and costs nothing.
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

    def forward(self, x: Tensor) -> Tensor:
        if self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        y = kronecker_matmul(x, self.a, self.b)
        if self.output_index is not None:
            y = y.index_select(-1, self.output_index)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, A={tuple(self.a.shape[1:])}, "
                f"B={tuple(self.b.shape[1:])}, rank={self.rank}")


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

    def forward(self, x: Tensor) -> Tensor:
        y = (x @ self.v.T) @ self.u.T
        return y + self.bias if self.bias is not None else y

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
        return out.index_select(-1, self.output_index) if self.output_index is not None else out

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T``: logits for an LM head tied to this embedding."""
        if self.input_index is not None:
            hidden = hidden.index_select(-1, self.input_index)
        logits = kronecker_matmul(hidden, self.a, self.b)
        return logits.index_select(-1, self.token_index) if self.token_index is not None else logits

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
