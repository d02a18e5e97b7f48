"""Plain configuration objects and the per-layer spec file (YAML or JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tqcompressor.errors import TQCError, first_line
from tqcompressor.planning.registry import get_planner, planner_name, planning_methods
from tqcompressor.schemas import SpecFile, check_data, structure_settings
from tqcompressor.structures import Structure, get_structure, settings_dict


class LayerSpec:
    """How one module is compressed: a registered structure (``method``), that structure's own
    settings (e.g. ``rank``, ``a_shape``, ``b_shape`` for ``tq``), and the distillation step at
    which it happens. ``LayerSpec("tq", rank=4, b_shape=(2, 4), step=2)``."""

    def __init__(self, method: str = "tq", *, step: int = 1, reason: str = "", **settings: Any) -> None:
        structure = get_structure(method)
        if int(step) < 1:
            raise TQCError(f"step must be 1 or more, got {step}")
        self.method, self.step, self.reason = method, int(step), reason
        self.settings = structure.make_settings(settings)

    @property
    def structure(self) -> Structure:
        return get_structure(self.method)

    def to_dict(self) -> dict:
        return {"method": self.method, **settings_dict(self.settings), "step": self.step, "reason": self.reason}

    @classmethod
    def from_dict(cls, entry: dict) -> LayerSpec:
        """Inverse of :meth:`to_dict`; fields set to null by older versions are skipped."""
        fields = {k: v for k, v in entry.items() if v is not None}
        return cls(**fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LayerSpec({self.to_dict()})"


@dataclass
class CompressionConfig:
    """What to compress and how much. Either a budget (``ratio`` or ``target_params`` of the whole
    model, every parameter counted once) that is turned into per-layer shapes automatically, or an
    explicit per-layer ``layers`` spec: ``(module name or pattern, LayerSpec)`` pairs; a module may
    appear again at a later step to be compressed further."""

    method: str = "tq"
    ratio: float | None = 0.65
    target_params: int | None = None
    target_modules: list[str] | None = None  # name suffixes or glob patterns; None = per-architecture default
    layers: list[tuple[str, LayerSpec]] | None = None  # (module name or pattern, spec)
    tie_lm_head: bool = True  # when a tied embedding is factored: keep the head tied to the factors
    steps: int = 1  # spread the automatic plan over this many distillation steps
    max_iterations: int = 20  # cap on permutation-search rounds per matrix (tq)
    prefer: str = "accuracy"  # budget solver: "accuracy" (any small B) or "speed" (B one row wide)
    auto_methods: list[str] | None = None  # method="auto": the structures it may choose (None: all)
    # with calibration: refit each layer, block by block, to the teacher's outputs from the inputs the
    # compressed model feeds it (errors of earlier layers compensated; tqcompressor.surgery.sequential)
    sequential: bool = False
    # with calibration, auto: weight each output of a layer by the loss's gradient energy there (Fisher row
    # weights, as FWSVD) in both the budget and the fits (bench/results/output_weighting/output-weighting.json);
    # a Kronecker layer fitted so keeps one scale per output (row_scale)
    output_weights: bool = False

    def __post_init__(self) -> None:
        if self.prefer not in ("accuracy", "speed"):
            raise TQCError(f"prefer must be 'accuracy' or 'speed', got {self.prefer!r}")
        if self.method not in planning_methods():  # a structure for every layer, or a planner that chooses
            get_structure(self.method)
        if self.layers is None:
            if self.target_params is None and self.ratio is None:
                raise TQCError("give a ratio (0, 1], a target parameter count, or an explicit layer spec")
            if self.ratio is not None and not 0 < self.ratio <= 1:
                raise TQCError(f"ratio must be in (0, 1] (fraction of parameters kept), got {self.ratio}")
            if self.target_params is not None and self.target_params <= 0:
                raise TQCError(f"target_params must be positive, got {self.target_params}")
        if self.steps < 1:
            raise TQCError(f"steps must be 1 or more, got {self.steps}")
        get_planner(self.planner).check(self)  # each planner refuses the options it does not read

    @property
    def planner(self) -> str:
        """The name of the planner that turns this config into a plan (:mod:`tqcompressor.planning.registry`)."""
        return planner_name(self.method, self.layers is not None)


def load_spec(path: str | Path) -> CompressionConfig:
    """Read a per-layer spec file. Format (YAML or JSON)::

    tie_lm_head: false            # optional
    layers:
      - modules: [transformer.h.1.mlp.c_fc, ...]   # exact module names or glob patterns
        method: tq
        rank: 4
        a_shape: [768, 384]
        b_shape: [4, 2]
        step: 1
    """
    path = Path(path)
    if not path.is_file():
        raise TQCError(f"spec file {path} does not exist; pass a YAML or JSON file with a 'layers' list")
    try:
        text = path.read_text(encoding="utf-8")
        # YAML reads JSON too; the suffix only picks the parser that names the fault best
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise TQCError(f"spec file {path} is not valid YAML/JSON: {first_line(exc) or type(exc).__name__}") from None
    check_data(data, SpecFile, f"spec file {path}")
    layers: list[tuple[str, LayerSpec]] = []
    for i, entry in enumerate(data["layers"]):
        where = f"spec file {path}: layers[{i}]"
        method = entry.get("method", "tq")
        own = {k: v for k, v in entry.items() if k not in ("modules", "method", "step", "reason")}
        settings = structure_settings(method, own, where)
        try:  # each structure checks how its settings fit together
            spec = LayerSpec(method, step=entry.get("step", 1), reason=entry.get("reason", ""), **settings)
        except TQCError as exc:
            raise TQCError(f"{where}: {exc}") from None
        modules = entry["modules"] if isinstance(entry["modules"], list) else [entry["modules"]]
        for name in modules:
            layers.append((name, spec))
    return CompressionConfig(
        method="tq",
        ratio=None,
        layers=layers,
        tie_lm_head=data.get("tie_lm_head", True),
        max_iterations=data.get("max_iterations", 20),
    )


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, int]
    method: str
    settings: dict  # the structure's settings as built (every field filled in)
    step: int
    params_before: int
    params_after: int
    relative_error: float
    seconds: float
    reason: str = ""


@dataclass
class CompressionReport:
    params_before: int = 0  # the model as this report's step found it
    params_after: int = 0
    target_params: int | None = None  # the whole-model budget
    method: str = ""
    step: int | None = None  # the distillation step applied; None: every step
    original_params: int | None = None  # the whole model before any step: what ratio and budget refer to
    seconds: float = 0.0
    counting: str = (
        "every parameter of the model counted once (a tied embedding/LM head once), permutation index buffers excluded"
    )
    layers: list[LayerReport] = field(default_factory=list)
    # method="auto": per target layer, the candidates measured and the one chosen (dense included)
    auto: dict[str, dict] | None = None
    # MLPs whose down projection's input gather was folded into the layers feeding it (exact)
    folded_mlps: list[str] = field(default_factory=list)
    plan: Any = None  # the Plan that was applied (not part of compression.json: tqcompressor.json has it)

    @property
    def ratio(self) -> float:
        """Parameters after, over the whole original model's (a later step's report does not restart
        from the partly compressed model, so it reads against the same budget)."""
        return self.params_after / max(self.original_params or self.params_before, 1)

    def to_dict(self) -> dict:
        out = asdict(replace(self, plan=None))
        del out["plan"]
        out["ratio"] = self.ratio
        return out
