"""Pieces every factored module shares: reading a dense layer, gathers, and the tied LM head.

The factored modules themselves live with their structure in :mod:`tqcompressor.structures`.
None of them ever builds the dense weight in its forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """The weight in (out, in) orientation and the kind of layer it came from:
    ``linear``, ``conv1d`` (GPT-2), ``embedding`` (vocab, dim), or that of a factored module."""
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out) and computes x @ W + b
        return module.weight.detach().T, "conv1d"
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear"
    if isinstance(module, nn.Embedding):
        return module.weight.detach(), "embedding"
    if hasattr(module, "to_dense") and hasattr(module, "kind"):  # a factored module, factored again
        return module.to_dense(), module.kind
    raise TQCError(
        f"cannot factor a {type(module).__name__}; only nn.Linear, GPT-2 Conv1D and nn.Embedding layers are supported"
    )


def embedding_scale(module: nn.Module) -> float:
    """The factor a token embedding multiplies the rows it looks up by: ``sqrt(hidden)`` in Gemma 3
    (``embed_scale``), 1 in most models. A factored embedding keeps it exactly (``output_scale``);
    a tied LM head never applies it."""
    scale = getattr(module, "output_scale", None)
    if scale is None:
        scale = getattr(module, "embed_scale", 1.0)
    return float(scale)


class ScaledEmbedding(nn.Embedding):
    """A plain embedding whose lookups are multiplied by ``output_scale`` (a densified Gemma 3 embedding)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, output_scale: float, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.output_scale = output_scale

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * self.output_scale


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name under which ``model`` holds ``module`` (found by identity)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def bias_of(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if bias is not None else None


def gather_columns(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` for a 2-D ``x``. ``torch.gather`` with a broadcast index is several times
    faster on CPU than ``index_select`` on the last dim of a 3-D activation."""
    return torch.gather(x, 1, index.expand(x.shape[0], -1))


def gather_last(x: Tensor, index: Tensor | None) -> Tensor:
    """``x[..., index]`` (``x`` itself for ``None``)."""
    if index is None:
        return x
    return gather_columns(x.reshape(-1, x.shape[-1]), index).reshape(*x.shape[:-1], index.numel())


def compose_gathers(first: Tensor | None, second: Tensor | None, device: torch.device) -> Tensor | None:
    """The one gather equal to gathering by ``first`` and then by ``second`` (``None``: identity)."""
    if first is None or second is None:
        index = first if second is None else second
    else:
        index = first[second.to(first.device)]
    return None if index is None else index.to(device)


def unless_identity(index: Tensor | None) -> Tensor | None:
    """``None`` for the identity gather (e.g. after folding), so that it is skipped. A meta
    tensor (a model built before its weights load) is kept; loading refreshes the gathers."""
    if index is None or (not index.is_meta and torch.equal(index.cpu(), torch.arange(index.numel()))):
        return None
    return index


class TiedFactoredHead(nn.Module):
    """An LM head tied to a factored embedding of any structure (one with ``project(hidden)``:
    ``KroneckerEmbedding``, ``LowRankEmbedding``, their quantized forms): shares its factors, stores
    nothing of its own but an optional bias."""

    def __init__(self, embedding: nn.Module, bias: Tensor | None = None) -> None:
        super().__init__()
        # kept outside the module tree so the factors are saved and counted once
        self._embedding = [embedding]
        self.kind = "tied_head"
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def embedding(self) -> nn.Module:
        return self._embedding[0]

    @property
    def weight(self) -> Tensor:
        return self.embedding.to_dense()

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.embedding.project(hidden)
        return logits + self.bias if self.bias is not None else logits


def is_tied_head_weight(model: nn.Module, key: str) -> bool:
    """``key`` names the weight of a dense LM head tied to the embedding, which is stored once (under the
    embedding's name): its second name is not missing. Tied by identity, or declared tied by the config
    (a skeleton built inside transformers' own ``from_pretrained`` is not tied yet); a factored head's
    weight is computed, never stored."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or isinstance(head, TiedFactoredHead):
        return False
    tied = getattr(head, "weight", None) is getattr(embedding, "weight", None) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    )
    return bool(tied) and key == f"{module_name(model, head)}.weight"
