"""What planning needs to know about a model, read once into an :class:`Inventory`.

Planners (:mod:`tqcompressor.planning.planners`) work from the inventory alone: the target modules
and their weights, which of them are embedding tables, how the LM head is tied, and the parameter
count budgets refer to. Reading it changes nothing in the model.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError
from tqcompressor.layers import FactoredModule, QuantizedMatrix, dense_weight_of, module_name
from tqcompressor.planning.config import CompressionConfig
from tqcompressor.structures import module_classes


@dataclass(frozen=True)
class Inventory:
    """A model as planning sees it. ``weights`` are (out, in) views of the model's weights (computed
    for a module that is factored already), for the targets and a tied token table."""

    total_params: int  # every parameter once: what ratios and budgets refer to
    targets: tuple[str, ...]  # budget and auto: the modules to compress, in model order
    spec_matches: tuple[tuple[str, ...], ...]  # a spec: the modules each of its entries names
    weights: Mapping[str, Tensor]
    embeddings: frozenset[str]  # which of those are embedding tables (looked up, not multiplied)
    input_embedding: str | None  # the token table's name
    tied_embedding: str | None  # the token table, when the LM head computes with the same weight
    head: str | None  # the LM head's name
    tied_head_params: int  # parameters a dense head tied to the table gains when untied (0: not tied)

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.weights[name].shape)

    def params_outside(self, names: list[str]) -> int:
        """The parameters of everything but ``names``."""
        return self.total_params - sum(self.weights[name].numel() for name in names)


def read_inventory(model: nn.Module, config: CompressionConfig) -> Inventory:
    """Everything ``config``'s planner reads from ``model``; one clear line for a pattern that matches
    nothing or a model without decoder blocks."""
    if config.layers is not None:
        spec_matches = tuple(tuple(find_target_modules(model, [pattern])) for pattern, _ in config.layers)
        targets: tuple[str, ...] = ()
    else:
        spec_matches, targets = (), tuple(find_target_modules(model, config.target_modules))
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = tied_embedding(model)
    names = list(dict.fromkeys([*targets, *(n for names in spec_matches for n in names), *([tied] if tied else [])]))
    modules = {name: model.get_submodule(name) for name in names}
    shares_weight = head is not None and embedding is not None and head.weight is getattr(embedding, "weight", None)
    return Inventory(
        total_params=count_parameters(model),
        targets=targets,
        spec_matches=spec_matches,
        weights=MappingProxyType({name: dense_weight_of(module)[0] for name, module in modules.items()}),
        embeddings=frozenset(name for name, module in modules.items() if is_embedding(module)),
        input_embedding=module_name(model, embedding) if embedding is not None else None,
        tied_embedding=tied,
        head=module_name(model, head) if head is not None else None,
        tied_head_params=head.weight.numel() if shares_weight else 0,
    )


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D ``down_proj`` and ``gate_up_proj`` (or ``up_proj``) parameters."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.ndim == 3 and up.ndim == 3


def has_fused_experts(model: nn.Module) -> bool:
    return any(is_fused_experts(module) for module in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Every parameter once: ``parameters()`` already skips a tied LM head's shared weight. A
    quantized matrix counts its entries (it is a parameter stored in fewer bits; padding excluded)."""
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedMatrix))
    return sum(p.numel() for p in model.parameters()) + quantized


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or (isinstance(module, FactoredModule) and module.kind == "embedding")


def tied_embedding(model: nn.Module) -> str | None:
    """The name of the token embedding when the LM head computes with the same table, else ``None``."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "get_output_embeddings"):
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not isinstance(embedding, nn.Embedding) or getattr(head, "weight", None) is not embedding.weight:
        return None
    return module_name(model, embedding)


def block_index(name: str) -> int:
    """The decoder block a module belongs to (the first ``.N.`` in its name); -1 outside the blocks."""
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[0]) if numbers else -1


# ---------------------------------------------------------------------------------------------
# Which modules


def _factorable_types() -> tuple[type, ...]:
    return (nn.Linear, Conv1D, nn.Embedding, *module_classes().values())


def find_target_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Module names matching ``patterns`` (exact name, name suffix after a dot, or glob); with no
    patterns, :func:`default_target_modules`.

    The LM head is only matched when named explicitly: it is usually tied to the embedding."""
    if patterns is None:
        return default_target_modules(model)
    names = []
    unmatched = set(patterns)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    factorable = _factorable_types()
    for name, module in model.named_modules():
        if not isinstance(module, factorable):
            continue
        if module is head and name not in patterns:
            continue
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
                names.append(name)
                unmatched.discard(pattern)
                break
    if unmatched:
        raise TQCError(
            f"target module pattern(s) {sorted(unmatched)} match no Linear/Conv1D/Embedding "
            f"module of this model; module names look like {_example_names(model)}"
        )
    return names


def default_target_modules(model: nn.Module) -> list[str]:
    """What is compressed when nobody names anything: every ``nn.Linear`` / ``Conv1D`` inside the
    model's repeated decoder blocks (its largest ``ModuleList`` of same-typed blocks). Never the
    embedding or the LM head (outside the blocks), nor an MoE router (a Linear with one output per
    expert): those are choices a user makes by naming them."""
    blocks = decoder_blocks(model)
    if blocks is None:
        raise TQCError(
            f"found no repeated decoder blocks in this {type(model).__name__}; "
            "pass target_modules (e.g. --target-modules q_proj,v_proj)"
        )
    experts = _expert_count(getattr(model, "config", None))
    names = []
    for name, module in model.get_submodule(blocks).named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not _is_router(module, experts):
            names.append(f"{blocks}.{name}")
    if not names:
        raise TQCError(f"the decoder blocks at {blocks!r} hold no Linear/Conv1D module; pass target_modules")
    return names


def decoder_blocks(model: nn.Module) -> str | None:
    """The qualified name of the ``ModuleList`` of decoder blocks: of the lists whose items all
    share one class, the one holding the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(item) for item in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = name, params
    return best


def _expert_count(config) -> int | None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _is_router(module: nn.Module, experts: int | None) -> bool:
    out_features = module.out_features if isinstance(module, nn.Linear) else module.nf
    return experts is not None and out_features == experts


def target_summary(model: nn.Module, names: list[str]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(name, class, weight shape, parameters)`` of each target, for ``tqc info --targets``."""
    rows = []
    for name in names:
        module = model.get_submodule(name)
        rows.append(
            (name, type(module).__name__, tuple(module.weight.shape), sum(p.numel() for p in module.parameters()))
        )
    return rows


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
