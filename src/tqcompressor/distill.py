"""Multi-step knowledge distillation: compress a group of layers, distill, compress the next, ...

The loop is plain PyTorch driven through ``accelerate`` so that the same code runs on a laptop CPU
and under ``accelerate launch`` on many GPUs (DDP, bf16 autocast). Checkpoints are written
atomically (into ``checkpoint.partial``, then renamed) with the model, optimizer, scheduler, data
position and RNG state, so ``resume=True`` continues an interrupted run with no step lost or
repeated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tqcompressor.checkpoint import load as load_compressed
from tqcompressor.checkpoint import save as save_compressed
from tqcompressor.config import CompressionConfig
from tqcompressor.errors import TQCError
from tqcompressor.surgery import compress

STATE_FILE = "trainer_state.pt"


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
    # (the 5 : 2 : 1 weighting of DistilBERT/DistilGPT-2; the hidden-state term is off by default on CPU)
    alpha_kl: float = 5.0
    alpha_ce: float = 2.0
    alpha_hidden: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU


BlockSource = Callable[[int], Iterator[torch.Tensor]]  # start block index -> endless stream of token blocks


def distillation_loss(student_out, teacher_out, input_ids: torch.Tensor, config: DistillConfig) -> dict[str, torch.Tensor]:
    """The weighted KD loss on next-token predictions; returns the total and its parts."""
    s_logits = student_out.logits[:, :-1].float()
    t_logits = teacher_out.logits[:, :-1].float()
    vocab = s_logits.shape[-1]
    temp = config.temperature
    kl = F.kl_div(F.log_softmax(s_logits / temp, -1).reshape(-1, vocab),
                  F.log_softmax(t_logits / temp, -1).reshape(-1, vocab),
                  log_target=True, reduction="batchmean") * temp ** 2
    ce = F.cross_entropy(s_logits.reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    parts = {"kl": kl, "ce": ce}
    total = config.alpha_kl * kl + config.alpha_ce * ce
    if config.alpha_hidden > 0:
        s_h, t_h = student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float()
        parts["hidden"] = 1 - F.cosine_similarity(s_h, t_h, dim=-1).mean()
        total = total + config.alpha_hidden * parts["hidden"]
    parts["loss"] = total
    return parts


def run_fingerprint(teacher_name: str, data_name: str, compression: CompressionConfig | None,
                    distill: DistillConfig, stages: list[int]) -> str:
    """Identifies a run, so that ``resume`` refuses a checkpoint of a different one."""
    payload = {"teacher": teacher_name, "data": data_name, "stages": stages,
               "compression": repr(compression), "distill": asdict(distill) | {"checkpoint_every": None, "log_every": None}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def multistep_distill(
    teacher,
    student,
    blocks: BlockSource,
    config: DistillConfig,
    out_dir: str | Path,
    compression: CompressionConfig | None = None,
    resume: bool = False,
    tokenizer=None,
    teacher_name: str = "teacher",
    data_name: str = "data",
    stop_after: int | None = None,
    on_stage_end: Callable[[int, object], None] | None = None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
):
    """Distill ``student`` from ``teacher``; with ``compression`` the student is compressed stage by
    stage (the plan's ``step`` numbers) and distilled ``config.steps`` steps after each stage.

    ``stop_after`` ends the run after that many optimizer steps in total (to simulate an
    interruption in tests). ``calibration`` (token ids) fits the layers of every stage after the first
    to the inputs they see in the distilled student, so a resumed run compresses exactly as an
    uninterrupted one. Returns the student (unwrapped, on the training device).
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = _stages(student, compression)
    fingerprint = run_fingerprint(teacher_name, data_name, compression, config, stages)
    state = {"stage_index": 0, "stage_step": 0, "global_step": 0, "data_position": 0, "fingerprint": fingerprint,
             "stage_compressed": False}
    checkpoint = out_dir / "checkpoint"
    trainer_state = None
    if resume:
        student, trainer_state = _load_checkpoint(checkpoint, fingerprint)
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum)
    teacher.to(accelerator.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if trainer_state is None:
        torch.manual_seed(config.seed)
    else:
        torch.set_rng_state(trainer_state["torch_rng"])

    metrics_path = out_dir / "metrics.jsonl"
    stream = _sharded(blocks(state["data_position"]), accelerator)
    for stage_index in range(state["stage_index"], len(stages)):
        stage = stages[stage_index]
        if compression is not None and not (state["stage_index"] == stage_index and state["stage_compressed"]):
            student.to("cpu")
            if calibration is not None and stage_index > 0:  # factors fitted before distilling are stale now
                cache = getattr(student, "tqc_factor_cache", {})
                for name in [name for name, spec in student.tqc_plan if spec.step == stage]:
                    cache.pop(name, None)
            compress(student, compression, step=stage, progress=progress, calibration=calibration)
        state.update(stage_index=stage_index, stage_compressed=True)
        student.to(accelerator.device).requires_grad_(True)  # a copy of the (frozen) teacher starts frozen
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
        if trainer_state is not None and state["stage_step"] > 0:
            optimizer.load_state_dict(trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
        trainer_state = None
        model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
        model.train()
        bar = tqdm(total=config.steps, initial=state["stage_step"], desc=f"distill stage {stage}",
                   unit="step", disable=not (progress and accelerator.is_main_process))
        started, tokens = time.perf_counter(), 0
        while state["stage_step"] < config.steps:
            if stop_after is not None and state["global_step"] >= stop_after:
                return accelerator.unwrap_model(model)
            for _ in range(config.grad_accum):
                batch = torch.stack([next(stream) for _ in range(config.batch_size)]).to(accelerator.device)
                state["data_position"] += config.batch_size * accelerator.num_processes
                with accelerator.accumulate(model), accelerator.autocast():
                    hidden = config.alpha_hidden > 0
                    with torch.no_grad():
                        teacher_out = teacher(batch, output_hidden_states=hidden)
                    parts = distillation_loss(model(batch, output_hidden_states=hidden), teacher_out, batch, config)
                    accelerator.backward(parts["loss"])
                    if accelerator.sync_gradients and config.clip:
                        accelerator.clip_grad_norm_(model.parameters(), config.clip)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                tokens += batch.numel() * accelerator.num_processes
            state["stage_step"] += 1
            state["global_step"] += 1
            rate = tokens / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{parts['loss'].item():.3f}", kl=f"{parts['kl'].item():.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if accelerator.is_main_process and (state["stage_step"] % config.log_every == 0
                                                or state["stage_step"] == config.steps):
                record = {"stage": stage, "step": state["stage_step"], "global_step": state["global_step"],
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate,
                          **{k: float(v.detach()) for k, v in parts.items()}}
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if state["stage_step"] % config.checkpoint_every == 0 or state["stage_step"] == config.steps:
                if accelerator.is_main_process:
                    _save_checkpoint(checkpoint, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler, state)
                accelerator.wait_for_everyone()
        bar.close()
        student = accelerator.unwrap_model(model)
        student.eval()
        del optimizer, scheduler, model
        accelerator.free_memory()  # the accelerator keeps references to what it prepared
        if on_stage_end is not None:
            on_stage_end(stage, student)
        state.update(stage_index=stage_index + 1, stage_step=0, stage_compressed=False)
    return student


def _stages(student, compression: CompressionConfig | None) -> list[int]:
    if compression is None:
        return [1]
    from tqcompressor.surgery import plan_compression

    plan = getattr(student, "tqc_plan", None) or plan_compression(student, compression)
    student.tqc_plan = plan
    return sorted({spec.step for _, spec in plan}) or [1]


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


def _save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_compressed(model, partial / "model", tokenizer)
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, partial / STATE_FILE)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, fingerprint: str):
    if not (path / STATE_FILE).is_file():
        old = path.with_name(path.name + ".old")
        if (old / STATE_FILE).is_file():  # interrupted between the two renames
            path = old
        else:
            raise TQCError(f"nothing to resume: {path} holds no checkpoint; run without --resume")
    state = torch.load(path / STATE_FILE, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise TQCError(f"{path} belongs to another run (different teacher, data, plan or settings); "
                       "use a new --out dir or the original settings")
    return load_compressed(path / "model"), state
