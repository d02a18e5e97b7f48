"""The ``tqc`` command line. Thin: parse options, call the library, print a table.

Every user-facing problem is a :class:`TQCError`; :func:`main` prints it as one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tqcompressor import recipe
from tqcompressor.errors import TQCError
from tqcompressor.models import DEFAULT_MODEL
from tqcompressor.outputs import check_writable, claim_directory, is_main_process

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress Hugging Face causal LMs with permuted Kronecker factorizations (TQCompressor).",
)


def _methods_help(auto: bool = True) -> str:
    from tqcompressor.structures import compression_methods

    return " | ".join(compression_methods() + (["auto (choose per layer)"] if auto else []))


# Distillation options shared by `tqc distill` and `tqc run`: name -> (type, default, help)
DISTILL_OPTIONS = {
    "batch_size": (int, 4, "token blocks per optimizer step"),
    "seq_len": (int, 256, "tokens per block"),
    "lr": (float, recipe.LR, "peak learning rate (warm-up, then cosine)"),
    "grad_accum": (int, 1, "micro-batches per optimizer step"),
    "seed": (int, 0, "seed of the student's training run"),
    "log_every": (int, 10, "optimizer steps between records in metrics.jsonl"),
    "teacher_dtype": (str, "fp32", "the teacher's weights in training: fp32 | bf16 | fp16 (half the memory)"),
    "mixed_precision": (
        str,
        "auto",
        "autocast precision of training: auto (bf16 on a GPU or a CPU with native bf16, else fp32) | bf16 | fp16 | no",
    ),
    "temperature": (float, recipe.TEMPERATURE, "softmax temperature of the KL term"),
    "alpha_blocks": (
        float,
        recipe.ALPHA_BLOCKS,
        "weight of matching every block's output to the teacher's (0: off; the student needs the teacher's depth)",
    ),
}


def with_distill_options(command):
    """Give ``command`` the options of :data:`DISTILL_OPTIONS`; it receives them as one
    :class:`~tqcompressor.distill.DistillConfig` ``kd`` (with its own ``steps`` and
    ``checkpoint_every``, which differ between commands)."""
    own = [p for name, p in inspect.signature(command).parameters.items() if name != "kd"]
    shared = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=typer.Option(default, help=text)
        )
        for name, (kind, default, text) in DISTILL_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**options):
        from tqcompressor.distill import DistillConfig

        kd = DistillConfig(
            steps=options["steps"],
            checkpoint_every=options["checkpoint_every"],
            **{name: options.pop(name) for name in DISTILL_OPTIONS},
        )
        return command(kd=kd, **options)

    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}  # typer reads these, not the original's
    return wrapper


def _auto_methods(text: Optional[str], method: str) -> Optional[list[str]]:
    """What ``--method auto`` may choose: the named structures, all of them ('all'), or the recipe's."""
    if method != "auto":
        if text:
            raise TQCError("--auto-methods only applies to --method auto")
        return None
    if text is None:
        return list(recipe.AUTO_METHODS)
    return None if text.strip() == "all" else _split(text)


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@app.command()
def compress(
    model: str = typer.Option(DEFAULT_MODEL, help="hub id, local HF dir, .gguf file, or 'smollm2-135m'"),
    method: str = typer.Option("tq", help=_methods_help()),
    ratio: Optional[float] = typer.Option(None, help="fraction of the whole model's parameters to keep, in (0, 1]"),
    target_params: Optional[int] = typer.Option(None, help="absolute parameter budget (instead of --ratio)"),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated module names/patterns"),
    spec: Optional[Path] = typer.Option(None, help="explicit per-layer spec file (YAML/JSON) instead of a budget"),
    steps: int = typer.Option(1, help="spread the automatic plan over this many distillation steps"),
    out: Path = typer.Option(..., help="output directory"),
    max_iterations: int = typer.Option(20, help="permutation-search rounds per matrix (tq)"),
    prefer: str = typer.Option("accuracy", help="budget solver: accuracy | speed (B one row wide: faster layers)"),
    auto_methods: Optional[str] = typer.Option(
        None,
        help="--method auto: comma-separated structures it may choose, "
        f"or 'all' (default: {','.join(recipe.AUTO_METHODS)}; dense is always allowed)",
    ),
    calibration: Optional[str] = typer.Option(
        None, help="text (file/dir/glob, dataset name) or 'teacher': activation-aware fits (best with --method auto)"
    ),
    calibration_tokens: int = typer.Option(8192, help="calibration tokens (in blocks of 256)"),
    sequential: bool = typer.Option(
        False,
        help="with --calibration: refit each block's layers to the original model's outputs from the inputs "
        "the compressed model feeds them (compensates earlier layers' errors)",
    ),
    output_weights: bool = typer.Option(
        False,
        help="with calibration and --method auto: weight each layer's outputs by the loss's gradient "
        "energy there (Fisher row weights, as FWSVD) when choosing ranks and fitting",
    ),
    quantize: Optional[str] = typer.Option(
        None, help="then store the factors and the remaining matrices in int8 or int4 (weight-only)"
    ),
    group_size: int = typer.Option(32, help="with --quantize int4: inputs sharing one scale (32, 64, 128, 256)"),
) -> None:
    """Compress a model and write a model dir plus compression.json (and quantization.json with --quantize)."""
    from tqcompressor.checkpoint import save
    from tqcompressor.config import CompressionConfig, load_spec
    from tqcompressor.models import load_model
    from tqcompressor.quantization import QuantizeSettings
    from tqcompressor.quantize import quantize as run_quantize
    from tqcompressor.report import format_compression_table
    from tqcompressor.surgery import compress as run_compress

    check_writable(out)  # before the long work, not after it
    if spec is not None:
        config = load_spec(spec)
    else:
        if ratio is None and target_params is None:
            ratio = 0.65
        config = CompressionConfig(
            method=method,
            ratio=ratio,
            target_params=target_params,
            target_modules=_split(target_modules),
            steps=steps,
            max_iterations=max_iterations,
            prefer=prefer,
            auto_methods=_auto_methods(auto_methods, method),
            sequential=sequential,
            output_weights=output_weights,
        )
    if output_weights and calibration is None:
        raise TQCError("--output-weights weighs outputs by their gradients on calibration text: give --calibration")
    if sequential and calibration is None:
        raise TQCError(
            "--sequential refits layers to calibration text: give --calibration (a text source or 'teacher')"
        )
    settings = QuantizeSettings.parse(quantize, group_size) if quantize is not None else None
    loaded = load_model(model)
    ids = None
    if calibration is not None:
        from tqcompressor.data import calibration_ids

        ids = calibration_ids(calibration, loaded.model, loaded.tokenizer, calibration_tokens)
    compressed, report = run_compress(loaded.model, config, calibration=ids)
    quantized = run_quantize(compressed, settings) if settings is not None else None
    save(compressed, out, loaded.tokenizer, base_model=model, plan=report.plan)
    (Path(out) / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    typer.echo(format_compression_table(report.to_dict()))
    if quantized is not None:
        _write_quantization(quantized, out, model)
    typer.echo(f"wrote {out}")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="a compressed dir or any model --model accepts (the baseline)"),
    bits: str = typer.Option(..., "--bits", help="int8 or int4 (weight-only; biases and norms stay float)"),
    group_size: int = typer.Option(32, help="int4: inputs sharing one scale (32, 64, 128, 256)"),
    out: Path = typer.Option(..., help="output directory"),
) -> None:
    """Store a model's matrices (factors of a compressed model, or an uncompressed one's layers) in int8/int4."""
    from tqcompressor.checkpoint import STRUCTURE_FILE, read_plan, save
    from tqcompressor.models import load_model
    from tqcompressor.quantization import QuantizeSettings
    from tqcompressor.quantize import quantize as run_quantize

    check_writable(out)
    settings = QuantizeSettings.parse(bits, group_size)
    loaded = load_model(model)
    plan = read_plan(model) if (Path(model) / STRUCTURE_FILE).is_file() else None
    report = run_quantize(loaded.model, settings)
    save(loaded.model, out, loaded.tokenizer, base_model=model, plan=plan)
    if (Path(model) / "compression.json").is_file():  # ours: the plan's table stays with the model
        (Path(out) / "compression.json").write_text((Path(model) / "compression.json").read_text())
    _write_quantization(report, out, model)
    typer.echo(f"wrote {out}")


def _write_quantization(report, out: Path, source: str) -> None:
    from tqcompressor.checkpoint import WEIGHTS_FILE
    from tqcompressor.report import format_quantization_table

    result = {
        "source": source,
        "format": report.settings.name,
        "bits": report.settings.bits,
        "group_size": report.settings.group_size if report.settings.bits == 4 else None,
        "weights_file_bytes": (Path(out) / WEIGHTS_FILE).stat().st_size,
        "quantized_float_bytes": report.float_bytes,
        "quantized_stored_bytes": report.stored_bytes,
        "layers": [layer.to_dict() for layer in report.layers],
    }
    (Path(out) / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(format_quantization_table(result))


@app.command()
def info(
    directory: str = typer.Argument(..., help="a dir written by `tqc compress`; with --targets any model reference"),
    targets: bool = typer.Option(
        False,
        "--targets",
        help="list the modules that would be compressed, and their parameters, without compressing anything",
    ),
    target_modules: Optional[str] = typer.Option(None, help="with --targets: the patterns you would pass to compress"),
) -> None:
    """Print the compression table of a compressed model dir, or (--targets) what a model offers."""
    from tqcompressor.checkpoint import read_structure
    from tqcompressor.report import format_compression_table

    if targets:
        typer.echo(_targets_table(directory, _split(target_modules)))
        return
    from tqcompressor.report import format_quantization_table

    read_structure(Path(directory))
    compression, quantization = Path(directory) / "compression.json", Path(directory) / "quantization.json"
    if not compression.is_file() and not quantization.is_file():
        raise TQCError(f"{directory} has no compression.json; it was not written by `tqc compress`")
    if compression.is_file():
        typer.echo(format_compression_table(json.loads(compression.read_text())))
    if quantization.is_file():
        typer.echo(format_quantization_table(json.loads(quantization.read_text())))


def _targets_table(model_name: str, patterns: Optional[list[str]]) -> str:
    from tqcompressor.experts import split_experts
    from tqcompressor.models import load_model
    from tqcompressor.planning import count_parameters, find_target_modules, target_summary, tied_embedding
    from tqcompressor.report import table

    model = load_model(model_name).model
    split_experts(model)  # as compress does: MoE experts are targets like any other layer
    rows = target_summary(model, find_target_modules(model, patterns))
    total, in_targets = count_parameters(model), sum(r[3] for r in rows)
    how = "the modules named" if patterns else "the default: every Linear/Conv1D in the decoder blocks"
    embedding = tied_embedding(model)
    offered = ""
    if embedding is not None and not patterns:
        size = model.get_submodule(embedding).weight.numel()
        offered = (
            f"\n--method auto also weighs the tied embedding {embedding} ({size:,} parameters, {size / total:.1%})"
        )
    return (
        table(["module", "class", "weight shape", "params"], [list(r) for r in rows], "lllr")
        + f"\n{len(rows)} target modules ({how}) hold {in_targets:,} of the model's {total:,} parameters "
        f"({in_targets / total:.1%}); the rest (embeddings, norms, head, routers) stays as it is unless named" + offered
    )


@app.command()
def export(
    directory: Path = typer.Argument(..., help="a dir written by `tqc compress`"),
    out: Path = typer.Option(..., help="output directory (--dense) or .onnx file (--onnx)"),
    dense: bool = typer.Option(False, "--dense", help="merge the factors into a plain HF model dir"),
    onnx: bool = typer.Option(False, "--onnx", help="ONNX graph input_ids -> logits, factored layers kept"),
) -> None:
    """Export a compressed model: a plain dense HF dir (--dense) or ONNX (--onnx)."""
    from tqcompressor.export import export_dense, export_onnx

    if dense == onnx:
        raise TQCError("choose one of --dense or --onnx")
    if dense:
        check_writable(out)
        export_dense(directory, out)
        typer.echo(f"wrote {out} (dense; opens with AutoModelForCausalLM.from_pretrained)")
    else:
        export_onnx(directory, out)
        typer.echo(f"wrote {out} (ONNX, input_ids -> logits; run it with onnxruntime)")


@app.command()
def push(
    directory: Path = typer.Argument(..., help="a dir written by `tqc compress`/`tqc run`"),
    repo: str = typer.Option(..., help="Hub repo id, user/name"),
    private: bool = typer.Option(False, help="create the repo as private"),
) -> None:
    """Upload a compressed model dir to the Hugging Face Hub (needs a token: `hf auth login`)."""
    from tqcompressor.export import push_to_hub

    typer.echo(f"uploaded: {push_to_hub(directory, repo, private)}")


def _check_seq_len(model, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and seq_len > limit:
        raise TQCError(f"--seq-len {seq_len} exceeds the model's context of {limit} tokens")


@app.command()
@with_distill_options
def distill(
    teacher: str = typer.Option(DEFAULT_MODEL, help="the original model"),
    student: Path = typer.Option(..., help="a compressed model dir (from `tqc compress`)"),
    data: str = typer.Option(
        "teacher", help="text file/dir/glob, a dataset name (wikitext, openwebtext), or 'teacher'"
    ),
    fraction: Optional[float] = typer.Option(None, help="fraction of a hub dataset's train split (0.031 = paper)"),
    teacher_fraction: float = typer.Option(
        recipe.TEACHER_FRACTION,
        help="fraction of the distillation (and calibration) blocks sampled from the teacher, mixed evenly into --data",
    ),
    teacher_pool: int = typer.Option(
        recipe.TEACHER_POOL, help="teacher blocks sampled once (then cycled) for --data teacher or --teacher-fraction"
    ),
    out: Path = typer.Option(..., help="run dir: checkpoints, metrics.jsonl, the final model"),
    steps: int = typer.Option(100, help="optimizer steps"),
    checkpoint_every: int = typer.Option(50, help="optimizer steps between checkpoints"),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    kd: object = None,  # the shared distillation options (with_distill_options)
) -> None:
    """Distill a compressed student from its teacher (single stage)."""
    from tqcompressor.checkpoint import load, save
    from tqcompressor.distill import check_same_depth, multistep_distill
    from tqcompressor.models import load_model
    from tqcompressor.pipeline import block_source_for, check_student_matches_teacher, data_name
    from tqcompressor.quantize import check_not_quantized

    check_writable(out)  # before anything is written there (teacher samples, checkpoints)
    if is_main_process():
        claim_directory(out)
    student_model = load(student)
    check_not_quantized(student_model, "distillation")
    loaded = load_model(teacher)
    check_student_matches_teacher(student_model, loaded.model)
    if kd.alpha_blocks > 0:  # before sampling any distillation data from the teacher
        check_same_depth(student_model, loaded.model)
    _check_seq_len(loaded.model, kd.seq_len)
    blocks = block_source_for(data, loaded, kd, out, fraction, teacher_fraction, teacher_pool=teacher_pool)
    result = multistep_distill(
        loaded.model,
        student_model,
        blocks,
        kd,
        out,
        resume=resume,
        tokenizer=loaded.tokenizer,
        teacher_name=teacher,
        data_name=data_name(data, teacher_fraction, teacher_pool),
    )
    if is_main_process():  # under torchrun / accelerate launch, rank 0 writes
        save(result.to("cpu"), out / "model", loaded.tokenizer, base_model=teacher)
        typer.echo(f"wrote {out / 'model'}; metrics in {out / 'metrics.jsonl'}")


@app.command(name="eval")
def eval_command(
    model: str = typer.Option(..., help="a compressed dir or any model --model accepts"),
    data: str = typer.Option(
        ..., help="text file/dir/glob, a dataset name (wikitext), or lambada / lambada:FILE for last-word accuracy"
    ),
    teacher: Optional[str] = typer.Option(None, help="also report KL and top-1 agreement with this model"),
    context: int = typer.Option(512, help="window length (tokens)"),
    stride: Optional[int] = typer.Option(None, help="window stride (tokens); default = context"),
    max_tokens: Optional[int] = typer.Option(None, help="evaluate on the first N tokens (LAMBADA: N examples)"),
    batch_size: int = typer.Option(4),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics to this JSON file"),
) -> None:
    """Perplexity (token, word, byte level), KL to the teacher and top-1 agreement."""
    from tqcompressor.data import tokenize_text
    from tqcompressor.evaluate import evaluate
    from tqcompressor.models import load_model
    from tqcompressor.report import table

    loaded = load_model(model)
    if data == "lambada" or data.startswith("lambada:"):
        from tqcompressor.data import iter_texts
        from tqcompressor.evaluate import lambada

        # "lambada" streams the hub dataset; "lambada:FILE" reads one passage per line from a file
        source = data.split(":", 1)[1] if ":" in data else "lambada"
        texts = iter_texts(source, split="test") if source == "lambada" else open(source, encoding="utf-8")
        metrics = lambada(loaded.model, loaded.tokenizer, texts, max_examples=max_tokens)
        typer.echo(table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
        if json_out:
            json_out.write_text(json.dumps({**metrics, "model": model, "data": data}, indent=2) + "\n")
        return
    teacher_model = load_model(teacher).model if teacher else None
    ids = tokenize_text(data, loaded.tokenizer, max_tokens)
    metrics = evaluate(
        loaded.model,
        ids,
        context=context,
        stride=stride,
        teacher=teacher_model,
        batch_size=batch_size,
        tokenizer=loaded.tokenizer,
    )
    metrics.update(model=model, data=data)
    keys = ["perplexity", "word_perplexity", "byte_perplexity", "kl_to_teacher", "top1_agreement", "tokens", "params"]
    typer.echo(table(["metric", "value"], [[k, metrics[k]] for k in keys if k in metrics]))
    lead = ", every window led by the tokenizer's start token" if metrics["protocol"]["start_token"] else ""
    typer.echo(f"protocol: token level, context {context}, stride {stride or context}{lead}")
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


@app.command()
@with_distill_options
def run(
    model: str = typer.Option(DEFAULT_MODEL, help="the model to compress (and the teacher)"),
    method: str = typer.Option(recipe.METHOD, help=_methods_help()),
    ratio: float = typer.Option(0.65, help="fraction of the whole model's parameters to keep"),
    stages: int = typer.Option(recipe.STAGES, help="compression/distillation steps (upper layers first)"),
    prefer: str = typer.Option("accuracy", help="budget solver: accuracy | speed (B one row wide: faster layers)"),
    auto_methods: Optional[str] = typer.Option(
        None,
        help="--method auto: comma-separated structures it may choose, "
        f"or 'all' (default: {','.join(recipe.AUTO_METHODS)}; dense is always allowed)",
    ),
    spec: Optional[Path] = typer.Option(None, help="explicit per-layer plan instead of --ratio/--stages"),
    data: str = typer.Option("teacher", help="distillation text (file/dir/glob, dataset name) or 'teacher'"),
    fraction: Optional[float] = typer.Option(None, help="fraction of a hub dataset's train split"),
    teacher_fraction: float = typer.Option(
        recipe.TEACHER_FRACTION,
        help="fraction of the distillation (and calibration) blocks sampled from the teacher, mixed evenly into --data",
    ),
    teacher_pool: int = typer.Option(
        recipe.TEACHER_POOL, help="teacher blocks sampled once (then cycled) for --data teacher or --teacher-fraction"
    ),
    eval_data: Optional[str] = typer.Option(None, help="evaluation text; default: held-out teacher samples"),
    eval_tokens: int = typer.Option(8192, help="tokens to evaluate on"),
    context: int = typer.Option(512, help="evaluation window"),
    steps: int = typer.Option(recipe.STEPS, help="distillation steps per stage"),
    checkpoint_every: int = typer.Option(20, help="optimizer steps between checkpoints"),
    out: Path = typer.Option(Path("out/run"), help="run dir: report.md, results.json, perplexity.png, model/"),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    calibration_tokens: int = typer.Option(
        8192, help="distillation tokens the fits are calibrated on (0: weight-space fits, e.g. the paper's tq as is)"
    ),
    sequential: bool = typer.Option(
        recipe.SEQUENTIAL,
        help="refit each block's layers to the teacher's outputs from the inputs the compressed "
        "model feeds them, before distilling (needs calibration)",
    ),
    output_weights: Optional[bool] = typer.Option(
        None,
        "--output-weights/--no-output-weights",
        help="weight each layer's outputs by the loss's gradient energy there (Fisher row weights, as FWSVD) when "
        "choosing ranks and fitting; needs calibration and --method auto (default: on wherever it applies)",
    ),
    kd: object = None,  # the shared distillation options (with_distill_options)
) -> None:
    """The main job: compress, distill step by step, evaluate, write report.md and a plot."""
    from tqcompressor.config import CompressionConfig, load_spec
    from tqcompressor.models import load_model
    from tqcompressor.pipeline import format_report, run_pipeline

    if output_weights is None:  # the recipe's default, wherever it applies
        output_weights = recipe.OUTPUT_WEIGHTS and method == "auto" and calibration_tokens > 0
    compression = (
        load_spec(spec)
        if spec
        else CompressionConfig(
            method=method,
            ratio=ratio,
            steps=stages,
            prefer=prefer,
            auto_methods=_auto_methods(auto_methods, method),
            sequential=sequential and calibration_tokens > 0,
            output_weights=output_weights,
        )
    )
    if output_weights and calibration_tokens <= 0:
        raise TQCError(
            "--output-weights weighs outputs by their gradients on calibration text: keep --calibration-tokens"
        )
    check_writable(out)  # before loading anything; run_pipeline claims it
    loaded = load_model(model)
    _check_seq_len(loaded.model, max(kd.seq_len, context))
    result = run_pipeline(
        loaded,
        compression,
        kd,
        data,
        eval_data,
        out,
        eval_tokens,
        context,
        resume,
        fraction,
        calibration_tokens,
        teacher_fraction,
        teacher_pool,
    )
    if not result:
        return  # not rank 0 of a multi-process run: rank 0 reports
    typer.echo(format_report(result))
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'perplexity.png'}, {out / 'model'}")


def main() -> None:
    try:
        app()
    except TQCError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
