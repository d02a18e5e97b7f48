"""``svd``: ``W ~= U V``, the low-rank baseline; with calibration statistics the activation-aware
fit that minimises the output error (as SVD-LLM does)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tqcompressor.errors import TQCError
from tqcompressor.layers import FactoredModule, bias_of, dense_weight_of
from tqcompressor.linalg.decompose import WHITENING_DAMPING, tail_energy, whitening
from tqcompressor.structures.base import Candidate, Capabilities, Factors, Structure, register

SVD_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # auto's menu: fractions of m*n


@dataclass
class LowRankSettings:
    rank: int = 1

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise TQCError(f"rank must be a positive integer, got {self.rank}")


@dataclass
class LowRankFactors(Factors):
    """``W ~= u @ v``."""

    u: Tensor  # (m, rank)
    v: Tensor  # (rank, n)
    history: list[float] = field(default_factory=list)  # relative error in the metric minimised

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[1])

    def to_dense(self) -> Tensor:
        return self.u @ self.v


def truncated_svd(
    weight: Tensor,
    rank: int,
    input_cov: Tensor | None = None,
    damping: float = WHITENING_DAMPING,
    whitened: tuple[Tensor, Tensor] | None = None,
    row_weights: Tensor | None = None,
) -> LowRankFactors:
    """Best rank-``rank`` ``U V``. Without ``input_cov`` it minimises ``||W - U V||_F``; with the
    second moment ``C = E[x x^T]`` of the layer's inputs it minimises the *output* error
    ``E||(W - U V) x||^2`` (activation-aware, as in SVD-LLM): the SVD of ``W S`` with ``C = S S^T``,
    mapped back by ``S^-1``. ``whitened``: ``(S, S^-1)`` from :func:`whitening`, when the caller
    fits many matrices against the same inputs. ``row_weights`` ``r`` (one per output, e.g. the
    loss's gradient energy ``E[(dL/dy_i)^2]``, as FWSVD weights rows by Fisher information) make
    the metric ``E||diag(sqrt(r)) (W - U V) x||^2``: the SVD of ``diag(sqrt(r)) W S``, mapped back
    on both sides (damped like the whitening, so that an output no gradient reached is still fitted).
    ``history`` holds the relative error in the metric that was minimised."""
    w = weight.detach().to(torch.float64)
    if rank > min(w.shape):
        raise TQCError(f"SVD rank {rank} exceeds min{tuple(w.shape)}")
    if row_weights is not None:  # the fit of diag(rows) W, its rows scaled back (as auto fits weighted layers)
        rows = damped_row_roots(row_weights)
        fitted = divide_rows(truncated_svd(w * rows[:, None], rank, input_cov, damping, whitened), rows)
        return LowRankFactors(fitted.u.to(weight.dtype), fitted.v.to(weight.dtype), fitted.history)
    if input_cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        back = None
    else:
        root_cov, back = whitened if whitened is not None else whitening(input_cov, damping)
        u, s, vh = torch.linalg.svd(w @ root_cov, full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, vh[:rank] * root[:, None]
    if back is not None:
        right = right @ back
    history = [float((s[rank:].square().sum() / s.square().sum().clamp_min(1e-300)).sqrt())]
    return LowRankFactors(left.to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous(), history)


def damped_row_roots(row_weights: Tensor, damping: float = WHITENING_DAMPING) -> Tensor:
    """``sqrt(r + damping * mean(r))`` in float64, scaled to mean square 1 (the scale of a metric
    does not change its best fit)."""
    r = row_weights.detach().to(torch.float64)
    if r.dim() != 1 or not torch.isfinite(r).all() or (r < 0).any() or not r.sum() > 0:
        raise TQCError("row weights must be a vector of finite non-negative numbers, not all zero")
    damped = r + damping * r.mean()
    return (damped / damped.mean()).sqrt()


def output_rows(weight: Tensor, stats) -> Tensor | None:
    """The row weights of the output-weighted metric (square roots of each output's damped gradient
    energy, :func:`damped_row_roots`) when ``stats`` recorded them."""
    energy = getattr(stats, "grad_sq_rows", None) if stats is not None else None
    if energy is None:
        return None
    if energy.numel() != weight.shape[0]:
        raise TQCError(f"the calibration statistics hold {energy.numel()} output weights for {weight.shape[0]} rows")
    return damped_row_roots(energy)


def divide_rows(factors: LowRankFactors, rows: Tensor) -> LowRankFactors:
    """``diag(1/rows) U V``: a fit of a row-scaled ``diag(rows) W`` mapped back to ``W``."""
    return LowRankFactors((factors.u / rows.to(factors.u.dtype)[:, None]).contiguous(), factors.v, factors.history)


def row_weighted_svd(weight: Tensor, rank: int, row_weights: Tensor) -> LowRankFactors:
    """Best rank-``rank`` ``U V`` in ``sum_i r_i ||W_i - (U V)_i||^2`` (``r_i > 0``): the rows of
    ``V`` are the top right singular vectors of ``diag(sqrt(r)) W``, and each row of ``U`` is its row
    of ``W`` projected on them (the best coefficients whatever the row's weight). For a token table
    whose rows matter as often as they are read (:func:`tqcompressor.planning.auto.embedding_factors`)."""
    w = weight.detach().to(torch.float64)
    if rank > min(w.shape):
        raise TQCError(f"SVD rank {rank} exceeds min{tuple(w.shape)}")
    _, s, vh = torch.linalg.svd(w * row_weights.to(torch.float64).sqrt()[:, None], full_matrices=False)
    right = vh[:rank]
    history = [float((s[rank:].square().sum() / s.square().sum().clamp_min(1e-300)).sqrt())]
    return LowRankFactors((w @ right.T).to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous(), history)


class LowRankLinear(FactoredModule):
    """``y = U (V x) + bias``: the truncated-SVD baseline as a drop-in layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        kind: str = "linear",
        dtype: torch.dtype | None = None,
    ) -> None:
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
        """Factor a dense ``nn.Linear`` / ``Conv1D`` by truncated SVD."""
        weight, kind = dense_weight_of(module)
        return cls.from_factors(truncated_svd(weight, rank), bias_of(module), kind)

    def config(self) -> dict:
        """Constructor arguments, as ``tqcompressor.json`` stores them."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "kind": self.kind,
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> LowRankLinear:
        return cls(config["in_features"], config["out_features"], config["rank"], config["bias"], config["kind"], dtype)

    permutes_outputs = True

    def permute_outputs(self, gather: Tensor) -> None:
        """Make this layer return ``y[..., gather]`` by permuting the rows of ``U`` (folding)."""
        with torch.no_grad():
            self.u.copy_(self.u[gather.to(self.u.device)])
            if self.bias is not None:
                self.bias.copy_(self.bias[gather.to(self.bias.device)])

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


class LowRankEmbedding(FactoredModule):
    """A token embedding ``E ~= U V``: a lookup reads one row of ``U`` (vocab x rank) and maps it
    through ``V`` (rank x dim). A tied LM head computes ``h V^T U^T`` (:meth:`project`) without the table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.kind = num_embeddings, embedding_dim, "embedding"
        self.u = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype))
        self.output_scale = 1.0  # lookups are multiplied by it (Gemma 3's sqrt(hidden)); the tied head is not

    @classmethod
    def from_factors(cls, factors: LowRankFactors) -> LowRankEmbedding:
        m, n = factors.shape
        layer = cls(m, n, factors.rank, factors.u.dtype)
        with torch.no_grad():
            layer.u.copy_(factors.u)
            layer.v.copy_(factors.v)
        return layer

    def config(self) -> dict:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            **({"output_scale": self.output_scale} if self.output_scale != 1.0 else {}),
        }

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> LowRankEmbedding:
        layer = cls(config["num_embeddings"], config["embedding_dim"], config["rank"], dtype)
        layer.output_scale = float(config.get("output_scale", 1.0))
        return layer

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def weight(self) -> Tensor:
        """Dense table, built on demand: HF helpers (resize, tie checks) look for ``.weight``."""
        return self.to_dense()

    def to_dense(self) -> Tensor:
        return (self.u @ self.v).detach()

    def forward(self, input_ids: Tensor) -> Tensor:
        out = F.embedding(input_ids, self.u) @ self.v
        return out * self.output_scale if self.output_scale != 1.0 else out

    def project(self, hidden: Tensor) -> Tensor:
        """``hidden @ E^T``: logits for an LM head tied to this embedding."""
        return F.linear(F.linear(hidden, self.v), self.u)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class LowRank(Structure):
    name = "svd"
    help = "truncated SVD U V (activation-aware with calibration)"
    settings_type = LowRankSettings
    module_types = (LowRankLinear, LowRankEmbedding)
    capabilities = Capabilities(
        embeddings=True,
        auto_embeddings=True,
        calibrated_in_run=True,
        calibrated_note=" (activation-aware: minimises the output error on the calibration text)",
    )

    def settings_of(self, module: nn.Module) -> LowRankSettings:
        return LowRankSettings(rank=module.rank)

    def describe(self, settings: dict) -> str:
        return f"svd r{settings['rank']}"

    def fit(self, weight: Tensor, settings: LowRankSettings, stats=None, max_iterations: int = 20) -> LowRankFactors:
        return truncated_svd(weight, settings.rank, stats.input_cov if stats is not None else None)

    def module(self, factors: LowRankFactors, bias: Tensor | None, kind: str) -> nn.Module:
        if kind == "embedding":
            return LowRankEmbedding.from_factors(factors)
        return LowRankLinear.from_factors(factors, bias, kind)

    def for_budget(self, shape, keep, prefer):
        m, n = shape
        rank = int(keep * m * n // (m + n))
        return (LowRankSettings(rank=rank), "largest SVD rank that") if rank >= 1 else None

    def candidates(self, weight: Tensor, sketch=None, max_iterations: int = 10) -> tuple[list[Candidate], None]:
        w = weight.detach().to(torch.float64)
        m, n = w.shape
        tail = tail_energy(torch.linalg.svdvals(w if sketch is None else w @ sketch.root))
        menu = []
        for fraction in SVD_FRACTIONS:
            rank = max(1, int(fraction * m * n / (m + n)))
            if rank < min(m, n):
                menu.append(
                    Candidate("svd", rank * (m + n), (tail[rank] / tail[0]) ** 0.5, {"rank": rank}, macs=rank * (m + n))
                )
        return menu, None

    def fit_candidate(self, weight: Tensor, candidate: Candidate, state, input_cov) -> LowRankFactors:
        return truncated_svd(weight, candidate.settings["rank"], input_cov)

    def row_scaled(self, candidate: Candidate, out_features: int) -> Candidate:
        return candidate  # U absorbs the row scale: no parameter more

    def divide_rows(self, factors: LowRankFactors, rows: Tensor) -> LowRankFactors:
        return divide_rows(factors, rows)


register(LowRank())
