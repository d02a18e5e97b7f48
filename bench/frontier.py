"""Bytes against fidelity: the teacher in each uniform storage format beside the formats a byte budget
plans per matrix (``tqc quantize --max-bytes``), one-shot, on the held-out fidelity suite; then the search
``tqc quantize --max-kl`` makes for the smallest plan within ``--max-kl``.

Every point's bytes are the tensors its saved dir holds (integers, scales, offsets, padding, the float
norms), computed exactly as the planner prices them (a test holds the two equal). The planned points'
errors are measured on ``--calibration`` (WikiText-2 valid by default: no held-out domain reads it).
The uniform points are the teacher by our round-to-nearest (``rtn``; ``-dq``: scales and offsets in 8-bit
codes) and by HQQ (``hqq``, the library quantizer users would otherwise pick: calibration-free, same bytes);
the planned points choose per matrix among all of them and int3 and int2 (``planning.formats.MENU``;
``quantizer: "planned"``), at each uniform point's bytes, and plan a tied token table in bands of rows.
With ``--structures svd`` the planner may also store a matrix as activation-aware SVD factors, each factor in
a format (:mod:`tqcompressor.planning.mixed`): those points (``quantizer: "planned+svd"``) stand beside the
formats-only plan at each budget.

    python bench/frontier.py    # ~35 minutes on 2 cores; writes bench/results/frontier/frontier.json and .png
    python bench/frontier.py --structures svd --budgets 50MiB,55MiB,60MiB,65MiB,71.5MiB \
        --uniform int4-g128-dq --max-kl 0 --out bench/results/frontier/frontier-structures.json
    python bench/frontier.py --structures svd --budgets 55MiB,60MiB,65MiB,71.5MiB \
        --uniform int4-g128-dq --max-kl 0 --out bench/results/frontier/frontier-low-bit.json   # int3/int2 on the menu
    python bench/frontier.py --correction-ranks 8,32 --budgets 55MiB,60MiB,65MiB,71.5MiB \
        --uniform int4-g128-dq --max-kl 0 --out bench/results/frontier/frontier-corrections.json

With ``--correction-ranks`` a third planner (``planned+corrections``) may also store a linear matrix in a low-bit
format plus a low-rank correction of its rounding error (:mod:`tqcompressor.planning.corrections`).

frontier.json and frontier-structures.json were measured before int3 and int2 joined the menu (their commits say
which code ran).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import HERE, one_shot_fidelity_options, teacher_and_domains
from provenance import cpu_run, git_commit

from tqcompressor.data import calibration_ids
from tqcompressor.evaluation.targets import measure_plan, smallest_within_kl
from tqcompressor.planning.calibration import layer_statistics
from tqcompressor.planning.corrections import with_corrections
from tqcompressor.planning.formats import (
    FORMATS,
    float_bytes,
    measure_formats,
    parse_bytes,
    plan_formats,
    planned_matrices,
)
from tqcompressor.planning.mixed import with_structures

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_shot_fidelity_options(parser)
    parser.add_argument(
        "--between", type=int, default=0, help="planned budgets between each pair of neighbouring uniform formats"
    )
    parser.add_argument(
        "--max-kl", type=float, default=0.01, help="then `--max-kl`'s search for the smallest plan within it (0: none)"
    )
    parser.add_argument("--uniform", default=",".join(FORMATS), help="the teacher's uniform formats to measure")
    parser.add_argument("--budgets", default="", help="sizes to plan at (default: each uniform point's bytes)")
    parser.add_argument("--structures", default="", help="structures the planner may store matrices as (svd)")
    parser.add_argument(
        "--correction-ranks", default="", help="plan also with low-bit formats plus corrections of these ranks (8,32)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frontier" / "frontier.json")
    args = parser.parse_args()
    commit, started = git_commit(), time.perf_counter()
    teacher, tokenizer, domains = teacher_and_domains(args)

    def point(label: str, kind: str, plan, quantizer: str) -> dict:
        measured = measure_plan(teacher, plan, domains, args.context, tokenizer)
        found = {
            "label": label,
            "kind": kind,
            "quantizer": quantizer,
            "bytes": plan.total_bytes,
            "fidelity_kl": measured["fidelity_kl"],
            "fidelity_top1": measured["fidelity_top1"],
            "kd_tokens": 0,
            "format_counts": plan.to_dict()["format_counts"],
            "domains": {name: d["kl_to_teacher"] for name, d in measured["domains"].items()},
        }
        print(f"{label:>32}  {plan.total_bytes / MIB:7.1f} MiB  fidelity KL {found['fidelity_kl']:.4f}", flush=True)
        return found

    names = list(planned_matrices(teacher))
    points, uniform_bytes = [], []
    for fmt in args.uniform.split(","):
        plan = plan_formats(teacher, float_bytes(teacher), formats=(fmt,))
        uniform_bytes.append(plan.total_bytes)
        points.append(point(f"teacher {fmt}", "uniform", plan, "rtn"))
        if fmt.startswith("int4") and not fmt.endswith("-dq"):  # HQQ as users run it: bfloat16 scales, int4 only
            plan = plan_formats(teacher, float_bytes(teacher), formats=(f"{fmt}-hqq",))
            points.append(point(f"teacher {fmt} (hqq)", "uniform", plan, "hqq"))
    ids = calibration_ids(args.calibration, teacher, tokenizer, args.calibration_tokens)
    stats = layer_statistics(teacher, names, ids)
    menus = measure_formats(teacher, stats)  # measured once, planned at each budget
    mixed = with_structures(menus, teacher, stats, tuple(filter(None, args.structures.split(","))))
    given = [parse_bytes(size, "--budgets") for size in filter(None, args.budgets.split(","))]
    budgets = given or planned_budgets(sorted(uniform_bytes), args.between)
    planners = [("planned", menus)] + ([(f"planned+{args.structures}", mixed)] if mixed is not menus else [])
    ranks, correction_seconds = tuple(int(rank) for rank in filter(None, args.correction_ranks.split(","))), None
    if ranks:  # each linear matrix's low-bit formats plus a correction of their rounding error, beside the formats
        measuring = time.perf_counter()
        planners.append(("planned+corrections", with_corrections(menus, teacher, stats, ranks=ranks)))
        correction_seconds = round(time.perf_counter() - measuring, 1)
        print(f"corrections measured in {correction_seconds:.0f} s", flush=True)
    for budget in budgets:
        for quantizer, planner in planners:
            if budget < planner.smallest:
                continue  # below every model this menu makes (formats alone stop above the structures)
            plan = planner.plan(budget)
            points.append(point(f"{quantizer} <= {budget / MIB:.1f} MiB", "planned", plan, quantizer))
            points[-1].update(budget_bytes=budget, formats=plan.formats, bands=plan.to_dict()["bands"])
    search = smallest_within_kl(teacher, mixed, args.max_kl, domains, args.context, tokenizer) if args.max_kl else None
    if search is not None:
        print(search.summary(), flush=True)
    result = {
        **cpu_run(commit, args),
        "what": "bytes of the saved weights against fidelity KL on the held-out suite: the teacher in each uniform "
        "format (round-to-nearest, with bfloat16 or 8-bit-coded scales, and HQQ for int4) and the per-matrix "
        "formats a byte budget plans from all of them and int3/int2, a tied token table in bands of rows, one-shot",
        "teacher_float_bytes": float_bytes(teacher),
        "points": points,
        "max_kl_search": search_record(search),
        "correction_seconds": correction_seconds,  # measuring the corrected candidates, where planned with them
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(points, args.out.with_suffix(".png"))
    print(format_table(result))


def search_record(search) -> dict | None:
    return {**search.to_dict(), "format_counts": search.plan.to_dict()["format_counts"]} if search else None


def planned_budgets(uniform: list[int], between: int) -> list[int]:
    """Each uniform point's bytes, and ``between`` evenly spaced budgets between each neighbouring pair."""
    budgets = []
    for low, high in zip(uniform, uniform[1:]):
        budgets += [low + (high - low) * i // (between + 1) for i in range(between + 1)]
    return sorted(set(budgets + [uniform[-1]]))


def format_table(result: dict) -> str:
    rows = ["| point | kind | MiB | fidelity KL | top-1 |", "| --- | --- | ---: | ---: | ---: |"]
    for p in sorted(result["points"], key=lambda p: p["bytes"]):
        size, kl, top1 = p["bytes"] / MIB, p["fidelity_kl"], p["fidelity_top1"]
        rows.append(f"| {p['label']} | {p['kind']} | {size:.1f} | {kl:.4f} | {top1:.3f} |")
    return "\n".join(rows)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    styles = [("uniform", "rtn", "o"), ("uniform", "hqq", "^"), ("planned", "planned", "s-")]
    styles += [("planned", q, "D-") for q in sorted({p["quantizer"] for p in points}) if q.startswith("planned+")]
    for kind, quantizer, style in styles:
        chosen = sorted(
            (p for p in points if (p["kind"], p["quantizer"]) == (kind, quantizer)), key=lambda p: p["bytes"]
        )
        label = quantizer if kind == "planned" else f"uniform, {quantizer}"
        axes.plot([p["bytes"] / MIB for p in chosen], [p["fidelity_kl"] for p in chosen], style, label=label)
        if kind == "uniform":
            for p in chosen:
                axes.annotate(p["label"].removeprefix("teacher "), (p["bytes"] / MIB, p["fidelity_kl"]), fontsize=8)
    axes.set_xlabel("saved weights (MiB)")
    axes.set_ylabel("fidelity KL (held-out, nats/token)")
    axes.set_yscale("log")
    axes.legend()
    axes.set_title("SmolLM2-135M: bytes against fidelity, one-shot")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
