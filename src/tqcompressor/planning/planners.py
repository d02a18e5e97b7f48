"""Planning: which module gets which structure, at which distillation step.

:func:`plan_compression` reads the model once (:func:`~tqcompressor.planning.inventory.read_inventory`),
measures calibration statistics when it is given text, and hands both to the config's planner. Two
planners live here, ``spec`` and ``budget``; ``auto`` has its own module. Nothing here changes the model
(applying a plan is :mod:`tqcompressor.surgery`).
"""

from __future__ import annotations

from torch import Tensor, nn
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.planning.calibration import layer_statistics, usable_statistics
from tqcompressor.planning.config import CompressionConfig, LayerSpec
from tqcompressor.planning.inventory import Inventory, has_fused_experts, read_inventory
from tqcompressor.planning.plan import LayerPlan, Plan, steps_upper_first
from tqcompressor.planning.registry import Planner, get_planner, register_planner
from tqcompressor.structures import get_structure, settings_dict


def plan_compression(
    model: nn.Module, config: CompressionConfig, calibration: Tensor | dict | None = None, progress: bool = True
) -> Plan:
    """Turn ``config`` into a :class:`Plan` for ``model``. ``calibration`` (token ids, shape
    (blocks, seq_len), or statistics from :func:`tqcompressor.calibrate`) makes the fits
    activation-aware (each structure's own way) and lets ``auto`` weigh layers by their effect on
    the loss; those factors are fitted here, while the statistics are at hand. A model with fused
    MoE experts is refused: split them first (:func:`tqcompressor.split_experts`; ``compress`` does)."""
    if has_fused_experts(model):
        raise TQCError(
            "this model's MoE experts are fused in one module: split them first with tqc.split_experts(model) "
            "(tqc.compress and the CLI do), so that each expert matrix can be planned"
        )
    inventory = read_inventory(model, config)
    planner = get_planner(config.planner)
    measured = planner.prepare(inventory, config, calibration)
    stats = layer_statistics(model, measured, calibration, progress) if measured else None
    layers, record = planner.plan(inventory, config, stats, progress)
    return Plan(
        layers,
        method=config.method,
        tie_lm_head=config.tie_lm_head,
        max_iterations=config.max_iterations,
        params_before=inventory.total_params,
        sequential=config.sequential,
        target_params=target_params(inventory, config),
        auto=record,
    )


def target_params(inventory: Inventory, config: CompressionConfig) -> int | None:
    """The whole-model budget in parameters (``None`` for a spec file, which sets each layer itself)."""
    if config.layers is not None:
        return None
    if config.target_params is not None:
        return int(config.target_params)
    return int(config.ratio * inventory.total_params)


def fit_calibrated(
    inventory: Inventory, layers: list[LayerPlan], stats: dict | None, config: CompressionConfig, progress: bool
) -> None:
    """Fit the layers that have calibration statistics now, while the statistics are at hand."""
    calibrated = [entry for entry in layers if stats is not None and entry.name in stats]
    for entry in tqdm(calibrated, desc="fitting to the calibration text", unit="layer", disable=not progress):
        weight = inventory.weights[entry.name]
        structure = entry.spec.structure
        layer_stats = usable_statistics(stats[entry.name], weight)
        if layer_stats is None:  # an expert few tokens were routed to: fitted to its weights, later
            note = f" (only {stats[entry.name].tokens} calibration tokens reached it: fitted to its weights)"
            entry.spec = LayerSpec.from_dict({**entry.spec.to_dict(), "reason": entry.spec.reason + note})
            continue
        entry.factors = structure.fit(weight, entry.spec.settings, layer_stats, config.max_iterations)
        # a fresh spec: the modules of one spec-file group share theirs
        entry.spec = LayerSpec.from_dict(
            {**entry.spec.to_dict(), "reason": entry.spec.reason + structure.capabilities.calibrated_note}
        )


def refuse_auto_options(config: CompressionConfig) -> None:
    if config.auto_methods is not None:
        raise TQCError("auto_methods (--auto-methods) only applies to method 'auto'")
    if config.output_weights:
        raise TQCError("output weights (--output-weights) apply to --method auto: its budget and fits use them")


# ---------------------------------------------------------------------------------------------
# spec: a per-layer spec file


def _spec_layers(inventory: Inventory, config: CompressionConfig) -> list[LayerPlan]:
    plan, seen = [], {}
    for index, ((pattern, spec), names) in enumerate(zip(config.layers, inventory.spec_matches)):
        for name in names:
            earlier = seen.setdefault((name, spec.step), index)
            if earlier != index:  # one module, one structure per step: a second entry would compress it twice
                raise TQCError(
                    f"spec: {name} is listed twice for step {spec.step} (as {config.layers[earlier][0]!r} and "
                    f"{pattern!r}); list each module once per step"
                )
            try:
                spec.structure.check(spec.settings, inventory.shape(name))
            except TQCError as exc:
                raise TQCError(f"{name}: {exc}") from None
            plan.append(LayerPlan(name, spec))
    return plan


def _spec_prepare(inventory: Inventory, config: CompressionConfig, calibration) -> list[str]:
    """Every module's settings checked against its shape before anything is measured; the modules
    fitted to calibration statistics: the first factorization of each linear one."""
    _spec_layers(inventory, config)
    if calibration is None:
        return []
    firsts = dict.fromkeys(name for names in inventory.spec_matches for name in names)
    return [name for name in firsts if name not in inventory.embeddings]


def plan_from_spec(
    inventory: Inventory, config: CompressionConfig, stats: dict | None, progress: bool
) -> tuple[list[LayerPlan], None]:
    layers = _spec_layers(inventory, config)
    first = {}
    for entry in sorted(layers, key=lambda e: e.spec.step):
        first.setdefault(entry.name, entry)
    fit_calibrated(inventory, list(first.values()), stats, config, progress)
    return layers, None


# ---------------------------------------------------------------------------------------------
# budget: one structure, every target keeping the same fraction


def _head_to_untie(inventory: Inventory, names: list[str], config: CompressionConfig) -> int:
    """Parameters a dense LM head will add: factoring an embedding the head is tied to, with
    ``tie_lm_head=False``, gives the head its own copy of the weight."""
    if config.tie_lm_head or inventory.input_embedding not in names:
        return 0
    return inventory.tied_head_params


def _budget_prepare(inventory: Inventory, config: CompressionConfig, calibration) -> list[str]:
    return [name for name in inventory.targets if name not in inventory.embeddings] if calibration is not None else []


def plan_from_budget(
    inventory: Inventory, config: CompressionConfig, stats: dict | None, progress: bool
) -> tuple[list[LayerPlan], None]:
    """Turn a whole-model budget into per-layer settings: every target layer keeps the same fraction
    ``f`` of its parameters, where ``f`` is what the budget leaves after the untouched parameters.
    Each layer then takes the settings of ``config.method`` with the most parameters under ``f``."""
    names = list(inventory.targets)
    total, target = inventory.total_params, target_params(inventory, config)
    compressible = sum(inventory.weights[name].numel() for name in names)
    fixed = total - compressible + _head_to_untie(inventory, names, config)
    if target >= total:
        return [], None
    if target <= fixed:
        raise TQCError(
            f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
            "modules; raise the ratio or add target modules (e.g. the embeddings)"
        )
    keep = (target - fixed) / compressible
    why = f"keeps {keep:.1%} of every target layer to meet the whole-model budget"
    steps = steps_upper_first(names, config.steps)
    layers = [LayerPlan(name, _budget_spec(inventory.shape(name), keep, config, steps[name], why)) for name in names]
    fit_calibrated(inventory, layers, stats, config, progress)
    return layers, None


def _budget_spec(shape: tuple[int, int], keep: float, config: CompressionConfig, step: int, why: str) -> LayerSpec:
    found = get_structure(config.method).for_budget(shape, keep, config.prefer)
    if found is None:
        m, n = shape
        raise TQCError(
            f"no {config.method} factorization of a {m}x{n} matrix fits {keep:.1%} of its parameters; "
            "raise the ratio or use --method svd"
        )
    settings, phrase = found
    return LayerSpec(config.method, step=step, reason=f"{phrase} {why}", **settings_dict(settings))


register_planner(
    Planner(
        "spec",
        "the settings a spec file gives each module",
        plan_from_spec,
        refuse_auto_options,
        prepare=_spec_prepare,
    )
)
register_planner(
    Planner(
        "budget",
        "one structure (--method) for every target, each keeping the fraction the whole-model budget leaves",
        plan_from_budget,
        refuse_auto_options,
        prepare=_budget_prepare,
    )
)
