"""The planners: ways of turning a :class:`~tqcompressor.planning.config.CompressionConfig` into
per-layer specs, looked up by name like structures. ``spec`` follows a per-layer spec file;
``budget`` gives every target the one structure ``method`` names, at the size the whole-model budget
leaves; ``auto`` chooses structure and size per layer (:mod:`tqcompressor.planning.auto`).

A planner works from an :class:`~tqcompressor.planning.inventory.Inventory` and calibration
statistics only; it never touches the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqcompressor.errors import TQCError


@dataclass(frozen=True)
class Planner:
    name: str
    help: str
    # (inventory, config, statistics or None, progress) -> (the layers' plans, a record for the report or None)
    plan: Callable[..., tuple[list, dict | None]]
    # (config) -> None: refuse options this planner does not read (each planner owns its options)
    check: Callable[[Any], None]
    # a method name users type (--method NAME): it chooses structures itself
    is_method: bool = False
    # (inventory, config, calibration) -> the modules to measure statistics for, after every check that
    # can be made before calibrating (one line, no work wasted)
    prepare: Callable[..., list[str]] | None = None


PLANNERS: dict[str, Planner] = {}


def register_planner(planner: Planner) -> Planner:
    if planner.name in PLANNERS:
        raise ValueError(f"a planner named {planner.name!r} is registered already")
    PLANNERS[planner.name] = planner
    return planner


def get_planner(name: str) -> Planner:
    if name not in PLANNERS:
        raise TQCError(f"unknown planner {name!r}; choose one of {', '.join(PLANNERS)}")
    return PLANNERS[name]


def planning_methods() -> list[str]:
    """The planners users name as a method (``auto``), beside the structures."""
    return [name for name, planner in PLANNERS.items() if planner.is_method]


def planner_name(method: str, has_layer_spec: bool) -> str:
    """The planner a config uses: its spec file's, the one its method names, else the budget planner."""
    if has_layer_spec:
        return "spec"
    return method if method in PLANNERS and PLANNERS[method].is_method else "budget"
