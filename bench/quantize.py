"""Smaller than quantization alone? The teacher and the best compressed model, each in fp32, int8 and int4.

The compressed model is the best family at 65% in compare.json (activation-aware SVD, ``svd_aware``),
built and distilled with the same protocol as there (calibration on WikiText-2 valid, --kd-steps x
--batch-size x --seq-len KD tokens of it). Each of the two is then stored in fp32, int8 and int4
(groups of 32 and 128) with ``tqcompressor.quant.api`` and measured:

- ``--part quality`` (the default; wants a GPU for the distillation): bytes of the weights file,
  fidelity to the fp32 teacher on held-out text first (fidelity KL and top-1, common.Fidelity), then
  WikiText-2 test perplexity, KL and top-1 (in-domain, same protocol as compare.json). Writes
  bench/results/quantize/quantize.json and quantize.png (fidelity KL against bytes, one curve per family).
- ``--part speed`` (CPU): prefill and generation time of every variant as a ratio to the fp32 teacher,
  interleaved in one process, and the bytes each holds in memory while running. Speed depends on the
  shapes only, so the compressed model is the one-shot svd_aware model (no distillation). Writes
  bench/results/quantize/quantize-speed.json.

    python bench/quantize.py --device cuda --kd-steps 300 --batch-size 16      # quality, on a GPU
    python bench/quantize.py --part speed                                        # speed, on this CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import HERE, Fidelity, distill_config, distillation_options, fidelity_options, pyplot
from provenance import git_commit

import tqcompressor as tqc
from tqcompressor.data import calibration_ids, text_block_source, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.evaluation.footprint import interleaved, memory_bytes
from tqcompressor.evaluation.report import table
from tqcompressor.planning.calibration import calibrate
from tqcompressor.quant.api import quantize_
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.surgery.apply import find_target_modules
from tqcompressor.training.distill import multistep_distill
from tqcompressor.versions import library_versions

FORMATS = {
    "fp32": None,
    "int8": QuantizeSettings(8),
    "int4-g128": QuantizeSettings(4, 128),
    "int4-g32": QuantizeSettings(4, 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quality", "speed"], default="quality")
    distillation_options(parser, eval_tokens=65536)
    fidelity_options(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="speed: prefill prompt length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="speed: greedy tokens generated")
    parser.add_argument("--repeats", type=int, default=5, help="speed: interleaved repeats (median)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/quantize"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args()
    out = args.out or HERE / "results" / "quantize" / (
        "quantize.json" if args.part == "quality" else "quantize-speed.json"
    )
    if args.replot:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    commit = git_commit()
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "work", "replot")}
    started = time.perf_counter()
    loaded = tqc.load_model(args.model)
    teacher = loaded.model.eval()
    student = compressed_student(loaded, args)
    result = {
        "commit": commit,
        "settings": settings,
        "versions": library_versions(),
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu": {"cores": os.cpu_count(), "machine": platform.machine(), "threads": torch.get_num_threads()},
        "ratio": args.ratio,
        "compressed_method": "svd_aware (activation-aware SVD, calibrated on --train)",
        "formats": {name: (s.name if s else "fp32") for name, s in FORMATS.items()},
        "counting": "bytes of model.safetensors as tqc.save writes it (tied embedding/head once, "
        "scales and offsets included, padding included); memory: parameters and buffers held",
        "models": {},
    }
    if args.part == "quality":
        result["kd_tokens"] = args.kd_steps * args.batch_size * args.seq_len
        result["kd_data"] = Path(args.train).name
        measure_quality(teacher, student, loaded.tokenizer, args, result)
    else:
        result["student_note"] = "one-shot svd_aware (not distilled): the same shapes, so the same speed"
        measure_speed(teacher, student, args, result)
    result["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.part == "quality":
        plot(result, out.with_suffix(".png"))
    print_table(result)
    print(f"wrote {out}")


def compressed_student(loaded, args) -> torch.nn.Module:
    """svd_aware at ``args.ratio``, calibrated on ``args.train``; distilled on ``args.device`` (quality part)."""
    config = tqc.CompressionConfig(method="svd", ratio=args.ratio)
    base = copy.deepcopy(loaded.model)
    names = find_target_modules(base, config.target_modules)
    stats = calibrate(base, names, calibration_ids(args.train, base, loaded.tokenizer, args.calibration_tokens))
    student = tqc.compress(base, config, calibration=stats)[0]
    if args.part == "speed":
        return student.eval()
    kd = distill_config(args)
    teacher = copy.deepcopy(loaded.model).to(args.device)
    blocks = text_block_source(args.train, loaded.tokenizer, args.seq_len)
    student = multistep_distill(
        teacher, student.to(args.device), blocks, kd, args.work / "kd", teacher_name=args.model, data_name=args.train
    )
    return student.to("cpu").eval()


def variants(teacher: torch.nn.Module, student: torch.nn.Module):
    """``(family, format, model on CPU)`` for every family and format, one at a time."""
    for family, model in (("teacher", teacher), ("svd_aware", student)):
        for name, settings in FORMATS.items():
            variant = copy.deepcopy(model)
            if settings is not None:
                quantize_(variant, settings, measure_error=False)
            yield family, name, variant.eval()


def weights_file_bytes(model: torch.nn.Module, work: Path) -> int:
    with tempfile.TemporaryDirectory(dir=work) as directory:
        tqc.save(model, Path(directory) / "m")
        return (Path(directory) / "m" / "model.safetensors").stat().st_size


def measure_quality(teacher, student, tokenizer, args, result: dict) -> None:
    ids = tokenize_text(args.test, tokenizer, args.eval_tokens)
    reference = copy.deepcopy(teacher).to(args.device)
    eval_kwargs = dict(context=args.context, tokenizer=tokenizer, batch_size=8 if args.device != "cpu" else 4)
    args.work.mkdir(parents=True, exist_ok=True)
    suite = Fidelity(reference, tokenizer, args.fidelity_tokens, args.context, args.work)
    result["fidelity"] = suite.protocol()
    for family, name, model in variants(teacher, student):
        disk = weights_file_bytes(model, args.work)
        metrics = evaluate(model.to(args.device), ids, teacher=reference, **eval_kwargs)
        result["models"][f"{family} {name}"] = {
            "family": family,
            "format": name,
            "params": tqc.count_parameters(model),
            "weights_file_bytes": disk,
            **suite.point(model),
            "perplexity": metrics["perplexity"],
            "kl_to_teacher": metrics["kl_to_teacher"],
            "top1_agreement": metrics["top1_agreement"],
        }
        result["eval"] = {
            "data": Path(args.test).name,
            "in_domain": True,  # perplexity, kl_to_teacher, top1_agreement of each model
            "tokens": metrics["tokens"],
            **metrics["protocol"],
        }
        print(family, name, json.dumps(result["models"][f"{family} {name}"]), flush=True)
        del model


@torch.no_grad()
def measure_speed(teacher, student, args, result: dict) -> None:
    """Every variant's prefill and generation time over the fp32 teacher's, interleaved in one process."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, teacher.config.vocab_size, (1, args.prompt_tokens), generator=generator)
    models = {f"{family} {name}": model for family, name, model in variants(teacher, student)}
    args.work.mkdir(parents=True, exist_ok=True)

    def generate(model) -> None:
        short = prompt[:, :32]
        model.generate(
            short,
            attention_mask=torch.ones_like(short),
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=0,
        )

    prefill = interleaved(
        {k: (lambda m=m: m(prompt, logits_to_keep=1)) for k, m in models.items()}, "cpu", args.repeats
    )
    generation = interleaved({k: (lambda m=m: generate(m)) for k, m in models.items()}, "cpu", args.repeats)
    base = "teacher fp32"
    for key, model in models.items():
        family, name = key.split(" ")
        result["models"][key] = {
            "family": family,
            "format": name,
            "params": tqc.count_parameters(model),
            "weights_file_bytes": weights_file_bytes(model, args.work),
            "memory_bytes": memory_bytes(model),  # after running: the int4 kernel layout is included
            "prefill_time_ratio": prefill[key] / prefill[base],
            "generation_time_ratio": generation[key] / generation[base],
        }
    result["protocol"] = (
        f"median of {args.repeats} interleaved runs in one process after a warm-up, ratios to the fp32 teacher "
        f"(below 1: faster); prefill: 1x{args.prompt_tokens} tokens, logits for the last position; generation: "
        f"batch 1, {args.new_tokens} greedy tokens after a 32-token prompt; CPU, {torch.get_num_threads()} threads; "
        "quantized layers compute in bfloat16 with PyTorch's weight-only kernels"
    )


def print_table(result: dict) -> None:
    keys = [
        "fidelity_kl",
        "fidelity_top1",
        "perplexity",
        "kl_to_teacher",
        "memory_bytes",
        "prefill_time_ratio",
        "generation_time_ratio",
    ]
    rows = []
    for name, row in result["models"].items():
        rows.append([name, row["params"], row["weights_file_bytes"] / 1e6] + [row.get(k) for k in keys])
    present = [k for k in keys if any(k in r for r in result["models"].values())]
    rows = [r[:3] + [r[3 + keys.index(k)] for k in present] for r in rows]
    names = {"perplexity": "perplexity (in-domain)", "kl_to_teacher": "KL (in-domain)"}
    print(table(["model", "params", "file MB", *[names.get(k, k) for k in present]], rows))


def plot(result: dict, path: Path) -> None:
    """Fidelity KL (held out) against the weights file's size, one curve per family (fp32 -> int8 ->
    int4); for a file from before the fidelity suite, in-domain perplexity."""
    fidelity = all("fidelity_kl" in r for r in result["models"].values())
    key = "fidelity_kl" if fidelity else "perplexity"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, color in (("teacher", "black"), ("svd_aware", "#1f77b4")):
        rows = sorted(
            (r for r in result["models"].values() if r["family"] == family), key=lambda r: r["weights_file_bytes"]
        )
        xs, ys = [r["weights_file_bytes"] / 1e6 for r in rows], [r[key] for r in rows]
        label = "teacher (SmolLM2-135M)" if family == "teacher" else f"svd_aware at {result['ratio']:.0%}, after KD"
        ax.plot(xs, ys, marker="o", color=color, label=label)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["format"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("weights file (MB, log)")
    if fidelity:
        ax.set_yscale("symlog", linthresh=1e-3)  # the fp32 teacher is at 0
    ax.set_ylabel("fidelity KL to the fp32 teacher, held out" if fidelity else "WikiText-2 test perplexity, in-domain")
    ax.set_title(f"Compression + quantization vs quantization alone ({result['device']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
