"""The main job: compress, distill in steps, evaluate at every point on two domains, write a report.

The report answers what a user asks before adopting the student: how close it is to the teacher
on the evaluation text and on text the distillation never saw (samples of the teacher with a
held-out seed), what the plan looks like, how both continue the same prompts, and what the student
costs to hold and to run."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tqcompressor.data import (
    TeacherPool,
    check_teacher_fraction,
    check_teacher_start,
    mixed_block_source,
    text_block_source,
    tokenize_text,
)
from tqcompressor.errors import TQCError, check_count
from tqcompressor.evaluation.evaluate import RememberedTeacher, greedy_continuations
from tqcompressor.evaluation.fidelity import (
    EVAL_BATCH,
    EVAL_SEED,
    TEACHER_DOMAIN,
    Domain,
    heldout_domains,
    in_domain,
    measure,
    measure_both,
    teacher_perplexities,
)
from tqcompressor.evaluation.figures import plan_cells, plot_fidelity, plot_plan, plot_points
from tqcompressor.evaluation.footprint import directory_bytes, memory_bytes, speed_ratios
from tqcompressor.evaluation.report import format_report
from tqcompressor.evaluation.targets import check_max_kl, smallest_within_kl
from tqcompressor.modelio.checkpoint import save, stored_tensor_bytes
from tqcompressor.modelio.models import LoadedModel
from tqcompressor.outputs import (
    RUN,
    check_writable,
    claim_directory,
    is_main_process,
    write_json_atomic,
    write_text_atomic,
)
from tqcompressor.planning.config import CompressionConfig
from tqcompressor.planning.formats import FormatPlan, check_below_model
from tqcompressor.planning.inventory import count_parameters
from tqcompressor.planning.mixed import measure_model_mixed
from tqcompressor.planning.plan import Plan
from tqcompressor.planning.planners import plan_compression
from tqcompressor.planning.registry import planning_methods
from tqcompressor.quant.api import quantize_, quantized_layers
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.schemas import BudgetFile, RunResults, read_json_file
from tqcompressor.structures import get_structure
from tqcompressor.surgery.apply import apply_plan, prepare_planned, store_factors
from tqcompressor.surgery.experts import split_experts
from tqcompressor.training.blockwise import estimated_seconds
from tqcompressor.training.budget import (
    BudgetPlan,
    plan_steps,
    quantized_forward_cost,
    seconds_after_distillation,
    seconds_per_step,
)
from tqcompressor.training.distill import DistillConfig, blockwise_ids, multistep_distill, training_precision
from tqcompressor.training.recipe import (
    BYTE_CORRECTION_RANKS,
    BYTE_FORMATS,
    LEARN_GRIDS,
    TEACHER_POOL,
    TEACHER_START,
    TEACHER_VIEWS,
)
from tqcompressor.versions import library_versions, machine_record

PROMPTS = [
    "The history of the city begins",
    "In 1998, the band released",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
]
METRICS = ("perplexity", "kl_to_teacher", "top1_agreement", "tokens")


def teacher_pool_for(
    loaded: LoadedModel, config: DistillConfig, out_dir: Path, teacher_pool: int, teacher_start: str
) -> TeacherPool:
    """The run's pool of teacher samples (at most ``teacher_pool``, each begun at ``teacher_start``), cached in
    ``out_dir``, as sampled so far (nothing, in a new run)."""
    begun = "" if teacher_start == "bos" else f"{teacher_start}-start-"
    cache = out_dir / f"teacher_pool-{begun}seed{config.seed}-{teacher_pool}x{config.seq_len}.safetensors"
    seed, length = config.seed, config.seq_len
    return TeacherPool(loaded.model, loaded.tokenizer, length, seed, teacher_pool, cache, teacher_start)


def teacher_share(data: str, teacher_fraction: float) -> float:
    """The share of distillation blocks that come from the teacher's pool."""
    return 1.0 if data == "teacher" else teacher_fraction


def teacher_blocks(total: int, share: float) -> int:
    """The teacher blocks among the first ``total`` distillation blocks (:func:`mixed_block_source`'s count,
    one more where it rounds down)."""
    return total if share == 1 else int(total * share) + 1


def block_source_for(
    data: str,
    loaded: LoadedModel,
    config: DistillConfig,
    out_dir: Path,
    fraction=None,
    teacher_fraction: float = 0.0,
    total_blocks: int | None = None,
    teacher_pool: int = TEACHER_POOL,
    teacher_start: str = TEACHER_START,
    pool: TeacherPool | None = None,
):
    """The distillation (and calibration) blocks: text, teacher samples, or an even mix of both
    (``teacher_fraction`` of the blocks sampled from the teacher, with the run's seed). The teacher's
    blocks come from ``pool`` (by default :func:`teacher_pool_for`), grown to what ``total_blocks`` take (at
    most ``teacher_pool``), and are cycled; each is begun at ``teacher_start``
    (:data:`~tqcompressor.data.TEACHER_STARTS`)."""
    if config.seed == EVAL_SEED and (data == "teacher" or teacher_fraction > 0):
        raise TQCError(f"seed {EVAL_SEED} is reserved for the held-out evaluation samples; pick another --seed")
    if teacher_pool < 1:
        raise TQCError(f"the teacher pool must hold at least 1 block, got {teacher_pool}")
    check_teacher_fraction(teacher_fraction)  # before any sampling
    check_teacher_start(teacher_start)
    share = teacher_share(data, teacher_fraction)
    text = None if share == 1 else text_block_source(data, loaded.tokenizer, config.seq_len, fraction=fraction)
    if share <= 0:
        return text
    if pool is None:
        pool = teacher_pool_for(loaded, config, out_dir, teacher_pool, teacher_start)
    pool.grow(teacher_blocks(total_blocks or config.steps * config.batch_size * config.grad_accum, share))
    return pool.stream if share == 1 else mixed_block_source(text, pool.stream, teacher_fraction)


def data_name(
    data: str, teacher_fraction: float, teacher_pool: int = TEACHER_POOL, teacher_start: str = TEACHER_START
) -> str:
    """What identifies the distillation data of a run (for resume): the source and the teacher's share."""
    # "seeded chunks": sampled as TeacherPool does, so that a run begun before it does not resume on other samples
    pool = f"pool {teacher_pool} in seeded chunks" + ("" if teacher_start == "bos" else f", {teacher_start} start")
    if data == "teacher":
        return f"teacher ({pool})"
    return data if teacher_fraction <= 0 else f"{data} + {teacher_fraction:g} teacher samples ({pool})"


def evaluation_sets(
    eval_data: str | None, loaded: LoadedModel, max_tokens: int, context: int, out_dir: Path
) -> dict[str, Domain]:
    """Named token sequences to evaluate on: ``eval_data`` (when it is a text: in-domain, not counted
    in fidelity KL) and the fidelity suite's held-out domains (teacher samples cached in ``out_dir``)."""
    sets = {}
    if eval_data is not None and eval_data != "teacher":
        sets[eval_data] = in_domain(tokenize_text(eval_data, loaded.tokenizer, max_tokens))
    sets.update(heldout_domains(loaded.model, loaded.tokenizer, max_tokens, context, out_dir))
    return sets


def evaluate_domains(
    model, teacher, eval_sets: dict[str, Domain], context: int, tokenizer=None, reference=None
) -> dict:
    """:func:`tqcompressor.evaluation.fidelity.measure`: per domain KL, top-1 and perplexity ratio against
    ``teacher``, and fidelity KL over the held-out domains. ``reference``: the teacher's own result
    (its perplexities are reused)."""
    return measure(
        model, teacher, eval_sets, context, tokenizer, teacher_perplexities(reference) if reference else None
    )


QUANTIZED_FORMATS = (QuantizeSettings(8), QuantizeSettings(4, 32), QuantizeSettings(4, 128))


def first_tokens(eval_sets: dict[str, Domain], tokens: int, context: int, held_out_only: bool = False) -> dict:
    """The first ``tokens`` of each domain, in whole windows of ``context`` (the same windows a
    longer evaluation of the domain begins with); ``0``: all of each."""
    tokens = max(context, tokens // context * context) if tokens else None
    return {
        name: Domain(d.ids[:tokens], d.held_out) for name, d in eval_sets.items() if d.held_out or not held_out_only
    }


def quantized_rows(teacher, student, eval_sets: dict[str, Domain], context: int, tokenizer, tokens: int = 2048) -> list:
    """What a user would pick instead: the teacher and the student in fp32, int8 and int4, each with
    its bytes and its fidelity, every row on the same first ``tokens`` of each held-out domain (a
    subset of the points' windows, so that eight models cost about two evaluations)."""
    subset = first_tokens(eval_sets, tokens, context, held_out_only=True)
    remembered = RememberedTeacher(teacher)  # every row scored against one pass of the teacher
    student_measured, reference = measure_both(student, remembered, subset, context, tokenizer)

    def row(name: str, label: str, model, measured: dict | None = None) -> dict:
        measured = measured or evaluate_domains(model, remembered, subset, context, tokenizer, reference)
        return {
            "model": name,
            "format": label,
            "params": count_parameters(model),
            "memory_bytes": memory_bytes(model),
            "fidelity_kl": measured["fidelity_kl"],
            "fidelity_top1": measured["fidelity_top1"],
            "domains": {d: _domain_record(m) for d, m in measured["domains"].items()},
        }

    stored = bool(quantized_layers(student))  # a byte budget's student: stored as planned already
    rows = [row("teacher", "fp32", teacher, reference)]
    rows.append(row("student", "as planned" if stored else "fp32", student, student_measured))
    for name, model in (("teacher", teacher), ("student", student))[: 1 if stored else 2]:
        for settings in QUANTIZED_FORMATS:
            quantized = copy.deepcopy(model)
            quantize_(quantized, settings)
            rows.append(row(name, settings.name, quantized))
            del quantized
    return rows


def comparison_evaluations(share: float, student_forms: bool = True, quantized_cost: float = 1.0) -> float:
    """The quantized comparison's cost in evaluations of one point (for the time budget; one evaluation runs
    the model and the teacher: two forwards), on ``share`` of that evaluation's tokens
    (:func:`comparison_share`): one pass of the teacher, whose logits are remembered (:class:`RememberedTeacher`),
    the student's, and the quantized copies', each ``quantized_cost`` forwards
    (:func:`~tqcompressor.training.budget.quantized_forward_cost`): the teacher's and the student's, or only the
    teacher's where the student is stored as planned already (a byte budget)."""
    quantized = (2 if student_forms else 1) * len(QUANTIZED_FORMATS)
    return (2 + quantized * quantized_cost) / 2 * share


def comparison_share(eval_sets: dict[str, Domain], compare_tokens: int, context: int) -> float:
    """The comparison's tokens (the first ``compare_tokens`` of each held-out domain) over the last point's
    (every domain, the evaluation text included, whole)."""
    compared = first_tokens(eval_sets, compare_tokens, context, held_out_only=True)
    return sum(len(d.ids) for d in compared.values()) / sum(len(d.ids) for d in eval_sets.values())


def _domain_record(metrics: dict) -> dict:
    keep = (*METRICS, "held_out", "teacher_perplexity", "perplexity_ratio")
    return {k: metrics[k] for k in keep if k in metrics}


MAX_CALIBRATION_TOKENS = 1 << 24  # far past where calibration statistics stop changing
MAX_TEACHER_POOL = 1 << 20
MAX_TIME_BUDGET = 7 * 24 * 60  # minutes


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``tqc run`` does with a loaded model, checked once, when it is made. The
    numbers' messages name the CLI options that set them."""

    compression: CompressionConfig
    distill: DistillConfig
    data: str  # distillation (and calibration) text: a name of :mod:`tqcompressor.data`, a file, or "teacher"
    eval_data: str | None  # the in-domain evaluation text (None: held-out domains only)
    out_dir: Path
    eval_tokens: int = 16384
    context: int = 512
    resume: bool = False
    fraction: float | None = None  # of the distillation text to read
    calibration_tokens: int = 8192
    teacher_fraction: float = 0.0  # of the distillation blocks sampled from the teacher
    teacher_pool: int = TEACHER_POOL
    teacher_start: str = TEACHER_START  # where each teacher sample begins (data.TEACHER_STARTS)
    compare_tokens: int = 2048  # 0: no int8/int4 comparison
    time_budget: float | None = None  # minutes; fixes the steps per stage
    # the points during the run (one-shot, stages before the last) on the first this many tokens of each
    # domain; the last stage and the teacher on all eval_tokens (0: every point on all of them)
    interim_tokens: int = 2048
    # a byte budget instead of the compression's: each matrix's format, or a structure of ``structures`` with
    # its factors in a format (planning/mixed.py); the factors train, the rest is stored in its format first
    max_bytes: int | None = None
    structures: tuple[str, ...] = ()
    # or a fidelity target: the smallest such plan whose one-shot model is within it on the held-out domains'
    # interim windows (each candidate stored and measured), then distilled like a byte budget's
    max_kl: float | None = None

    def __post_init__(self) -> None:
        if self.compression.output_weights and self.calibration_tokens <= 0:
            raise TQCError(
                "--output-weights weighs outputs by their gradients on calibration text: keep --calibration-tokens"
            )
        check_count("context", self.context, 2)
        check_count("eval-tokens", self.eval_tokens, self.context)
        check_count("calibration-tokens", self.calibration_tokens, 0, MAX_CALIBRATION_TOKENS)
        check_count("teacher-pool", self.teacher_pool, 1, MAX_TEACHER_POOL)
        check_teacher_fraction(self.teacher_fraction)
        check_teacher_start(self.teacher_start)
        if self.compare_tokens:
            check_count("compare-tokens", self.compare_tokens, self.context)
        if self.interim_tokens:
            check_count("interim-eval-tokens", self.interim_tokens, self.context)
        if self.structures and not self.plans_bytes:
            raise TQCError(
                "--structures joins the formats a --max-bytes or --max-kl plan chooses from: give one of them too"
            )
        if self.max_bytes is not None and self.max_bytes < 1:
            raise TQCError(f"--max-bytes must be a positive size, got {self.max_bytes}")
        if self.max_kl is not None:
            check_max_kl(self.max_kl)
            if self.max_bytes is not None:
                raise TQCError("give one target: --max-bytes (a size) or --max-kl (a fidelity), not both")
        budget = self.time_budget
        if budget is not None and (not math.isfinite(budget) or not 0 < budget <= MAX_TIME_BUDGET):
            raise TQCError(f"--time-budget must be a number of minutes in (0, {MAX_TIME_BUDGET}], got {budget}")

    @property
    def plans_bytes(self) -> bool:
        """Whether the student is a byte plan (``--max-bytes`` or ``--max-kl``) rather than a parameter plan."""
        return self.max_bytes is not None or self.max_kl is not None

    @property
    def method(self) -> str:
        """What made the student: the compression's method, or ``mixed`` for a byte plan."""
        return "mixed" if self.plans_bytes else self.compression.method

    @property
    def stages(self) -> int:
        if self.plans_bytes:
            return 1
        layers = self.compression.layers
        return self.compression.steps if layers is None else len({spec.step for _, spec in layers})


@dataclass
class RunRecord:
    """What ``results.json`` holds while the run goes: every point evaluated so far, the distillation
    settings as the time budget fixed them; written whole after each point (by rank 0 only)."""

    out_dir: Path
    source: str
    run: RunConfig
    distill: DistillConfig
    started: float
    writes: bool
    points: list[dict]
    budget: dict | None = None
    byte_plan: dict | None = None  # a byte budget's plan: its bytes, formats and structures (no menus)
    max_kl_search: dict | None = None  # a fidelity target's search: every plan measured, and whether one met it
    phases: list[tuple[str, float]] = field(default_factory=list)  # each phase's name and start (run seconds)

    def has(self, label: str) -> bool:
        return any(point["label"] == label for point in self.points)

    def add(self, point: dict, teacher: dict | None = None) -> None:
        """``point`` last, ``teacher`` (its own row, measured in the same passes) first; then one write."""
        if teacher is not None:
            self.points.insert(0, teacher)
        self.points.append(point)
        if self.writes:
            write_results(self)


class Points:
    """Evaluates and records the run's points: those during the run on the interim windows (the first
    ``run.interim_tokens`` of each domain), the last stage's on every window with the teacher's own row
    from the same passes. A point already in the record (a resumed run) is not measured again."""

    def __init__(self, record: RunRecord, loaded: LoadedModel, eval_sets: dict, phase) -> None:
        run = record.run
        self.record, self.loaded, self.eval_sets, self.phase = record, loaded, eval_sets, phase
        self.interim_sets = first_tokens(eval_sets, run.interim_tokens, run.context)

    def after_stage(self, stage: int, model, last_stage: int) -> None:
        """A stage before the last: its interim point (the last stage's is :meth:`final`, measured on the model
        as the run stores it)."""
        if stage != last_stage:
            self.interim(f"after KD stage {stage}", stage, model)

    def interim(self, label: str, stage: int, model) -> None:
        if not self.record.has(label):
            self.phase(f"evaluating: {label}")
            context = self.record.run.context
            self.record.add(evaluate_point(label, stage, model, self.loaded, self.interim_sets, context))

    def final(self, stage: int, model) -> None:
        label, record = f"after KD stage {stage}", self.record
        if not record.has(label):
            self.phase(f"evaluating: {label}, and the teacher (every window)")
            tokenizer, context = self.loaded.tokenizer, record.run.context
            measured, own = measure_both(model, self.loaded.model, self.eval_sets, context, tokenizer)
            # a run begun by an earlier version measured the teacher first, on its own
            own_row = None if record.has("teacher") else point_row("teacher", 0, own)
            record.add(point_row(label, stage, measured), teacher=own_row)


def run_pipeline(loaded: LoadedModel, run: RunConfig) -> dict:
    """The main job, in phases: data → teacher's point → calibration → plan and one-shot point →
    time budget → multi-step distillation (a point per stage) → the saved model and the report.
    Each point lands in ``results.json`` as it is measured; ``run.resume`` skips those already there."""
    main = is_main_process()  # under torchrun / accelerate launch every rank trains; rank 0 writes
    out_dir = claim_directory(run.out_dir, kind=RUN) if main else check_writable(run.out_dir, kind=RUN)
    started = time.perf_counter()
    phase, phase_log = _phases(started)
    blocks, pool, eval_sets = load_data(loaded, run, out_dir, phase)
    results_path = out_dir / "results.json"
    previous = read_json_file(results_path, RunResults) if run.resume and results_path.is_file() else {}
    measured = previous.get("points", [])
    record = RunRecord(out_dir, loaded.source, run, run.distill, started, main, measured, phases=phase_log)
    teacher = loaded.model
    points = Points(record, loaded, eval_sets, phase)
    calibration = calibration_blocks(run, blocks, phase)
    plan_and_one_shot = _byte_plan_and_one_shot if run.plans_bytes else _plan_and_one_shot
    student, plan, evaluation_seconds, formats = plan_and_one_shot(teacher, run, calibration, record, points, phase)
    last_stage = plan.steps()[-1]
    if run.time_budget is not None:
        stages = len(plan.steps())
        refit_ids = blockwise_ids(calibration, blocks) if run.distill.blockwise_steps else None
        evaluations = _evaluation_costs(evaluation_seconds, points.interim_sets, eval_sets)
        budget = _budget_plan(
            record, teacher, student, loaded.tokenizer, blocks, evaluations, stages, refit_ids, pool, eval_sets
        )
        phase(f"time budget: {budget.steps_per_stage} steps per stage ({budget.seconds_per_step:.1f} s each)")
        record.distill, record.budget = dataclasses.replace(run.distill, steps=budget.steps_per_stage), budget.to_dict()
        _grow_pool(pool, budget.teacher_blocks, phase)
    refit = f", each after refitting blocks ({record.distill.blockwise_steps} steps a block)"
    phase(
        f"distillation: {len(plan.steps())} stage(s) of {record.distill.steps} steps"
        + (refit if record.distill.blockwise_steps else "")
    )
    student = multistep_distill(
        teacher,
        student,
        blocks,
        record.distill,
        out_dir,
        plan,
        resume=run.resume,
        tokenizer=loaded.tokenizer,
        teacher_name=loaded.source,
        data_name=data_name(run.data, run.teacher_fraction, run.teacher_pool, run.teacher_start),
        calibration=calibration,
        on_stage_end=lambda stage, model: points.after_stage(stage, model, last_stage),
        on_phase=phase,
    )
    if formats is not None:
        phase("storing the trained factors in their planned formats")
        store_factors(student, formats, measure_error=False)
    if main:
        points.final(last_stage, student)
    student.to("cpu")
    if not main:
        return {}
    phase("saving the model")
    save(student, out_dir / "model", loaded.tokenizer, base_model=loaded.source, plan=plan)
    return _finish(record, loaded, student, eval_sets, phase)


def load_data(loaded: LoadedModel, run: RunConfig, out_dir: Path, phase) -> tuple:
    """The distillation blocks, the pool of teacher samples they draw on (``None`` for text alone) and the
    evaluation sets (both may sample from the teacher, cached in ``out_dir``). With a time budget the steps
    are not known yet: the pool holds what calibration takes, and grows once the budget fixes the steps."""
    share = teacher_share(run.data, run.teacher_fraction)
    phase("distillation data" + (" (sampling from the teacher)" if share else ""))
    distill = run.distill
    pool = teacher_pool_for(loaded, distill, out_dir, run.teacher_pool, run.teacher_start) if share else None
    if run.time_budget is None:
        total = distill.steps * distill.batch_size * distill.grad_accum * run.stages
    else:  # the calibration blocks, or one batch to time a step on
        total = max(run.calibration_tokens // distill.seq_len, distill.batch_size)
    blocks = block_source_for(
        run.data,
        loaded,
        distill,
        out_dir,
        run.fraction,
        run.teacher_fraction,
        total,
        run.teacher_pool,
        run.teacher_start,
        pool,
    )
    phase("evaluation text and held-out teacher samples")
    return blocks, pool, evaluation_sets(run.eval_data, loaded, run.eval_tokens, run.context, out_dir)


def evaluate_point(
    label: str, stage: int, model, loaded: LoadedModel, eval_sets: dict, context: int, reference: dict | None = None
) -> dict:
    """One row of ``results.json``: the in-domain text's figures, fidelity against ``loaded.model``, and
    every domain's. ``reference``: the teacher's own row, whose perplexities are reused (``None``: the
    teacher's from the same passes)."""
    measured = evaluate_domains(model, loaded.model, eval_sets, context, loaded.tokenizer, reference)
    return point_row(label, stage, measured)


def point_row(label: str, stage: int, measured: dict) -> dict:
    """One row of ``results.json`` from a :func:`~tqcompressor.evaluation.fidelity.measure` result."""
    domains = measured["domains"]
    primary = next(iter(domains.values()))  # the evaluation text: perplexity, params, protocol
    return {
        "label": label,
        "stage": stage,
        **{k: v for k, v in primary.items() if k not in ("held_out", "teacher_perplexity")},
        "fidelity_kl": measured["fidelity_kl"],
        "fidelity_top1": measured["fidelity_top1"],
        "domains": {name: _domain_record(m) for name, m in domains.items()},
    }


def calibration_blocks(run: RunConfig, blocks, phase) -> torch.Tensor | None:
    """Token ids to calibrate the fits on, when a planned structure fits in the output metric."""
    compression = run.compression
    methods = {spec.method for _, spec in compression.layers} if compression.layers else {compression.method}
    calibrated = run.plans_bytes or any(
        m in planning_methods() or get_structure(m).capabilities.calibrated_in_run for m in methods
    )
    if run.calibration_tokens <= 0 or not calibrated:
        return None
    # fits in the output metric (auto, svd, tq, ...): plan once from the first distillation blocks
    phase(f"calibration on {run.calibration_tokens:,} tokens of the distillation data")
    count = max(1, run.calibration_tokens // run.distill.seq_len)
    return torch.stack(list(itertools.islice(blocks(0), count)))


def _plan_and_one_shot(teacher, run: RunConfig, calibration, record: RunRecord, points: Points, phase) -> tuple:
    """The student to distil, the plan, and how long one evaluation took (``None`` when the one-shot
    point was measured before, in the run being resumed)."""
    phase(f"planning ({run.compression.method})")
    student = copy.deepcopy(teacher)
    split_experts(student)  # exact: each expert matrix becomes a module a plan can name
    plan = plan_compression(student, run.compression, calibration)
    if record.has("compressed (no KD)"):
        return student, plan, None, None
    one_shot = copy.deepcopy(student)
    refit = dict(calibration=calibration, teacher=teacher) if plan.sequential else {}
    apply_plan(one_shot, plan, **refit)  # every stage at once, no distillation
    evaluating = time.perf_counter()
    points.interim("compressed (no KD)", 0, one_shot)
    evaluation_seconds = time.perf_counter() - evaluating
    # one stage: stage 1 is this very model, distillation finds its layers in place (no second fit)
    return (one_shot if len(plan.steps()) == 1 else student), plan, evaluation_seconds, None


def _byte_plan_and_one_shot(teacher, run: RunConfig, calibration, record: RunRecord, points: Points, phase) -> tuple:
    """:func:`_plan_and_one_shot` for a byte budget or a fidelity target (planning/mixed.py), and the plan of
    formats the run ends storing: the student to distil holds the planned structures' factors in float (they
    train) beside every other matrix already in its format (its integers frozen, its scales and offsets trained
    where ``LEARN_GRIDS``), so that distillation learns around the rounding the model keeps; the one-shot point
    is the model stored as planned."""
    names = " and " + ", ".join(run.structures) if run.structures else ""
    target = f"{run.max_bytes / 2**20:.1f} MiB" if run.max_kl is None else f"the smallest within KL {run.max_kl:g}"
    phase(f"planning {target}: each matrix's format{names}")
    student = copy.deepcopy(teacher)
    split_experts(student)
    if run.max_bytes is not None:
        check_below_model(student, run.max_bytes)
    menus = measure_model_mixed(
        student, calibration, run.structures, formats=BYTE_FORMATS, correction_ranks=BYTE_CORRECTION_RANKS
    )
    formats = menus.plan(run.max_bytes) if run.max_kl is None else _search_max_kl(student, menus, run, record, points)
    record.byte_plan = _byte_plan_record(formats)
    _, structures = prepare_planned(student, formats, measure_error=False, learn_grids=LEARN_GRIDS)
    plan = structures or Plan(method="mixed")
    if record.has("compressed (no KD)"):
        return student, plan, None, formats
    one_shot = copy.deepcopy(student)
    store_factors(one_shot, formats, measure_error=False)
    evaluating = time.perf_counter()
    points.interim("compressed (no KD)", 0, one_shot)
    return student, plan, time.perf_counter() - evaluating, formats


def _search_max_kl(model, menus, run: RunConfig, record: RunRecord, points: Points) -> FormatPlan:
    """The smallest plan of ``menus`` whose model, stored as planned, is within ``run.max_kl`` of ``model`` on
    the held-out domains' interim windows, each candidate measured (the closest plan where none is: the report
    states the gap). Distillation then takes the chosen plan closer still."""
    held_out = {name: domain for name, domain in points.interim_sets.items() if domain.held_out}
    search = smallest_within_kl(model, menus, run.max_kl, held_out, run.context, points.loaded.tokenizer)
    record.max_kl_search = search.to_dict()
    points.phase(search.summary())
    return search.plan


def _byte_plan_record(formats: FormatPlan) -> dict:
    """What results.json keeps of a byte plan: its bytes, the count of each format, each matrix's choice."""
    found = formats.to_dict()
    found["layers"] = {name: layer["format"] for name, layer in found["layers"].items()}
    return found


def _finish(record: RunRecord, loaded: LoadedModel, student, eval_sets: dict, phase) -> dict:
    """The comparison with quantization, the plan picture, continuations, memory and speed; the final write."""
    run, teacher = record.run, loaded.model
    student.to(next(teacher.parameters()).device)  # side by side on one device
    phase("int8 and int4 of the teacher and of the student, for comparison")
    compare = run.compare_tokens
    quantized = quantized_rows(teacher, student, eval_sets, run.context, loaded.tokenizer, compare) if compare else []
    phase("plan picture, continuations, memory and speed")
    extras = {
        "bytes": stored_tensor_bytes(record.out_dir / "model"),  # the saved model's weights, headers aside
        "quantized": quantized,
        "plan_cells": plan_cells(teacher, student),
        "continuations": greedy_continuations({"teacher": teacher, "student": student}, loaded.tokenizer, PROMPTS),
        "footprint": footprint(
            teacher, student, record.out_dir / "model", next(iter(eval_sets.values())).ids, run.context
        ),
    }
    title = f"{loaded.source}: the plan ({run.method})"
    plot_plan(extras["plan_cells"], record.out_dir / "plan.png", title)
    return write_results(record, extras)


def _evaluation_costs(one_shot_seconds: float | None, interim: dict, eval_sets: dict) -> tuple[float, float] | None:
    """``(on every window, on the interim windows)``: the seconds of one evaluation, scaled by tokens from
    the one-shot point's (``None`` where it was measured before, in the run being resumed)."""
    if one_shot_seconds is None:
        return None
    tokens = sum(len(d.ids) for d in eval_sets.values()) / sum(len(d.ids) for d in interim.values())
    return one_shot_seconds * tokens, one_shot_seconds


def _budget_plan(
    record: RunRecord,
    teacher,
    student,
    tokenizer,
    blocks,
    evaluations: tuple | None,
    stages: int,
    refit_ids,
    pool,
    eval_sets: dict,
):
    """The run's budget plan: measured now, or, on resume, the one the run fixed before (budget.json).
    ``evaluations``: :func:`_evaluation_costs` of ``eval_sets``, on which the comparison's share is counted
    (:func:`comparison_share`). ``refit_ids``: what block-wise reconstruction fits on, where the run refits
    blocks (its time is estimated). ``pool``: the teacher's samples so far (``None``: the run takes none),
    grown after for the steps fixed here, its sampling counted in the budget."""
    run = record.run
    path = record.out_dir / "budget.json"
    if run.resume and path.is_file():
        return BudgetPlan(**read_json_file(path, BudgetFile))
    if evaluations is None:
        raise TQCError(f"{path} is missing: this run cannot be resumed with --time-budget; start it again")
    stream = blocks(0)
    batch = torch.stack([next(stream) for _ in range(run.distill.batch_size)])
    step = seconds_per_step(teacher, student, batch, run.distill, tokenizer=tokenizer)
    # the comparison's speed against float differs most between CPUs, and with the rows a call multiplies: timed
    # on one batch of evaluation windows (on 2 AVX2 cores int4 read 1.28x on two sequences of 256 tokens,
    # docs/demo-ratio-results-c168667.json, and 1.03x on 4 windows of 512, quantized_forward/quantized-forward.json)
    cost, comparison = 1.0, 0.0
    if run.compare_tokens:
        cost = quantized_forward_cost(teacher, _evaluation_batch(stream, run), QUANTIZED_FORMATS[1])
        compared = comparison_share(eval_sets, run.compare_tokens, run.context)
        comparison = comparison_evaluations(compared, not run.plans_bytes, cost)
    spent = time.perf_counter() - record.started + 3 * step  # the timing itself
    after = seconds_after_distillation(*evaluations, stages, comparison)
    refit = estimated_seconds(student, refit_ids, run.distill.blockwise) if refit_ids is not None else 0.0
    pool_blocks = _pool_blocks(pool, run, stages)
    sampling = None if pool is None else (lambda steps: (pool_blocks(steps) - len(pool)) * pool.seconds_per_block)
    plan = plan_steps(run.time_budget, spent, step, evaluations[0], after, stages, refit, sampling)
    teacher_blocks = 0 if pool is None else pool_blocks(plan.steps_per_stage)
    plan = dataclasses.replace(plan, quantized_forward_cost=cost, teacher_blocks=teacher_blocks)
    if is_main_process():
        write_json_atomic(path, plan.to_dict())
    return plan


def _grow_pool(pool: TeacherPool | None, blocks: int, phase) -> None:
    """The teacher's pool grown to the ``blocks`` the budget's steps take, where it holds fewer."""
    if pool is not None and blocks > len(pool):
        phase(f"sampling the teacher: the pool grows to the {blocks} sequences those steps take")
        pool.grow(blocks)


def _evaluation_batch(stream, run: RunConfig) -> torch.Tensor:
    """``EVAL_BATCH`` windows of ``run.context`` tokens from the distillation blocks: what one forward of an
    evaluation takes."""
    tokens = EVAL_BATCH * run.context
    ids = torch.cat(list(itertools.islice(stream, math.ceil(tokens / run.distill.seq_len))))
    return ids[:tokens].reshape(EVAL_BATCH, run.context)


def _pool_blocks(pool: TeacherPool | None, run: RunConfig, stages: int):
    """``steps per stage -> the blocks the teacher's pool holds for them``: enough that distillation sees each
    at most ``TEACHER_VIEWS`` times, in whole chunks, at most the pool's cap, never fewer than it holds."""
    if pool is None:
        return None
    distill = run.distill
    per_step = distill.batch_size * distill.grad_accum * teacher_share(run.data, run.teacher_fraction) * stages
    return lambda steps: max(len(pool), pool.chunks_for(math.ceil(steps * per_step / TEACHER_VIEWS)))


def footprint(teacher, student, model_dir: Path, ids: torch.Tensor, context: int) -> dict:
    """Parameters, bytes in memory and on disk, and student/teacher time ratios (a few seconds)."""
    length = min(context, 256, len(ids))
    prompt = ids[:length].reshape(1, -1)
    return {
        "teacher": {
            "params": count_parameters(teacher),
            "memory_bytes": memory_bytes(teacher),
            "disk_bytes": memory_bytes(teacher),
        },  # what saving its tensors as they are in memory takes
        "student": {
            "params": count_parameters(student),
            "memory_bytes": memory_bytes(student),
            "disk_bytes": directory_bytes(model_dir),
        },
        "speed": speed_ratios(teacher, student, prompt),
        "disk_note": "student: the saved model dir (weights, config, tokenizer); teacher: its tensors' bytes in "
        "memory (fp32 as loaded), which is what its weights take on disk as safetensors",
    }


def _phases(started: float):
    """``(phase, log)``: ``phase(text)`` prints a phase of the run with the time elapsed so far (the bars show
    each phase's own ETA) and appends its name and start to ``log``."""
    log: list[tuple[str, float]] = []

    def phase(text: str) -> None:
        elapsed = time.perf_counter() - started
        log.append((text, elapsed))
        tqdm.write(f"[{elapsed:6.0f} s] {text}")

    return phase, log


def write_results(record: RunRecord, extras: dict | None = None) -> dict:
    """``results.json``, ``report.md`` and the plots of the run so far (``extras``: the final write)."""
    run, distill, rows = record.run, record.distill, record.points
    compression = run.compression
    result = {
        "base_model": record.source,
        "method": run.method,
        "ratio": None if run.plans_bytes else compression.ratio,
        "max_bytes": run.max_bytes,  # a byte budget instead of a ratio (planning/mixed.py)
        "max_kl": run.max_kl,  # or a fidelity target, and the search that found its byte plan
        "max_kl_search": record.max_kl_search,
        "structures": list(run.structures),
        "byte_plan": record.byte_plan,
        "stages": sorted({r["stage"] for r in rows if r["stage"] > 0}),
        "data": run.data,
        "teacher_fraction": run.teacher_fraction,
        "teacher_pool_blocks": run.teacher_pool,
        "teacher_start": run.teacher_start,
        "calibration_tokens": run.calibration_tokens,
        "eval_data": run.eval_data or TEACHER_DOMAIN,
        "interim_eval_tokens": run.interim_tokens,  # per domain, for the points during the run (0: all)
        "second_domain": f"{TEACHER_DOMAIN}: sequences sampled from the teacher (temperature 1, top-k 50, from the "
        f"start token) with seed {EVAL_SEED}, which no distillation or calibration sample uses",
        "kd_tokens_per_stage": distill.steps * distill.batch_size * distill.grad_accum * distill.seq_len,
        "distill": asdict(distill),
        "training_precision": training_precision(distill.mixed_precision),  # what "auto" meant on this machine
        "budget": record.budget,
        "compression": {k: v for k, v in asdict(compression).items() if k != "layers"},
        "counting": "every parameter counted once (tied embedding/head once); permutation index buffers excluded",
        "points": rows,
        "versions": library_versions(),
        "machine": machine_record(),
        **(extras or {}),
        "phase_seconds": _phase_seconds(record.phases, time.perf_counter() - record.started),
        "seconds": time.perf_counter() - record.started,
        "complete": extras is not None,
    }
    write_json_atomic(record.out_dir / "results.json", result)
    write_text_atomic(record.out_dir / "report.md", format_report(result))
    plot_points(rows, record.out_dir / "perplexity.png", f"{record.source}: {run.method}")
    if rows and rows[0].get("fidelity_kl") is not None:
        plot_fidelity(rows, (extras or {}).get("quantized", []), record.out_dir / "fidelity.png", record.source)
    return result


def _phase_seconds(phases: list[tuple[str, float]], now: float) -> list[dict]:
    """Each phase of this process and the seconds it took (to the next one's start, the last one's to ``now``)."""
    ends = [start for _, start in phases[1:]] + [now]
    return [{"phase": name, "seconds": round(end - start, 1)} for (name, start), end in zip(phases, ends)]


def check_student_matches_teacher(student, teacher) -> None:
    s, t = student.config, teacher.config
    for attr in ("vocab_size", "hidden_size", "model_type"):
        if getattr(s, attr, None) != getattr(t, attr, None):
            raise TQCError(
                f"student does not match the teacher ({attr}: {getattr(s, attr, None)} vs "
                f"{getattr(t, attr, None)}); compress the teacher itself to make the student"
            )
    if count_parameters(student) > count_parameters(teacher):
        raise TQCError("the student has more parameters than the teacher; is --teacher the original model?")
