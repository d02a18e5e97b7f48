"""Block-wise reconstruction: fit each decoder block of a compressed student to its teacher's, in order,
before distilling the whole model (as AA-SVD, EBFT and Puzzle's local distillation do).

For block ``i`` the inputs are the student's own hidden states after its blocks ``0 .. i-1`` (already
refit, so the block learns to undo the drift before it), the target is the teacher block's output on the
teacher's own hidden states, and a few Adam steps on the block's parameters lower the per-token
normalised squared error (:func:`~tqcompressor.training.losses.normalised_state_error`). A step
runs one block, never the 49k-wide head, and each position gives a hidden-size target instead of one KL.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.surgery.baselines import decoder_layers
from tqcompressor.training.losses import depth_mismatch, normalised_state_error


@dataclass(frozen=True)
class BlockwiseConfig:
    """``steps`` Adam steps per block at learning rate ``lr``, on batches of ``batch_size`` calibration blocks."""

    steps: int = 25
    lr: float = 1e-4
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise TQCError(f"block-wise reconstruction needs steps >= 0, batch size >= 1 and lr > 0, got {self}")


class _Captured(Exception):
    """Raised by the capturing hook: the forward has given the first block what it needed."""


Batch = tuple[Tensor, dict]  # one batch's hidden states entering a block, and the keyword arguments it takes


@torch.no_grad()
def block_inputs(model: nn.Module, ids: Tensor, batch_size: int) -> list[Batch]:
    """Per batch of ``ids`` (blocks x seq_len): the hidden states entering the first decoder block and the
    keyword arguments every block gets (position embeddings, masks), caught from the model's own forward."""
    first = decoder_layers(model)[0]
    caught: list[Batch] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return caught


def estimated_seconds(student: nn.Module, ids: Tensor, config: BlockwiseConfig, repeats: int = 2) -> float:
    """Wall seconds :func:`reconstruct_blocks` will take on ``ids``, from one Adam step on a copy of the
    student's first block, timed after a warm-up: per block, its steps, and its passes over every batch
    (the teacher block's, the student's before and after its steps: about one step per three batches)."""
    if config.steps == 0:
        return 0.0
    blocks = decoder_layers(student)
    (hidden, kwargs), *_ = block_inputs(student, ids[: config.batch_size], config.batch_size)
    probe = copy.deepcopy(blocks[0]).eval()
    params = [p.requires_grad_(True) for p in probe.parameters() if p.dtype.is_floating_point]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        normalised_state_error(run_block(probe, hidden, kwargs), hidden).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    batches = -(-len(ids) // config.batch_size)
    return len(blocks) * (config.steps + batches) * min(timings[1:])


def run_block(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def reconstruct_blocks(
    student: nn.Module,
    teacher: nn.Module,
    ids: Tensor,
    config: BlockwiseConfig,
    progress: bool = True,
    start: int = 0,
    on_block_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Refit ``student``'s decoder blocks in place, first to last (see the module's docstring); the teacher
    is left as it is. Returns, per block refit, its error on ``ids`` before and after its steps.

    ``start``: the blocks before it are refit already (a resumed run): they only pass their outputs on.
    ``on_block_end(index)`` runs after each block is refit (a checkpoint)."""
    student_blocks, teacher_blocks = decoder_layers(student), decoder_layers(teacher)
    if len(student_blocks) != len(teacher_blocks):
        raise depth_mismatch(len(student_blocks), len(teacher_blocks))
    was_training = student.training
    student.eval()  # no dropout: the targets are deterministic
    inputs, targets_in = block_inputs(student, ids, config.batch_size), block_inputs(teacher, ids, config.batch_size)
    report = []
    total = (len(student_blocks) - start) * config.steps
    bar = tqdm(total=total, desc="refitting blocks", unit="step", disable=not progress)
    try:
        for index, (block, reference) in enumerate(zip(student_blocks, teacher_blocks)):
            refit = index >= start
            with torch.no_grad():
                targets = _outputs(reference, targets_in)
                before = _mean_error(_outputs(block, inputs), targets) if refit else None
            if refit:
                _fit_block(block, inputs, targets, config, bar)
            with torch.no_grad():
                outputs = _outputs(block, inputs)
            inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
            targets_in = [(t, kwargs) for t, (_, kwargs) in zip(targets, targets_in)]
            if refit:
                after = _mean_error(outputs, targets)
                report.append({"block": index, "error_before": before, "error_after": after})
                bar.set_postfix(block=f"{index + 1}/{len(student_blocks)}", error=f"{after:.4f}")
                if on_block_end is not None:
                    on_block_end(index)
    finally:
        bar.close()
        student.train(was_training)
    return report


def _fit_block(block: nn.Module, inputs: list[Batch], targets: list[Tensor], config: BlockwiseConfig, bar) -> None:
    params = [p for p in block.parameters() if p.dtype.is_floating_point]
    if not params or config.steps == 0:
        return
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    try:
        for step in range(config.steps):
            hidden, kwargs = inputs[step % len(inputs)]
            loss = normalised_state_error(run_block(block, hidden, kwargs), targets[step % len(inputs)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
    finally:
        for p, was in zip(params, trainable):
            p.requires_grad_(was)
            p.grad = None


def _outputs(block: nn.Module, batches: list[Batch]) -> list[Tensor]:
    return [run_block(block, hidden, kwargs) for hidden, kwargs in batches]


def _mean_error(outputs: list[Tensor], targets: list[Tensor]) -> float:
    return sum(float(normalised_state_error(o, t)) for o, t in zip(outputs, targets)) / len(targets)
