"""Does more distillation close the gap? Fidelity to the teacher against KD tokens, each family at one budget.

The paper distilled on ~280M tokens, ``compare.json`` on 1.23M, the CPU demo on 0.1M. This runs
each method's distillation once, with the schedule of the largest budget (warm-up, then cosine to
--kd-tokens), stops it at every point of --points, evaluates the student there and continues it
from its checkpoint (a resumed run is bit-identical to an uninterrupted one). So a point before the
last is a student part-way through one run, still at a high learning rate, not a run that ended
with that budget: the curve understates what a dedicated shorter run reaches.

Students are built as ``compare.py`` builds them (``*_aware`` and ``auto`` calibrated on
--calibration-tokens of the distillation data). Writes bench/results/kd_scaling/kd_scaling.json and
kd_scaling.png and prints a table.

    python bench/kd_scaling.py                   # 2 CPU cores: ~1 hour
    python bench/kd_scaling.py --device cuda --kd-tokens 20480000 --batch-size 16 \\
        --points 1228800,5120000,20480000 --eval-tokens 65536
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import (
    HERE,
    Fidelity,
    bad_input,
    distill_config,
    distillation_options,
    fidelity_options,
    finish_log_plot,
    pyplot,
)
from compare import chosen_methods, compressed_students, layer_types
from provenance import git_commit

import tqcompressor as tqc
from tqcompressor.data import text_block_source, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.training.distill import DistillConfig, multistep_distill
from tqcompressor.versions import library_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    distillation_options(parser, eval_tokens=8192, kd_steps=False)
    fidelity_options(parser)
    parser.add_argument("--methods", default="tq_aware,svd_aware,layer_drop,auto")
    parser.add_argument("--kd-tokens", type=int, default=102400, help="the whole run's KD tokens (the last point)")
    parser.add_argument("--points", default="25600,51200", help="KD tokens to stop at and evaluate before the last")
    parser.add_argument("--auto-methods", default="svd", help="structures auto may choose (the CLI's default)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kd_scaling" / "kd_scaling.json")
    parser.add_argument("--work", type=Path, default=Path("runs/kd_scaling"))
    args = parser.parse_args()
    # what compare.build_student reads beside these
    args.embedding, args.workers, args.threads = False, 0, None

    methods = chosen_methods(args.methods)
    tokens_per_step = args.batch_size * args.seq_len
    try:
        stops = stop_steps([int(p) for p in args.points.split(",") if p] + [args.kd_tokens], tokens_per_step)
    except ValueError as error:
        bad_input(f"--points/--kd-tokens: {error}")

    commit = git_commit()
    loaded = tqc.load_model(args.model)
    teacher = copy.deepcopy(loaded.model).to(args.device)
    ids = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    # every stop is a multiple of the first (stop_steps checks): checkpoint there
    config = distill_config(args, steps=stops[-1], checkpoint_every=stops[0])
    blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
    suite = Fidelity(teacher, loaded.tokenizer, args.fidelity_tokens, args.context, args.work)
    measure = lambda student: {  # noqa: E731 - one protocol for every point: fidelity first, then in-domain
        **suite.point(student),
        **point(
            evaluate(
                student.eval(), ids, context=args.context, tokenizer=loaded.tokenizer, teacher=teacher, progress=False
            )
        ),
    }
    teacher_metrics = evaluate(teacher, ids, context=args.context, tokenizer=loaded.tokenizer, progress=False)
    result = {
        "commit": commit,
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("out", "work")},
        "versions": library_versions(),
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine()},
        "ratio": args.ratio,
        "teacher": {"params": tqc.count_parameters(teacher), "perplexity": teacher_metrics["perplexity"]},
        "distill": asdict(config),
        "schedule": "one run per method with the schedule of the last point; earlier points are part-way through it",
        "kd_data": Path(args.train).name,
        "fidelity": suite.protocol(),
        "eval": {
            "data": Path(args.test).name,
            "in_domain": True,  # perplexity, kl_to_teacher, top1_agreement of each point
            "tokens": teacher_metrics["tokens"],
            **teacher_metrics["protocol"],
        },
        "counting": "every parameter counted once (tied embedding/head once); permutation index buffers excluded",
        "finished": False,
        "methods": {},
    }
    started = time.perf_counter()
    for method, student, _, compress_seconds in compressed_students(methods, loaded, args):
        t0 = time.perf_counter()
        curve, distilled = distill_curve(
            teacher, student.to(args.device), blocks, config, stops, args.work / method, measure
        )
        result["methods"][method] = {
            "params": tqc.count_parameters(distilled),
            "layer_types": layer_types(distilled),
            "compress_seconds": compress_seconds,
            "kd_and_eval_seconds": time.perf_counter() - t0,
            "curve": curve,
        }
        print(method, json.dumps(result["methods"][method]["curve"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every method: partial results survive
    result["seconds"] = time.perf_counter() - started
    result["finished"] = True
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    rows = [
        [m]
        + [p["fidelity_kl"] for p in r["curve"]]
        + [r["curve"][-1]["fidelity_top1"], r["curve"][-1]["perplexity"], r["curve"][-1]["kl_to_teacher"]]
        for m, r in result["methods"].items()
    ]
    heads = [f"fidelity KL @ {p['tokens']:,}" for p in next(iter(result["methods"].values()))["curve"]]
    ends = ["fidelity top-1 at the end", "ppl at the end (in-domain)", "KL at the end (in-domain)"]
    print(table(["method", *heads, *ends], rows))
    print(f"teacher {teacher_metrics['perplexity']:.2f}; eval: {result['eval']}; wrote {args.out}")


def stop_steps(points: list[int], tokens_per_step: int) -> list[int]:
    """Optimizer steps at which to evaluate: each point a whole number of steps, each a multiple of
    the first (the checkpoint interval, so that every stop resumes from a checkpoint taken there)."""
    steps = sorted({p // tokens_per_step for p in points})
    if any(p <= 0 or p % tokens_per_step for p in points):
        raise ValueError(f"every point must be a positive multiple of batch size x seq len = {tokens_per_step}")
    if any(s % steps[0] for s in steps):
        raise ValueError(f"every point must be a multiple of the first ({steps[0] * tokens_per_step} tokens)")
    return steps


def distill_curve(
    teacher, student, blocks, config: DistillConfig, stops: list[int], work: Path, measure, progress: bool = True
):
    """``(curve, distilled student)``: ``measure(student)`` (a dict of scores) before distilling and at
    each of ``stops`` (optimizer steps) of one run of ``config.steps`` steps, which stops there and resumes from its
    checkpoint."""
    tokens_per_step = config.batch_size * config.seq_len
    curve = [{"tokens": 0, **measure(student)}]
    for index, stop in enumerate(stops):
        student = multistep_distill(
            teacher,
            student,
            blocks,
            config,
            work,
            resume=index > 0,
            stop_after=stop if stop < config.steps else None,
            progress=progress,
        )
        curve.append({"tokens": stop * tokens_per_step, **measure(student)})
    return curve, student


def point(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement")}


def plot(result: dict, path: Path) -> None:
    """Fidelity KL (held out) against KD tokens (log axes; the one-shot student at the left edge), one
    line per method; for a file from before the fidelity suite, in-domain perplexity."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [record["curve"] for record in result["methods"].values()]
    fidelity = all("fidelity_kl" in p for curve in curves for p in curve)
    key = "fidelity_kl" if fidelity else "perplexity"
    first = min(p["tokens"] for curve in curves for p in curve if p["tokens"])
    for method, record in result["methods"].items():
        xs = [p["tokens"] or first / 4 for p in record["curve"]]  # one-shot drawn a quarter of the first point in
        ax.plot(xs, [p[key] for p in record["curve"]], marker="o", label=method)
    if not fidelity:
        ax.axhline(result["teacher"]["perplexity"], color="black", linestyle="--", label="teacher")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"KD tokens (log; leftmost point: no KD, at {first / 4:,.0f})")
    ax.set_ylabel(
        "fidelity KL to the teacher, held out (nats/token, log)"
        if fidelity
        else "WikiText-2 test perplexity, in-domain (log)"
    )
    name = Path(result["model"]).name
    what = "fidelity" if fidelity else "in-domain perplexity"
    ax.set_title(f"{name} at {result['ratio']:.0%} params: {what} against distillation", fontsize=10)
    finish_log_plot(fig, ax, path)


if __name__ == "__main__":
    main()
