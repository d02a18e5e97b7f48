"""Structures beside storage formats, under one byte budget: a matrix may be stored as a structure's
factors, each factor in a format, where that buys more fidelity per byte than any format of the matrix.

:mod:`tqcompressor.planning.formats` gives every matrix a menu of formats priced in stored bytes and
measured by the output error of the stored matrix. Here each plain linear matrix's menu gains, for every
structure of ``structures`` (by default activation-aware SVD) and every size that structure offers
(:meth:`~tqcompressor.structures.base.Structure.candidates`), its fitted factors stored in each format of
``factor_formats``: priced in the bytes its quantized module holds (each factor's integers, scales and
offsets) and measured on the module as stored (:func:`~tqcompressor.quant.modules.quantized_form`, so that
a registered structure gets every format without code of its own). The same solve then spreads the budget
over formats and structures at once. Token tables keep the formats' menus (and bands).
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from tqcompressor.errors import TQCError
from tqcompressor.layers import factored_modules
from tqcompressor.linalg.decompose import OutputSketch
from tqcompressor.planning.calibration import LayerStatistics, layer_statistics
from tqcompressor.planning.config import LayerSpec
from tqcompressor.planning.corrections import with_corrections
from tqcompressor.planning.formats import (
    MENU,
    FormatCandidate,
    FormatMenus,
    FormatPlan,
    extend_menus,
    measure_formats,
    planned_matrices,
    relative_output_error,
    settings_named,
)
from tqcompressor.planning.plan import LayerPlan, Plan
from tqcompressor.quant.modules import QuantizedWeight, quantized_form
from tqcompressor.structures import REGISTRY, Candidate
from tqcompressor.structures.lowrank import LowRankFactors

STRUCTURES = ("svd",)  # the structures whose factors join each matrix's menu
# each factor's format: int4 with 8-bit coded scales (the cheapest at its group size) and int8
FACTOR_FORMATS = ("int4-g64-dq", "int4-g32-dq", "int8")
# of a structure's sizes, those keeping at least this share of the matrix's parameters: smaller ones cost
# far more error than a coarser format of the matrix saves (and each size is measured in every format)
SMALLEST_SHARE = 0.2


def factored_menu(
    weight: Tensor,
    stats: LayerStatistics | None,
    structures: tuple[str, ...] = STRUCTURES,
    factor_formats: tuple[str, ...] = FACTOR_FORMATS,
) -> list[FormatCandidate]:
    """Every size of every structure in ``structures`` for one matrix, its factors in each format of
    ``factor_formats``: the bytes its stored module holds, the relative output error of the stored
    matrix (fitted and measured in the output metric of ``stats``; the weight's without them)."""
    cov = stats.input_cov if stats is not None else None
    sketch = OutputSketch(cov) if cov is not None else None
    menu = []
    for name in structures:
        for size, factors in _fitted_sizes(REGISTRY[name], weight, sketch, cov):
            for fmt in factor_formats:
                stored = quantized_form(REGISTRY[name].module(factors, None, "linear"), settings_named(fmt))
                held = sum(m.stored_bytes for m in stored.modules() if isinstance(m, QuantizedWeight))
                error = relative_output_error(weight, weight.float() - stored.to_dense().float(), stats)
                menu.append(FormatCandidate(f"{_label(size)}/{fmt}", held, error, size))
    return menu


def _fitted_sizes(structure, weight: Tensor, sketch, cov: Tensor | None) -> list[tuple[Candidate, object]]:
    """The structure's sizes keeping at least :data:`SMALLEST_SHARE` of the parameters, each with its factors.
    SVD's ranks are the leading components of one fit: the widest is fitted, the others are its slices."""
    sizes, state = structure.candidates(weight, sketch)
    sizes = [size for size in sizes if size.params >= SMALLEST_SHARE * weight.numel()]
    if structure.name != "svd" or not sizes:
        return [(size, structure.fit_candidate(weight, size, state, cov)) for size in sizes]
    widest = structure.fit_candidate(weight, max(sizes, key=lambda size: size.params), state, cov)
    found = []
    for size in sizes:
        rank = size.settings["rank"]
        found.append((size, LowRankFactors(widest.u[:, :rank], widest.v[:rank])))
    return found


def _label(size: Candidate) -> str:
    """``svd rank=96``: a structure's candidate as a plan names it."""
    return " ".join([size.method, *(f"{k}={v}" for k, v in size.settings.items())])


def with_structures(
    menus: FormatMenus,
    model: nn.Module,
    stats: dict | None = None,
    structures: tuple[str, ...] = STRUCTURES,
    progress: bool = True,
) -> FormatMenus:
    """``menus`` with each plain linear matrix's menu extended by :func:`factored_menu` (token tables, and
    the bands of one, keep theirs), measured with ``stats``, the statistics ``menus`` were measured with
    (kept with the menus: the chosen factors are fitted with them again)."""
    if not structures:
        return menus
    tables = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    measure = functools.partial(factored_menu, structures=structures)
    return extend_menus(menus, model, stats, measure, tables, "measuring factored candidates", progress)


def measure_model_mixed(
    model: nn.Module,
    calibration: Tensor | None = None,
    structures: tuple[str, ...] = STRUCTURES,
    progress: bool = True,
    formats: tuple[str, ...] = MENU,
    correction_ranks: tuple[int, ...] = (),
) -> FormatMenus:
    """:func:`~tqcompressor.planning.formats.measure_model_formats` with ``structures`` on each linear
    matrix's menu: every menu measured on the token ids ``calibration`` (blocks x seq_len) where given;
    ``formats``: the whole matrices' menu; ``correction_ranks``: each linear matrix's menu also holds the
    low-bit formats plus a correction of their rounding error of these ranks
    (:mod:`tqcompressor.planning.corrections`)."""
    factored = [name for name, _ in factored_modules(model)]
    if factored:
        raise TQCError(f"a byte or fidelity target plans the layers of a plain model; {factored[0]} is factored")
    names = list(planned_matrices(model))
    stats = layer_statistics(model, names, calibration, progress) if calibration is not None else None
    menus = with_structures(measure_formats(model, stats, formats), model, stats, structures, progress)
    return with_corrections(menus, model, stats, ranks=correction_ranks, progress=progress)


def structure_plan(model: nn.Module, plan: FormatPlan) -> Plan | None:
    """The structures ``plan`` stores matrices as, for :func:`~tqcompressor.surgery.apply.apply_plan` and
    for saving, each layer's factors fitted as they were measured (``None``: every matrix in a format)."""
    chosen = plan.structures()
    if not chosen:
        return None
    matrices = planned_matrices(model)
    layers = []
    for name, size in chosen.items():
        stats = (plan.stats or {}).get(name)
        cov = stats.input_cov if stats is not None else None
        structure = REGISTRY[size.method]
        _, state = structure.candidates(matrices[name], OutputSketch(cov) if cov is not None else None)
        factors = structure.fit_candidate(matrices[name], size, state, cov)
        reason = f"planned in bytes: {plan.formats[name]}, relative output error {plan.chosen(name).error:.3f}"
        layers.append(LayerPlan(name, LayerSpec(size.method, reason=reason, **size.settings), factors))
    return Plan(layers, method="mixed")


__all__ = [
    "FACTOR_FORMATS",
    "STRUCTURES",
    "factored_menu",
    "measure_model_mixed",
    "structure_plan",
    "with_structures",
]
