"""Reproduce the one-shot point of a committed ``tqc run`` (``make demo-ratio``'s ``docs/demo-ratio-results.json``)
with the code as it is now: the same data, calibration, plan and evaluation, through the pipeline's own
phases, then every figure of the point compared with the committed one. A refactor that changes no
behaviour reproduces it exactly.

The teacher samples the run drew (distillation pool, held-out samples) are read from its output dir
(``--samples``, ``out/demo-ratio`` by default), so nothing is sampled again; without them they are drawn
again with the same seeds.

    python bench/one_shot.py [--reference docs/demo-ratio-results.json] [--samples out/demo-ratio]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from common import HERE, bad_input
from provenance import cpu_run, git_commit

from tqcompressor.modelio.models import load_model
from tqcompressor.pipeline import RunConfig, calibration_blocks, evaluate_point, first_tokens, load_data
from tqcompressor.planning.config import CompressionConfig
from tqcompressor.planning.planners import plan_compression
from tqcompressor.surgery.apply import apply_plan
from tqcompressor.surgery.experts import split_experts
from tqcompressor.training.distill import DistillConfig

LABEL = "compressed (no KD)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(HERE.parent / "docs" / "demo-ratio-results.json"))
    parser.add_argument("--samples", default=str(HERE.parent / "out" / "demo-ratio"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="what the reference run used (tqc run's default)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--out", default=str(HERE / "results" / "one_shot" / "one-shot-demo.json"))
    args = parser.parse_args()
    reference_path = Path(args.reference)
    if not reference_path.is_file():
        bad_input(f"{reference_path} does not exist; pass --reference with a tqc run's results.json")
    commit, started = git_commit(), time.perf_counter()
    reference = json.loads(reference_path.read_text())
    committed = next(p for p in reference["points"] if p["label"] == LABEL)
    with tempfile.TemporaryDirectory() as scratch:
        point = one_shot(reference, args, Path(scratch))
    comparison = compare(committed, point)
    result = {
        **cpu_run(commit, args),
        "reference": str(reference_path),
        "reference_versions": reference["versions"],
        "committed_point": committed,
        "reproduced_point": point,
        "comparison": comparison,
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'figure':<32} {'committed':>14} {'now':>14} {'difference':>12}")
    for name, row in comparison["figures"].items():
        print(f"{name:<32} {row['committed']:>14.6g} {row['now']:>14.6g} {row['difference']:>12.3g}")
    print(f"identical: {comparison['identical']} (largest relative difference {comparison['max_relative']:.3g})")
    print(f"wrote {args.out}")


def one_shot(reference: dict, args: argparse.Namespace, scratch: Path) -> dict:
    """The reference run's one-shot point, measured again (its teacher samples copied into ``scratch``)."""
    for cached in Path(args.samples).glob("*teacher_samples-*.safetensors"):
        shutil.copy(cached, scratch / cached.name)
    run = RunConfig(
        CompressionConfig(**reference["compression"]),
        DistillConfig(**reference["distill"]),
        reference["data"],
        reference["eval_data"],
        scratch,
        eval_tokens=args.eval_tokens,
        context=args.context,
        calibration_tokens=reference["calibration_tokens"],
        teacher_fraction=reference["teacher_fraction"],
        teacher_pool=reference["teacher_pool_blocks"],
    )
    loaded = load_model(args.model)
    teacher = loaded.model
    blocks, eval_sets = load_data(loaded, run, scratch, print)
    calibration = calibration_blocks(run, blocks, print)
    student = split_experts_copy(teacher)
    plan = plan_compression(student, run.compression, calibration)
    apply_plan(student, plan)
    interim = interim_tokens(reference)
    if interim:  # scored on the run's interim windows, the teacher's perplexities from the same passes
        return evaluate_point(LABEL, 0, student, loaded, first_tokens(eval_sets, interim, run.context), run.context)
    teacher_point = reference["points"][0]  # its perplexities are reused, as in the run
    return evaluate_point(LABEL, 0, student, loaded, eval_sets, run.context, teacher_point)


def interim_tokens(reference: dict) -> int:
    """The tokens per domain the reference run scored its one-shot point on (0: every window). A run of
    51aeef5 scored it on fewer windows without recording how many: the default's."""
    if "interim_eval_tokens" in reference:
        return reference["interim_eval_tokens"]
    points = {p["label"]: p for p in reference["points"]}
    scored = {label: sum(d["tokens"] for d in p["domains"].values()) for label, p in points.items()}
    return RunConfig.interim_tokens if scored[LABEL] < scored["teacher"] else 0


def split_experts_copy(teacher):
    student = copy.deepcopy(teacher)
    split_experts(student)
    return student


def compare(committed: dict, now: dict) -> dict:
    """Every number of the point (its domains' too), side by side."""
    figures, measured = {}, _numbers(now)
    for name, value in _numbers(committed).items():
        other = measured.get(name)
        if other is None:
            continue
        figures[name] = {"committed": value, "now": other, "difference": other - value}
    relative = [abs(f["difference"]) / max(abs(f["committed"]), 1e-300) for f in figures.values()]
    return {
        "figures": figures,
        "identical": all(f["difference"] == 0 for f in figures.values()) and len(figures) > 0,
        "max_relative": max(relative, default=math.nan),
    }


def _numbers(point: dict, prefix: str = "") -> dict[str, float]:
    found = {}
    for key, value in point.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found[prefix + key] = float(value)
        elif isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}."))
    return found


if __name__ == "__main__":
    main()
