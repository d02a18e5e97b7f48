"""Recovery per CPU second: from one one-shot student, fidelity to the teacher after global distillation
alone and after block-wise reconstruction then global distillation, each given the same seconds.

The student is compressed once (``--method``, calibrated on ``--train``) and measured one-shot. One
distillation step of the run's settings is timed on it, and each recovery gets ``--recovery-seconds``:
``global`` spends them all on logit distillation; ``blockwise+global`` first refits each decoder block to
the teacher's (:mod:`tqcompressor.training.blockwise`, timed as it runs), then distils for the steps the
seconds left pay for. Both start from copies of the same student and measure on the same held-out suite.
``seconds`` of a run is the compression's plus its recovery's (evaluations aside: the same for every run).

    python bench/recovery.py    # ~30 minutes on 2 cores; writes bench/results/recovery/recovery.json and .png
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

from common import HERE, Fidelity, distill_config, distillation_options, fidelity_options, pyplot
from compare import build_student, chosen_methods
from provenance import cpu_run, git_commit

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, text_block_source
from tqcompressor.evaluation.report import table
from tqcompressor.training.blockwise import BlockwiseConfig, reconstruct_blocks
from tqcompressor.training.budget import seconds_per_step
from tqcompressor.training.distill import multistep_distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    distillation_options(parser, eval_tokens=2048, kd_steps=False)
    fidelity_options(parser, tokens=1024)
    parser.add_argument("--method", default="svd_aware", help="how the one-shot student is compressed")
    parser.add_argument("--recovery-seconds", type=float, default=600.0, help="what each recovery may spend")
    parser.add_argument("--blockwise-steps", type=int, default=BlockwiseConfig.steps, help="Adam steps per block")
    parser.add_argument("--blockwise-lr", type=float, default=BlockwiseConfig.lr)
    parser.add_argument("--blockwise-tokens", type=int, default=8192, help="of --train, in blocks of --seq-len")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "recovery" / "recovery.json")
    parser.add_argument("--work", type=Path, default=Path("runs/recovery"))
    args = parser.parse_args()
    args.embedding, args.auto_methods = False, "svd"  # what compare.build_student reads beside these
    (method,) = chosen_methods(args.method)
    commit = git_commit()
    loaded = tqc.load_model(args.model)
    teacher = loaded.model
    suite = Fidelity(teacher, loaded.tokenizer, args.fidelity_tokens, args.context, args.work)
    started = time.perf_counter()
    student, _ = build_student(method, copy.deepcopy(teacher), loaded.tokenizer, args)
    compress_seconds = time.perf_counter() - started
    runs = [run_record("one-shot", method, "none", compress_seconds, 0, suite.point(student))]
    print_run(runs[-1])

    probe = calibration_ids(args.train, teacher, loaded.tokenizer, args.batch_size * args.seq_len, args.seq_len)
    step_seconds = seconds_per_step(teacher, student, probe, distill_config(args, steps=1))
    tokens_per_step = args.batch_size * args.seq_len

    def distil(model, seconds: float, name: str):
        steps = max(1, int(seconds / step_seconds))
        blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
        t0 = time.perf_counter()
        model = multistep_distill(
            teacher, model, blocks, distill_config(args, steps=steps), args.work / name, tokenizer=loaded.tokenizer
        )
        return model.to("cpu"), steps, time.perf_counter() - t0

    distilled, steps, seconds = distil(copy.deepcopy(student), args.recovery_seconds, "global")
    runs.append(
        run_record(
            "global KD",
            method,
            "global",
            compress_seconds + seconds,
            steps * tokens_per_step,
            suite.point(distilled),
            {"global": seconds},
        )
    )
    print_run(runs[-1])
    del distilled

    blockwise = BlockwiseConfig(args.blockwise_steps, args.blockwise_lr, args.batch_size)
    refit, ids = copy.deepcopy(student), calibration_ids(args.train, teacher, loaded.tokenizer, args.blockwise_tokens)
    t0 = time.perf_counter()
    blocks_report = reconstruct_blocks(refit, teacher, ids, blockwise)
    block_seconds = time.perf_counter() - t0
    runs.append(
        run_record(
            "block-wise only",
            method,
            "blockwise",
            compress_seconds + block_seconds,
            0,
            suite.point(refit),
            {"blockwise": block_seconds},
        )
    )
    print_run(runs[-1])
    distilled, steps, seconds = distil(refit, args.recovery_seconds - block_seconds, "blockwise_global")
    runs.append(
        run_record(
            "block-wise, then global KD",
            method,
            "blockwise+global",
            compress_seconds + block_seconds + seconds,
            steps * tokens_per_step,
            suite.point(distilled),
            {"blockwise": block_seconds, "global": seconds},
        )
    )
    print_run(runs[-1])

    result = {
        **cpu_run(commit, args),
        "what": "fidelity KL on the held-out suite of one one-shot student after each recovery, every recovery "
        "given the same seconds (--recovery-seconds); seconds = compression + recovery, evaluations aside",
        "fidelity": suite.protocol(),
        "distill": asdict(distill_config(args, steps=1)),
        "blockwise": asdict(blockwise),
        "blockwise_tokens": int(ids.numel()),
        "seconds_per_kd_step": step_seconds,
        "blocks": blocks_report,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(format_table(result))


def run_record(label, method, stages, seconds, kd_tokens, measured, stage_seconds=None) -> dict:
    return {
        "label": label,
        "method": method,
        "stages": stages,
        "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in (stage_seconds or {}).items()},
        "kd_tokens": kd_tokens,
        **measured,
    }


def print_run(run: dict) -> None:
    print(f"{run['label']:>28}  {run['seconds']:7.0f} s  fidelity KL {run['fidelity_kl']:.4f}", flush=True)


def format_table(result: dict) -> str:
    rows = [
        [r["label"], r["stages"], r["seconds"], r["kd_tokens"], r["fidelity_kl"], r["fidelity_top1"]]
        for r in result["runs"]
    ]
    return table(["run", "stages", "seconds", "KD tokens", "fidelity KL", "top-1"], rows)


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        axes.plot(run["seconds"] / 60, run["fidelity_kl"], "o")
        axes.annotate(run["label"], (run["seconds"] / 60, run["fidelity_kl"]), fontsize=8)
    axes.set_xlabel("CPU minutes (compression + recovery)")
    axes.set_ylabel("fidelity KL (held-out, nats/token)")
    axes.set_title("Recovery from one one-shot student at equal seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
