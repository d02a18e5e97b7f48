"""Does a `tqc run` student learn the teacher, or the teacher samples it was distilled on?

`tqc run` mixes blocks sampled once from the teacher (a pool of ``--teacher-pool`` sequences,
cycled) into the distillation data. This scores a finished run's student against its teacher on
that very pool and on the run's held-out teacher samples (seed 12345, which no training sample
uses), both as the first ``--context`` tokens of each sequence so the two are scored alike. A
student far closer to the teacher on the pool than on held-out samples has memorised the pool.
Writes --out (default bench/results/teacher_pool/teacher-pool.json) and prints a table.

    python bench/teacher_pool.py --run out/demo [--context 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import HERE, bad_input
from provenance import cpu_run, git_commit  # bench/provenance.py (scripts run from bench/)
from safetensors.torch import load_file

import tqcompressor as tqc
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the --out dir of a finished tqc run")
    parser.add_argument("--context", type=int, default=256, help="tokens scored from the start of each sequence")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "teacher_pool" / "teacher-pool.json")
    args = parser.parse_args()
    results_file = args.run / "results.json"
    # teacher_samples-*: the pool's name in runs before it grew in chunks
    pools = sorted(
        [*args.run.glob("teacher_pool-*seed*.safetensors"), *args.run.glob("teacher_samples-seed*.safetensors")]
    )
    held = sorted(args.run.glob("eval_teacher_samples-seed*.safetensors"))
    if not (results_file.is_file() and (args.run / "model").is_dir() and pools and held):
        bad_input(
            f"{args.run} is not a finished tqc run (results.json, model/ and its teacher samples); give its --out"
        )
    run = json.loads(results_file.read_text())
    commit = git_commit()
    loaded = tqc.load_model(run["base_model"])
    student = tqc.load(args.run / "model").eval()
    sets = {
        f"the pool it was distilled on ({pools[0].name})": sequences(pools[0]),
        f"held-out teacher samples ({held[0].name})": sequences(held[0]),
    }
    rows = {}
    for name, blocks in sets.items():
        if blocks.shape[1] < args.context:
            bad_input(f"--context {args.context} is longer than the sequences of {name} ({blocks.shape[1]} tokens)")
        started = time.perf_counter()
        ids = blocks[:, : args.context].reshape(-1)  # windows of --context: each one sequence's start
        scored = evaluate(student, ids, context=args.context, teacher=loaded.model, tokenizer=loaded.tokenizer)
        # the teacher alone: against itself its KL is 0 by definition, not worth a second forward pass
        teacher_alone = evaluate(loaded.model, ids, context=args.context, tokenizer=loaded.tokenizer)
        rows[name] = {
            "sequences": blocks.shape[0],
            "tokens": scored["tokens"],
            "teacher_perplexity": teacher_alone["perplexity"],
            **{k: scored[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement")},
            "seconds": time.perf_counter() - started,
        }
    result = cpu_run(commit, args) | {
        "run": {k: run.get(k) for k in ("base_model", "method", "ratio", "teacher_pool_blocks", "distill", "seconds")},
        "protocol": f"first {args.context} tokens of each sequence, one window each, scored as in tqc eval",
        "sets": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(
            ["teacher samples", "sequences", "tokens", "teacher ppl", "student ppl", "KL", "top-1"],
            [
                [
                    n,
                    r["sequences"],
                    r["tokens"],
                    r["teacher_perplexity"],
                    r["perplexity"],
                    r["kl_to_teacher"],
                    r["top1_agreement"],
                ]
                for n, r in rows.items()
            ],
        )
    )


def sequences(path: Path) -> torch.Tensor:
    return load_file(str(path))["blocks"]


if __name__ == "__main__":
    main()
