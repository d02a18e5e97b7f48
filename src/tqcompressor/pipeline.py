"""The main job: compress, distill in steps, evaluate at every point, write a report and a plot."""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tqcompressor.checkpoint import save
from tqcompressor.config import CompressionConfig
from tqcompressor.data import sample_from_teacher, teacher_block_source, text_block_source, tokenize_text
from tqcompressor.distill import DistillConfig, multistep_distill
from tqcompressor.errors import TQCError
from tqcompressor.evaluate import evaluate
from tqcompressor.models import LoadedModel
from tqcompressor.outputs import claim_directory
from tqcompressor.planning import count_parameters, plan_compression
from tqcompressor.report import table
from tqcompressor.structures import get_structure
from tqcompressor.surgery import apply_plan


def block_source_for(data: str, loaded: LoadedModel, config: DistillConfig, out_dir: Path, fraction=None):
    if data == "teacher":
        needed = min(config.steps * config.batch_size * config.grad_accum, 512)
        return teacher_block_source(loaded.model, loaded.tokenizer, config.seq_len, needed, config.seed,
                                    out_dir / "teacher_samples.safetensors")
    return text_block_source(data, loaded.tokenizer, config.seq_len, fraction=fraction)


def eval_tokens_for(eval_data: str | None, loaded: LoadedModel, max_tokens: int, seq_len: int):
    if eval_data is None or eval_data == "teacher":
        # held-out teacher samples (another seed than the training samples)
        count = max(1, max_tokens // seq_len)
        return torch.cat(list(sample_from_teacher(loaded.model, loaded.tokenizer, count, seq_len, seed=12345)))
    return tokenize_text(eval_data, loaded.tokenizer, max_tokens)


def run_pipeline(loaded: LoadedModel, compression: CompressionConfig, distill: DistillConfig, data: str,
                 eval_data: str | None, out_dir: str | Path, eval_tokens: int = 16384, context: int = 512,
                 resume: bool = False, fraction: float | None = None, calibration_tokens: int = 8192) -> dict:
    out_dir = claim_directory(out_dir)
    started = time.perf_counter()
    teacher = loaded.model
    ids = eval_tokens_for(eval_data, loaded, eval_tokens, context)
    results_path = out_dir / "results.json"
    previous = json.loads(results_path.read_text()) if resume and results_path.is_file() else {}
    rows = previous.get("points", [])

    def record(label: str, stage: int, model) -> None:
        if any(r["label"] == label for r in rows):
            return
        metrics = evaluate(model, ids, context=context, teacher=None if model is teacher else teacher,
                           tokenizer=loaded.tokenizer)
        rows.append({"label": label, "stage": stage, **metrics})
        _write(out_dir, loaded, compression, distill, data, eval_data, rows, started)

    record("teacher", 0, teacher)
    student = copy.deepcopy(teacher)
    blocks = block_source_for(data, loaded, distill, out_dir, fraction)
    calibration = None
    methods = {spec.method for _, spec in compression.layers} if compression.layers else {compression.method}
    if calibration_tokens > 0 and any(m == "auto" or get_structure(m).calibrated_in_run for m in methods):
        # fits in the output metric (auto, svd, tq, ...): plan once from the first distillation blocks
        calibration = torch.stack(list(itertools.islice(blocks(0), max(1, calibration_tokens // distill.seq_len))))
    plan = plan_compression(student, compression, calibration)
    if not any(r["label"] == "compressed (no KD)" for r in rows):
        one_shot = copy.deepcopy(student)
        apply_plan(one_shot, plan)  # every stage at once, no distillation
        record("compressed (no KD)", 0, one_shot)
        del one_shot

    student = multistep_distill(teacher, student, blocks, distill, out_dir, plan, resume=resume,
                                tokenizer=loaded.tokenizer, teacher_name=loaded.source, data_name=data,
                                calibration=calibration,
                                on_stage_end=lambda stage, model: record(f"after KD stage {stage}", stage, model))
    student.to("cpu")
    save(student, out_dir / "model", loaded.tokenizer, base_model=loaded.source, plan=plan)
    return _write(out_dir, loaded, compression, distill, data, eval_data, rows, started, final=True)


def _write(out_dir: Path, loaded, compression, distill, data, eval_data, rows, started, final=False) -> dict:
    result = {
        "base_model": loaded.source,
        "method": compression.method,
        "ratio": compression.ratio,
        "data": data,
        "eval_data": eval_data or "teacher samples",
        "kd_tokens_per_stage": distill.steps * distill.batch_size * distill.grad_accum * distill.seq_len,
        "distill": asdict(distill),
        "counting": "every parameter counted once (tied embedding/head once); permutation index buffers excluded",
        "points": rows,
        "seconds": time.perf_counter() - started,
        "complete": final,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "report.md").write_text(format_report(result))
    plot_points(rows, out_dir / "perplexity.png", f"{loaded.source}: {compression.method}")
    return result


def format_report(result: dict) -> str:
    rows = [[r["label"], r["params"], r["perplexity"], r.get("kl_to_teacher"), r.get("top1_agreement")]
            for r in result["points"]]
    protocol = result["points"][0]["protocol"] if result["points"] else {}
    lines = [
        f"# tqcompressor run: {result['base_model']}, method {result['method']}, ratio {result['ratio']}",
        "",
        table(["model", "params", "perplexity", "KL to teacher", "top-1 agreement"], rows),
        "",
        f"Perplexity: token level, sliding window (context {protocol.get('context')}, stride {protocol.get('stride')}), "
        f"{result['points'][0]['tokens'] if result['points'] else 0:,} scored tokens of {result['eval_data']}.",
        f"Distillation data: {result['data']}; {result['kd_tokens_per_stage']:,} tokens per stage.",
        f"Parameters: {result['counting']}.",
        f"Wall time: {result['seconds']:.0f} s.",
        "",
        "![perplexity vs parameters](perplexity.png)",
        "",
    ]
    return "\n".join(lines)


def plot_points(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["params"] / 1e6, r["perplexity"], s=40)
        ax.annotate(r["label"], (r["params"] / 1e6, r["perplexity"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("parameters (M, all counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_student_matches_teacher(student, teacher) -> None:
    s, t = student.config, teacher.config
    for attr in ("vocab_size", "hidden_size", "model_type"):
        if getattr(s, attr, None) != getattr(t, attr, None):
            raise TQCError(f"student does not match the teacher ({attr}: {getattr(s, attr, None)} vs "
                           f"{getattr(t, attr, None)}); compress the teacher itself to make the student")
    if count_parameters(student) > count_parameters(teacher):
        raise TQCError("the student has more parameters than the teacher; is --teacher the original model?")
