"""Model surgery: apply a :class:`~tqcompressor.planning.plan.Plan` by swapping modules in place, PEFT style."""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.layers import TiedFactoredHead, bias_of, dense_weight_of, embedding_scale, set_module
from tqcompressor.linalg.decompose import relative_error
from tqcompressor.planning.calibration import layer_statistics
from tqcompressor.planning.config import CompressionConfig, CompressionReport, LayerReport
from tqcompressor.planning.corrections import correction_factors
from tqcompressor.planning.formats import FormatPlan
from tqcompressor.planning.inventory import count_parameters, find_target_modules, is_embedding
from tqcompressor.planning.mixed import structure_plan
from tqcompressor.planning.plan import LayerPlan, Plan
from tqcompressor.planning.planners import plan_compression
from tqcompressor.quant.api import (
    QuantizeReport,
    check_not_quantized,
    freeze_grids_,
    learn_grids_,
    quantize_,
    restated,
)
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.quant.modules import CorrectedLinear
from tqcompressor.structures import all_structures, settings_dict
from tqcompressor.surgery.experts import split_experts
from tqcompressor.surgery.folding import fold_mlp_permutations
from tqcompressor.surgery.sequential import refit_sequentially

__all__ = [
    "apply_plan",
    "compress",
    "count_parameters",
    "find_target_modules",
    "plan_compression",
    "prepare_planned",
    "store_factors",
    "store_planned",
]


def compress(
    model: nn.Module, config: CompressionConfig, calibration: Tensor | dict | None = None, progress: bool = True
) -> tuple[nn.Module, CompressionReport]:
    """Split fused MoE experts (:func:`~tqcompressor.surgery.experts.split_experts`), plan
    (:func:`~tqcompressor.planning.planners.plan_compression`) and apply every step at once, in
    place. ``report.plan`` is the plan, for :func:`tqcompressor.save` and distillation. With
    ``config.sequential`` (calibration token ids needed) the layers are then refitted block by block
    to the uncompressed model's outputs (:mod:`tqcompressor.surgery.sequential`)."""
    if config.sequential and not isinstance(calibration, Tensor):
        raise TQCError("sequential refit needs calibration text (token ids), not precomputed statistics")
    check_not_quantized(model, "compression")
    split_experts(model)  # exact: each expert matrix becomes a module a plan can name
    teacher = copy.deepcopy(model) if config.sequential else None
    plan = plan_compression(model, config, calibration, progress=progress)
    if teacher is None:
        return model, apply_plan(model, plan, progress=progress)
    return model, apply_plan(model, plan, calibration=calibration, teacher=teacher, progress=progress)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    step: int | None = None,
    calibration: Tensor | dict | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> CompressionReport:
    """Replace the modules of ``plan`` (only those of ``step``, or every step in order) by their
    factored structures, in place. A module already in its planned form is left alone (resumed
    runs), and one planned again at a later step is re-factored from its current factors.

    ``calibration``: this step's linear layers that have no fitted factors in the plan are fitted
    to the inputs they see in the model as it is now (later steps of multi-step distillation).
    With ``plan.sequential``, the ``teacher`` and calibration token ids, this step's linear layers
    are then refitted block by block to the teacher's outputs (:mod:`tqcompressor.surgery.sequential`),
    before any permutation is folded.
    """
    started = time.perf_counter()
    report = CompressionReport(
        params_before=count_parameters(model),
        method=plan.method,
        target_params=plan.target_params,
        step=step,
        original_params=plan.params_before,
        auto=plan.auto,
        plan=plan,
    )
    todo = [
        entry
        for entry in sorted(plan.layers, key=lambda e: e.spec.step)
        if (step is None or entry.spec.step == step) and not _in_place(model, entry)
    ]
    factors = [entry.factors for entry in todo]
    if calibration is not None:
        refit = [
            i
            for i, entry in enumerate(todo)
            if entry.factors is None and not is_embedding(model.get_submodule(entry.name))
        ]
        stats = layer_statistics(model, [todo[i].name for i in refit], calibration) if refit else {}
        for i in refit:
            entry = todo[i]
            weight = dense_weight_of(model.get_submodule(entry.name))[0]
            factors[i] = entry.spec.structure.fit(weight, entry.spec.settings, stats[entry.name], plan.max_iterations)
    bar = tqdm(list(zip(todo, factors)), desc="compressing", unit="layer", disable=not progress)
    for entry, fitted in bar:
        bar.set_postfix_str(entry.name)
        report.layers.append(_replace(model, entry, fitted, plan))
    if todo and plan.sequential and teacher is not None and isinstance(calibration, Tensor):
        _refit_sequentially(model, teacher, todo, report, calibration, plan, progress)
    # exact, free at run time; layers a later step still factors from their weights stay untouched
    report.folded_mlps = fold_mlp_permutations(model, skip=_pending(model, plan))
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - started
    return report


def _refit_sequentially(model, teacher, todo, report, ids: Tensor, plan: Plan, progress: bool) -> None:
    """Refit ``todo``'s linear layers to the teacher's outputs from the inputs ``model`` gives them;
    the report's errors then compare each final layer with the teacher's weight."""
    entries = {entry.name: entry for entry in todo if not is_embedding(model.get_submodule(entry.name))}
    layers = {layer.name: layer for layer in report.layers}
    weights = {name: dense_weight_of(teacher.get_submodule(name)) for name in entries}

    def refit(name: str, w_star: Tensor, stats) -> None:
        module, structure = model.get_submodule(name), entries[name].spec.structure
        weight, kind = weights[name]
        factors = structure.fit(w_star.to(weight.dtype), entries[name].spec.settings, stats, plan.max_iterations)
        new = structure.module(factors, bias_of(module), kind)
        set_module(model, name, new)
        layers[name].relative_error = relative_error(weight.double(), new.to_dense().double())
        layers[name].reason = (layers[name].reason + "; " if layers[name].reason else "") + "refitted sequentially"

    refit_sequentially(teacher, model, [(name, weights[name][0]) for name in entries], refit, ids, progress)


def _replace(model: nn.Module, entry: LayerPlan, factors, plan: Plan) -> LayerReport:
    """Swap one module for its factored form; returns what the report says of it."""
    t0 = time.perf_counter()
    module = model.get_submodule(entry.name)
    structure, settings = entry.spec.structure, entry.spec.settings
    weight, kind = dense_weight_of(module)
    if kind == "embedding" and not structure.capabilities.embeddings:
        able = ", ".join(repr(s.name) for s in all_structures() if s.capabilities.embeddings)
        raise TQCError(f"{entry.name}: embeddings are factored with {able}, not {entry.spec.method!r}")
    if factors is None:
        factors = structure.fit(weight, settings, None, plan.max_iterations)
    new = structure.module(factors, bias_of(module), kind)
    if kind == "embedding":
        new.output_scale = embedding_scale(module)  # kept exactly through every step (Gemma 3: sqrt(hidden))
    error = relative_error(weight.double(), new.to_dense().double())
    was_input_embedding = hasattr(model, "get_input_embeddings") and module is model.get_input_embeddings()
    set_module(model, entry.name, new)
    if was_input_embedding:
        _retie_head(model, module, new, plan.tie_lm_head)
    return LayerReport(
        name=entry.name,
        kind=kind,
        shape=tuple(weight.shape),
        method=entry.spec.method,
        settings=settings_dict(structure.settings_of(new)),
        step=entry.spec.step,
        params_before=sum(p.numel() for p in module.parameters()),
        params_after=sum(p.numel() for p in new.parameters()),
        relative_error=error,
        seconds=time.perf_counter() - t0,
        reason=entry.spec.reason,
    )


def _in_place(model: nn.Module, entry: LayerPlan) -> bool:
    return entry.spec.structure.is_applied(model.get_submodule(entry.name), entry.spec.settings)


def _pending(model: nn.Module, plan: Plan) -> set[str]:
    """Modules whose last planned factorization is not in place yet."""
    last = {entry.name: entry for entry in sorted(plan.layers, key=lambda e: e.spec.step)}
    return {name for name, entry in last.items() if not _in_place(model, entry)}


def _retie_head(model: nn.Module, old: nn.Module, new: nn.Module, tie: bool) -> None:
    """Keep a tied LM head consistent with a factored embedding: tie it to the same factors, or
    untie it explicitly into a dense copy of the original table (then it is counted on its own)."""
    head = model.get_output_embeddings()
    if isinstance(head, TiedFactoredHead):  # already tied to the factors: follow the new ones
        model.set_output_embeddings(TiedFactoredHead(new, head.bias))
        return
    if head is None or not isinstance(old, nn.Embedding) or getattr(head, "weight", None) is not old.weight:
        return
    bias = head.bias if getattr(head, "bias", None) is not None else None
    if tie:
        replacement = TiedFactoredHead(new, bias)
    else:
        replacement = nn.Linear(old.embedding_dim, old.num_embeddings, bias=bias is not None)
        with torch.no_grad():
            replacement.weight.copy_(old.weight)
            if bias is not None:
                replacement.bias.copy_(bias)
    model.set_output_embeddings(replacement)
    model.config.tie_word_embeddings = False  # stop transformers from re-tying to a dense table


def store_planned(model: nn.Module, plan: FormatPlan, measure_error: bool = True) -> tuple[QuantizeReport, Plan | None]:
    """``model`` stored as a byte plan says (:mod:`tqcompressor.planning.mixed`), in place: the matrices it
    stores as a structure's factors replaced by that structure's modules, then every matrix (or factor)
    quantized in its format. Returns quantize_'s report and the structure plan (what saving the model
    records; ``None`` where every matrix stays whole)."""
    corrected = plan.corrections()
    originals = {name: dense_weight_of(model.get_submodule(name))[0].clone() for name in corrected if measure_error}
    report, structures = prepare_planned(model, plan, measure_error)
    report.layers += store_factors(model, plan, measure_error).layers
    report.layers = [  # a corrected matrix's entry, made before its correction: both parts now
        restated(layer, model.get_submodule(layer.name), originals.get(layer.name))
        if layer.name in corrected
        else layer
        for layer in report.layers
    ]
    return report, structures


def prepare_planned(
    model: nn.Module, plan: FormatPlan, measure_error: bool = True, learn_grids: bool = False
) -> tuple[QuantizeReport, Plan | None]:
    """The first half of :func:`store_planned`, the model a byte plan's distillation trains: the planned
    structures in place with their factors in float (they train), every other matrix stored in its format,
    so that training learns around the rounding it keeps: frozen, or with ``learn_grids`` its integers frozen
    and its scales and offsets trainable (:func:`~tqcompressor.quant.api.learn_grids_`).
    :func:`store_factors` is the second half."""
    structures = structure_plan(model, plan)
    if structures is not None:
        apply_plan(model, structures, progress=False)
    settings = plan.settings()
    whole = set(settings) - set(plan.structures())
    corrections = plan.corrections()
    originals = {name: dense_weight_of(model.get_submodule(name))[0].clone() for name in corrections}
    report = quantize_(model, QuantizeSettings(8), measure_error=measure_error, per_layer=settings, only=whole)
    for name, rank in corrections.items():
        _correct(model, name, originals[name], rank, (plan.stats or {}).get(name))
    if learn_grids:
        learn_grids_(model)
    return report, structures


def _correct(model: nn.Module, name: str, weight: Tensor, rank: int, stats) -> None:
    """The stored matrix ``name`` given a float rank-``rank`` correction of its rounding of ``weight``, fitted as
    the plan measured it (:func:`~tqcompressor.planning.corrections.correction_factors`)."""
    base = model.get_submodule(name)
    stored = base.to_dense()
    factors = correction_factors(weight.to(stored.device), stored, rank, stats)
    set_module(model, name, CorrectedLinear.from_factors(base, factors))


def store_factors(model: nn.Module, plan: FormatPlan, measure_error: bool = True) -> QuantizeReport:
    """The factors of the structures ``plan`` chose and the corrections it added stored in their formats, and
    the grids the stored matrices learned stored too, in place (after :func:`prepare_planned` and training)."""
    freeze_grids_(model)
    for module in model.modules():
        if isinstance(module, CorrectedLinear):
            module.store_correction()
    factored = set(plan.structures())
    return quantize_(model, QuantizeSettings(8), measure_error=measure_error, per_layer=plan.settings(), only=factored)
