"""Side by side at equal budgets: tq, kronecker, svd, layer dropping and auto, each distilled on the same data.

Every method gets the same whole-model parameter budget (--ratio of the teacher, all parameters
counted once), the same distillation data (WikiText-2 valid) and the same number of KD tokens;
all are scored first by fidelity to the teacher on held-out text (teacher samples, prose, docs,
code: fidelity KL and top-1, :class:`common.Fidelity`), then on the same prefix of WikiText-2 test,
in-domain. The ``*_aware`` methods and ``auto`` also see --calibration-tokens of the distillation
data before compressing (each structure fitted in the output metric ``E||(W - W')x||^2``; auto's
loss-weighted output errors); the others fit weights only. Writes bench/results/compare/compare.json and
bench/results/compare/compare.png and prints a table.

    python bench/compare.py                       # CPU, small KD budget
    python bench/compare.py --device cuda --kd-steps 300 --batch-size 16 --workers 2 --threads 7

Compression runs on the CPU. With ``--workers N`` it runs in N processes beside the main one,
which distils and evaluates each student as soon as it is ready: on a GPU machine the slowest fit
(calibrated ``tq``) then overlaps the other methods' distillation. Methods start in the order given,
and the JSON is rewritten after each, so a run stopped early keeps what it finished (``finished``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from common import HERE, Fidelity, bad_input, before_after_bars, distill_config, distillation_options, fidelity_options
from provenance import git_commit

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, text_block_source, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.report import table
from tqcompressor.layers import factored_modules
from tqcompressor.planning.inventory import default_target_modules, tied_embedding
from tqcompressor.surgery.baselines import keep_layers, layer_drop_plan
from tqcompressor.training.distill import multistep_distill
from tqcompressor.versions import library_versions

METHODS = ["tq", "kronecker", "svd", "layer_drop", "tq_aware", "svd_aware", "auto"]
# bench name -> CompressionConfig method, with calibration (tq/kronecker: fitted in the output metric)
CALIBRATED = {
    "tq_aware": "tq",
    "kronecker_aware": "kronecker",
    "tq_lowrank_aware": "tq_lowrank",
    "svd_aware": "svd",
    "auto": "auto",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    distillation_options(parser, eval_tokens=65536)
    fidelity_options(parser)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, started in this order")
    parser.add_argument(
        "--auto-methods",
        default=None,
        help="comma-separated structures auto may choose (default: every registered one; the CLI's default is svd)",
    )
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="the uniform-budget methods also factor the tied token embedding (auto always weighs it)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="compress in this many processes beside the main one (0: one after another, in it)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each compressing worker")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare" / "compare.json")
    parser.add_argument("--work", type=Path, default=Path("runs/compare"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="continue an interrupted run: keep the methods of this result file, which must come "
        "from the same commit (committed) and the very same settings",
    )
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    methods = chosen_methods(args.methods)
    if args.embedding and "layer_drop" in methods:
        bad_input("--embedding: layer dropping cannot factor an embedding; leave layer_drop out")
    commit = git_commit()
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("methods", "out", "work", "replot", "merge")}
    loaded = tqc.load_model(args.model)
    teacher = copy.deepcopy(loaded.model).to(args.device)
    ids = tokenize_text(args.test, loaded.tokenizer, args.eval_tokens)
    config = distill_config(args)
    settings["training_precision"] = config.mixed_precision  # what "auto" meant here; --merge checks it
    blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
    eval_kwargs = dict(context=args.context, tokenizer=loaded.tokenizer, batch_size=8 if args.device != "cpu" else 4)
    t0 = time.perf_counter()
    teacher_metrics = evaluate(teacher, ids, **eval_kwargs)
    suite = Fidelity(teacher, loaded.tokenizer, args.fidelity_tokens, args.context, args.work)
    teacher_params = tqc.count_parameters(teacher)
    result = {
        "commit": commit,
        "settings": settings,
        "versions": library_versions(),
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine()},
        "ratio": args.ratio,
        "target_params": int(args.ratio * teacher_params),
        "teacher": {"params": teacher_params, "perplexity": teacher_metrics["perplexity"]},
        "kd_tokens": config.steps * config.batch_size * config.seq_len,
        "kd_data": Path(args.train).name,
        "fidelity": suite.protocol(),
        "eval": {
            "data": Path(args.test).name,
            "in_domain": True,  # the distillation data's own corpus: ppl_* and kl_to_teacher below
            "tokens": teacher_metrics["tokens"],
            **teacher_metrics["protocol"],
        },
        "counting": "every parameter counted once (tied embedding/head once); permutation index buffers excluded",
        "calibration": {
            "methods": [m for m in methods if m in CALIBRATED],
            "tokens": args.calibration_tokens,
            "data": Path(args.train).name,
        },
        "requested": methods,
        "finished": False,
        "methods": {},
    }
    if args.merge is not None:
        result["methods"] = mergeable(json.loads(args.merge.read_text()), result)["methods"]
    print(f"teacher: {teacher_params:,} params, perplexity {teacher_metrics['perplexity']:.2f}")
    todo = [m for m in methods if m not in result["methods"]]
    for method, student, auto_record, compress_seconds in compressed_students(todo, loaded, args):
        started = time.perf_counter()
        student.to(args.device)
        compressed = evaluate(student, ids, teacher=teacher, **eval_kwargs)
        before = suite.point(student)
        student = multistep_distill(
            teacher,
            student,
            blocks,
            config,
            args.work / method,
            plan=None,
            teacher_name=args.model,
            data_name=args.train,
        )
        distilled = evaluate(student.eval(), ids, teacher=teacher, **eval_kwargs)
        result["methods"][method] = {
            "params": tqc.count_parameters(student),
            **suite.point(student),
            "fidelity_kl_before_kd": before["fidelity_kl"],
            "ppl_compressed": compressed["perplexity"],
            "ppl_distilled": distilled["perplexity"],
            "kl_to_teacher": distilled["kl_to_teacher"],
            "top1_agreement": distilled["top1_agreement"],
            "kl_to_teacher_before_kd": compressed["kl_to_teacher"],
            "layer_types": layer_types(student),
            "compress_seconds": compress_seconds,
            "kd_and_eval_seconds": time.perf_counter() - started,
            "seconds": compress_seconds + time.perf_counter() - started,
            **({"auto_embedding": auto_record["embedding"]} if auto_record else {}),
        }
        print(method, json.dumps(result["methods"][method]), flush=True)
        del student
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every method: partial results survive
    result["seconds"] = time.perf_counter() - t0
    result["finished"] = True
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(format_table(result))
    print(
        f"KD: {result['kd_tokens']:,} tokens of {result['kd_data']} per method; eval: {result['eval']}; "
        f"wrote {args.out}"
    )


def format_table(result: dict) -> str:
    """Fidelity first (held out), then the in-domain perplexities, one row per method."""
    teacher = result["teacher"]
    rows = [["teacher", teacher["params"], 0.0, 1.0, 0.0, teacher["perplexity"], teacher["perplexity"], 0.0]]
    rows += [
        [
            m,
            r["params"],
            r.get("fidelity_kl", ""),
            r.get("fidelity_top1", ""),
            r.get("fidelity_kl_before_kd", ""),
            r["ppl_compressed"],
            r["ppl_distilled"],
            r["kl_to_teacher"],
        ]
        for m, r in result["methods"].items()
    ]
    headers = [
        "method",
        "params",
        "fidelity KL",
        "fidelity top-1",
        "fidelity KL before KD",
        "ppl compressed (in-domain)",
        "ppl after KD (in-domain)",
        "KL (in-domain)",
    ]
    return table(headers, rows)


def chosen_methods(text: str) -> list[str]:
    """The comma-separated ``--methods``, each one this script knows (or any registered structure,
    compressed to the budget without calibration, e.g. ``kronecker_prune``)."""
    from tqcompressor.structures import compression_methods

    known = list(dict.fromkeys(METHODS + list(CALIBRATED) + compression_methods()))
    methods = text.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        bad_input(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return methods


def layer_types(student: torch.nn.Module) -> dict[str, int]:
    """How many layers of each factored module class the student has (what ``auto`` chose)."""
    return dict(Counter(type(module).__name__ for _, module in factored_modules(student)))


def build_student(method: str, base, tokenizer, args) -> tuple[torch.nn.Module, dict]:
    """``base`` (a CPU copy of the teacher, consumed) compressed by ``method`` to ``args.ratio``,
    and what ``auto`` recorded of the token embedding (its choice, menu and role weights), if it weighed one."""
    ratio = args.ratio
    if method == "layer_drop":
        keep_layers(base, layer_drop_plan(base, int(ratio * tqc.count_parameters(base))))
        return base, {}
    targets = None  # the default targets (auto adds a tied embedding to its menu by itself)
    if args.embedding and method != "auto":
        targets = default_target_modules(base) + [tied_embedding(base)]
    if method not in CALIBRATED:
        return tqc.compress(base, tqc.CompressionConfig(method=method, ratio=ratio, target_modules=targets))[0], {}
    auto_methods = args.auto_methods.split(",") if method == "auto" and args.auto_methods else None
    config = tqc.CompressionConfig(
        method=CALIBRATED[method], ratio=ratio, target_modules=targets, auto_methods=auto_methods
    )
    embedding = tied_embedding(base)
    # statistics of the teacher's own layer inputs: planning calibrates before it changes anything
    ids = calibration_ids(args.train, base, tokenizer, args.calibration_tokens)
    student, report = tqc.compress(base, config, calibration=ids)
    return student, {"embedding": report.plan.auto[embedding]} if embedding in (report.plan.auto or {}) else {}


def compressed_students(methods: list[str], loaded, args):
    """``(method, student on CPU, what auto recorded, seconds)`` for each method, in order of completion."""
    if args.workers == 0:
        for method in methods:
            started = time.perf_counter()
            student, record = build_student(method, copy.deepcopy(loaded.model), loaded.tokenizer, args)
            yield method, student, record, time.perf_counter() - started
        return
    args.work.mkdir(parents=True, exist_ok=True)
    # spawn: the main process holds a CUDA context, which a forked child must not inherit
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compress_in_worker, m, args, args.work / f"{m}.student.pt") for m in methods]
        for future in concurrent.futures.as_completed(futures):
            method, path, record, seconds = future.result()
            student = torch.load(path, weights_only=False)  # our own file of this run, written by the worker
            path.unlink()
            yield method, student, record, seconds


def compress_in_worker(method: str, args, path: Path) -> tuple[str, Path, dict, float]:
    """Runs in a worker process: load the model, compress it, pickle the student to ``path``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = tqc.load_model(args.model)
    student, record = build_student(method, loaded.model, loaded.tokenizer, args)
    torch.save(student, path)
    return method, path, record, time.perf_counter() - started


def mergeable(earlier: dict, result: dict) -> dict:
    """``earlier`` if it is the same run (one commit, committed, every setting equal) interrupted; a
    result file is one run of one commit, so anything else is refused."""
    if "+uncommitted" in result["commit"] or earlier.get("commit") != result["commit"]:
        bad_input(
            f"--merge: the earlier file is from commit {earlier.get('commit')}, this run from "
            f"{result['commit']}; a result file is one run of one committed version: run all methods"
        )
    differ = sorted(
        k
        for k in set(earlier.get("settings", {})) | set(result["settings"])
        if earlier.get("settings", {}).get(k) != result["settings"].get(k)
    )
    if differ:
        bad_input(f"--merge: settings differ ({', '.join(differ)}); use the very same settings")
    return earlier


def plot(result: dict, path: Path) -> None:
    """Grouped bars per method: fidelity KL right after compression and after KD (log scale); for a
    file from before the fidelity suite, in-domain perplexity."""
    methods = result["methods"]
    teacher = result["teacher"]
    title = f"{Path(result['model']).name} at {result['ratio']:.0%} params, {result['kd_tokens'] / 1e6:.1f}M KD tokens"
    ticks = [f"{m}\n{r['params'] / 1e6:.1f}M" for m, r in methods.items()]
    if all("fidelity_kl" in r for r in methods.values()):
        before_after_bars(
            path,
            {m: (r["fidelity_kl_before_kd"], r["fidelity_kl"]) for m, r in methods.items()},
            ticks,
            None,
            title,
            "after compression",
            ylabel="fidelity KL to the teacher, held out (nats/token, log)",
        )
        return
    before_after_bars(
        path,
        {m: (r["ppl_compressed"], r["ppl_distilled"]) for m, r in methods.items()},
        ticks,
        (teacher["perplexity"], f"teacher {teacher['perplexity']:.1f} ({teacher['params'] / 1e6:.0f}M)"),
        title,
        "after compression",
    )


if __name__ == "__main__":
    main()
