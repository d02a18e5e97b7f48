"""The registry of compression structures. Adding one: write ``structures/NAME.py`` (see
``base.Structure``; it ends with ``register(...)``) and add its module to the import line below."""

from __future__ import annotations

from torch import Tensor

from tqcompressor.errors import TQCError
from tqcompressor.structures import dense, kronecker, kronecker_lowrank, lowrank  # noqa: E402,F401  (each registers itself)
from tqcompressor.structures.base import (
    REGISTRY,
    Candidate,
    Structure,
    all_structures,
    compression_methods,
    get_structure,
    module_classes,
    register,
    settings_dict,
)


def decompose(weight: Tensor, method: str = "tq", max_iterations: int = 20, **settings):
    """Factor one ``weight`` (out x in) with a registered structure, in weight space: e.g.
    ``decompose(w, "tq", b_shape=(2, 4), rank=2)`` or ``decompose(w, "svd", rank=64)``."""
    structure = get_structure(method)
    if weight.dim() != 2:
        raise TQCError(f"decompose expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
    spec = structure.make_settings(settings)
    structure.check(spec, tuple(weight.shape))
    return structure.fit(weight, spec, None, max_iterations)


__all__ = [
    "REGISTRY",
    "Candidate",
    "Structure",
    "all_structures",
    "compression_methods",
    "decompose",
    "get_structure",
    "module_classes",
    "register",
    "settings_dict",
]
