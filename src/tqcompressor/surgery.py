"""Model surgery: choose per-layer factorizations and swap modules in place, PEFT style."""

from __future__ import annotations

import fnmatch
import re
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from tqcompressor.config import DEFAULT_TARGET_MODULES, CompressionConfig, CompressionReport, LayerReport, LayerSpec
from tqcompressor.decompose import complete_shapes, decompose, relative_error, truncated_svd
from tqcompressor.errors import TQCError
from tqcompressor.folding import fold_mlp_permutations
from tqcompressor.layers import KroneckerEmbedding, KroneckerLinear, LowRankLinear, TiedKroneckerHead, dense_weight_of

FACTORED = (KroneckerLinear, LowRankLinear, KroneckerEmbedding)
# Small-factor sides the budget solver may pick for B (A takes the rest), and the most Kronecker
# terms it will use: the method is about a *short* sum of Kronecker products.
B_SIDES = (1, 2, 3, 4)
MAX_RANK = 8
# prefer="speed": B is one row wide (1 x n2). A rank-r Kronecker layer costs
# r * min(1/m1 + 1/n2, 1/n1 + 1/m2) of the dense FLOPs (B or A contracted first, whichever is
# cheaper); with m2 = 1 that is about its parameter fraction, so the layer gets faster as it gets
# smaller (with a 3x3 B and rank 5 it costs 1.7x the dense layer).
SPEED_B_WIDTHS = (2, 3, 4, 6, 8, 9, 12, 16)


def count_parameters(model: nn.Module) -> int:
    """Every parameter once: ``parameters()`` already skips a tied LM head's shared weight."""
    return sum(p.numel() for p in model.parameters())


Plan = list[tuple[str, LayerSpec]]  # (module name, how), in order; a module may appear at several steps


def compress(model: nn.Module, config: CompressionConfig, step: int | None = None,
             progress: bool = True, calibration: Tensor | dict | None = None) -> tuple[nn.Module, CompressionReport]:
    """Replace the target modules of ``model`` by factored layers, in place.

    ``calibration`` (token ids, shape (blocks, seq_len), or statistics from
    :func:`tqcompressor.calibration.calibrate`) makes the fits activation-aware: ``svd`` minimises
    the output error, ``tq``/``kronecker`` weight each input column by its RMS (folded into the
    factors), and ``auto`` weighs layers by their effect on the loss. When the plan already exists
    (later distillation steps, resumed runs), this step's linear layers without fitted factors are
    fitted to the inputs they see in the model as it is now.

    ``step`` compresses only the layers planned for that distillation step (multi-step KD);
    ``None`` compresses all of them, step by step. The plan is kept on ``model.tqc_plan`` so later
    steps and ``save`` see the same choices. A module planned again at a later step (e.g. the
    embedding halved twice) is re-factored from its current factors.
    """
    started = time.perf_counter()
    plan_was_ready = bool(getattr(model, "tqc_plan", None))
    plan = getattr(model, "tqc_plan", None) or plan_compression(model, config, calibration)
    model.tqc_plan = plan
    report = CompressionReport(params_before=count_parameters(model), method=config.method,
                               target_params=_target_params(model, config) if config.layers is None else None,
                               auto=getattr(model, "tqc_auto", None))
    cache = getattr(model, "tqc_factor_cache", {})
    todo = [(name, spec) for name, spec in sorted(plan, key=lambda item: item[1].step)
            if (step is None or spec.step == step) and not _already_done(model.get_submodule(name), spec)]
    if calibration is not None and plan_was_ready:
        # a later distillation step (or a resumed run): fit this step's linear layers that have no
        # fitted factors to the inputs they see now, in the partly compressed and distilled model
        refit = [(name, spec) for name, spec in todo
                 if name not in cache and not _is_embedding(model.get_submodule(name))]
        stats = _statistics(model, [name for name, _ in refit], calibration) if refit else {}
        for name, spec in refit:
            cache[name] = _aware_factors(model.get_submodule(name), spec, stats[name], config.max_iterations)
    bar = tqdm(todo, desc="compressing", unit="layer", disable=not progress)
    for name, spec in bar:
        bar.set_postfix_str(name)
        module = model.get_submodule(name)
        t0 = time.perf_counter()
        new, dense, kind = _factor_module(module, spec, config.max_iterations, cache.pop(name, None))
        error = relative_error(dense.double(), new.to_dense().double())
        is_embedding = hasattr(model, "get_input_embeddings") and module is model.get_input_embeddings()
        _set_module(model, name, new)
        if is_embedding:
            _retie_head(model, module, new, config.tie_lm_head)
        report.layers.append(LayerReport(
            name=name, kind=kind, shape=tuple(dense.shape), method=spec.method, rank=new.rank,
            a_shape=tuple(new.a.shape[1:]) if hasattr(new, "a") else None,
            b_shape=tuple(new.b.shape[1:]) if hasattr(new, "b") else None, step=spec.step,
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()),
            relative_error=error, seconds=time.perf_counter() - t0, reason=spec.reason))
    # exact, free at run time; layers a later step still factors from their weights stay untouched
    report.folded_mlps = fold_mlp_permutations(model, skip=_pending(model, plan) | set(cache))
    report.params_after = count_parameters(model)
    report.seconds = time.perf_counter() - started
    return model, report


def _pending(model: nn.Module, plan: Plan) -> set[str]:
    """Modules whose last planned factorization is not in place yet."""
    last = {name: spec for name, spec in sorted(plan, key=lambda item: item[1].step)}
    return {name for name, spec in last.items() if not _already_done(model.get_submodule(name), spec)}


def _already_done(module: nn.Module, spec: LayerSpec) -> bool:
    """True when ``module`` already has the factorization ``spec`` asks for (resumed runs)."""
    if isinstance(module, LowRankLinear):
        return spec.method == "svd" and module.rank == spec.rank
    if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
        return (spec.method != "svd" and module.rank == spec.rank
                and (spec.b_shape is None or tuple(module.b.shape[1:]) == tuple(spec.b_shape))
                and (spec.a_shape is None or tuple(module.a.shape[1:]) == tuple(spec.a_shape)))
    return False


def _factor_module(module: nn.Module, spec: LayerSpec, max_iterations: int, cached=None):
    if isinstance(module, (nn.Embedding, KroneckerEmbedding)):
        if spec.method == "svd":
            raise TQCError("embeddings are factored with 'tq' or 'kronecker', not 'svd'")
        dense = module.to_dense() if isinstance(module, KroneckerEmbedding) else module.weight.detach()
        factors = decompose(dense, spec.method, spec.a_shape, spec.b_shape, spec.rank, max_iterations)
        return KroneckerEmbedding.from_factors(factors), dense, "embedding"
    if isinstance(module, (KroneckerLinear, LowRankLinear)):
        dense, kind = module.to_dense(), module.kind
    else:
        dense, kind = dense_weight_of(module)
    bias = module.bias.detach() if module.bias is not None else None
    if spec.method == "svd":
        factors = cached or decompose(dense, "svd", rank=spec.rank)
        return LowRankLinear.from_factors(factors, bias, kind), dense, kind
    factors = cached or decompose(dense, spec.method, spec.a_shape, spec.b_shape, spec.rank, max_iterations)
    return KroneckerLinear.from_factors(factors, bias, kind), dense, kind


def _retie_head(model: nn.Module, old: nn.Embedding, new: KroneckerEmbedding, tie: bool) -> None:
    """Keep a tied LM head consistent with a factored embedding: tie it to the same factors, or
    untie it explicitly into a dense copy of the original table (then it is counted on its own)."""
    head = model.get_output_embeddings()
    if isinstance(head, TiedKroneckerHead):  # already tied to the factors: follow the new ones
        model.set_output_embeddings(TiedKroneckerHead(new, head.bias))
        return
    if head is None or isinstance(old, KroneckerEmbedding) or getattr(head, "weight", None) is not old.weight:
        return
    bias = head.bias if getattr(head, "bias", None) is not None else None
    if tie:
        replacement = TiedKroneckerHead(new, bias)
    else:
        replacement = nn.Linear(old.embedding_dim, old.num_embeddings, bias=bias is not None)
        with torch.no_grad():
            replacement.weight.copy_(old.weight)
            if bias is not None:
                replacement.bias.copy_(bias)
    model.set_output_embeddings(replacement)
    model.config.tie_word_embeddings = False  # stop transformers from re-tying to a dense table


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------
# Planning: which module gets which factorization


def find_target_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Module names matching ``patterns`` (exact name, name suffix after a dot, or glob).

    The LM head is only matched when named explicitly: it is usually tied to the embedding."""
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if model_type not in DEFAULT_TARGET_MODULES:
            raise TQCError(f"no default target modules for model type {model_type!r}; "
                           "pass target_modules (e.g. --target-modules q_proj,v_proj)")
        patterns = DEFAULT_TARGET_MODULES[model_type]
    names = []
    unmatched = set(patterns)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding, *FACTORED)):
            continue
        if module is head and name not in patterns:
            continue
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
                names.append(name)
                unmatched.discard(pattern)
                break
    if unmatched:
        raise TQCError(f"target module pattern(s) {sorted(unmatched)} match no Linear/Conv1D/Embedding "
                       f"module of this model; module names look like {_example_names(model)}")
    return names


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def plan_compression(model: nn.Module, config: CompressionConfig, calibration: Tensor | dict | None = None) -> Plan:
    if calibration is not None and config.layers is not None:
        raise TQCError("calibration text works with a budget (--ratio / --target-params), not with a spec file")
    if config.layers is not None:
        return _plan_from_spec(model, config.layers)
    names = find_target_modules(model, config.target_modules)
    linear = [name for name in names if not _is_embedding(model.get_submodule(name))]
    if config.method == "auto" and len(linear) < len(names):
        raise TQCError("method 'auto' covers linear layers; factor embeddings with an explicit spec")
    stats = _statistics(model, linear, calibration)
    if config.method == "auto":
        return _plan_auto(model, names, config, stats)
    plan = _plan_from_budget(model, names, config)
    if stats is not None:  # activation-aware fits: do them now, while the statistics are at hand
        model.tqc_factor_cache = {name: _aware_factors(model.get_submodule(name), spec, stats[name],
                                                       config.max_iterations)
                                  for name, spec in plan if name in stats}
        for name, spec in plan:
            if name in stats:
                spec.reason += (" (activation-aware: minimises the output error on the calibration text)"
                                if spec.method == "svd" else " (input columns weighted by their RMS on the calibration text)")
    return plan


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, KroneckerEmbedding))


def _aware_factors(module: nn.Module, spec: LayerSpec, stats, max_iterations: int):
    """Factors fitted with calibration statistics: output-error SVD, or a column-weighted Kronecker fit."""
    dense = _dense_of(module)
    if spec.method == "svd":
        return truncated_svd(dense, spec.rank, stats.input_cov)
    rms = stats.input_cov.diagonal().clamp_min(0).sqrt()
    rms = rms.clamp_min(1e-6 * float(rms.mean()) + 1e-30)  # a channel never seen still gets a little weight
    return decompose(dense, spec.method, spec.a_shape, spec.b_shape, spec.rank, max_iterations, input_scale=rms)


def _statistics(model: nn.Module, names: list[str], calibration) -> dict | None:
    from tqcompressor.calibration import calibrate

    if calibration is None or isinstance(calibration, dict):
        return calibration
    if not isinstance(calibration, Tensor):
        raise TQCError("calibration must be token ids (a blocks x seq_len tensor) or statistics from calibrate()")
    return calibrate(model, names, calibration)


def _dense_of(module: nn.Module) -> Tensor:
    return module.to_dense() if isinstance(module, FACTORED) else dense_weight_of(module)[0]


def _plan_from_spec(model: nn.Module, layers: list[tuple[str, LayerSpec]]) -> Plan:
    plan: Plan = []
    for pattern, spec in layers:
        matched = find_target_modules(model, [pattern])
        for name in matched:
            if spec.method != "svd":
                try:
                    complete_shapes(_weight_shape(model.get_submodule(name)), spec.a_shape, spec.b_shape)
                except TQCError as exc:
                    raise TQCError(f"{name}: {exc}") from None
            plan.append((name, spec))
    return plan


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):
        return tuple(module.weight.shape)
    if isinstance(module, FACTORED):
        return tuple(module.to_dense().shape)
    return tuple(dense_weight_of(module)[0].shape)


def _target_params(model: nn.Module, config: CompressionConfig) -> int:
    total = count_parameters(model)
    return int(config.target_params) if config.target_params is not None else int(config.ratio * total)


def _plan_from_budget(model: nn.Module, names: list[str], config: CompressionConfig) -> Plan:
    """Turn a whole-model budget into per-layer shapes: every target layer keeps the same fraction
    ``f`` of its parameters, where ``f`` is what the budget leaves after the untouched parameters.
    Each layer then takes the factorization with the most parameters that fit under ``f``."""
    total = count_parameters(model)
    target = _target_params(model, config)
    shapes = {name: _weight_shape(model.get_submodule(name)) for name in names}
    compressible = sum(m * n for m, n in shapes.values())
    fixed = total - compressible
    if target >= total:
        return []
    if target <= fixed:
        raise TQCError(f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
                       "modules; raise the ratio or add target modules (e.g. the embeddings)")
    keep = (target - fixed) / compressible
    order = sorted(names, key=_depth, reverse=True)  # upper layers first, as multi-step KD does
    plan = {}
    for index, name in enumerate(order):
        step = 1 + index * config.steps // max(len(order), 1)
        plan[name] = _choose_shape(shapes[name], keep, config.method, step, config.prefer)
    return [(name, plan[name]) for name in names]


def _plan_auto(model: nn.Module, names: list[str], config: CompressionConfig, stats: dict | None = None) -> Plan:
    """Measure a menu of candidates per layer and allocate the budget by error per parameter
    (see :mod:`tqcompressor.auto`). The chosen factors are kept for ``compress``."""
    from tqcompressor.auto import allocate, candidate_menu, factors_for, layer_scale

    total, target = count_parameters(model), _target_params(model, config)
    weights = {name: _dense_of(model.get_submodule(name)) for name in names}
    fixed = total - sum(w.numel() for w in weights.values())
    if target <= fixed:
        raise TQCError(f"a budget of {target:,} parameters is below the {fixed:,} parameters outside the target "
                       "modules; raise the ratio or add target modules")
    cov = {name: stats[name].input_cov if stats else None for name in names}
    menus, searches = {}, {}
    for name in tqdm(names, desc="measuring candidates", unit="layer"):
        menus[name], searches[name] = candidate_menu(weights[name], cov[name], max_iterations=config.max_iterations)
    scales = {name: layer_scale(w, stats[name] if stats else None) for name, w in weights.items()}
    try:
        choices = allocate(menus, scales, target - fixed)
    except ValueError as exc:
        raise TQCError(f"{exc}; raise the ratio") from None
    metric = "relative output error on the calibration text" if stats else "relative weight error"
    order = sorted(names, key=_depth, reverse=True)
    steps = {name: 1 + i * config.steps // max(len(order), 1) for i, name in enumerate(order)}
    plan: Plan = []
    model.tqc_factor_cache, model.tqc_auto = {}, {}
    for name in names:
        choice = choices[name]
        model.tqc_auto[name] = {"chosen": choice.to_dict(), "metric": metric, "layer_weight": scales[name],
                                "menu": [c.to_dict() for c in menus[name]]}
        if choice.method == "dense":
            continue
        reason = (f"auto: {choice.method} at {choice.params:,} params gives {metric} {choice.error:.3f}; "
                  f"chosen by weighted error reduction per parameter among {len(menus[name])} candidates")
        plan.append((name, LayerSpec(choice.method, rank=choice.rank, a_shape=choice.a_shape,
                                     b_shape=choice.b_shape, step=steps[name], reason=reason)))
        model.tqc_factor_cache[name] = factors_for(weights[name], choice, searches[name], cov[name])
    return plan


def _depth(name: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", name)
    return int(numbers[0]) if numbers else -1


def _choose_shape(shape: tuple[int, int], keep: float, method: str, step: int, prefer: str = "accuracy") -> LayerSpec:
    m, n = shape
    budget = keep * m * n
    why = f"keeps {keep:.1%} of every target layer to meet the whole-model budget"
    if method == "svd":
        rank = max(1, int(budget // (m + n)))
        return LayerSpec("svd", rank=rank, step=step, reason=f"largest SVD rank that {why}")
    best = None  # (params, -size of B, LayerSpec)
    b_shapes = ([(1, w) for w in SPEED_B_WIDTHS] if prefer == "speed"
                else [(m2, n2) for m2 in B_SIDES for n2 in B_SIDES])
    for m2, n2 in b_shapes:
        if m2 * n2 < 2 or m % m2 or n % n2:
            continue
        m1, n1 = m // m2, n // n2
        per_term = m1 * n1 + m2 * n2
        rank = min(int(budget // per_term), m2 * n2 - 1, m1 * n1, MAX_RANK)
        if rank < 1:
            continue
        key = (rank * per_term, -(m2 * n2))
        if best is None or key > best[:2]:
            best = (*key, LayerSpec(method, rank=rank, a_shape=(m1, n1), b_shape=(m2, n2), step=step))
    if best is None:
        raise TQCError(f"no Kronecker factorization of a {m}x{n} matrix fits {keep:.1%} of its parameters; "
                       "raise the ratio or use --method svd")
    kind = "one-row B shapes (fast: FLOPs follow parameters)" if prefer == "speed" else "Kronecker shapes"
    best[2].reason = f"most parameters among {kind} that {why}"
    return best[2]
