"""Does letting ``auto`` mix structures pay, one-shot? The same model, budget and calibration text,
planned by calibrated ``auto`` once per menu (``--menus``, e.g. ``svd`` alone, the CLI's default,
against every registered structure), each evaluated one-shot on WikiText-2 test (perplexity, KL to
the teacher, top-1 agreement), with its compress seconds (calibration included) and the layers it
chose. Writes bench/results/auto_menus/auto-menus.json and prints a table.

    python bench/auto_menus.py [--menus "svd;all"] [--ratio 0.65] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

from common import HERE, bad_input, calibrated_options
from provenance import cpu_run, git_commit  # bench/provenance.py (scripts run from bench/)

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.structures import REGISTRY


def parse_menus(text: str) -> dict[str, list[str] | None]:
    """``"svd;all"`` -> ``{"svd": ["svd"], "all": None}`` (None: every registered structure)."""
    menus = {}
    for menu in filter(None, (m.strip() for m in text.split(";"))):
        names = None if menu == "all" else [n.strip() for n in menu.split(",")]
        unknown = [n for n in names or [] if n not in REGISTRY]
        if unknown:
            bad_input(f"--menus: unknown structure {unknown[0]!r}; choose from {', '.join(sorted(REGISTRY))} or all")
        menus[menu] = names
    if not menus:
        bad_input("--menus: name at least one menu, e.g. 'svd;all'")
    return menus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_options(parser, eval_tokens=16384)
    parser.add_argument("--menus", default="svd;all", help="auto's menus to compare, ';'-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "auto_menus" / "auto-menus.json")
    args = parser.parse_args()
    menus = parse_menus(args.menus)
    commit = git_commit()  # the code this run imports now
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    ids = calibration_ids(args.calibration, teacher, loaded.tokenizer, args.calibration_tokens)
    test = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    eval_kwargs = dict(context=args.context, tokenizer=loaded.tokenizer)
    rows = {"teacher": evaluate(teacher, test, **eval_kwargs)}
    for label, methods in menus.items():
        config = tqc.CompressionConfig(method="auto", ratio=args.ratio, auto_methods=methods)
        started = time.perf_counter()
        student, report = tqc.compress(copy.deepcopy(teacher), config, calibration=ids)
        seconds = time.perf_counter() - started
        rows[label] = {
            **evaluate(student, test, teacher=teacher, **eval_kwargs),
            "compress_seconds": seconds,
            "layers_by_method": dict(Counter(layer.method for layer in report.layers)),
        }
        print(label, json.dumps(rows[label]), flush=True)
    result = {
        **cpu_run(commit, args),
        "model": args.model,
        "counting": "every parameter counted once (tied embedding/head once)",
        "seconds_note": "compress seconds include the calibration pass, not model loading",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    header = ["auto's menu", "params", "perplexity", "KL to teacher", "top-1", "seconds", "layers"]
    print(
        table(
            header,
            [
                [
                    label,
                    r["params"],
                    r["perplexity"],
                    r.get("kl_to_teacher", 0.0),
                    r.get("top1_agreement", 1.0),
                    r.get("compress_seconds", 0.0),
                    " ".join(f"{k}:{v}" for k, v in sorted(r.get("layers_by_method", {}).items())),
                ]
                for label, r in rows.items()
            ],
        )
    )
    print(f"{args.model} at {args.ratio:.0%}; wrote {args.out}")


if __name__ == "__main__":
    main()
