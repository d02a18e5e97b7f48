"""One-shot quality with and without the sequential refit (tqcompressor.surgery.sequential), same plan.

SmolLM2-135M compressed to --ratio with calibrated auto (the main job's default menu), calibrated
on --calibration-tokens of WikiText-2 valid; then the same plan applied twice: as planned, and
refitted block by block to the teacher's outputs from the compressed model's own inputs. Each is
evaluated on WikiText-2 test (perplexity, KL to the teacher, top-1 agreement). Writes
bench/results/sequential/sequential.json and prints a table.

    python bench/sequential.py [--methods svd] [--ratio 0.65] [--eval-tokens 32768]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import HERE, calibrated_options
from provenance import git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.surgery.apply import apply_plan
from tqcompressor.training import recipe
from tqcompressor.versions import library_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_options(parser, eval_tokens=32768)
    parser.add_argument("--methods", default=",".join(recipe.AUTO_METHODS), help="auto's menu")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sequential" / "sequential.json")
    args = parser.parse_args()
    commit = git_commit()  # the code this run imports now
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    ids = calibration_ids(args.calibration, teacher, loaded.tokenizer, args.calibration_tokens)
    test = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    config = tqc.CompressionConfig(method="auto", ratio=args.ratio, auto_methods=args.methods.split(","))
    started = time.perf_counter()
    plan = tqc.plan_compression(copy.deepcopy(teacher), config, ids)
    planning_seconds = time.perf_counter() - started
    rows = {"teacher": evaluate(teacher, test, context=args.context)}
    for label, kwargs in (("as planned", {}), ("sequential refit", {"calibration": ids, "teacher": teacher})):
        student = copy.deepcopy(teacher)
        started = time.perf_counter()
        apply_plan(student, dataclasses.replace(plan, sequential=bool(kwargs)), **kwargs)
        seconds = time.perf_counter() - started
        rows[label] = {**evaluate(student, test, context=args.context, teacher=teacher), "apply_seconds": seconds}
        print(label, {k: v for k, v in rows[label].items() if k != "protocol"}, flush=True)
    result = {
        "commit": commit,
        "versions": library_versions(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "params": {"teacher": tqc.count_parameters(teacher), "target": plan.target_params},
        "planning_seconds": planning_seconds,
        "plan": {m: sum(1 for e in plan.layers if e.spec.method == m) for m in {e.spec.method for e in plan.layers}},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(
            ["model", "perplexity", "KL to teacher", "top-1 agreement"],
            [
                [label, r["perplexity"], r.get("kl_to_teacher", 0.0), r.get("top1_agreement", 1.0)]
                for label, r in rows.items()
            ],
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
