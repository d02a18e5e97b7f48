"""The base classes of every module tqcompressor installs, and pieces they share: reading a dense
layer, gathers, and the tied LM head.

The factored modules themselves live with their structure in :mod:`tqcompressor.structures` (their
quantized forms in :mod:`tqcompressor.quant.modules`). None of them ever builds the dense weight in
its forward pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError


class SavedModule(nn.Module):
    """A module saved by description: ``config()`` (its constructor arguments, JSON-ready) goes to
    ``tqcompressor.json`` under its class name, its tensors to ``model.safetensors``, and
    ``from_config`` builds it again, empty, before the weights load. Every concrete subclass is
    registered by class name (:func:`saved_module_classes`): what a structure file may name.

    ``refresh_derived()`` rebuilds the buffers that are not saved (fused gathers, placeholders) once
    the weights are in place; the default has none."""

    is_container: ClassVar[bool] = False  # True: its children are saved as modules of their own (split experts)
    stores_integers: ClassVar[bool] = False  # True: stores integer weights, which no optimizer can train as they are

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not abstract:
            _SAVED_MODULES[cls.__name__] = cls

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> SavedModule:
        raise NotImplementedError

    def refresh_derived(self) -> None:
        """Rebuild what is computed from the saved tensors (called after loading)."""


class FactoredModule(SavedModule, abstract=True):
    """The contract of every layer that replaces a dense one (``nn.Linear``, GPT-2 ``Conv1D``,
    ``nn.Embedding``), factored, quantized, or both:

    - ``kind``: ``linear`` | ``conv1d`` | ``embedding``, the layer it stands in for;
    - ``to_dense()``: the (out, in) weight it represents (for export and checks, never in forward);
    - ``macs_per_token``: multiply-adds per input row in the forward (0 for a lookup);
    - ``config()`` / ``from_config()`` / ``refresh_derived()``: see :class:`SavedModule`.

    Folding (:mod:`tqcompressor.surgery.folding`) also asks two optional things: a layer with
    ``permutes_outputs`` can take a permutation of its outputs into its stored state
    (``permute_outputs``), and one whose ``input_permutation()`` is not ``None`` can stop doing that gather
    (``take_input_gathered``) once its producers emit their outputs in that order."""

    kind: str = ""
    permutes_outputs: ClassVar[bool] = False

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    @property
    def macs_per_token(self) -> int:
        if self.kind == "embedding":  # a lookup multiplies nothing
            return 0
        raise NotImplementedError

    def input_permutation(self) -> Tensor | None:
        """The gather this layer applies to its input before anything else (``None``: none)."""
        return None

    def permute_outputs(self, gather: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot permute its outputs")

    def take_input_gathered(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} gathers no input")


class QuantizedMatrix(nn.Module):
    """A matrix stored in fewer bits (``out_features`` x ``in_features`` entries): counted as that
    many parameters (:func:`tqcompressor.planning.inventory.count_parameters`)."""

    out_features: int
    in_features: int

    def refresh_derived(self) -> None:
        """Rebuild what is computed from the saved tensors (called after loading); the default has none."""


_SAVED_MODULES: dict[str, type[SavedModule]] = {}


def saved_module_classes() -> dict[str, type[SavedModule]]:
    """Every module class a structure file can name, by class name (those defined so far: the
    checkpoint module imports every structure, the quantized modules and the split experts)."""
    return dict(_SAVED_MODULES)


def describe_module(module: nn.Module) -> dict | None:
    """``{"type": class name, **config()}`` of a saved module, ``None`` for any other module."""
    if not isinstance(module, SavedModule):
        return None
    return {"type": type(module).__name__, **module.config()}


def build_module(desc: dict, dtype: torch.dtype) -> SavedModule:
    """An empty module from its description (weights load later); one line for an unknown type."""
    cls = _SAVED_MODULES.get(desc["type"])
    if cls is None:
        raise TQCError(
            f"unknown module type {desc['type']!r} in tqcompressor.json; was it written by a newer tqcompressor?"
        )
    return cls.from_config({k: v for k, v in desc.items() if k != "type"}, dtype)


def is_container(module: nn.Module) -> bool:
    """A module saved by its own description whose children are saved as modules too (split experts)."""
    return isinstance(module, SavedModule) and module.is_container


def factored_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The saved modules of ``model`` and its factored LM heads, outermost only: a structure built
    from other factored modules (say a Kronecker layer plus a low-rank one) is saved and densified as
    one. Split MoE experts are listed and so are the factored modules inside them."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer, m in found if not is_container(m))
        if not inside and isinstance(module, (SavedModule, TiedFactoredHead)):
            found.append((name, module))
    return found


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """The weight in (out, in) orientation and the kind of layer it came from:
    ``linear``, ``conv1d`` (GPT-2), ``embedding`` (vocab, dim), or that of a factored module."""
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out) and computes x @ W + b
        return module.weight.detach().T, "conv1d"
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear"
    if isinstance(module, nn.Embedding):
        return module.weight.detach(), "embedding"
    if isinstance(module, FactoredModule):  # a factored module, factored again
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
