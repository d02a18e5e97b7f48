"""Quantizing a model: :func:`quantize_` swaps every weight matrix of a model, compressed or not, for
its int8, int4, int3 or int2 form (:mod:`tqcompressor.quant.modules`), in place.

What is quantized: every ``nn.Linear`` and GPT-2 ``Conv1D`` (the LM head too), the token embedding
and plain position embeddings, and every factored module's factors. Biases and norms stay in float. A dense
LM head tied to the embedding stays tied: one quantized table serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError
from tqcompressor.layers import (
    TiedFactoredHead,
    bias_of,
    dense_weight_of,
    embedding_scale,
    factored_modules,
    is_container,
    set_module,
)
from tqcompressor.quant.formats import QuantizeSettings, TokenBands, relative_error
from tqcompressor.quant.modules import (
    MODULE_TYPES,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTokenBands,
    QuantizedWeight,
    quantized_form,
)


@dataclass
class QuantizedLayer:
    name: str
    kind: str  # what was quantized: linear | conv1d | embedding | a factored module's class
    weights: int  # matrix entries stored (padding included)
    float_bytes: int  # bytes of those entries before
    stored_bytes: int  # integers + scales + offsets after
    error: float  # ||W - W'|| / ||W|| of the matrix the layer stands for
    format: str = ""  # int8, int4-g32, ...: per layer, where a plan mixes them

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class QuantizeReport:
    settings: QuantizeSettings
    layers: list[QuantizedLayer] = field(default_factory=list)

    @property
    def float_bytes(self) -> int:
        return sum(layer.float_bytes for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    def summary(self) -> str:
        return (
            f"quantized {len(self.layers)} layers to {self.settings.name}: their weights went from "
            f"{self.float_bytes / 2**20:.1f} MiB to {self.stored_bytes / 2**20:.1f} MiB"
        )


def quantize_(
    model: nn.Module,
    settings: QuantizeSettings | str,
    measure_error: bool = True,
    per_layer: dict[str, QuantizeSettings | TokenBands] | None = None,
    only: set[str] | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s weight matrices in place (``settings``: a :class:`QuantizeSettings` or
    ``"int8"`` / ``"int4"``; ``per_layer``: another format for the modules it names, as a byte-budget
    plan mixes them; a token table's may be :class:`TokenBands`, a format per band of its rows).
    Factored modules keep their structure; their factors are quantized
    (:data:`~tqcompressor.quant.modules.QUANTIZED_FORMS`). ``only``: quantize the modules it names and
    leave the rest as they are, quantized or not (a byte plan's distillation trains the factors in float
    beside layers already stored in their formats, then stores the factors)."""
    if isinstance(settings, str):
        settings = QuantizeSettings.parse(settings)
    per_layer = per_layer or {}
    already = [name for name in quantized_layers(model) if only is None or name in only]
    if already:
        raise TQCError(f"the model is quantized already ({already[0]}); quantize the unquantized model instead")
    report = QuantizeReport(settings)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    quantized_now = set(quantized_layers(model))
    factored = {
        name: module
        for name, module in factored_modules(model)
        if not is_container(module) and name not in quantized_now
    }
    for name, module in factored.items():
        if isinstance(module, TiedFactoredHead) or (only is not None and name not in only):
            continue  # a tied head follows its embedding below
        before = _before(module, measure_error)  # the wrapper takes over the module's factors
        quantized = quantized_form(module, per_layer.get(name, settings))
        report.layers.append(_layer(name, type(module).__name__, before, quantized))
        set_module(model, name, quantized)
        if module is embedding and isinstance(head, TiedFactoredHead):
            model.set_output_embeddings(TiedFactoredHead(quantized, head.bias))
    tied_dense = isinstance(embedding, nn.Embedding) and getattr(head, "weight", None) is embedding.weight
    tied = (embedding, head) if tied_dense else None
    inside = (*factored, *quantized_now)
    for name, module in list(model.named_modules()):
        skipped = any(name == outer or name.startswith(outer + ".") for outer in inside)
        if name and not skipped and (only is None or name in only):
            _quantize_plain(model, name, module, per_layer.get(name, settings), tied, report, measure_error)
    return report


def _quantize_plain(model: nn.Module, name: str, module: nn.Module, settings, tied, report, measure_error) -> None:
    """One plain ``nn.Linear`` / ``Conv1D`` / token table (any other module is left alone) in ``settings``.
    ``tied``: ``(table, head)`` where a dense head shares the table's weight: it stays tied, to the quantized
    table (found before any module was replaced)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = tied[1] if tied else None
    if isinstance(module, (nn.Linear, Conv1D)) and not (tied and module is head):
        before = _before(module, measure_error)
        weight, kind = dense_weight_of(module)
        if isinstance(settings, TokenBands):
            raise TQCError(f"{name} is not a token table: bands of rows are for embeddings only")
        quantized = QuantizedLinear.from_dense(weight, bias_of(module), kind, settings)
    elif type(module) is nn.Embedding or module is embedding and isinstance(module, nn.Embedding):
        # a subclass with its own forward (OPT's learned positions) stays float; the input
        # embedding's subclasses only scale their lookups (Gemma), which QuantizedEmbedding keeps
        before = _before(module, measure_error)
        quantized = _quantized_table(module, settings)
    else:
        return
    report.layers.append(_layer(name, _kind(module), before, quantized))
    set_module(model, name, quantized)
    if tied and module is tied[0]:
        model.set_output_embeddings(TiedFactoredHead(quantized, bias_of(head)))
        model.config.tie_word_embeddings = False  # stop transformers from re-tying to a dense table


def _quantized_table(module: nn.Embedding, settings: QuantizeSettings | TokenBands) -> nn.Module:
    if isinstance(settings, TokenBands):
        return QuantizedTokenBands.from_dense(
            module.weight.detach(), settings.order, list(settings.bands), embedding_scale(module)
        )
    return QuantizedEmbedding.from_dense(module.weight.detach(), settings, embedding_scale(module))


def _kind(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "embedding" if isinstance(module, nn.Embedding) else "linear"


def _before(module: nn.Module, measure_error: bool) -> tuple[int, Tensor | None]:
    """Bytes of the matrices about to be quantized, and the matrix the layer stands for."""
    float_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.ndim >= 2)
    if not measure_error:
        return float_bytes, None
    return float_bytes, dense_weight_of(module)[0]


def _layer(name: str, kind: str, before: tuple[int, Tensor | None], after: nn.Module) -> QuantizedLayer:
    float_bytes, dense = before
    stored = [m for m in after.modules() if isinstance(m, QuantizedWeight)]
    weights = sum(m.padded_shape[0] * m.padded_shape[1] for m in stored)
    error = relative_error(dense, after.to_dense()) if dense is not None else float("nan")
    formats = getattr(after, "format_name", None) or ", ".join(sorted({m.settings.name for m in stored}))
    stored_bytes = sum(m.stored_bytes for m in stored) + getattr(after, "index_bytes", 0)
    return QuantizedLayer(name, kind, weights, float_bytes, stored_bytes, error, formats)


def restated(layer: QuantizedLayer, module: nn.Module, dense: Tensor | None = None) -> QuantizedLayer:
    """``layer``'s entry again for ``module`` as it is stored now (a matrix given a correction after its entry
    was made): its formats, all its stored bytes, and its error against ``dense`` where given."""
    return _layer(layer.name, type(module).__name__, (layer.float_bytes, dense), module)


def learn_grids_(model: nn.Module) -> int:
    """Every stored matrix of ``model`` learns its scales and offsets from here on, its integers kept
    (:meth:`QuantizedWeight.learn_grid`); how many matrices that is."""
    stored = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    for matrix in stored:
        matrix.learn_grid()
    return len(stored)


def freeze_grids_(model: nn.Module) -> None:
    """What :func:`learn_grids_` learned, stored in each matrix's format."""
    for matrix in model.modules():
        if isinstance(matrix, QuantizedWeight):
            matrix.freeze_grid()


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """``{module name: format}`` of every quantized module, outermost only (a corrected matrix is one layer, its
    stored parts inside it are not; ``tqc info`` shows it)."""
    return {name: format_name(module) for name, module in factored_modules(model) if isinstance(module, MODULE_TYPES)}


def format_name(module: nn.Module) -> str:
    """A quantized module's format: ``int4-g32``, or each band's where a token table has bands."""
    return getattr(module, "format_name", None) or module.settings.name


def check_not_quantized(model: nn.Module, what: str) -> None:
    """One clear error where a step needs float weights (compressing again, distilling)."""
    quantized = quantized_layers(model)
    if quantized:
        name = next(iter(quantized))
        raise TQCError(
            f"{what} needs float weights, but {name} is quantized ({quantized[name]}); "
            "run it on the model before quantizing, then quantize the result"
        )


def tensor_bytes(model: nn.Module, excluded: set[int] = frozenset()) -> int:
    """Bytes of every tensor of ``model``'s state but those whose storage ``excluded`` names (by
    ``data_ptr``), each tensor once however many names share it."""
    seen, total = set(excluded), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def kept_bytes(model: nn.Module) -> int:
    """Bytes a quantized model saves as they are, beside its quantized matrices: norms, biases, index buffers
    (a token table's band order is the matrices': its layer counts it)."""
    stored = [t for m in model.modules() if isinstance(m, QuantizedWeight) for t in m.state_dict().values()]
    stored += [m.order for m in model.modules() if isinstance(m, QuantizedTokenBands)]
    return tensor_bytes(model, {t.data_ptr() for t in stored})


__all__ = [
    "QuantizeReport",
    "QuantizeSettings",
    "QuantizedLayer",
    "check_not_quantized",
    "freeze_grids_",
    "learn_grids_",
    "kept_bytes",
    "quantize_",
    "restated",
    "tensor_bytes",
]
