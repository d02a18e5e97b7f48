"""Does offering the tied token table to ``auto`` earn its place? The same model, budget and
calibration, planned by ``auto`` twice: with the table on its menu (the default when no targets are
named) and with the decoder blocks' projections only; and, for reference, activation-aware ``svd``
with every projection and the table keeping the same fraction. Each is evaluated one-shot on
WikiText-2 test (perplexity, KL to the teacher, top-1 agreement). A plan that cannot meet the
budget (the projections alone, on a model whose table is most of it) is recorded with its reason.
Writes bench/results/embedding/embedding.json and prints a table.

    python bench/embedding.py [--model smollm2-135m] [--ratio 0.65] [--methods svd] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

from common import HERE, calibrated_options
from provenance import cpu_run, git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.layers import factored_modules
from tqcompressor.planning.inventory import default_target_modules, tied_embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_options(parser, eval_tokens=16384)
    parser.add_argument("--methods", default="svd", help="auto's menu (comma-separated structures)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "embedding" / "embedding.json")
    args = parser.parse_args()
    commit = git_commit()  # the code this run imports now
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    embedding = tied_embedding(teacher)
    if embedding is None:
        raise SystemExit(f"{args.model} has no tied token embedding: nothing to offer")
    ids = calibration_ids(args.calibration, teacher, loaded.tokenizer, args.calibration_tokens)
    test = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    eval_kwargs = dict(context=args.context, tokenizer=loaded.tokenizer)
    rows = {"teacher": evaluate(teacher, test, **eval_kwargs)}
    projections = default_target_modules(teacher)
    methods = args.methods.split(",")
    variants = {
        "auto, table on the menu": tqc.CompressionConfig(method="auto", ratio=args.ratio, auto_methods=methods),
        "auto, projections only": tqc.CompressionConfig(
            method="auto", ratio=args.ratio, auto_methods=methods, target_modules=projections
        ),
        "svd, everything the same fraction": tqc.CompressionConfig(
            method="svd", ratio=args.ratio, target_modules=[*projections, embedding]
        ),
    }
    for label, config in variants.items():
        started = time.perf_counter()
        try:
            student, report = tqc.compress(copy.deepcopy(teacher), config, calibration=ids)
        except tqc.TQCError as exc:
            rows[label] = {"error": str(exc)}
            continue
        seconds = time.perf_counter() - started
        auto = report.plan.auto or {}
        rows[label] = {
            **evaluate(student, test, teacher=teacher, **eval_kwargs),
            "compress_seconds": seconds,
            "layer_types": dict(Counter(type(m).__name__ for _, m in factored_modules(student))),
            "table": auto.get(embedding, {}).get("chosen"),
            "role_weights": auto.get(embedding, {}).get("role_weights"),
        }
    result = {
        **cpu_run(commit, args),
        "model": args.model,
        "embedding": embedding,
        "counting": "every parameter counted once (tied embedding/head once)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(
            ["plan", "params", "perplexity", "KL to teacher", "top-1", "table"],
            [
                [
                    label,
                    r["params"],
                    r["perplexity"],
                    r.get("kl_to_teacher", 0.0),
                    r.get("top1_agreement", 1.0),
                    str(r.get("table") or "-"),
                ]
                for label, r in rows.items()
                if "error" not in r
            ],
        )
    )
    for label, r in rows.items():
        if "error" in r:
            print(f"{label}: {r['error']}")
    print(f"{args.model} at {args.ratio:.0%}, auto over {args.methods}; wrote {args.out}")


if __name__ == "__main__":
    main()
