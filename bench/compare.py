"""Side by side at equal budgets: tq, kronecker, svd, layer dropping and auto, each distilled on the same data.

Every method gets the same whole-model parameter budget (--ratio of the teacher, all parameters
counted once), the same distillation data (WikiText-2 valid) and the same number of KD tokens;
all are evaluated on the same prefix of WikiText-2 test. ``tq_aware``, ``svd_aware`` and ``auto``
also see --calibration-tokens of the distillation data before compressing (RMS-weighted input
columns for tq; activation-aware SVD; auto's loss-weighted output errors); the others fit weights only. Writes bench/results/compare.json and
bench/results/compare.png and prints a table.

    python bench/compare.py                       # CPU, small KD budget
    python bench/compare.py --device cuda --kd-steps 300 --eval-tokens 65536
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import tqcompressor as tqc
from provenance import git_commit
from tqcompressor.baselines import keep_layers, layer_drop_plan
from tqcompressor.calibration import calibrate
from tqcompressor.data import calibration_ids, text_block_source, tokenize_text
from tqcompressor.distill import DistillConfig, multistep_distill
from tqcompressor.evaluate import evaluate
from tqcompressor.report import table
from tqcompressor.surgery import find_target_modules

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "wikitext-2"
METHODS = ["tq", "kronecker", "svd", "layer_drop", "tq_aware", "svd_aware", "auto"]
CALIBRATED = {"tq_aware": "tq", "svd_aware": "svd", "auto": "auto"}  # bench name -> CompressionConfig method, with calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train", default=str(DATA / "valid.txt"))
    parser.add_argument("--test", default=str(DATA / "test.txt"))
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--kd-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare.json")
    parser.add_argument("--work", type=Path, default=Path("runs/compare"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    parser.add_argument("--merge", type=Path, default=None,
                        help="continue an interrupted run: keep the methods of this result file, which must come "
                             "from the same commit (committed) and the very same settings")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return

    commit = git_commit()
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("methods", "out", "work", "replot", "merge")}
    loaded = tqc.load_model(args.model)
    teacher = loaded.model.to(args.device)
    ids = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    config = DistillConfig(steps=args.kd_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           checkpoint_every=10**9, log_every=10)
    blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
    eval_kwargs = dict(context=args.context, tokenizer=loaded.tokenizer, batch_size=8 if args.device != "cpu" else 4)
    t0 = time.perf_counter()
    teacher_metrics = evaluate(teacher, ids, **eval_kwargs)
    teacher_params = tqc.count_parameters(teacher)
    result = {
        "commit": commit, "settings": settings,
        "model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "ratio": args.ratio, "target_params": int(args.ratio * teacher_params),
        "teacher": {"params": teacher_params, "perplexity": teacher_metrics["perplexity"]},
        "kd_tokens": config.steps * config.batch_size * config.seq_len, "kd_data": Path(args.train).name,
        "eval": {"data": Path(args.test).name, "tokens": teacher_metrics["tokens"], **teacher_metrics["protocol"]},
        "counting": "every parameter counted once (tied embedding/head once); permutation index buffers excluded",
        "calibration": {"methods": sorted(CALIBRATED), "tokens": args.calibration_tokens, "data": Path(args.train).name},
        "methods": {},
    }
    if args.merge is not None:
        result["methods"] = mergeable(json.loads(args.merge.read_text()), result)["methods"]
    print(f"teacher: {teacher_params:,} params, perplexity {teacher_metrics['perplexity']:.2f}")
    for method in args.methods.split(","):
        started = time.perf_counter()
        student = copy.deepcopy(teacher).to("cpu")
        if method == "layer_drop":
            keep_layers(student, layer_drop_plan(student, int(args.ratio * teacher_params)))
        elif method in CALIBRATED:
            config_c = tqc.CompressionConfig(method=CALIBRATED[method], ratio=args.ratio)
            names = find_target_modules(student, config_c.target_modules)
            stats = calibrate(teacher, names, calibration_ids(args.train, teacher, loaded.tokenizer,
                                                              args.calibration_tokens))
            student, _ = tqc.compress(student, config_c, calibration=stats)
        else:
            student, _ = tqc.compress(student, tqc.CompressionConfig(method=method, ratio=args.ratio))
        student.to(args.device)
        compressed = evaluate(student, ids, teacher=teacher, **eval_kwargs)
        student = multistep_distill(teacher, student, blocks, config, args.work / method, plan=None,
                                    teacher_name=args.model, data_name=args.train)
        distilled = evaluate(student.eval(), ids, teacher=teacher, **eval_kwargs)
        result["methods"][method] = {
            "params": tqc.count_parameters(student),
            "ppl_compressed": compressed["perplexity"], "ppl_distilled": distilled["perplexity"],
            "kl_to_teacher": distilled["kl_to_teacher"], "top1_agreement": distilled["top1_agreement"],
            "kl_to_teacher_before_kd": compressed["kl_to_teacher"], "seconds": time.perf_counter() - started,
        }
        print(method, json.dumps(result["methods"][method]))
        del student
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every method: partial results survive
    result["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    rows = [[m, r["params"], r["ppl_compressed"], r["ppl_distilled"], r["kl_to_teacher"], r["top1_agreement"]]
            for m, r in result["methods"].items()]
    print(table(["method", "params", "ppl compressed", "ppl after KD", "KL to teacher", "top-1 agree"],
                [["teacher", teacher_params, teacher_metrics["perplexity"], teacher_metrics["perplexity"], 0.0, 1.0]] + rows))
    print(f"KD: {result['kd_tokens']:,} tokens of {result['kd_data']} per method; eval: {result['eval']}; wrote {args.out}")


def mergeable(earlier: dict, result: dict) -> dict:
    """``earlier`` if it is the same run (one commit, committed, every setting equal) interrupted; a
    result file is one run of one commit, so anything else is refused."""
    if "+uncommitted" in result["commit"] or earlier.get("commit") != result["commit"]:
        raise SystemExit(f"--merge: the earlier file is from commit {earlier.get('commit')}, this run from "
                         f"{result['commit']}; a result file is one run of one committed version: run all methods")
    differ = sorted(k for k in set(earlier.get("settings", {})) | set(result["settings"])
                    if earlier.get("settings", {}).get(k) != result["settings"].get(k))
    if differ:
        raise SystemExit(f"--merge: settings differ ({', '.join(differ)}); use the very same settings")
    return earlier


def plot(result: dict, path: Path) -> None:
    """Grouped bars per method: perplexity right after compression and after KD (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    x = range(len(methods))
    fig, ax = plt.subplots(figsize=(7, 4))
    before = [result["methods"][m]["ppl_compressed"] for m in methods]
    after = [result["methods"][m]["ppl_distilled"] for m in methods]
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="after compression", color="#bbbbbb")
    bars = ax.bar([i + 0.2 for i in x], after, width=0.4, label="after KD", color="#1f77b4")
    for bar, value in zip(bars, after):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.axhline(result["teacher"]["perplexity"], color="black", linestyle="--",
               label=f"teacher {result['teacher']['perplexity']:.1f} ({result['teacher']['params'] / 1e6:.0f}M)")
    ax.set_xticks(list(x), [f"{m}\n{result['methods'][m]['params'] / 1e6:.1f}M" for m in methods])
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    name = Path(result["model"]).name
    ax.set_title(f"{name} at {result['ratio']:.0%} params, {result['kd_tokens'] / 1e6:.1f}M KD tokens", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
