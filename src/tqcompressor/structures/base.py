"""What a compression structure is, and the registry every other part of tqcompressor loops over.

A structure (``tq``, ``svd``, ...) owns everything about one way of storing a matrix: its
settings (the spec fields a user writes), its fit (pure tensor math, with or without calibration
statistics), the ``nn.Module`` that computes with the factors, and its candidates for ``auto``.
Surgery, checkpoints, ``auto``, reports and the CLI only ever talk to a structure through the
methods below, so a new structure is one new file plus its line in ``structures/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from tqcompressor.errors import TQCError


class Factors:
    """Base of every structure's factors dataclass (which adds ``to_dense()``): ``num_params``
    counts its floating-point tensors and nested factors; integer permutations are index
    buffers, not parameters."""

    @property
    def num_params(self) -> int:
        total = 0
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Tensor) and value.is_floating_point():
                total += value.numel()
            elif isinstance(value, Factors):
                total += value.num_params
        return total


@dataclass
class Candidate:
    """One way to store one matrix, measured for ``auto``: parameters, relative error (in the
    metric ``auto`` uses) and multiply-adds per token."""

    method: str
    params: int
    error: float
    settings: dict = field(default_factory=dict)  # the structure's spec fields, JSON-ready
    macs: int = 0

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params, "error": self.error, "macs": self.macs, **self.settings}


@dataclass(frozen=True)
class Capabilities:
    """What a structure can do and how the rest of tqcompressor should treat it, in one value."""

    compresses: bool = True  # False only for 'dense', auto's "keep the layer as it is"
    embeddings: bool = False  # can it replace an nn.Embedding
    auto_embeddings: bool = False  # does auto measure it on a (vocab-sized) embedding table
    offers_candidates: bool = True  # False: a start to distil from, which auto's one-shot errors would misjudge
    covered_by: str = ""  # auto skips this structure's candidates when that one's are measured (they include them)
    calibrated_in_run: bool = False  # `tqc run` calibrates it on the distillation data before planning
    calibrated_note: str = ""  # added to a layer's reason when its fit used calibration statistics


class Structure:
    """The interface. Subclasses set the class attributes and implement the methods that raise."""

    name: str = ""  # what users type: --method NAME, `method:` in spec files
    help: str = ""  # one line for --help and the README
    settings_type: type = object  # a dataclass of the spec fields; validates itself in __post_init__
    module_types: tuple[type, ...] = ()  # the nn.Module classes it builds (saved by class name)
    capabilities: Capabilities = Capabilities()

    # -- settings ---------------------------------------------------------------------------
    def make_settings(self, fields: dict[str, Any]) -> Any:
        """Settings from spec fields; one clear error for a field this structure does not have."""
        allowed = {f.name for f in dataclasses.fields(self.settings_type)}
        unknown = sorted(k for k in fields if k not in allowed)
        if unknown:
            raise TQCError(f"method {self.name!r} has no setting(s) {unknown}; its settings are {sorted(allowed)}")
        return self.settings_type(**fields)

    def check(self, settings: Any, shape: tuple[int, int]) -> None:
        """Raise :class:`TQCError` if ``settings`` cannot factor a weight of ``shape`` (out, in)."""

    def settings_of(self, module: nn.Module) -> Any:
        """The settings a built module has (every field filled in)."""
        raise NotImplementedError

    def is_applied(self, module: nn.Module, settings: Any) -> bool:
        """True when ``module`` already is what ``settings`` asks for (resumed and multi-step runs).
        A field left ``None`` in ``settings`` matches anything."""
        if type(module) not in self.module_types:
            return False
        actual = dataclasses.asdict(self.settings_of(module))
        return all(value is None or actual[key] == value for key, value in dataclasses.asdict(settings).items())

    def describe(self, settings: dict) -> str:
        """A few characters for tables, e.g. ``tq B2x4 r3``."""
        return self.name

    # -- fitting and modules ----------------------------------------------------------------
    def fit(self, weight: Tensor, settings: Any, stats: Any = None, max_iterations: int = 20) -> Any:
        """Factors of ``weight`` (out x in). ``stats``: the layer's calibration statistics
        (:class:`tqcompressor.planning.calibration.LayerStatistics`) or ``None`` for a weight-space fit."""
        raise NotImplementedError

    def module(self, factors: Any, bias: Tensor | None, kind: str) -> nn.Module:
        """The drop-in module for fitted ``factors``; ``kind``: linear | conv1d | embedding."""
        raise NotImplementedError

    # -- planning ---------------------------------------------------------------------------
    def for_budget(self, shape: tuple[int, int], keep: float, prefer: str) -> tuple[Any, str] | None:
        """The settings with the most parameters at most ``keep * m * n``, and why (``None``: none fits)."""
        raise NotImplementedError

    def candidates(self, weight: Tensor, sketch: Any = None, max_iterations: int = 10) -> tuple[list[Candidate], Any]:
        """``auto``'s menu for this matrix, and any state worth reusing in :meth:`fit_candidate`.
        ``sketch``: a :class:`tqcompressor.linalg.decompose.OutputSketch` of the inputs (errors in the output
        metric), or ``None`` (relative weight error)."""
        return [], None

    def fit_candidate(self, weight: Tensor, candidate: Candidate, state: Any, input_cov: Tensor | None) -> Any:
        """The factors of a candidate ``auto`` chose."""
        raise NotImplementedError

    # -- output weights: auto measures and fits diag(rows) W, then maps the factors back to W ----------
    def row_scaled(self, candidate: Candidate, out_features: int) -> Candidate:
        """``candidate`` as it is installed when its fit of ``diag(rows) W`` is mapped back by
        :meth:`divide_rows` (with whatever that adds to its parameters and settings)."""
        raise TQCError(f"method {self.name!r} cannot be fitted with output weights")

    def divide_rows(self, factors: Any, rows: Tensor) -> Any:
        """``diag(1/rows) W'`` for factors ``W'`` of ``diag(rows) W``, exactly."""
        raise TQCError(f"method {self.name!r} cannot be fitted with output weights")


REGISTRY: dict[str, Structure] = {}


def register(structure: Structure) -> Structure:
    if structure.name in REGISTRY:
        raise ValueError(f"a structure named {structure.name!r} is registered already")
    REGISTRY[structure.name] = structure
    return structure


def get_structure(name: str) -> Structure:
    if name not in REGISTRY or not REGISTRY[name].capabilities.compresses:
        raise TQCError(f"unknown method {name!r}; choose one of {', '.join(compression_methods())}")
    return REGISTRY[name]


def compression_methods() -> list[str]:
    return [name for name, structure in REGISTRY.items() if structure.capabilities.compresses]


def all_structures() -> list[Structure]:
    return list(REGISTRY.values())


def module_classes() -> dict[str, type]:
    """Every factored module class by name: what ``tqcompressor.json`` stores."""
    return {cls.__name__: cls for structure in REGISTRY.values() for cls in structure.module_types}


def settings_dict(settings: Any) -> dict:
    """JSON-ready spec fields (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}
