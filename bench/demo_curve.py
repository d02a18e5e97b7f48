"""How much distillation would the main job need to reach its fidelity goal? Fidelity KL against KD tokens.

`make demo` distils for as many steps as its time budget allows and ends well above the fidelity KL
goal of issue #36 (0.6 nats/token, the mean over the held-out domains). This builds the student as `tqc run` does with
its defaults (calibrated ``auto`` at --ratio; calibration and distillation blocks half WikiText-2
valid, half sampled from the teacher, a pool of --teacher-pool cycled) and distils it once with the
schedule of --steps, stopping at every point of --points to evaluate it on the report's domains
(the fidelity suite's held-out domains, and WikiText-2 test, in-domain), then resuming from its checkpoint (bit-
identical to an uninterrupted run). As in kd_scaling.py, a point before the last is part-way through
one schedule, still at a high learning rate: it understates what a run ending there reaches.

A power law ``fidelity KL = a * tokens^-b`` through the distilled points says how many KD tokens the goal
would take at this rate of improvement (recorded as an extrapolation, not a measurement). Writes
bench/results/demo_curve/demo-curve.json and .png and prints a table.

    python bench/demo_curve.py [--steps 520 --points 130,260,390 --teacher-pool 256]   # 2 CPU cores: ~45 min

With --max-bytes SIZE the student is `tqc run --max-bytes`'s instead (make demo's since 3c640ad): the byte plan's
whole matrices stored in their formats, its SVD factors in float, distilled; each point is measured on the model
as the run would store it (its factors in their formats too), and the goal is issue #50's (0.5 at <= 60 MiB).
--frozen-grids keeps the stored matrices' scales and offsets as planned (the run trains them: recipe.LEARN_GRIDS),
to measure what training them buys at equal steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import DATA, HERE, bad_input, finish_log_plot, pyplot
from kd_scaling import distill_curve
from provenance import cpu_run, git_commit

import tqcompressor as tqc
from tqcompressor.evaluation.report import table
from tqcompressor.pipeline import block_source_for, evaluate_domains, evaluation_sets
from tqcompressor.planning.config import CompressionConfig
from tqcompressor.planning.formats import parse_bytes
from tqcompressor.planning.planners import plan_compression
from tqcompressor.surgery.apply import apply_plan
from tqcompressor.training import recipe
from tqcompressor.training.distill import DistillConfig, training_precision

FIDELITY = "fidelity"  # the curve's summary figure: fidelity KL, the mean KL over the held-out domains
GOAL_KL = 0.6  # issue #36: fidelity KL of make demo, nats/token
BYTES_GOAL_KL = 0.5  # issue #50: fidelity KL at <= 60 MiB after the main job's distillation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--max-bytes", default=None, help="a byte budget instead of --ratio (tqc run --max-bytes)")
    parser.add_argument(
        "--frozen-grids",
        action="store_true",
        help="with --max-bytes: the stored matrices' scales and offsets stay as planned (recipe.LEARN_GRIDS off)",
    )
    parser.add_argument("--steps", type=int, default=2 * recipe.STEPS, help="optimizer steps of the one schedule")
    parser.add_argument("--points", default="130,260,390", help="steps to stop at and evaluate before the last")
    parser.add_argument("--teacher-pool", type=int, default=2 * recipe.TEACHER_POOL)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="per domain (tqc run's default)")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "demo_curve" / "demo-curve.json")
    parser.add_argument("--work", type=Path, default=Path("runs/demo_curve"))
    args = parser.parse_args()
    stops = sorted({int(p) for p in args.points.split(",") if p} | {args.steps})
    if stops[0] <= 0 or any(s % stops[0] for s in stops):
        bad_input(f"--points {args.points}: every point and --steps must be positive multiples of the first point")
    if args.work.exists():
        bad_input(f"{args.work} exists: give a new --work (the run resumes only within itself)")

    commit, started = git_commit(), time.perf_counter()
    torch.manual_seed(0)
    loaded = tqc.load_model()
    teacher = loaded.model
    kd = DistillConfig(
        steps=args.steps,
        lr=recipe.LR,
        temperature=recipe.TEMPERATURE,
        alpha_ce=recipe.ALPHA_CE,
        alpha_blocks=recipe.ALPHA_BLOCKS,
        checkpoint_every=stops[0],
        mixed_precision=training_precision("auto"),  # recorded as what it meant on this machine
    )
    blocks = block_source_for(
        str(DATA / "valid.txt"),
        loaded,
        kd,
        args.work,
        teacher_fraction=recipe.TEACHER_FRACTION,
        total_blocks=kd.steps * kd.batch_size,
        teacher_pool=args.teacher_pool,
    )
    eval_sets = evaluation_sets(str(DATA / "test.txt"), loaded, args.eval_tokens, 512, args.work)
    calibration = torch.stack([b for b, _ in zip(blocks(0), range(args.calibration_tokens // kd.seq_len))])
    student, stored = build_student(teacher, calibration, args)
    teacher_scores = evaluate_domains(teacher, teacher, eval_sets, 512, loaded.tokenizer)

    def measure(model) -> dict:
        measured = evaluate_domains(stored(model).eval(), teacher, eval_sets, 512, loaded.tokenizer, teacher_scores)
        return {
            "fidelity_kl": measured["fidelity_kl"],
            "fidelity_top1": measured["fidelity_top1"],
            **{
                domain_label(name, m): {k: m[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement")}
                for name, m in measured["domains"].items()
            },
        }

    curve, _ = distill_curve(teacher, student, blocks, kd, stops, args.work / "run", measure)
    result = {
        **cpu_run(commit, args),
        "recipe": {"method": recipe.METHOD, "auto_methods": list(recipe.AUTO_METHODS), "stages": recipe.STAGES}
        | {"teacher_fraction": recipe.TEACHER_FRACTION, "output_weights": recipe.OUTPUT_WEIGHTS},
        "distill": asdict(kd),
        "schedule": "one run with the schedule of --steps; earlier points are part-way through it",
        "teacher": {domain_label(n, m): {"perplexity": m["perplexity"]} for n, m in teacher_scores["domains"].items()},
        "curve": curve,
        "extrapolation": extrapolate(curve, FIDELITY, BYTES_GOAL_KL if args.max_bytes else GOAL_KL),
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(format_table(result))


def build_student(teacher, calibration, args) -> tuple:
    """``(student to distil, stored)``: ``tqc run``'s student at --ratio, or at --max-bytes with
    ``stored(model)`` the model as the run stores it (a copy, its factors in their formats)."""
    student = copy.deepcopy(teacher)
    if args.max_bytes is None:
        compression = CompressionConfig(
            method=recipe.METHOD,
            ratio=args.ratio,
            steps=recipe.STAGES,
            auto_methods=list(recipe.AUTO_METHODS),
            output_weights=recipe.OUTPUT_WEIGHTS,
        )
        apply_plan(student, plan_compression(student, compression, calibration))
        return student, lambda model: model
    structures, formats = recipe.BYTE_STRUCTURES, recipe.BYTE_FORMATS
    plan = tqc.measure_model_mixed(student, calibration, structures, formats=formats).plan(parse_bytes(args.max_bytes))
    learn = recipe.LEARN_GRIDS and not getattr(args, "frozen_grids", False)
    tqc.prepare_planned(student, plan, measure_error=False, learn_grids=learn)

    def stored(model):
        copied = copy.deepcopy(model)
        tqc.store_factors(copied, plan, measure_error=False)
        return copied

    return student, stored


def domain_label(name: str, measured: dict) -> str:
    """A domain's name in the result: the file name, marked in-domain where it is not held out."""
    return Path(name).name + ("" if measured["held_out"] else " (in-domain)")


def kl_of(point: dict, domain: str) -> float:
    """A curve point's fidelity KL (``domain`` = :data:`FIDELITY`) or its KL on one domain."""
    return point["fidelity_kl"] if domain == FIDELITY else point[domain]["kl_to_teacher"]


def extrapolate(curve: list[dict], domain: str = FIDELITY, goal: float = GOAL_KL) -> dict:
    """A least-squares power law ``KL = a * tokens^-b`` through the distilled points (log-log), and
    the KD tokens at which it would reach ``goal``."""
    points = [(p["tokens"], kl_of(p, domain)) for p in curve if p["tokens"] > 0]
    xs, ys = [math.log(t) for t, _ in points], [math.log(k) for _, k in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    log_a = mean_y - slope * mean_x
    tokens = math.exp((math.log(goal) - log_a) / slope) if slope < 0 else None
    return {
        "domain": domain,
        "fit": "KL = a * tokens^-b, least squares in log-log over the distilled points",
        "a": math.exp(log_a),
        "b": -slope,
        "goal_kl": goal,
        "tokens_to_goal": tokens,
    }


def format_table(result: dict) -> str:
    """Fidelity KL and top-1 first (where the file has them), then ppl, KL and top-1 per domain."""
    domains = list(result["teacher"])
    fidelity = all("fidelity_kl" in p for p in result["curve"])
    lead = [0.0, 1.0] if fidelity else []
    rows = [["teacher", ""] + lead + [x for d in domains for x in (result["teacher"][d]["perplexity"], 0.0, 1.0)]]
    for p in result["curve"]:
        rows.append(
            ["one-shot" if p["tokens"] == 0 else "distilled", p["tokens"]]
            + ([p["fidelity_kl"], p["fidelity_top1"]] if fidelity else [])
            + [x for d in domains for x in (p[d]["perplexity"], p[d]["kl_to_teacher"], p[d]["top1_agreement"])]
        )
    heads = ["point", "KD tokens"] + (["fidelity KL", "fidelity top-1"] if fidelity else [])
    heads += [f"{h} ({d})" for d in domains for h in ("ppl", "KL", "top-1")]
    fit = result["extrapolation"]
    goal = f"{fit['tokens_to_goal']:,.0f}" if fit["tokens_to_goal"] else "never (KL does not fall)"
    what = "fidelity KL" if fit["domain"] == FIDELITY else f"KL ({fit['domain']})"
    law = f"power law: {what} = {fit['a']:.3g} * tokens^-{fit['b']:.3f}; {fit['goal_kl']} at {goal} tokens"
    return table(heads, rows) + "\n" + law


def plot(result: dict, path: Path) -> None:
    """KL to the teacher on each domain against KD tokens (log-log), the goal and the power law."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    distilled = [p for p in result["curve"] if p["tokens"] > 0]
    xs = [p["tokens"] for p in distilled]
    if all("fidelity_kl" in p for p in distilled):
        ax.plot(xs, [p["fidelity_kl"] for p in distilled], marker="o", color="black", label="fidelity KL (held out)")
    for domain in result["teacher"]:
        ax.plot(xs, [p[domain]["kl_to_teacher"] for p in distilled], marker=".", alpha=0.7, label=domain)
    fit = result["extrapolation"]
    end = fit["tokens_to_goal"] or 10 * distilled[-1]["tokens"]
    xs = [distilled[0]["tokens"] * (end / distilled[0]["tokens"]) ** (i / 20) for i in range(21)]
    law = [fit["a"] * x ** -fit["b"] for x in xs]
    ax.plot(xs, law, linestyle=":", color="grey", label=f"power law ({fit['domain']})")
    ax.axhline(fit["goal_kl"], color="black", linestyle="--", label=f"goal: {fit['goal_kl']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:.2g}")  # plain numbers, not powers of ten, on a short log axis
    ax.yaxis.set_minor_formatter("{x:.2g}")
    ax.set_xlabel("KD tokens (log)")
    ax.set_ylabel("KL(teacher || student), nats/token (log)")
    ratio, size = float(result["settings"]["ratio"]), result["settings"].get("max_bytes")  # recorded as strings
    what = f"in {size}" if size not in (None, "None") else f"at {ratio:.0%} params"
    ax.set_title(f"tqc run's recipe {what}: fidelity against distillation", fontsize=10)
    finish_log_plot(fig, ax, path)


if __name__ == "__main__":
    main()
