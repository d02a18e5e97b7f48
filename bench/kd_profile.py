"""Where a distillation step's time goes, phase by phase and op by op, before and after this work.

One KD step of SmolLM2-135M at --ratio (uncalibrated ``svd``: the shapes of ``tqc run``'s student,
without its calibration time) is cut into its phases: the teacher's forward, the student's forward,
the loss, the backward pass, and clipping with the optimizer step. Each phase is timed (median over
--steps steps after --warmup warm-up steps) for the baseline settings (whole-batch fp32 logit loss,
for-each AdamW) and for the new defaults (chunked logit loss, fused AdamW), the two interleaved step
by step, in one process; then torch.profiler lists the ops that take the most time in one step of
each. The loop is the one of distill.train_stage, without accelerate's wrapper (bf16 autocast as it
sets it on a CPU with native bf16).

Writes bench/results/kd_profile/kd-profile.json and prints the tables.

    python bench/kd_profile.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import HERE
from provenance import cpu_run, git_commit
from torch.profiler import ProfilerActivity, profile

import tqcompressor as tqc
from tqcompressor.evaluation.report import table
from tqcompressor.training.distill import DistillConfig, new_optimizer, training_precision
from tqcompressor.training.losses import distillation_loss

PHASES = ("teacher forward", "student forward", "loss", "backward", "clip + optimizer")
SETTINGS = {
    "baseline": {"chunked_loss": False, "fused_optimizer": False},
    "new defaults": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top-ops", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kd_profile" / "kd-profile.json")
    args = parser.parse_args()
    commit = git_commit()
    torch.manual_seed(0)
    teacher = tqc.load_model(args.model).model.eval().requires_grad_(False)
    student = tqc.compress(copy.deepcopy(teacher), tqc.CompressionConfig(method="svd", ratio=args.ratio))[0]
    vocab = teacher.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    precision = training_precision("auto")
    trainers = {}
    for name, changes in SETTINGS.items():
        config = DistillConfig(batch_size=args.batch_size, seq_len=args.seq_len, mixed_precision=precision, **changes)
        model = copy.deepcopy(student).train().requires_grad_(True)
        trainers[name] = (model, new_optimizer(model, config), config)
    timings = {name: {phase: [] for phase in PHASES} for name in SETTINGS}
    for step in range(args.warmup + args.steps):
        for name, (model, optimizer, config) in trainers.items():  # interleaved: the same machine state for both
            phases = timed_step(teacher, model, optimizer, batch, config, precision)
            if step >= args.warmup:
                for phase, seconds in phases.items():
                    timings[name][phase].append(seconds)
    result = {
        **cpu_run(commit, args),
        "student": {"method": "svd (uncalibrated)", "params": tqc.count_parameters(student)},
        "precision": precision,
        "settings_compared": {name: {k: str(v) for k, v in changes.items()} for name, changes in SETTINGS.items()},
        "phases": {
            name: {phase: statistics.median(values) for phase, values in phases.items()}
            for name, phases in timings.items()
        },
        "top_ops": {
            name: top_ops(teacher, model, optimizer, batch, config, precision, args.top_ops)
            for name, (model, optimizer, config) in trainers.items()
        },
    }
    for name in SETTINGS:
        result["phases"][name]["step"] = sum(result["phases"][name][p] for p in PHASES)
    result["speedup"] = result["phases"]["baseline"]["step"] / result["phases"]["new defaults"]["step"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


def timed_step(teacher, student, optimizer, batch, config: DistillConfig, precision: str) -> dict[str, float]:
    """One optimizer step, each phase timed on its own."""
    times, started = {}, time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal started
        now = time.perf_counter()
        times[phase], started = now - started, now

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with torch.no_grad():
            teacher_out = teacher(batch)
        mark("teacher forward")
        student_out = student(batch)
        mark("student forward")
        loss = distillation_loss(student_out, teacher_out, batch, config)["loss"]
        mark("loss")
    loss.backward()
    mark("backward")
    torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("clip + optimizer")
    return times


def top_ops(teacher, student, optimizer, batch, config, precision: str, count: int) -> list[dict]:
    """The ops with the most self time in one step (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_step(teacher, student, optimizer, batch, config, precision)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops]


def print_tables(result: dict) -> None:
    phases = result["phases"]
    rows = [[phase] + [phases[name][phase] for name in SETTINGS] for phase in (*PHASES, "step")]
    print(table(["phase (median s)", *SETTINGS], rows))
    print(f"speed-up of a whole step: {result['speedup']:.2f}x")
    for name, ops in result["top_ops"].items():
        print(f"\n{name}: ops by self time in one step")
        print(table(["op", "self s", "calls"], [[o["op"][:60], o["self_seconds"], o["calls"]] for o in ops]))


if __name__ == "__main__":
    main()
