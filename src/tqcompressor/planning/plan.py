"""A plan: which module gets which structure, at which distillation step, as a plain value.
Made by :func:`tqcompressor.planning.planners.plan_compression`, applied by
:func:`tqcompressor.surgery.apply.apply_plan`, saved in ``tqcompressor.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tqcompressor.planning.config import LayerSpec
from tqcompressor.planning.inventory import block_index


@dataclass
class LayerPlan:
    """One module's compression: how (``spec``), and its factors when planning already fitted them
    (``auto``, calibrated fits); ``None``: fitted when applied, to the module's weight at that time."""

    name: str
    spec: LayerSpec
    factors: Any = None


@dataclass
class Plan:
    """A whole model's compression, passed explicitly to :func:`tqcompressor.surgery.apply.apply_plan`,
    to multi-step distillation and to :func:`tqcompressor.save`. A module may appear at several
    steps (e.g. an embedding halved twice); later steps re-factor its current factors."""

    layers: list[LayerPlan] = field(default_factory=list)
    method: str = ""
    target_params: int | None = None
    params_before: int | None = None  # the whole model's parameters when it was planned: what budgets refer to
    sequential: bool = False  # applied with the teacher and calibration tokens: refit block by block
    tie_lm_head: bool = True  # a factored tied embedding keeps the LM head tied to its factors
    max_iterations: int = 20  # permutation-search rounds per matrix, for fits done when applying
    auto: dict[str, dict] | None = None  # method="auto": per target layer, the candidates and the choice

    def steps(self) -> list[int]:
        return sorted({entry.spec.step for entry in self.layers}) or [1]

    def without_factors(self, step: int) -> Plan:
        """The same plan, with the factors of ``step``'s layers dropped (to refit them later)."""
        layers = [LayerPlan(e.name, e.spec, None if e.spec.step == step else e.factors) for e in self.layers]
        return dataclasses.replace(self, layers=layers)

    def to_list(self) -> list[dict]:
        """The per-layer plan as ``tqcompressor.json`` stores it (factors are in the weights)."""
        return [{"module": entry.name, **entry.spec.to_dict()} for entry in self.layers]

    @classmethod
    def from_list(cls, entries: list[dict], **fields: Any) -> Plan:
        layers = [
            LayerPlan(e["module"], LayerSpec.from_dict({k: v for k, v in e.items() if k != "module"})) for e in entries
        ]
        return cls(layers, **fields)


def steps_upper_first(names: list[str], steps: int) -> dict[str, int]:
    """Spread layers over ``steps`` distillation steps, upper layers first, as multi-step KD does."""
    order = sorted(names, key=block_index, reverse=True)
    return {name: 1 + i * steps // max(len(order), 1) for i, name in enumerate(order)}
