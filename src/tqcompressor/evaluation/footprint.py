"""What a compressed model costs to hold and to run, next to its teacher, measured in one process.

Timings are only ever reported as ratios of runs interleaved in the same process (machines are
noisy; a ratio measured side by side is what carries over)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """Median seconds per call, the candidates run in turn so that drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: statistics.median(s) for name, s in samples.items()}


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the memory the parameters and buffers hold: each storage once, however many tensors view
    it (a tied weight, an int4 matrix's scales beside the kernel's copy, an expanded placeholder)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@torch.no_grad()
def speed_ratios(
    teacher: nn.Module, student: nn.Module, prompt: torch.Tensor, new_tokens: int = 16, repeats: int = 3
) -> dict:
    """Student/teacher time ratios (below 1: the student is faster) for a prefill of ``prompt``
    (batch, length) and for greedy generation of ``new_tokens`` after it, batch 1; a few seconds."""
    device = next(student.parameters()).device
    prompt = prompt.to(device)
    models = {"teacher": teacher.eval(), "student": student.eval()}
    prefill = interleaved(
        {k: (lambda m=m: m(prompt, logits_to_keep=1)) for k, m in models.items()}, device.type, repeats
    )
    one = prompt[:1]

    def generate(model: nn.Module) -> None:
        model.generate(
            one,
            attention_mask=torch.ones_like(one),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )

    generation = interleaved({k: (lambda m=m: generate(m)) for k, m in models.items()}, device.type, repeats)
    return {
        "prefill_time_ratio": prefill["student"] / prefill["teacher"],
        "generation_time_ratio": generation["student"] / generation["teacher"],
        "protocol": f"median of {repeats} interleaved runs in one process after a warm-up; prefill: "
        f"{tuple(prompt.shape)} tokens, logits for the last position; generation: batch 1, "
        f"{new_tokens} greedy tokens after a {prompt.shape[1]}-token prompt; device {device.type}, "
        f"{torch.get_num_threads()} threads",
    }
