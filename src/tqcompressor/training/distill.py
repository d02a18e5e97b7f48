"""Multi-step knowledge distillation: compress a group of layers, distill, compress the next, ...

Two levels: :func:`multistep_distill` is the stage loop (apply a step of the plan, train,
evaluate); :func:`train_stage` trains one stage from a :class:`TrainerState` (model, optimizer,
scheduler, position in the run and data), which is exactly what a checkpoint saves, with the RNG
state, and what resume restores. The loop is plain PyTorch driven through ``accelerate`` so that
the same code runs on a laptop CPU and under ``accelerate launch`` on many GPUs (DDP, bf16
autocast). Checkpoints are written atomically (into ``checkpoint.partial``, then renamed), so
``resume=True`` continues an interrupted run with no step lost or repeated.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tqcompressor.data import sample_blocks
from tqcompressor.errors import TQCError
from tqcompressor.modelio.checkpoint import load as load_compressed
from tqcompressor.modelio.checkpoint import save as save_compressed
from tqcompressor.outputs import RUN, check_writable, claim_directory
from tqcompressor.planning.plan import Plan
from tqcompressor.surgery.apply import apply_plan
from tqcompressor.surgery.baselines import decoder_layers
from tqcompressor.training.blockwise import BlockwiseConfig, reconstruct_blocks
from tqcompressor.training.losses import depth_mismatch, distillation_loss
from tqcompressor.versions import cpu_has_native_bf16

STATE_FILE = "trainer_state.pt"
BLOCKWISE_BLOCKS = 32  # blocks of the distillation data block-wise reconstruction fits on without calibration text
BLOCK_CHECKPOINT_SECONDS = 60.0  # block-wise reconstruction saves at most this often (a save takes seconds)
MAX_BATCH_TOKENS = 1 << 24  # tokens in one micro-batch; the memory check refines it once the model is known
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillConfig:
    steps: int = 100  # optimizer steps per compression stage
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    clip: float = 1.0
    temperature: float = 2.0
    # loss = alpha_kl * T^2 * KL(teacher || student) + alpha_ce * CE + alpha_hidden * (1 - cos(hidden))
    #        + alpha_blocks * (every block's output matched, see losses.block_matching_loss)
    # (the 5 : 2 : 1 weighting of DistilBERT/DistilGPT-2; the hidden-state terms are off by default)
    alpha_kl: float = 5.0
    alpha_ce: float = 2.0
    # the share of the KL term taken in reverse, KL(student || teacher): 0 forward (the default), 1 reverse (as in
    # MiniLLM and generalized KD), between them a mix (losses.LogitDistillation)
    reverse_kl: float = 0.0
    # the share of optimizer steps whose blocks the student samples itself, scored by the teacher (on-policy, as in
    # generalized KD): the student learns the teacher's answer where its own generations go, not only on given text
    on_policy: float = 0.0
    alpha_hidden: float = 0.0
    alpha_blocks: float = 0.0
    # before each stage's distillation, Adam steps per decoder block fitting it to the teacher's block, first to
    # last, on the calibration text (training/blockwise.py; 0: off), at this learning rate
    blockwise_steps: int = 0
    blockwise_lr: float = 1e-4
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # bf16 where the hardware computes it natively, else fp32 (training_precision)
    # the teacher's weights: fp32 | bf16 | fp16 | auto (teacher_weights_dtype: bf16 on a GPU, fp32 on a CPU)
    teacher_dtype: str = "auto"
    # the KL and CE terms a few rows of logits at a time, gradient in the same pass (losses.LogitDistillation);
    # False: the textbook whole-batch form, the same loss to float rounding (bench/throughput.py's baseline)
    chunked_loss: bool = True
    fused_optimizer: bool = True  # AdamW's fused kernel where available (new_optimizer); False: the for-each one

    @property
    def blockwise(self) -> BlockwiseConfig:
        """The settings of block-wise reconstruction before each stage (on batches of the run's batch size)."""
        return BlockwiseConfig(self.blockwise_steps, self.blockwise_lr, self.batch_size)

    @property
    def pairs_blocks(self) -> bool:
        """Block matching or block-wise reconstruction: each student block is paired with the teacher's."""
        return self.alpha_blocks > 0 or self.blockwise_steps > 0

    def __post_init__(self) -> None:
        """One clear line for a setting that cannot work (instead of a torch traceback later, or
        a run that silently trains nothing)."""
        for name, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise TQCError(f"{name.replace('_', '-')} must be a finite number, got {value}")
            if isinstance(value, int) and not -(2**63) < value < 2**63:  # what tensors and schedules can count
                raise TQCError(f"{name.replace('_', '-')} is out of range, got {value}")
        if not 0 <= self.seed < 2**63:
            raise TQCError(f"seed must be in [0, 2^63), got {self.seed}")
        for name in ("lr", "blockwise_lr"):
            value, option = getattr(self, name), name.replace("_", "-")
            if value >= 1:
                raise TQCError(
                    f"{option} {value} would diverge at once (Adam steps are about lr per weight); use e.g. 1e-4"
                )
            if not value > 0:
                raise TQCError(f"{option} must be a positive learning rate, got {value}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every", "temperature"):
            if not getattr(self, name) > 0:
                raise TQCError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "clip", "alpha_kl", "alpha_ce", "alpha_hidden", "alpha_blocks")
        for name in (*non_negative, "blockwise_steps"):
            if not getattr(self, name) >= 0:
                raise TQCError(f"{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("reverse_kl", "on_policy"):
            if not 0 <= getattr(self, name) <= 1:
                raise TQCError(
                    f"{name.replace('_', '-')} is a share: give a number from 0 to 1, got {getattr(self, name)}"
                )
        if self.batch_size * self.seq_len > MAX_BATCH_TOKENS:
            raise TQCError(
                f"a micro-batch of {self.batch_size} x {self.seq_len} tokens is past what any device holds "
                f"({MAX_BATCH_TOKENS:,} tokens); lower --batch-size and use --grad-accum for a larger effective batch"
            )
        if self.alpha_kl + self.alpha_ce + self.alpha_hidden + self.alpha_blocks <= 0:
            raise TQCError(
                "the distillation loss has no term: give alpha_kl, alpha_ce, alpha_hidden or alpha_blocks a weight"
            )
        if self.teacher_dtype not in (*TEACHER_DTYPES, "auto"):
            raise TQCError(
                f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)} or auto, got {self.teacher_dtype!r}"
            )
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise TQCError(f"mixed-precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")


def check_memory(config: DistillConfig, model_config, device: str | torch.device = "cpu") -> None:
    """Refuse a batch that cannot fit before any work starts: the logits of teacher and student
    (fp32, with their softmax and gradient: about four copies of batch x seq_len x vocab) and the
    activations kept for the backward pass, against the device's whole memory."""
    vocab = getattr(model_config, "vocab_size", 0) or 0
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 0) or 0
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 0) or 0
    tokens = config.batch_size * config.seq_len
    needed = tokens * (16 * vocab + 64 * hidden * layers)
    device = torch.device(device)
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise TQCError(
            f"a batch of {config.batch_size} x {config.seq_len} tokens needs about {needed / 2**30:.1f} GiB for "
            f"logits and activations, more than the {available / 2**30:.1f} GiB this {device.type} has: lower "
            "--batch-size (use --grad-accum to keep the effective batch)"
        )


def training_precision(requested: str, cuda: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """The autocast precision of training: ``requested`` unless it is ``"auto"``, which means bf16 on
    a GPU and on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX), and fp32 elsewhere, where
    bf16 is emulated and slower. On 2 cores with AVX512-BF16 SmolLM2 distilled at 1.66x the tokens
    per second of fp32, to the same student (bench/results/recipe/recipe-precision.json). Master
    weights, the optimizer and the loss stay fp32 either way; only the matmuls inside the teacher's and
    the student's forward (and the student's backward) run in bf16."""
    if requested != "auto":
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    cpu_bf16 = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    return "bf16" if cuda or cpu_bf16 else "no"


def teacher_weights_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The teacher's weights in training: ``requested``, where ``"auto"`` means bf16 on a GPU (half the
    memory and none of autocast's per-step weight casts; its logits moved by KL 0.004 nats/token from the
    fp32 teacher's under autocast, bench/results/throughput/throughput.json) and fp32 on a CPU, where the casts cost
    little and the teacher stays exactly the one the student is scored against."""
    if requested == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TEACHER_DTYPES[requested]


def _forget_other_precision(precision: str) -> None:
    """accelerate keeps one precision per process and refuses another; a process that distils twice
    (a benchmark, a test session) may ask for two. Its process group (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


BlockSource = Callable[[int], Iterator[torch.Tensor]]  # start block index -> endless stream of token blocks


def check_same_depth(student, teacher) -> None:
    """Block matching pairs block i of the student with block i of the teacher: refuse, before any
    work, a student of another depth (layer dropping)."""
    depths = [getattr(getattr(m, "config", None), "num_hidden_layers", None) for m in (student, teacher)]
    if None not in depths and depths[0] != depths[1]:
        raise depth_mismatch(*depths)


@dataclass
class Position:
    """Where a run is: stage, steps done, blocks of data consumed."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    data_position: int = 0
    stage_compressed: bool = False  # this stage's layers are factored already
    blocks_refit: int = 0  # this stage's decoder blocks refit to the teacher's so far (blockwise_steps)


@dataclass
class TrainerState:
    """What one stage of training changes: the model (as prepared by ``accelerate``), its optimizer
    and schedule, and the position. A checkpoint saves this and the torch RNG state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    position: Position = field(default_factory=Position)


@dataclass
class RunOutputs:
    """Where a run writes, and what identifies it."""

    checkpoint: Path
    metrics: Path
    fingerprint: str
    tokenizer: Any = None
    plan: Plan | None = None


def run_fingerprint(teacher_name: str, data_name: str, plan: Plan | None, distill: DistillConfig) -> str:
    """Identifies a run, so that ``resume`` refuses a checkpoint of a different one."""
    compression = (
        None
        if plan is None
        else {
            "layers": plan.to_list(),
            "method": plan.method,
            "tie_lm_head": plan.tie_lm_head,
            "max_iterations": plan.max_iterations,
        }
    )
    payload = {
        "teacher": teacher_name,
        "data": data_name,
        "stages": plan.steps() if plan else [1],
        "compression": compression,
        "distill": _fingerprinted(distill),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprinted(distill: DistillConfig) -> dict:
    """The settings that make a run what it is: not how often it logs or saves; block-wise reconstruction's
    only where it is on (a run from before it existed resumes as it was)."""
    settings = asdict(distill) | {"checkpoint_every": None, "log_every": None}
    if distill.blockwise_steps == 0:
        del settings["blockwise_steps"], settings["blockwise_lr"]
    return settings


def multistep_distill(
    teacher,
    student,
    blocks: BlockSource,
    config: DistillConfig,
    out_dir: str | Path,
    plan: Plan | None = None,
    resume: bool = False,
    tokenizer=None,
    teacher_name: str = "teacher",
    data_name: str = "data",
    stop_after: int | None = None,
    on_stage_end: Callable[[int, object], None] | None = None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    on_phase: Callable[[str], None] | None = None,
):
    """Distill ``student`` from ``teacher``; with a ``plan`` the student is compressed stage by
    stage (the plan's ``step`` numbers) and distilled ``config.steps`` steps after each stage.

    ``stop_after`` ends the run after that many optimizer steps in total (to simulate an
    interruption in tests). ``calibration`` (token ids) fits the layers of every stage after the first
    to the inputs they see in the distilled student, so a resumed run compresses exactly as an
    uninterrupted one. ``on_phase(text)`` is told when each stage's block refit and distillation begin
    (the main job's phase log). Returns the student (unwrapped, on the training device).
    """
    on_phase = on_phase or (lambda text: None)
    _check_run(config, student, teacher, tokenizer)  # before any work
    accelerator = _accelerator(config, teacher)
    fingerprint = run_fingerprint(teacher_name, data_name, plan, config)
    outputs = RunOutputs(Path(out_dir) / "checkpoint", Path(out_dir) / "metrics.jsonl", fingerprint, tokenizer, plan)
    student, position, saved = _opened(Path(out_dir), outputs, student, resume, accelerator)
    target = _training_teacher(teacher, config, accelerator)
    _seed(config, saved)
    stages = plan.steps() if plan is not None else [1]
    stream = _sharded(blocks(position.data_position), accelerator)
    for stage_index in range(position.stage_index, len(stages)):
        stage = stages[stage_index]
        if plan is not None and not (position.stage_index == stage_index and position.stage_compressed):
            _compress_stage(student, teacher, plan, stage, stage_index, calibration, progress)
        position.stage_index, position.stage_compressed = stage_index, True
        _refit_blocks(
            student, target, calibration, blocks, config, accelerator, outputs, position, progress, stage, on_phase
        )
        trainer = _new_trainer(student, config, accelerator, position, saved if position.stage_step > 0 else None)
        saved = None
        on_phase(f"distilling (stage {stage})")
        finished = train_stage(trainer, target, stream, stage, config, accelerator, outputs, stop_after, progress)
        student = _without_autocast(accelerator.unwrap_model(trainer.model))
        if not finished:
            return student
        student.eval()
        del trainer
        accelerator.free_memory()  # the accelerator keeps references to what it prepared
        if on_stage_end is not None:
            on_stage_end(stage, student)
        position.stage_index, position.stage_step, position.stage_compressed = stage_index + 1, 0, False
        position.blocks_refit = 0
    return student


def _opened(out_dir: Path, outputs: RunOutputs, student, resume: bool, accelerator) -> tuple:
    """``(student, position, saved)`` where the run begins: fresh, or from its checkpoint; the run dir claimed
    (by the main process; every process refuses a user's directory) and its metrics cut back to the checkpoint."""
    check_writable(out_dir, kind=RUN)
    student, position, saved = _resumed(outputs) if resume else (student, Position(), None)
    if accelerator.is_main_process:
        claim_directory(out_dir, kind=RUN)
        _keep_metrics_until(outputs.metrics, position.global_step)  # steps after the checkpoint run again: once
    accelerator.wait_for_everyone()
    return student, position, saved


def _check_run(config: DistillConfig, student, teacher, tokenizer) -> None:
    if config.pairs_blocks:
        check_same_depth(student, teacher)
    if config.on_policy > 0:
        _require_tokenizer(tokenizer)


def _refit_blocks(
    student,
    teacher,
    calibration,
    blocks: BlockSource,
    config: DistillConfig,
    accelerator,
    outputs,
    position,
    progress,
    stage: int,
    on_phase: Callable[[str], None],
) -> None:
    """Block-wise reconstruction of the stage's student before its distillation (training/blockwise.py),
    where asked, from the first block not yet refit; a checkpoint at most every BLOCK_CHECKPOINT_SECONDS and
    after the last block, so that a resumed run neither loses nor repeats a refit block. Under several processes
    each refits every block on the run's global batches (the refit is not sharded), so that all stay alike and
    alike to one process; the main one decides when to checkpoint, and the others wait with it."""
    if config.blockwise_steps == 0 or position.stage_step > 0 or position.blocks_refit >= len(decoder_layers(student)):
        return
    on_phase(f"refitting blocks (stage {stage})")
    ids = blockwise_ids(calibration, blocks)
    student.to(accelerator.device)
    last_saved = time.perf_counter()

    def block_done(index: int) -> None:
        nonlocal last_saved
        position.blocks_refit = index + 1
        due = position.blocks_refit == len(decoder_layers(student))
        due = due or time.perf_counter() - last_saved >= BLOCK_CHECKPOINT_SECONDS
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list  # slow to import: only where it is needed

            due = broadcast_object_list([due])[0]  # one decision: every process waits at the same block
        if due:
            if accelerator.is_main_process:
                _save_checkpoint(outputs, position, student)
            accelerator.wait_for_everyone()
            last_saved = time.perf_counter()

    settings = replace(config.blockwise, batch_size=config.batch_size * accelerator.num_processes)
    reconstruct_blocks(student, teacher, ids, settings, progress, position.blocks_refit, block_done)


def blockwise_ids(calibration: torch.Tensor | None, blocks: BlockSource) -> torch.Tensor:
    """What block-wise reconstruction fits on: the calibration text, else the first BLOCKWISE_BLOCKS blocks of
    the distillation data."""
    if calibration is not None:
        return calibration
    stream = blocks(0)
    return torch.stack([next(stream) for _ in range(BLOCKWISE_BLOCKS)])


def _resumed(outputs: RunOutputs) -> tuple:
    """The student, position and saved state of the run's newest readable checkpoint."""
    student, saved = _load_checkpoint(outputs.checkpoint, outputs.fingerprint)
    return student, Position(**{k: saved[k] for k in asdict(Position()) if k in saved}), saved


def _accelerator(config: DistillConfig, teacher):
    """The ``accelerate`` state of the run: its precision, accumulation, device; memory checked on it."""
    from accelerate import Accelerator  # imported when training starts: it is slow to import

    precision = training_precision(config.mixed_precision)
    _forget_other_precision(precision)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum)
    check_memory(config, teacher.config, accelerator.device)
    return accelerator


def _training_teacher(teacher, config: DistillConfig, accelerator):
    """What the student trains against, in its training dtype. The teacher only runs forward: never
    wrapped for DDP, never holding gradients. The caller's teacher keeps its dtype (a copy is made when
    it differs), since the evaluations during and after the run score the student against it."""
    teacher.to(accelerator.device).eval().requires_grad_(False)
    dtype = teacher_weights_dtype(config.teacher_dtype, accelerator.device)
    return teacher if next(teacher.parameters()).dtype == dtype else copy.deepcopy(teacher).to(dtype)


def _seed(config: DistillConfig, saved: dict | None) -> None:
    """The run's seed, or on resume the random state its checkpoint saved."""
    if saved is None:
        torch.manual_seed(config.seed)
        return
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _compress_stage(student, teacher, plan: Plan, stage: int, stage_index: int, calibration, progress: bool) -> None:
    """Factor this stage's layers of the student, in place (on the CPU, where the fits run)."""
    student.to("cpu")
    # factors fitted before distilling are stale after it: refit them to the distilled student
    stage_plan = plan.without_factors(stage) if calibration is not None and stage_index > 0 else plan
    refit_from = teacher if plan.sequential else None  # block by block, to the teacher's outputs
    apply_plan(student, stage_plan, step=stage, calibration=calibration, progress=progress, teacher=refit_from)


def _without_autocast(model):
    """``accelerator.prepare`` puts an autocast wrapper on the model's own ``forward`` (kept by
    ``unwrap_model``); put the original back, so that what follows training (evaluation, timing)
    runs in the model's precision. (``unwrap_model(keep_fp32_wrapper=False)`` would also strip the
    decorators transformers puts on ``forward``.)"""
    original = vars(model).pop("_original_forward", None)
    if original is not None:
        model.forward = original
    return model


def new_optimizer(student: torch.nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over the student's parameters; the fused kernel (one pass over all parameters instead of
    a dozen elementwise passes) where this PyTorch has it for the parameters' device: on 2 CPU cores
    the update took a tenth of a step unfused (bench/results/throughput/throughput.json)."""
    params = list(student.parameters())
    fused = config.fused_optimizer and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def _new_trainer(student, config: DistillConfig, accelerator, position: Position, saved: dict | None) -> TrainerState:
    """Optimizer and schedule for one stage, restored from a checkpoint taken inside it."""
    student.to(accelerator.device).requires_grad_(True)  # a copy of the (frozen) teacher starts frozen
    optimizer = new_optimizer(student, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    # the scheduler is not prepared: accelerate would step it once per process, and the schedule is
    # defined per optimizer step whatever the number of processes
    model, optimizer = accelerator.prepare(student, optimizer)
    return TrainerState(model, optimizer, scheduler, position)


def train_stage(
    trainer: TrainerState,
    teacher,
    stream: Iterator[torch.Tensor],
    stage: int,
    config: DistillConfig,
    accelerator,
    outputs: RunOutputs,
    stop_after: int | None = None,
    progress: bool = True,
) -> bool:
    """Train until the stage has ``config.steps`` optimizer steps; log every ``log_every`` and
    checkpoint every ``checkpoint_every`` steps. Returns False when ``stop_after`` cut it short."""
    model, position = trainer.model, trainer.position
    model.train()
    bar = tqdm(
        total=config.steps,
        initial=position.stage_step,
        desc=f"distill stage {stage}",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    started, tokens = time.perf_counter(), 0
    while position.stage_step < config.steps:
        if stop_after is not None and position.global_step >= stop_after:
            return False
        on_policy = is_on_policy_step(position.global_step, config.on_policy)
        for micro in range(config.grad_accum):
            if on_policy:  # the data stream is not read: a resumed run reads on where it stopped
                seed = _on_policy_seed(config, position.global_step, micro, accelerator.process_index)
                batch = student_samples(accelerator.unwrap_model(model), outputs.tokenizer, config, seed)
            else:
                batch = torch.stack([next(stream) for _ in range(config.batch_size)])
                position.data_position += config.batch_size * accelerator.num_processes
            batch = batch.to(accelerator.device)
            parts = _micro_step(trainer, teacher, batch, stage, config, accelerator, outputs)
            tokens += batch.numel() * accelerator.num_processes
        position.stage_step += 1
        position.global_step += 1
        rate = tokens / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{parts['loss'].item():.3f}", kl=f"{parts['kl'].item():.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if position.stage_step % config.log_every == 0 or position.stage_step == config.steps:
            _log_metrics(parts, trainer, stage, rate, accelerator, outputs)
        if position.stage_step % config.checkpoint_every == 0 or position.stage_step == config.steps:
            if accelerator.is_main_process:
                _save_checkpoint(outputs, trainer.position, accelerator.unwrap_model(model), trainer)
            accelerator.wait_for_everyone()
    bar.close()
    return True


def is_on_policy_step(global_step: int, share: float) -> bool:
    """Whether optimizer step ``global_step`` (from 0) trains on the student's own samples: ``share`` of the
    steps, spread evenly (step k is one when ``floor((k + 1)·share)`` passes a whole number)."""
    return math.floor((global_step + 1) * share) > math.floor(global_step * share)


def _on_policy_seed(config: DistillConfig, global_step: int, micro: int, process: int) -> int:
    # a seed of its own per step, micro-batch and process: a resumed run samples what the run it continues would
    # have (a tuple of ints hashes the same in every process)
    return hash((config.seed, global_step, micro, process)) % 2**63


def student_samples(student, tokenizer, config: DistillConfig, seed: int) -> torch.Tensor:
    """``config.batch_size`` blocks of ``config.seq_len`` tokens the student samples itself (temperature 1,
    top-k 50, after the start token, as the teacher's samples), seeded; the student's mode is kept."""
    _require_tokenizer(tokenizer)
    mode = student.training
    student.eval()
    try:
        blocks = sample_blocks(
            student, tokenizer, config.batch_size, config.seq_len, seed, batch_size=config.batch_size
        )
        return torch.stack(list(blocks))
    finally:
        student.train(mode)


def _require_tokenizer(tokenizer) -> None:
    if tokenizer is None:  # sampling begins from its start token and pads with its end token
        raise TQCError("on-policy distillation samples from the student: give the run its tokenizer")


def _micro_step(
    trainer: TrainerState, teacher, batch: torch.Tensor, stage: int, config: DistillConfig, accelerator, outputs
) -> dict[str, torch.Tensor]:
    """One micro-batch: the teacher's outputs, the student's loss and its gradient; the optimizer
    steps when the accumulated batch is complete. A loss that is not finite stops the run first."""
    model, optimizer, scheduler, position = trainer.model, trainer.optimizer, trainer.scheduler, trainer.position
    with accelerator.accumulate(model), accelerator.autocast():
        hidden = config.alpha_hidden > 0 or config.alpha_blocks > 0
        with torch.no_grad():
            teacher_out = teacher(batch, output_hidden_states=hidden)
        parts = distillation_loss(model(batch, output_hidden_states=hidden), teacher_out, batch, config)
        if not torch.isfinite(parts["loss"]):  # before the step: the weights stay as last checkpointed
            raise TQCError(
                f"the distillation loss became {parts['loss'].item()} at step {position.global_step + 1} "
                f"(stage {stage}); training stopped, the last good checkpoint in {outputs.checkpoint.parent} "
                "is kept: lower --lr (or --temperature, --alpha-blocks) and resume from it with --resume"
            )
        accelerator.backward(parts["loss"])
        if accelerator.sync_gradients and config.clip:
            accelerator.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad()
    return parts


def _log_metrics(parts: dict, trainer: TrainerState, stage: int, rate: float, accelerator, outputs) -> None:
    """One line of metrics.jsonl: the losses of the whole global batch, every process's averaged (a
    collective: every process calls it; the main one writes)."""
    losses = accelerator.reduce({k: v.detach() for k, v in parts.items()}, reduction="mean")
    if not accelerator.is_main_process:
        return
    position = trainer.position
    record = {
        "stage": stage,
        "step": position.stage_step,
        "global_step": position.global_step,
        "lr": trainer.scheduler.get_last_lr()[0],
        "tokens_per_s": rate,
        **{k: float(v) for k, v in losses.items()},
    }
    with outputs.metrics.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _keep_metrics_until(path: Path, global_step: int) -> None:
    """Drop the records after ``global_step`` (all of them for a fresh run), atomically; a line cut
    off by a kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= global_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _sharded(stream: Iterator[torch.Tensor], accelerator) -> Iterator[torch.Tensor]:
    """Each process takes every ``num_processes``-th block, so DDP ranks see different data."""
    if accelerator.num_processes == 1:
        return stream
    return itertools.islice(stream, accelerator.process_index, None, accelerator.num_processes)


def _save_checkpoint(outputs: RunOutputs, position: Position, student, trainer: TrainerState | None = None) -> None:
    """Write ``checkpoint.partial``, then rename: the last good checkpoint becomes
    ``checkpoint.previous`` (kept, in case the new one is damaged later) and the new one ``checkpoint``.
    Without a ``trainer`` (between distillation stages' steps: block-wise reconstruction) no optimizer state."""
    if not all(torch.isfinite(p).all() for p in student.parameters()):
        raise TQCError(
            "the student's weights are no longer finite; training stopped without overwriting the last good "
            f"checkpoint in {outputs.checkpoint.parent}: lower --lr and resume with --resume"
        )
    path = outputs.checkpoint
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_compressed(student, partial / "model", outputs.tokenizer, plan=outputs.plan)
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(
        {
            **asdict(position),
            "fingerprint": outputs.fingerprint,
            **(
                {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()}
                if trainer is not None
                else {}
            ),
            **rng,
        },
        partial / STATE_FILE,
    )
    previous = path.with_name(path.name + ".previous")
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(path, previous)
    os.replace(partial, path)


def _load_checkpoint(path: Path, fingerprint: str):
    """The newest readable checkpoint: ``checkpoint``, else ``checkpoint.previous`` (interrupted
    between the renames, or the newest one damaged). One line when none can be read."""
    damaged = []
    for candidate in (path, path.with_name(path.name + ".previous")):
        if not (candidate / STATE_FILE).is_file():
            continue
        try:
            state = torch.load(candidate / STATE_FILE, weights_only=True)
            model = load_compressed(candidate / "model")
        except (TQCError, RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            damaged.append(f"{candidate} ({type(exc).__name__})")
            continue
        if state.get("fingerprint") != fingerprint:
            raise TQCError(
                f"{candidate} belongs to another run (different teacher, data, plan or settings); "
                "use a new --out dir or the original settings"
            )
        if damaged:
            tqdm.write(f"warning: {damaged[0]} cannot be read; resuming from the previous checkpoint, {candidate}")
        return model, state
    if damaged:
        raise TQCError(
            f"cannot read the checkpoint {' or '.join(damaged)}; it is damaged: run again without "
            "--resume (or into a new --out dir)"
        )
    raise TQCError(f"nothing to resume: {path} holds no checkpoint; run without --resume")
