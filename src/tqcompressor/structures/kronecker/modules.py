"""The modules: :class:`KroneckerLinear` and :class:`KroneckerEmbedding` (whose tied LM head shares its factors)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tqcompressor.errors import TQCError
from tqcompressor.layers import (
    FactoredModule,
    bias_of,
    compose_gathers,
    dense_weight_of,
    gather_last,
    unless_identity,
)
from tqcompressor.linalg.decompose import (
    inverse_permutation,
)
from tqcompressor.structures.kronecker.fit import KroneckerFactors, fit_kronecker, stored_factors
from tqcompressor.structures.kronecker.kernels import (
    gathered_kronecker,
    kronecker_layouts,
    kronecker_macs,
    kronecker_matmul,
    kronecker_order,
)


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
