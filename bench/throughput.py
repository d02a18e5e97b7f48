"""Distillation throughput on the device it runs on: KD tokens per second, MFU and peak memory.

The student is SmolLM2-135M at --ratio as ``tqc run`` plans it (calibrated ``auto`` over the recipe's
structures, outputs weighted by the loss's gradients), built once and saved. Then, each in a fresh
process (so that peak memory is its own), on the same data from the same student and seed:

* ``baseline``: the loop before this work: whole-batch fp32 logit loss, for-each AdamW, fp32 teacher;
  on a GPU compare.py's protocol (16 x 256 tokens), on a CPU the demo's (4 x 256);
* ``new defaults``: ``DistillConfig()`` as ``tqc run`` uses it on this device, at --batch-size
  (default: the baseline's on a CPU, --gpu-batch-size on a GPU);
* ``anchor``: a plain bf16 fine-tuning step (cross-entropy) of the dense teacher alone at the same
  token batch, fused AdamW: what a standard trainer of this model reaches here;
* ``ceiling``: the device's bf16 matrix-product rate on the model's own linear shapes at that token
  batch (forward shapes only): the physical limit.

The two distillation rows train --steps optimizer steps each; tokens/s counts the steps after
--warmup-steps. Both students are then scored against the teacher on the shipped held-out text
(KL and top-1 on --eval-tokens of each domain): the speed-up must leave quality where it was.

FLOPs per KD token: 6 x student parameters (forward and backward) + 2 x teacher parameters
(forward) + attention, 12 x layers x hidden x seq_len for the student and 4 x ... for the teacher
(PaLM's MFU count: matmuls only, attention not halved for causality); the anchor: 6 x teacher
parameters + 12 x layers x hidden x seq_len. MFU = achieved FLOP/s over the ceiling row's rate
(and, on a GPU with a known spec, over the card's dense bf16 peak).

--compress METHODS adds a second part: seconds to compress the whole model with each method (with
the calibration the method takes), on the device given by --device.

Writes bench/results/throughput/throughput.json (commit, settings, device, each row as it finishes) and prints a table.

    python bench/throughput.py                               # CPU
    python bench/throughput.py --device cuda --compress svd,svd_aware,tq,tq_aware,kronecker,layer_drop,auto
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, HERE, bad_input
from provenance import git_commit

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, text_block_source, tokenize_text
from tqcompressor.evaluation.fidelity import HELDOUT_DIR, HELDOUT_FILES, Domain, measure
from tqcompressor.evaluation.report import table
from tqcompressor.training import recipe
from tqcompressor.training.distill import DistillConfig, multistep_distill
from tqcompressor.versions import library_versions

# dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), FLOP/s
SPEC_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    args = parse_args()
    commit = git_commit()
    result = {
        "commit": commit,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "versions": library_versions(),
        "device": device_name(args.device),
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine()},
        "finished": False,
    }
    loaded = tqc.load_model(args.model)
    teacher = loaded.model.eval()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.perf_counter()
        student = plan_like_tqc_run(copy.deepcopy(teacher), loaded.tokenizer, args)
        result["student"] = {
            "params": tqc.count_parameters(student),
            "teacher_params": tqc.count_parameters(teacher),
            "plan_seconds": time.perf_counter() - started,
        }
        tqc.save(student, work / "student", loaded.tokenizer)
        del student
        rows = {}
        result["rows"] = rows
        baseline_batch = 16 if args.device == "cuda" else 4
        new_batch = args.batch_size or (args.gpu_batch_size if args.device == "cuda" else baseline_batch)
        runs = {
            "baseline": (baseline_batch, {"chunked_loss": False, "fused_optimizer": False, "teacher_dtype": "fp32"}),
            "new defaults": (new_batch, {}),
        }
        for name, (batch, changes) in runs.items():
            rows[name] = in_fresh_process(distill_row, args, work, batch, changes)
            write(result, args.out)
        rows["anchor"] = in_fresh_process(anchor_row, args, work, new_batch)
        write(result, args.out)
        rows["ceiling"] = ceiling_row(teacher, new_batch * args.seq_len, args.device)
        add_ratios(result, teacher)
        write(result, args.out)
        if args.compress:
            result["compression"] = {}
            for method in args.compress.split(","):
                result["compression"][method] = in_fresh_process(compress_row, args, work, method)
                write(result, args.out)
    result["finished"] = True
    write(result, args.out)
    print_tables(result)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--train", default=str(DATA / "valid.txt"), help="calibration and distillation text")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="of the new defaults and the anchor")
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of each distillation row")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="of each held-out domain, for the quality check")
    parser.add_argument("--compress", default="", help="comma-separated methods whose whole-model compression is timed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "throughput" / "throughput.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        bad_input("--device cuda: no CUDA device is visible here; use --device cpu")
    if not 0 <= args.warmup_steps < args.steps:
        bad_input(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}")
    if not Path(args.train).is_file():
        bad_input(f"--train {args.train} does not exist; point it at a text file (WikiText-2 valid by default)")
    return args


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


def plan_like_tqc_run(student: torch.nn.Module, tokenizer, args: argparse.Namespace) -> torch.nn.Module:
    """The student ``tqc run`` trains: calibrated auto over the recipe's structures, output-weighted."""
    config = tqc.CompressionConfig(
        method=recipe.METHOD,
        ratio=args.ratio,
        auto_methods=list(recipe.AUTO_METHODS),
        output_weights=recipe.OUTPUT_WEIGHTS,
    )
    ids = calibration_ids(args.train, student, tokenizer, args.calibration_tokens, args.seq_len)
    return tqc.compress(student, config, calibration=ids, progress=False)[0]


def in_fresh_process(function, *arguments) -> dict:
    """``function(*arguments)`` in a spawned process (its own peak memory, no state carried over)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_quiet) as pool:
        return pool.apply(function, arguments)


def _quiet() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars from the rows: one table at the end


def distill_row(args: argparse.Namespace, work: Path, batch_size: int, changes: dict) -> dict:
    """Train the saved student ``--steps`` steps with DistillConfig(**changes); tokens/s, peak memory,
    and its fidelity to the teacher on the held-out text afterwards."""
    loaded = tqc.load_model(args.model)
    teacher, student = loaded.model.to(args.device), tqc.load(work / "student").to(args.device)
    config = DistillConfig(
        steps=args.steps,
        batch_size=batch_size,
        seq_len=args.seq_len,
        lr=recipe.LR,
        checkpoint_every=10**9,
        log_every=1,
        **changes,
    )
    blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
    run = work / f"run-{len(changes)}-{batch_size}"
    reset_peak_memory(args.device)
    student = multistep_distill(teacher, student, blocks, config, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = batch_size * args.seq_len
    # each record's rate is cumulative from the stage's start: elapsed time after step k = k x tokens / rate_k
    elapsed = {r["global_step"]: r["global_step"] * tokens_per_step / r["tokens_per_s"] for r in records}
    timed_steps = args.steps - args.warmup_steps
    seconds = elapsed[args.steps] - elapsed.get(args.warmup_steps, 0.0)
    peak = peak_memory(args.device)
    domains = {
        name: Domain(tokenize_text(str(HELDOUT_DIR / file), loaded.tokenizer, args.eval_tokens), True)
        for name, file in HELDOUT_FILES.items()
    }
    fidelity = measure(student.eval(), teacher.eval(), domains, context=512, tokenizer=loaded.tokenizer)
    return {
        "distill_config": {k: str(v) for k, v in vars(config).items()},
        "batch_tokens": tokens_per_step,
        "timed_steps": timed_steps,
        "seconds_per_step": seconds / timed_steps,
        "tokens_per_s": timed_steps * tokens_per_step / seconds,
        "peak_memory_bytes": peak,
        "final_kl_loss": records[-1]["kl"],
        "heldout_text_kl": fidelity["fidelity_kl"],
        "heldout_text_top1": fidelity["fidelity_top1"],
        "flops_per_token": kd_flops_per_token(student, teacher, args.seq_len),
    }


def anchor_row(args: argparse.Namespace, work: Path, batch_size: int) -> dict:
    """A plain bf16 fine-tuning step of the dense teacher: ``model(ids, labels=ids).loss``, fused AdamW."""
    loaded = tqc.load_model(args.model)
    model = loaded.model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    stream = text_block_source(args.train, loaded.tokenizer, args.seq_len)(0)
    reset_peak_memory(args.device)
    started = None
    for step in range(args.steps):
        if step == args.warmup_steps:
            synchronize(args.device)
            started = time.perf_counter()
        batch = torch.stack([next(stream) for _ in range(batch_size)]).to(args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(args.device)
    timed_steps = args.steps - args.warmup_steps
    seconds = time.perf_counter() - started
    return {
        "batch_tokens": batch_size * args.seq_len,
        "timed_steps": timed_steps,
        "seconds_per_step": seconds / timed_steps,
        "tokens_per_s": timed_steps * batch_size * args.seq_len / seconds,
        "peak_memory_bytes": peak_memory(args.device),
        "flops_per_token": 6 * tqc.count_parameters(model) + attention_flops(model, args.seq_len, 12),
    }


def ceiling_row(model: torch.nn.Module, tokens: int, device: str, repeats: int = 3) -> dict:
    """bf16 ``x @ W.T`` for every distinct linear shape of ``model`` (the LM head included), ``tokens``
    rows each, weighted by how often the shape occurs: total FLOPs over total time (best of ``repeats``)."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes[tuple(module.weight.shape)] = shapes.get(tuple(module.weight.shape), 0) + 1
    flops = seconds = 0.0
    for (out_features, in_features), count in shapes.items():
        x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
        w = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
        x @ w.T  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            x @ w.T
            synchronize(device)
            best = min(best, time.perf_counter() - started)
        flops += count * 2 * tokens * in_features * out_features
        seconds += count * best
    return {"tokens": tokens, "shapes": {f"{o}x{i}": n for (o, i), n in shapes.items()}, "flops_per_s": flops / seconds}


def compress_row(args: argparse.Namespace, work: Path, method: str) -> dict:
    """Seconds to compress the whole model with ``method`` (calibration included where it takes one)."""
    from compare import build_student

    loaded = tqc.load_model(args.model)
    model = loaded.model.to(args.device)
    options = argparse.Namespace(
        ratio=args.ratio, embedding=False, auto_methods=None, train=args.train, calibration_tokens=8192
    )
    synchronize(args.device)
    started = time.perf_counter()
    student, _ = build_student(method, model, loaded.tokenizer, options)
    synchronize(args.device)
    return {"compress_seconds": time.perf_counter() - started, "params": tqc.count_parameters(student)}


def attention_flops(model: torch.nn.Module, seq_len: int, factor: int) -> int:
    """``factor`` x layers x hidden x seq_len: 12 for a training token, 4 for a forward-only one."""
    config = model.config
    return factor * config.num_hidden_layers * config.hidden_size * seq_len


def kd_flops_per_token(student, teacher, seq_len: int) -> int:
    student_flops = 6 * tqc.count_parameters(student) + attention_flops(student, seq_len, 12)
    return student_flops + 2 * tqc.count_parameters(teacher) + attention_flops(teacher, seq_len, 4)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int:
    """Peak GPU memory allocated, or on a CPU the process's peak resident set (models and data included)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def add_ratios(result: dict, teacher) -> None:
    """Speed-up of the new defaults over the baseline and over the anchor; MFU of every training row."""
    rows = result["rows"]
    ceiling = rows["ceiling"]["flops_per_s"]
    spec = next((peak for name, peak in SPEC_BF16_PEAK.items() if name in result["device"]), None)
    for name in ("baseline", "new defaults", "anchor"):
        row = rows[name]
        achieved = row["tokens_per_s"] * row["flops_per_token"]
        row["flops_per_s"] = achieved
        row["mfu_of_ceiling"] = achieved / ceiling
        if spec:
            row["mfu_of_spec"] = achieved / spec
    new = rows["new defaults"]
    new["speedup"] = new["tokens_per_s"] / rows["baseline"]["tokens_per_s"]
    new["share_of_anchor"] = new["tokens_per_s"] / rows["anchor"]["tokens_per_s"]
    new["heldout_text_kl_change"] = new["heldout_text_kl"] - rows["baseline"]["heldout_text_kl"]


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def print_tables(result: dict) -> None:
    rows = result["rows"]
    lines = []
    for name in ("baseline", "new defaults", "anchor"):
        r = rows[name]
        lines.append(
            [
                name,
                r["batch_tokens"],
                r["tokens_per_s"],
                r["flops_per_s"] / 1e12,
                r["mfu_of_ceiling"],
                r["peak_memory_bytes"] / 2**30,
                r.get("heldout_text_kl", ""),
            ]
        )
    lines.append(
        ["ceiling (bf16 matmul)", rows["ceiling"]["tokens"], "", rows["ceiling"]["flops_per_s"] / 1e12, 1.0, "", ""]
    )
    print(f"device: {result['device']}, commit {result['commit']}")
    print(table(["row", "tokens/step", "KD tokens/s", "TFLOP/s", "of ceiling", "peak GiB", "held-out KL"], lines))
    new = rows["new defaults"]
    print(
        f"new defaults: {new['speedup']:.2f}x the baseline's tokens/s, {new['share_of_anchor']:.0%} of the anchor's; "
        f"held-out KL {new['heldout_text_kl_change']:+.4f} against the baseline's"
    )
    if "compression" in result:
        print(
            table(
                ["method", "compress seconds"], [[m, r["compress_seconds"]] for m, r in result["compression"].items()]
            )
        )


if __name__ == "__main__":
    main()
