"""Planning: which module gets which structure, at which distillation step. Returns a :class:`Plan`
value; nothing here changes the model (applying a plan is :mod:`tqcompressor.surgery.apply`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError
from tqcompressor.layers import dense_weight_of, embedding_scale, module_name
from tqcompressor.planning.config import CompressionConfig, LayerSpec
from tqcompressor.structures import REGISTRY, get_structure, module_classes, settings_dict
from tqcompressor.surgery.experts import split_experts


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


def plan_compression(
    model: nn.Module, config: CompressionConfig, calibration: Tensor | dict | None = None, progress: bool = True
) -> Plan:
    """Turn ``config`` into a :class:`Plan` for ``model``. ``calibration`` (token ids, shape
    (blocks, seq_len), or statistics from :func:`tqcompressor.planning.calibration.calibrate`) makes the fits
    activation-aware (each structure's own way) and lets ``auto`` weigh layers by their effect on
    the loss; those factors are fitted here, while the statistics are at hand. Fused MoE experts
    are first split, in place, into one module per expert matrix (:mod:`tqcompressor.surgery.experts`)."""
    split_experts(model)  # fused MoE experts -> one module per expert matrix (exact)
    settings = dict(
        method=config.method,
        tie_lm_head=config.tie_lm_head,
        max_iterations=config.max_iterations,
        params_before=count_parameters(model),
        sequential=config.sequential,
    )
    if config.layers is not None:
        layers = _layers_from_spec(model, config.layers)
        first = {}  # a module planned at several steps: only its first factorization sees the dense weight
        for entry in sorted(layers, key=lambda e: e.spec.step):
            first.setdefault(entry.name, entry)
        linear = [name for name in first if not is_embedding(model.get_submodule(name))]
        _fit_calibrated(
            model, list(first.values()), layer_statistics(model, linear, calibration, progress), config, progress
        )
        return Plan(layers, **settings)
    names = find_target_modules(model, config.target_modules)
    linear = [name for name in names if not is_embedding(model.get_submodule(name))]
    target = target_params(model, config)
    if config.method == "auto":
        # statistics handed in were measured for the named targets: the embedding is offered with token ids
        names = _auto_targets(model, names, linear, config, offer_embedding=not isinstance(calibration, dict))
        _outside_targets(model, names, target)  # before calibrating: one line, no work wasted
        stats = layer_statistics(model, names, calibration, progress)
        missing = [name for name in names if stats is not None and name not in stats]
        if missing:
            raise TQCError(f"the calibration statistics have none for {missing[0]}; pass calibration token ids")
        layers, record = _plan_auto(model, names, config, stats, progress)
        return Plan(layers, target_params=target, auto=record, **settings)
    stats = layer_statistics(model, linear, calibration, progress)
    layers = _layers_from_budget(model, names, config)
    _fit_calibrated(model, layers, stats, config, progress)
    return Plan(layers, target_params=target, **settings)


def _fit_calibrated(
    model: nn.Module, layers: list[LayerPlan], stats: dict | None, config: CompressionConfig, progress: bool
) -> None:
    """Fit the layers that have calibration statistics now, while the statistics are at hand."""
    calibrated = [entry for entry in layers if stats is not None and entry.name in stats]
    for entry in tqdm(calibrated, desc="fitting to the calibration text", unit="layer", disable=not progress):
        weight = dense_weight_of(model.get_submodule(entry.name))[0]
        structure = entry.spec.structure
        layer_stats = usable_statistics(stats[entry.name], weight)
        if layer_stats is None:  # an expert few tokens were routed to: fitted to its weights, later
            note = f" (only {stats[entry.name].tokens} calibration tokens reached it: fitted to its weights)"
            entry.spec = LayerSpec.from_dict({**entry.spec.to_dict(), "reason": entry.spec.reason + note})
            continue
        entry.factors = structure.fit(weight, entry.spec.settings, layer_stats, config.max_iterations)
        # a fresh spec: the modules of one spec-file group share theirs
        entry.spec = LayerSpec.from_dict(
            {**entry.spec.to_dict(), "reason": entry.spec.reason + structure.calibrated_note}
        )


def usable_statistics(stats, weight: Tensor):
    """``stats`` if enough tokens reached the layer to fit it in the output metric: at least as many
    as it has inputs (an MoE expert sees only the tokens routed to it); ``None`` otherwise."""
    return stats if stats.tokens >= weight.shape[1] else None


def count_parameters(model: nn.Module) -> int:
    """Every parameter once: ``parameters()`` already skips a tied LM head's shared weight. A
    quantized matrix counts its entries (it is a parameter stored in fewer bits; padding excluded)."""
    quantized = sum(m.out_features * m.in_features for m in model.modules() if hasattr(m, "stored_bytes"))
    return sum(p.numel() for p in model.parameters()) + quantized


def target_params(model: nn.Module, config: CompressionConfig) -> int | None:
    if config.layers is not None:
        return None
    total = count_parameters(model)
    return int(config.target_params) if config.target_params is not None else int(config.ratio * total)


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or getattr(module, "kind", None) == "embedding"


def layer_statistics(model: nn.Module, names: list[str], calibration, progress: bool = True) -> dict | None:
    """Calibration statistics of ``names``: computed from token ids, or passed through. A tied
    embedding is measured in both roles (:class:`~tqcompressor.planning.calibration.EmbeddingStatistics`)."""
    from tqcompressor.planning.calibration import EmbeddingStatistics, calibrate

    if calibration is None or isinstance(calibration, dict):
        return calibration
    if not isinstance(calibration, Tensor):
        raise TQCError("calibration must be token ids (a blocks x seq_len tensor) or statistics from calibrate()")
    embedding = tied_embedding(model) if tied_embedding(model) in names else None
    extra = [module_name(model, model.get_output_embeddings())] if embedding is not None else []
    measured = calibrate(model, list(dict.fromkeys(names + extra)), calibration, progress=progress)
    if embedding is not None:
        scale = embedding_scale(model.get_submodule(embedding))
        measured[embedding] = EmbeddingStatistics(measured[extra[0]], measured[embedding], scale)
    return {name: measured[name] for name in names}


def tied_embedding(model: nn.Module) -> str | None:
    """The name of the token embedding when the LM head computes with the same table, else ``None``."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "get_output_embeddings"):
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not isinstance(embedding, nn.Embedding) or getattr(head, "weight", None) is not embedding.weight:
        return None
    return module_name(model, embedding)


def _auto_targets(
    model: nn.Module, names: list[str], linear: list[str], config: CompressionConfig, offer_embedding: bool
) -> list[str]:
    """What ``auto`` measures: the targets, and with no targets named a tied token embedding too
    (keeping it dense is on its menu, so offering it never costs quality). An embedding is
    measured through the head tied to it, so an untied one, or a head about to be untied, is refused."""
    embedding = tied_embedding(model) if config.tie_lm_head else None
    refused = [name for name in names if name not in linear and name != embedding]
    if refused:
        raise TQCError(
            f"method 'auto' measures an embedding through the LM head tied to it; {refused[0]} has none "
            "(or tie_lm_head is off): factor it with an explicit spec"
        )
    if offer_embedding and config.target_modules is None and embedding is not None:
        return [*names, embedding]
    return names


# ---------------------------------------------------------------------------------------------
# Which modules


def _factorable_types() -> tuple[type, ...]:
    return (nn.Linear, Conv1D, nn.Embedding, *module_classes().values())


def find_target_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Module names matching ``patterns`` (exact name, name suffix after a dot, or glob); with no
    patterns, :func:`default_target_modules`.

    The LM head is only matched when named explicitly: it is usually tied to the embedding."""
    if patterns is None:
        return default_target_modules(model)
    names = []
    unmatched = set(patterns)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    factorable = _factorable_types()
    for name, module in model.named_modules():
        if not isinstance(module, factorable):
            continue
        if module is head and name not in patterns:
            continue
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
                names.append(name)
                unmatched.discard(pattern)
                break
    if unmatched:
        raise TQCError(
            f"target module pattern(s) {sorted(unmatched)} match no Linear/Conv1D/Embedding "
            f"module of this model; module names look like {_example_names(model)}"
        )
    return names


def default_target_modules(model: nn.Module) -> list[str]:
    """What is compressed when nobody names anything: every ``nn.Linear`` / ``Conv1D`` inside the
    model's repeated decoder blocks (its largest ``ModuleList`` of same-typed blocks). Never the
    embedding or the LM head (outside the blocks), nor an MoE router (a Linear with one output per
    expert): those are choices a user makes by naming them."""
    blocks = decoder_blocks(model)
    if blocks is None:
        raise TQCError(
            f"found no repeated decoder blocks in this {type(model).__name__}; "
            "pass target_modules (e.g. --target-modules q_proj,v_proj)"
        )
    experts = _expert_count(getattr(model, "config", None))
    names = []
    for name, module in model.get_submodule(blocks).named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not _is_router(module, experts):
            names.append(f"{blocks}.{name}")
    if not names:
        raise TQCError(f"the decoder blocks at {blocks!r} hold no Linear/Conv1D module; pass target_modules")
    return names


def decoder_blocks(model: nn.Module) -> str | None:
    """The qualified name of the ``ModuleList`` of decoder blocks: of the lists whose items all
    share one class, the one holding the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(item) for item in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = name, params
    return best


def _expert_count(config) -> int | None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _is_router(module: nn.Module, experts: int | None) -> bool:
    out_features = module.out_features if isinstance(module, nn.Linear) else module.nf
    return experts is not None and out_features == experts


def target_summary(model: nn.Module, names: list[str]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(name, class, weight shape, parameters)`` of each target, for ``tqc info --targets``."""
    rows = []
    for name in names:
        module = model.get_submodule(name)
        rows.append(
            (name, type(module).__name__, tuple(module.weight.shape), sum(p.numel() for p in module.parameters()))
        )
    return rows


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def block_index(name: str) -> int:
    """The decoder block a module belongs to (the first ``.N.`` in its name); -1 outside the blocks."""
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[0]) if numbers else -1


def _steps_upper_first(names: list[str], steps: int) -> dict[str, int]:
    """Spread layers over ``steps`` distillation steps, upper layers first, as multi-step KD does."""
    order = sorted(names, key=block_index, reverse=True)
    return {name: 1 + i * steps // max(len(order), 1) for i, name in enumerate(order)}


# ---------------------------------------------------------------------------------------------
# Three ways to plan: an explicit spec, one budget for every layer, auto


def _head_to_untie(model: nn.Module, names: list[str], config: CompressionConfig) -> int:
    """Parameters a dense LM head will add: factoring an embedding the head is tied to, with
    ``tie_lm_head=False``, gives the head its own copy of the weight."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    embedding_name = next((n for n in names if model.get_submodule(n) is embedding), None)
    if config.tie_lm_head or embedding_name is None or head is None or head.weight is not embedding.weight:
        return 0
    return head.weight.numel()


def _layers_from_spec(model: nn.Module, layers: list[tuple[str, LayerSpec]]) -> list[LayerPlan]:
    plan = []
    for pattern, spec in layers:
        for name in find_target_modules(model, [pattern]):
            try:
                spec.structure.check(spec.settings, tuple(dense_weight_of(model.get_submodule(name))[0].shape))
            except TQCError as exc:
                raise TQCError(f"{name}: {exc}") from None
            plan.append(LayerPlan(name, spec))
    return plan


def _layers_from_budget(model: nn.Module, names: list[str], config: CompressionConfig) -> list[LayerPlan]:
    """Turn a whole-model budget into per-layer settings: every target layer keeps the same fraction
    ``f`` of its parameters, where ``f`` is what the budget leaves after the untouched parameters.
    Each layer then takes the settings of ``config.method`` with the most parameters under ``f``."""
    total, target = count_parameters(model), target_params(model, config)
    shapes = {name: tuple(dense_weight_of(model.get_submodule(name))[0].shape) for name in names}
    compressible = sum(m * n for m, n in shapes.values())
    fixed = total - compressible + _head_to_untie(model, names, config)
    if target >= total:
        return []
    if target <= fixed:
        raise TQCError(
            f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
            "modules; raise the ratio or add target modules (e.g. the embeddings)"
        )
    keep = (target - fixed) / compressible
    structure = get_structure(config.method)
    steps = _steps_upper_first(names, config.steps)
    why = f"keeps {keep:.1%} of every target layer to meet the whole-model budget"
    plan = []
    for name in names:
        found = structure.for_budget(shapes[name], keep, config.prefer)
        if found is None:
            m, n = shapes[name]
            raise TQCError(
                f"no {config.method} factorization of a {m}x{n} matrix fits {keep:.1%} of its parameters; "
                "raise the ratio or use --method svd"
            )
        settings, phrase = found
        plan.append(
            LayerPlan(
                name, LayerSpec(config.method, step=steps[name], reason=f"{phrase} {why}", **settings_dict(settings))
            )
        )
    return plan


EMBEDDING_METRIC = "relative error as LM head and as lookup on the calibration text, weighted by loss sensitivity"


def _outside_targets(model: nn.Module, names: list[str], target: int) -> int:
    """The parameters outside the target modules; one clear error if they alone exceed the budget."""
    fixed = count_parameters(model) - sum(dense_weight_of(model.get_submodule(n))[0].numel() for n in names)
    if target <= fixed:
        raise TQCError(
            f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
            "modules; raise the ratio or add target modules"
        )
    return fixed


def _plan_auto(
    model: nn.Module, names: list[str], config: CompressionConfig, stats: dict | None, progress: bool
) -> tuple[list[LayerPlan], dict]:
    """Measure every structure's candidates per layer and allocate the budget by error per
    parameter (see :mod:`tqcompressor.planning.auto`). The chosen factors are fitted here."""
    from tqcompressor.planning.auto import (
        allocate,
        candidate_menu,
        embedding_candidates,
        embedding_factors,
        factors_for,
        layer_scale,
        role_scales,
    )
    from tqcompressor.planning.calibration import EmbeddingStatistics

    target = target_params(model, config)
    weights = {name: dense_weight_of(model.get_submodule(name))[0] for name in names}
    fixed = _outside_targets(model, names, target)
    usable = {name: usable_statistics(stats[name], weights[name]) if stats else None for name in names}
    cov = {name: usable[name].input_cov if usable[name] is not None else None for name in names}
    # a tied table's two role weights (tr(W C W^T) over 262k rows for Gemma): measured once, used thrice
    roles = {name: role_scales(weights[name], s) for name, s in usable.items() if isinstance(s, EmbeddingStatistics)}
    rows = _output_weights(weights, usable, roles) if config.output_weights else {}
    # with output weights a layer is measured, budgeted and fitted as diag(rows) W in the output metric
    # (1/2 sum_i r_i E[(delta y_i)^2] = grad_sq * ||diag(rows) (W - W') x||^2), its factors scaled back below
    # exactly: svd's U absorbs the scale, a Kronecker layer stores it (one parameter per output, counted)
    measured = {
        name: weights[name] * rows[name][:, None].to(weights[name].dtype) if name in rows else weights[name]
        for name in names
    }
    menus, states = {}, {}
    for name in tqdm(names, desc="measuring candidates", unit="layer", disable=not progress):
        menus[name], states[name] = candidate_menu(
            measured[name],
            cov[name],
            config.max_iterations,
            config.auto_methods,
            embedding=is_embedding(model.get_submodule(name)),
        )
        if name in roles:
            menus[name] = embedding_candidates(weights[name], menus[name], states[name], usable[name], roles[name])
        if name in rows:
            out_features = weights[name].shape[0]
            menus[name] = [REGISTRY[c.method].row_scaled(c, out_features) for c in menus[name]]
    scales = {
        name: sum(roles[name]) if name in roles else layer_scale(w, stats[name] if stats else None)
        for name, w in measured.items()
    }
    try:
        choices = allocate(menus, scales, target - fixed)
    except ValueError as exc:
        raise TQCError(f"{exc}; raise the ratio") from None
    metric = "relative output error on the calibration text" if stats else "relative weight error"
    if rows:
        metric = "relative output error on the calibration text, outputs weighted by gradient energy"
    steps = _steps_upper_first(names, config.steps)
    layers, record = [], {}
    for name in names:
        choice = choices[name]
        measured_in = EMBEDDING_METRIC if name in roles else metric
        record[name] = {
            "chosen": choice.to_dict(),
            "metric": measured_in,
            "layer_weight": scales[name],
            "menu": [c.to_dict() for c in menus[name]],
        }
        if name in roles:  # what each role of the table adds to its weight
            record[name]["role_weights"] = dict(zip(("head", "lookup"), roles[name]))
        if not REGISTRY[choice.method].compresses:
            continue  # kept dense
        reason = (
            f"auto: {choice.method} at {choice.params:,} params gives {measured_in} {choice.error:.3f}; "
            f"chosen by weighted error reduction per parameter among {len(menus[name])} candidates"
        )
        spec = LayerSpec(choice.method, step=steps[name], reason=reason, **choice.settings)
        if name in roles:
            factors = embedding_factors(weights[name], choice, states[name], usable[name], roles[name])
        else:
            factors = factors_for(measured[name], choice, states[name], cov[name])
            if name in rows:
                factors = REGISTRY[choice.method].divide_rows(factors, rows[name])
        layers.append(LayerPlan(name, spec, factors))
    return layers, record


def _output_weights(weights: dict, usable: dict, roles: dict) -> dict[str, Tensor]:
    """Per layer with calibration statistics (not a tied table, whose roles are weighed apart): the
    square roots of its outputs' damped gradient energies, mean square 1."""
    from tqcompressor.structures.lowrank import output_rows

    found = {name: output_rows(weights[name], s) for name, s in usable.items() if s is not None and name not in roles}
    return {name: rows.float() for name, rows in found.items() if rows is not None}
