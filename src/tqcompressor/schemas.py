"""The schema of every file tqcompressor reads, checked before any tensor is allocated.

A model dir, a spec file or a run dir may come from anywhere (a download, an edit, a disk that
filled up), so what they hold is input like any option: types, required keys, known names, every
size positive and bounded. pydantic does the checking (a well-kept library: one declaration per
file gives the check, the error message and the JSON schema that ``docs/file-formats.md`` shows).
A file that does not match is refused with one line naming the file, the key and what was wrong.

Consistency with the base model (each factored module stands for a layer of the base config's
shape, every tensor it implies is in the weights file) is checked against a meta-device skeleton
in :func:`tqcompressor.modelio.checkpoint.check_shapes`, right after these schemas pass.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter, ValidationError, model_validator

from tqcompressor.errors import TQCError
from tqcompressor.structures import compression_methods, get_structure

SCHEMA_VERSION = 1  # equals checkpoint.FORMAT_VERSION: the format and its schema change together
MAX_SIZE = 1 << 24  # no matrix side, rank or count in a real model comes near 16.7M
MAX_EXPERTS = 1 << 14

Size = Annotated[int, Field(strict=True, ge=1, le=MAX_SIZE)]
Shape = tuple[Size, Size]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Bits = Literal[2, 3, 4, 8]
GroupSize = Annotated[int, Field(strict=True, ge=1, le=MAX_SIZE)]
LinearKind = Literal["linear", "conv1d"]
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", strict=True)


# -- one description per factored module class (tqcompressor.json's "modules") ----------------------


class KroneckerShapes(Strict):
    """What every Kronecker module stores: the factor shapes, the number of terms and which
    permutations it keeps; the rank cannot exceed the terms the shapes allow."""

    a_shape: Shape
    b_shape: Shape
    rank: Size
    row_perm: StrictBool
    col_perm: StrictBool

    @model_validator(mode="after")
    def _rank_within_terms(self):
        most = min(self.a_shape[0] * self.a_shape[1], self.b_shape[0] * self.b_shape[1])
        if self.rank > most:
            raise ValueError(
                f"rank {self.rank} exceeds the most Kronecker terms shapes {list(self.a_shape)}, "
                f"{list(self.b_shape)} have"
            )
        return self


class KroneckerLinearConfig(KroneckerShapes):
    bias: StrictBool
    kind: LinearKind
    row_scale: StrictBool = False


class KroneckerEmbeddingConfig(KroneckerShapes):
    output_scale: FiniteFloat = 1.0


class LowRankLinearConfig(Strict):
    in_features: Size
    out_features: Size
    rank: Size
    bias: StrictBool
    kind: LinearKind

    @model_validator(mode="after")
    def _rank_within_shape(self):
        _check_matrix_rank(self.rank, self.out_features, self.in_features)
        return self


class LowRankEmbeddingConfig(Strict):
    num_embeddings: Size
    embedding_dim: Size
    rank: Size
    output_scale: FiniteFloat = 1.0

    @model_validator(mode="after")
    def _rank_within_shape(self):
        _check_matrix_rank(self.rank, self.num_embeddings, self.embedding_dim)
        return self


def _check_matrix_rank(rank: int, rows: int, columns: int) -> None:
    if rank > min(rows, columns):
        raise ValueError(f"rank {rank} exceeds min({rows}, {columns}), the most a {rows}x{columns} matrix has")


class KroneckerLowRankLinearConfig(Strict):
    kronecker: KroneckerLinearConfig
    lowrank: LowRankLinearConfig


class QuantizedLinearConfig(Strict):
    in_features: Size
    out_features: Size
    bias: StrictBool
    kind: LinearKind
    bits: Bits
    group_size: GroupSize
    double_quant: StrictBool = False  # int4's scales and offsets stored as 8-bit codes


class QuantizedLowRankLinearConfig(QuantizedLinearConfig):
    rank: Size


class QuantizedEmbeddingConfig(Strict):
    num_embeddings: Size
    embedding_dim: Size
    output_scale: FiniteFloat
    bits: Bits
    group_size: GroupSize
    double_quant: StrictBool = False  # int4's scales and offsets stored as 8-bit codes


class TokenBandConfig(Strict):
    rows: Size
    bits: Bits
    group_size: GroupSize
    double_quant: StrictBool = False  # int4's scales and offsets stored as 8-bit codes


class QuantizedTokenBandsConfig(Strict):
    num_embeddings: Size
    embedding_dim: Size
    output_scale: FiniteFloat
    bands: Annotated[tuple[TokenBandConfig, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _bands_cover_table(self):
        rows = sum(band.rows for band in self.bands)
        if rows != self.num_embeddings:
            raise ValueError(f"bands of {rows} rows in all do not make the table's {self.num_embeddings} rows")
        return self


class QuantizedLowRankEmbeddingConfig(QuantizedEmbeddingConfig):
    rank: Size


class QuantizedFactoredConfig(Strict):
    inner: dict  # a module description of its own, checked by module_config (recursively)
    bits: Bits
    group_size: GroupSize
    double_quant: StrictBool = False  # int4's scales and offsets stored as 8-bit codes


class CorrectedLinearConfig(Strict):
    base: dict  # a QuantizedLinear's description, checked by module_config
    correction: dict  # a LowRankLinear's (float, while it trains) or a QuantizedLowRankLinear's


class LinearExpertsConfig(Strict):
    num_experts: Annotated[int, Field(strict=True, ge=1, le=MAX_EXPERTS)]
    hidden_dim: Size
    intermediate_dim: Size
    has_gate: StrictBool
    has_bias: StrictBool
    hidden_act: StrictStr
    fused_class: StrictStr  # a record of where the weights came from; never imported

    @model_validator(mode="after")
    def _known_activation(self):
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"unknown activation {self.hidden_act!r}")
        return self


class TiedHeadConfig(Strict):
    bias: StrictBool
    embedding: StrictStr | None = None


MODULE_CONFIGS: dict[str, type[Strict]] = {
    "KroneckerLinear": KroneckerLinearConfig,
    "KroneckerEmbedding": KroneckerEmbeddingConfig,
    "LowRankLinear": LowRankLinearConfig,
    "LowRankEmbedding": LowRankEmbeddingConfig,
    "KroneckerLowRankLinear": KroneckerLowRankLinearConfig,
    "QuantizedLinear": QuantizedLinearConfig,
    "QuantizedLowRankLinear": QuantizedLowRankLinearConfig,
    "QuantizedEmbedding": QuantizedEmbeddingConfig,
    "QuantizedTokenBands": QuantizedTokenBandsConfig,
    "QuantizedLowRankEmbedding": QuantizedLowRankEmbeddingConfig,
    "QuantizedFactored": QuantizedFactoredConfig,
    "CorrectedLinear": CorrectedLinearConfig,
    "LinearExperts": LinearExpertsConfig,
    "TiedFactoredHead": TiedHeadConfig,
    "TiedKroneckerHead": TiedHeadConfig,  # the older name
}


def module_config(description: Any, where: str) -> dict:
    """A module description checked against its class's schema; JSON-ready (tuples as lists)."""
    if not isinstance(description, dict) or not isinstance(description.get("type"), str):
        raise TQCError(f"{where}: a module description needs a 'type' string")
    kind = description["type"]
    schema = MODULE_CONFIGS.get(kind)
    if schema is None:
        raise TQCError(f"{where}: unknown module type {kind!r}; was it written by a newer tqcompressor?")
    fields = {k: v for k, v in description.items() if k != "type"}
    try:
        checked = schema.model_validate(_tuples(fields))
    except ValidationError as exc:
        raise TQCError(f"{where} ({kind}): {_first_error(exc)}") from None
    if kind == "QuantizedFactored":
        module_config(checked.inner, f"{where}.inner")
    if kind == "CorrectedLinear":
        _corrected_parts(checked, where)
    return description


def _corrected_parts(checked: CorrectedLinearConfig, where: str) -> None:
    """A corrected matrix's two parts: a stored matrix, and a low-rank correction of its shape."""
    base = module_config(checked.base, f"{where}.base")
    correction = module_config(checked.correction, f"{where}.correction")
    if base["type"] != "QuantizedLinear" or correction["type"] not in ("LowRankLinear", "QuantizedLowRankLinear"):
        raise TQCError(f"{where} (CorrectedLinear): needs a QuantizedLinear base and a low-rank correction")
    shapes = [(part["in_features"], part["out_features"]) for part in (base, correction)]
    if shapes[0] != shapes[1]:
        raise TQCError(f"{where} (CorrectedLinear): its correction is {shapes[1]}, its base {shapes[0]} (in, out)")


# -- whole files --------------------------------------------------------------------------------------


class StructureFile(BaseModel):
    """``tqcompressor.json``: which modules of the base model are factored, and how."""

    model_config = ConfigDict(extra="allow", strict=True)  # callers may add keys of their own (save's extra)

    format_version: Annotated[int, Field(strict=True, ge=1, le=SCHEMA_VERSION)]
    base_model: StrictStr | None = None
    dtype: Literal[FLOAT_DTYPES] = "float32"
    modules: dict[StrictStr, dict]
    plan: list[dict] = []

    @model_validator(mode="after")
    def _every_module(self):
        for name, description in self.modules.items():
            module_config(description, f"modules[{name!r}]")
        for i, entry in enumerate(self.plan):
            check_plan_entry(entry, f"plan[{i}]")
        return self


class CompressionLayer(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr
    method: StrictStr
    params_before: Annotated[int, Field(strict=True, ge=0)]
    params_after: Annotated[int, Field(strict=True, ge=0)]


class CompressionFile(BaseModel):
    """``compression.json``: the table ``tqc compress`` printed (``tqc info`` prints it again)."""

    model_config = ConfigDict(extra="allow")

    params_before: Annotated[int, Field(strict=True, ge=0)]
    params_after: Annotated[int, Field(strict=True, ge=0)]
    method: StrictStr
    layers: list[CompressionLayer]


class QuantizedLayer(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr


class QuantizationFile(BaseModel):
    """``quantization.json``: what ``tqc quantize`` stored in int8/int4."""

    model_config = ConfigDict(extra="allow")

    format: StrictStr
    bits: Bits
    group_size: GroupSize | None = None
    weights_file_bytes: Annotated[int, Field(strict=True, ge=0)]
    quantized_float_bytes: Annotated[int, Field(strict=True, ge=0)]
    quantized_stored_bytes: Annotated[int, Field(strict=True, ge=0)]
    # the weights file's tensors, and what of them is not a quantized layer's (files from before lack both)
    weights_tensor_bytes: Annotated[int, Field(strict=True, ge=0)] | None = None
    kept_bytes: Annotated[int, Field(strict=True, ge=0)] | None = None
    layers: list[QuantizedLayer]


class SpecLayer(BaseModel):
    """One entry of a spec file's ``layers``; the structure's own settings are checked by
    :func:`structure_settings`."""

    model_config = ConfigDict(extra="allow", strict=True)

    modules: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)]]
    method: StrictStr = "tq"
    step: Size = 1
    reason: StrictStr = ""


class SpecFile(Strict):
    """A per-layer spec file (``--spec``): the whole plan, written by hand."""

    layers: Annotated[list[SpecLayer], Field(min_length=1)]
    tie_lm_head: StrictBool = True
    max_iterations: Annotated[int, Field(strict=True, ge=1, le=10_000)] = 20


class RunPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    label: StrictStr
    stage: Annotated[int, Field(strict=True, ge=0)]


class RunResults(BaseModel):
    """A run dir's ``results.json`` (``tqc run --resume`` reads the points measured so far)."""

    model_config = ConfigDict(extra="allow")

    points: list[RunPoint]


PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class BudgetFile(Strict):
    """A run dir's ``budget.json`` (``tqc run --time-budget``): the plan a resumed run keeps."""

    model_config = ConfigDict(extra="forbid", strict=False)

    budget: PositiveSeconds
    spent_before_distillation: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    seconds_per_step: PositiveSeconds
    evaluation_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    reserved_after_distillation: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    stages: Size
    steps_per_stage: Size
    blockwise_seconds_per_stage: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    quantized_forward_cost: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    teacher_blocks: Annotated[int, Field(ge=0)] = 0
    sampling_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


FILES: dict[str, type[BaseModel]] = {
    "tqcompressor.json": StructureFile,
    "compression.json": CompressionFile,
    "quantization.json": QuantizationFile,
    "spec file (--spec, YAML or JSON)": SpecFile,
    "results.json (a run dir)": RunResults,
    "budget.json (a run dir, --time-budget)": BudgetFile,
}


def structure_settings(method: str, fields: dict, where: str) -> dict:
    """A structure's spec fields, type-checked: integers must be whole positive numbers (not 4.7,
    'abc' or .nan), flags true/false (not "no"), shapes two sizes. Returns them with tuples."""
    settings_type = get_structure(method).settings_type
    hints = typing.get_type_hints(settings_type)
    names = {f.name for f in dataclasses.fields(settings_type)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TQCError(f"{where}: method {method!r} has no setting(s) {unknown}; its settings are {sorted(names)}")
    checked = {}
    for name, value in fields.items():
        annotation = _sized(hints[name])
        try:
            checked[name] = TypeAdapter(annotation, config=ConfigDict(strict=True)).validate_python(_tuples(value))
        except ValidationError as exc:
            raise TQCError(f"{where}: {name}: {_first_error(exc, with_location=False)} (got {value!r})") from None
    return checked


def check_plan_entry(entry: Any, where: str) -> None:
    """One entry of a saved plan (``Plan.to_list``): a module name, a known method, its settings, a step."""
    if not isinstance(entry, dict) or not isinstance(entry.get("module"), str):
        raise TQCError(f"{where}: a plan entry needs a 'module' name")
    method = entry.get("method")
    if method not in compression_methods():
        raise TQCError(f"{where}: unknown method {method!r}; known: {', '.join(compression_methods())}")
    step = entry.get("step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= MAX_SIZE:
        raise TQCError(f"{where}: step must be a whole number of 1 or more, got {step!r}")
    skip = ("module", "method", "step", "reason")
    structure_settings(method, {k: v for k, v in entry.items() if k not in skip and v is not None}, where)


def read_json_file(path: Path, schema: type[BaseModel]) -> dict:
    """``path``'s JSON, checked against ``schema``; one line naming the file and the fault."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TQCError(f"{path} is unreadable or not valid JSON ({_short(exc)}); it is corrupt") from None
    return check_data(data, schema, str(path))


def check_data(data: Any, schema: type[BaseModel], where: str) -> dict:
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        raise TQCError(f"{where}: {_first_error(exc)}") from None
    except TQCError as exc:  # a module description inside it
        raise TQCError(f"{where}: {exc}") from None
    return data


def json_schemas() -> dict[str, dict]:
    """The JSON schema of every file we read (for docs/file-formats.md)."""
    return {name: schema.model_json_schema() for name, schema in FILES.items()} | {
        f"module type {name}": schema.model_json_schema() for name, schema in MODULE_CONFIGS.items()
    }


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


def check_layer_count(config: dict, tensor_names: list[str], where: str) -> None:
    """A config may not promise more layers than the weights file holds: checked on names alone,
    before a skeleton of the model is built (a million edited layers would take an hour on meta). What
    counts is how many distinct layers one list holds (``model.layers.0`` ... ``model.layers.29``: 30),
    never the largest number named: one tensor named ``model.layers.99999999.x`` is one layer."""
    lists: dict[tuple[str, int], set[str]] = {}  # (the names before a number, its position) -> numbers seen
    for name in tensor_names:
        parts = name.split(".")
        for position, part in enumerate(parts):
            if part.isdigit():
                lists.setdefault((".".join(parts[:position]), position), set()).add(part)
    available = max((len(numbers) for numbers in lists.values()), default=0)
    for key in LAYER_COUNTS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TQCError(f"{where}: {key} must be a whole number of 1 or more, got {value!r}")
        if value > max(available, 1):
            raise TQCError(
                f"{where}: {key} is {value:,} but the weights hold {available:,} numbered layers at most; "
                "the config was edited or the files are incomplete"
            )


def render_markdown() -> str:
    """``docs/file-formats.md``: every schema above as JSON Schema, generated (never edited by hand)."""
    parts = [
        "# File formats",
        "",
        "Generated by `python -m tqcompressor.schemas > docs/file-formats.md` from `src/tqcompressor/schemas.py`;",
        f"format version {SCHEMA_VERSION}. tqcompressor checks every file below against its schema before it",
        "allocates any tensor, and refuses one that does not match with one line naming the file and the key.",
        "Module types name our own classes only; nothing named in a file is ever imported.",
        "",
    ]
    for name, schema in json_schemas().items():
        parts += [f"## {name}", "", "```json", json.dumps(schema, indent=2, sort_keys=True), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_markdown(), end="")


# -- helpers -----------------------------------------------------------------------------------------


def _sized(annotation):
    """A settings annotation with every ``int`` bounded to a size (1 .. MAX_SIZE)."""
    if annotation is int:
        return Size
    origin = typing.get_origin(annotation)
    if origin in (tuple, Union, typing.Union) or str(origin) == "<class 'types.UnionType'>":
        args = tuple(_sized(a) for a in typing.get_args(annotation))
        return tuple[args] if origin is tuple else Union[args]
    return annotation


def _tuples(value):
    """YAML and JSON give lists where a shape is a tuple."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _first_error(exc: ValidationError, with_location: bool = True) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{location}: {message}{more}" if with_location and location else message + more


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
