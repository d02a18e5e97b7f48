"""A main job that ends inside a time budget (``tqc run --time-budget MINUTES``).

Everything before distillation (sampling, calibration, planning, the one-shot evaluation) runs as
it is and is timed. Then one distillation step of the run's own settings is timed on the model
about to be trained, the time still needed after distillation is estimated from the evaluation
just measured (:func:`seconds_after_distillation`), and the number of steps per
stage is fixed so that the whole job ends inside the budget. The schedule (warm-up, cosine) is
then the ordinary one for that many steps. The plan is written to ``budget.json`` so that a
resumed run keeps it instead of measuring again on another machine state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from tqcompressor.errors import TQCError
from tqcompressor.quant.api import quantize_
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.training.distill import DistillConfig, new_optimizer, student_samples, training_precision
from tqcompressor.training.losses import distillation_loss

SAFETY = 1.1  # logging, checkpoints and the data stream are not in the timed step
# saving the model, the plan picture, continuations and the speed ratios: in make demo on 2 CPU cores the
# comparison and these took 267 s together, against the comparison's own estimate of 285 s (1.9 evaluations)
RESERVE_EVALUATIONS, RESERVE_SECONDS = 0.25, 5.0


@dataclass(frozen=True)
class BudgetPlan:
    """How a run spends its budget (all times in seconds)."""

    budget: float
    spent_before_distillation: float
    seconds_per_step: float
    evaluation_seconds: float  # one evaluation on every window, estimated from the one-shot model's
    reserved_after_distillation: float
    stages: int
    steps_per_stage: int
    blockwise_seconds_per_stage: float = 0.0  # block-wise reconstruction before each stage's steps (estimated)
    quantized_forward_cost: float = 1.0  # a quantized copy's forward over the float model's (the comparison's)
    teacher_blocks: int = 0  # the teacher samples the pool holds for these steps (0: the run takes none)
    sampling_seconds: float = 0.0  # to sample those the pool lacked when the budget was fixed (estimated)

    def to_dict(self) -> dict:
        return asdict(self)


def seconds_per_step(
    teacher, student, batch: torch.Tensor, config: DistillConfig, repeats: int = 2, tokenizer=None
) -> float:
    """Wall seconds of one optimizer step under ``config`` on ``batch``, after one warm-up: the
    teacher's forward and the student's forward and backward ``grad_accum`` times, clipping and the
    AdamW update (a fifth of a step on 2 CPU cores, so it is timed too), plus, with on-policy steps,
    their share of the student's sampling (timed once). It trains a copy: the student itself is left
    as it was."""
    precision = training_precision(config.mixed_precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device = next(student.parameters()).device

    def autocast():  # what training's autocast does: off in fp32
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    hidden = config.alpha_hidden > 0 or config.alpha_blocks > 0
    probe = copy.deepcopy(student).train().requires_grad_(True)
    optimizer = new_optimizer(probe, config)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for _ in range(config.grad_accum):
            with autocast():
                with torch.no_grad():
                    teacher_out = teacher(batch, output_hidden_states=hidden)
                loss = distillation_loss(probe(batch, output_hidden_states=hidden), teacher_out, batch, config)
            loss["loss"].backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    sampling = 0.0
    if config.on_policy > 0:
        started = time.perf_counter()
        with autocast():
            student_samples(probe, tokenizer, config, seed=config.seed)
        sampling = (time.perf_counter() - started) * config.grad_accum * config.on_policy
    del probe, optimizer
    return min(timings[1:]) + sampling


def quantized_forward_cost(model, batch: torch.Tensor, settings: QuantizeSettings) -> float:
    """How many float forwards of ``model`` on ``batch`` one forward of a ``settings`` copy of it takes, each
    timed once after a short warm-up (the copy's first call lays its integers out for the kernels); ``batch``
    shaped as the calls to be estimated (their rows decide which way a quantized matrix multiplies). The quantized
    comparison's models run PyTorch's weight-only kernels, which take bfloat16, or, on a CPU that emulates it,
    float32 matmuls of the dequantized matrices (:data:`~tqcompressor.quant.modules.DEQUANTIZE_ROWS`): their
    speed against float differs most between CPUs."""
    quantized = copy.deepcopy(model)
    quantize_(quantized, settings)
    seconds = []
    with torch.no_grad():
        for forward in (model, quantized):
            forward(batch[:1, :8])  # a warm-up a few tokens long: a whole batch would double the timing's cost
            started = time.perf_counter()
            forward(batch)
            seconds.append(time.perf_counter() - started)
    del quantized
    return seconds[1] / max(seconds[0], 1e-9)


def seconds_after_distillation(
    evaluation_seconds: float, interim_seconds: float, stages: int, comparison_evaluations: float
) -> float:
    """What the run still needs once its last step is taken: a point on the interim windows after each
    stage but the last (``interim_seconds`` each), the last on every window (``evaluation_seconds``), the
    quantized comparison (``comparison_evaluations`` full evaluations' worth) and saving and the rest
    (a reserve)."""
    full = evaluation_seconds * (1 + comparison_evaluations + RESERVE_EVALUATIONS)
    return full + interim_seconds * (stages - 1) + RESERVE_SECONDS


def plan_steps(
    budget_minutes: float,
    spent: float,
    step_seconds: float,
    evaluation_seconds: float,
    after: float,
    stages: int,
    blockwise_seconds: float = 0.0,
    sampling: Callable[[int], float] | None = None,
) -> BudgetPlan:
    """The steps per stage that fit: what is left after ``spent``, after the ``after`` seconds still needed
    once distillation ends (:func:`seconds_after_distillation`) and after each stage's block-wise
    reconstruction (``blockwise_seconds`` a stage), over the step's time and, where ``sampling`` is given,
    the seconds that many steps per stage spend sampling more teacher data (``sampling(steps)``)."""
    budget = budget_minutes * 60
    available = budget - spent - after - blockwise_seconds * SAFETY * stages
    per_step = step_seconds * SAFETY * stages
    steps = math.floor(available / per_step) if available > 0 else 0
    if sampling is not None:
        steps = _most_that_fit(steps, lambda n: n * per_step + sampling(n) <= available)
    if steps < 1:
        # the least whole minutes that fit one step a stage, as measured on this machine
        least = math.ceil((spent + after + (blockwise_seconds + step_seconds) * SAFETY * stages) / 60)
        raise TQCError(
            f"--time-budget {budget_minutes:g} min leaves no time to distill: {spent / 60:.1f} min went to "
            f"sampling, planning and evaluating, {after / 60:.1f} min are needed after distillation, "
            f"{blockwise_seconds * stages / 60:.1f} min to refit blocks, and one step takes {step_seconds:.1f} s; "
            f"give at least {least} min on this machine, or fewer --eval-tokens / --compare-tokens / "
            "--blockwise-steps"
        )
    sampling_seconds = sampling(steps) if sampling is not None else 0.0
    plan = BudgetPlan(budget, spent, step_seconds, evaluation_seconds, after, stages, steps, blockwise_seconds)
    return dataclasses.replace(plan, sampling_seconds=sampling_seconds)


def _most_that_fit(most: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n`` in ``[0, most]`` for which ``fits(n)`` (``fits`` true up to some ``n``, false after)."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low
