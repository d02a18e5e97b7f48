"""The ``tqc`` command line. Thin: parse options, call the library, print a table.

Every user-facing problem is a :class:`TQCError`; :func:`main` prints it as one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tqcompressor.data import calibration_ids, check_teacher_fraction, check_teacher_start, iter_texts, tokenize_text
from tqcompressor.errors import TQCError, check_count, first_line
from tqcompressor.evaluation.evaluate import evaluate, lambada
from tqcompressor.evaluation.fidelity import TABLE_HEADER, heldout_domains, measure, table_rows
from tqcompressor.evaluation.report import format_compression_table, format_quantization_table, format_report, table
from tqcompressor.evaluation.targets import check_max_kl, smallest_within_kl
from tqcompressor.modelio.checkpoint import (
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    check_layer_names,
    load,
    read_base_config,
    read_plan,
    read_structure,
    save,
    stored_tensor_bytes,
    write_model,
)
from tqcompressor.modelio.export import export_dense, export_genai, export_onnx, push_to_hub
from tqcompressor.modelio.models import DEFAULT_MODEL, load_model
from tqcompressor.outputs import (
    RUN,
    check_writable,
    claim_directory,
    is_main_process,
    staged_directory,
    staged_file,
    writer_lock,
)
from tqcompressor.pipeline import (
    MAX_CALIBRATION_TOKENS,
    MAX_TEACHER_POOL,
    RunConfig,
    block_source_for,
    check_student_matches_teacher,
    data_name,
    run_pipeline,
)
from tqcompressor.planning.config import CompressionConfig, load_spec
from tqcompressor.planning.corrections import RANKS as CORRECTION_RANKS
from tqcompressor.planning.formats import check_below_model, parse_bytes
from tqcompressor.planning.inventory import count_parameters, find_target_modules, target_summary, tied_embedding
from tqcompressor.planning.mixed import measure_model_mixed
from tqcompressor.planning.registry import planning_methods
from tqcompressor.quant.api import check_not_quantized, kept_bytes, quantize_
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.schemas import CompressionFile, QuantizationFile, read_json_file
from tqcompressor.structures import compression_methods, get_structure
from tqcompressor.surgery.apply import compress as run_compress
from tqcompressor.surgery.apply import store_planned
from tqcompressor.surgery.experts import split_experts
from tqcompressor.training import recipe
from tqcompressor.training.distill import DistillConfig, check_memory, check_same_depth, multistep_distill

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress Hugging Face causal LMs with permuted Kronecker factorizations (TQCompressor).",
)


def _methods_help(auto: bool = True) -> str:
    return " | ".join(compression_methods() + (["auto (choose per layer)"] if auto else []))


# Distillation options shared by `tqc distill` and `tqc run`: name -> (type, default, help)
DISTILL_OPTIONS = {
    "batch_size": (int, 4, "token blocks per optimizer step"),
    "seq_len": (int, 256, "tokens per block"),
    "lr": (float, recipe.LR, "peak learning rate (warm-up, then cosine)"),
    "grad_accum": (int, 1, "micro-batches per optimizer step"),
    "seed": (int, 0, "seed of the student's training run"),
    "log_every": (int, 10, "optimizer steps between records in metrics.jsonl"),
    "teacher_dtype": (
        str,
        "auto",
        "the teacher's weights in training: fp32 | bf16 | fp16 (half the memory) | auto (bf16 on a GPU, else fp32)",
    ),
    "mixed_precision": (
        str,
        "auto",
        "autocast precision of training: auto (bf16 on a GPU or a CPU with native bf16, else fp32) | bf16 | fp16 | no",
    ),
    "temperature": (float, recipe.TEMPERATURE, "softmax temperature of the KL term"),
    "alpha_ce": (float, recipe.ALPHA_CE, "weight of cross-entropy on the data's next tokens (0: the teacher alone)"),
    "reverse_kl": (
        float,
        recipe.REVERSE_KL,
        "share of the KL term taken in reverse, KL(student || teacher): 0 forward, 1 reverse, between a mix",
    ),
    "on_policy": (
        float,
        recipe.ON_POLICY,
        "share of steps trained on the student's own samples, scored by the teacher (0: off; each costs a sampling)",
    ),
    "alpha_blocks": (
        float,
        recipe.ALPHA_BLOCKS,
        "weight of matching every block's output to the teacher's (0: off; the student needs the teacher's depth)",
    ),
    "blockwise_steps": (
        int,
        recipe.BLOCKWISE_STEPS,
        "before distilling, Adam steps fitting each decoder block to the teacher's, first to last (0: off; "
        "on the calibration text, else the first blocks of --data; the student needs the teacher's depth)",
    ),
    "blockwise_lr": (float, recipe.BLOCKWISE_LR, "learning rate of --blockwise-steps"),
}


def with_distill_options(command):
    """Give ``command`` the options of :data:`DISTILL_OPTIONS`; it receives them as one
    :class:`~tqcompressor.training.distill.DistillConfig` ``kd`` (with its own ``steps`` and
    ``checkpoint_every``, which differ between commands)."""
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "kd"]
    shared = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=typer.Option(default, help=text)
        )
        for name, (kind, default, text) in DISTILL_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**options):
        kd = DistillConfig(
            steps=options["steps"] if options["steps"] is not None else recipe.STEPS,  # tqc run's default
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


def _check_spec_alone(**options) -> None:
    """A spec file is the whole plan: options that would plan otherwise are refused, not ignored."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise TQCError(f"--spec is the whole plan; {names} would be ignored: drop {names} or drop --spec")


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# options several commands share
Adopt = Annotated[
    bool,
    typer.Option(
        help="--out was written by tqcompressor elsewhere and copied or moved here: treat it as tqcompressor's "
        "(the files it wrote there may be replaced; any other file still stops the write)"
    ),
]
TeacherStart = Annotated[
    str,
    typer.Option(
        help="where each teacher sample begins: bos (the start token) or random (a random token, as LLM-QAT: "
        "more kinds of text)"
    ),
]
Prefer = Annotated[
    Optional[str],
    typer.Option(help="budget solver: accuracy | speed (B one row wide: faster layers) [default: accuracy]"),
]
AutoMethods = Annotated[
    Optional[str],
    typer.Option(
        help="--method auto: comma-separated structures it may choose, "
        f"or 'all' (default: {','.join(recipe.AUTO_METHODS)}; dense is always allowed)"
    ),
]

# `tqc compress` options whose help takes more than a line
CompressRatio = Annotated[
    Optional[float], typer.Option(help="fraction of the whole model's parameters to keep, in (0, 1] [default: 0.65]")
]
CompressSteps = Annotated[
    Optional[int], typer.Option(help="spread the automatic plan over this many distillation steps [default: 1]")
]
CompressCalibration = Annotated[
    Optional[str],
    typer.Option(
        help="text (file/dir/glob, dataset name) or 'teacher': activation-aware fits (best with --method auto)"
    ),
]
CompressSequential = Annotated[
    bool,
    typer.Option(
        help="with --calibration: refit each block's layers to the original model's outputs from the inputs "
        "the compressed model feeds them (compensates earlier layers' errors)"
    ),
]
CompressOutputWeights = Annotated[
    bool,
    typer.Option(
        help="with calibration and --method auto: weight each layer's outputs by the loss's gradient "
        "energy there (Fisher row weights, as FWSVD) when choosing ranks and fitting"
    ),
]
CompressQuantize = Annotated[
    Optional[str],
    typer.Option(help="then store the factors and the remaining matrices in int8, int4, int3 or int2 (weight-only)"),
]
MaxBytes = Annotated[
    Optional[str],
    typer.Option(
        help="instead of --bits: the size the weights may take (90MiB, 90MB, 1.5GiB, bytes); each matrix gets the "
        "format (int8; int4, int3, int2 in groups of 32/64/128) that loses least per byte"
    ),
]
MaxKL = Annotated[
    Optional[float],
    typer.Option(
        help="instead of --bits: the fidelity KL to the model (held-out, nats/token) the result may have; the "
        "smallest --max-bytes plan within it is found by measuring each candidate"
    ),
]
CompressMaxBytes = Annotated[
    Optional[str],
    typer.Option(
        "--max-bytes",
        help="instead of --ratio: the size the weights may take (90MiB, 90MB, 1.5GiB, bytes), each matrix in the "
        "format that loses least per byte, as tqc quantize --max-bytes plans it (one-shot; tqc run distils it)",
    ),
]
CompressMaxKL = Annotated[
    Optional[float],
    typer.Option(
        "--max-kl",
        help="instead of --ratio: the fidelity KL to the model (held-out, nats/token) the result may have; the "
        "smallest --max-bytes plan within it, each candidate measured (as tqc quantize --max-kl)",
    ),
]
QuantizeCalibration = Annotated[
    Optional[str],
    typer.Option(
        help="with --max-bytes or --max-kl: text (file/dir/glob, dataset name) or 'teacher' to measure output errors on"
    ),
]
PlannedStructures = Annotated[
    Optional[str],
    typer.Option(
        "--structures",
        help="with --max-bytes or --max-kl: structures a matrix may instead be stored as, its factors in a "
        "format too, comma-separated (svd: activation-aware SVD with --calibration); one budget spreads over both",
    ),
]
PlannedCorrections = Annotated[
    bool,
    typer.Option(
        "--corrections",
        help="with --max-bytes or --max-kl: each linear matrix may also be stored in int2/int3/int4-g64 plus a "
        "low-rank correction of its rounding error (ranks 16 and 32, int8): measured on SmolLM2-135M, closer "
        "one-shot at 55 MiB, further at 60 and 65 MiB (bench/results/frontier/frontier-corrections.json)",
    ),
]
QuantizeBits = Annotated[
    Optional[str],
    typer.Option(
        "--bits",
        help="int8, int4, int3 or int2 (weight-only; biases and norms stay float; int3 and int2 save bytes on disk "
        "and run as int4)",
    ),
]
GroupSize = Annotated[
    Optional[int], typer.Option(help="int4/3/2: inputs sharing one scale (32, 64, 128, 256) [default: 32]")
]


@app.command()
def compress(
    model: str = typer.Option(DEFAULT_MODEL, help="hub id, local HF dir, .gguf file, or 'smollm2-135m'"),
    method: Optional[str] = typer.Option(None, help=_methods_help() + " [default: tq]"),
    ratio: CompressRatio = None,
    target_params: Optional[int] = typer.Option(None, help="absolute parameter budget (instead of --ratio)"),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated module names/patterns"),
    spec: Optional[Path] = typer.Option(None, help="explicit per-layer spec file (YAML/JSON) instead of a budget"),
    steps: CompressSteps = None,
    out: Path = typer.Option(..., help="output directory"),
    max_iterations: int = typer.Option(20, help="permutation-search rounds per matrix (tq)"),
    prefer: Prefer = None,
    auto_methods: AutoMethods = None,
    calibration: CompressCalibration = None,
    calibration_tokens: int = typer.Option(8192, help="calibration tokens (in blocks of 256)"),
    sequential: CompressSequential = False,
    output_weights: CompressOutputWeights = False,
    quantize: CompressQuantize = None,
    group_size: GroupSize = None,
    max_bytes: CompressMaxBytes = None,
    max_kl: CompressMaxKL = None,
    structures: PlannedStructures = None,
    adopt: Adopt = False,
) -> None:
    """Compress a model and write a model dir plus compression.json (and quantization.json with --quantize); with
    --max-bytes or --max-kl, the closest model in a size or the smallest within a fidelity, as tqc quantize plans."""

    check_writable(out, inputs=[model, spec, calibration], adopt=adopt)  # before the long work, not after it
    if group_size is not None and quantize is None:
        raise TQCError("--group-size applies to --quantize int4/3/2: add --quantize int4 or drop --group-size")
    # what would plan without a spec file (a spec file is the whole plan: these are refused beside it)
    planning = dict(method=method, ratio=ratio, target_params=target_params, target_modules=target_modules)
    planning.update(steps=steps, auto_methods=auto_methods, prefer=prefer)
    targeted = max_bytes is not None or max_kl is not None
    _check_joins_target("--structures", structures is not None, targeted)
    if targeted:
        _check_target_alone(planning, spec, quantize, sequential, output_weights)
        targets = dict(max_bytes=max_bytes, max_kl=max_kl, structures=structures, calibration=calibration)
        return _quantize_to_target(model, out, adopt, calibration_tokens=calibration_tokens, **targets)
    config = _compression_config(spec, planning, max_iterations, sequential, output_weights, calibration)
    settings = QuantizeSettings.parse(quantize, group_size) if quantize is not None else None
    check_count("calibration-tokens", calibration_tokens, 1, MAX_CALIBRATION_TOKENS)
    check_count("max-iterations", max_iterations, 1, 10_000)
    with writer_lock(out):  # held from the first read to the last write: a second writer is refused
        loaded = load_model(model)
        ids = None
        if calibration is not None:
            ids = calibration_ids(calibration, loaded.model, loaded.tokenizer, calibration_tokens)
        compressed, report = run_compress(loaded.model, config, calibration=ids)
        quantized = quantize_(compressed, settings) if settings is not None else None
        with staged_directory(out, inputs=[model], adopt=adopt) as staging:  # metadata inside before the swap
            write_model(compressed, staging, loaded.tokenizer, base_model=model, plan=report.plan)
            (staging / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            if quantized is not None:
                _write_quantization(quantized, staging, model, kept_bytes(compressed))
    typer.echo(format_compression_table(report.to_dict()))
    if quantized is not None:
        typer.echo(format_quantization_table(json.loads((Path(out) / "quantization.json").read_text())))
    typer.echo(f"wrote {out}")


def _check_target_alone(planning: dict, spec, quantize, sequential: bool, output_weights: bool) -> None:
    """``tqc compress --max-bytes/--max-kl`` plans sizes and formats itself: no parameter budget, spec or format."""
    given = [f"--{k.replace('_', '-')}" for k, v in planning.items() if v is not None]
    given += [name for name, v in (("--spec", spec), ("--quantize", quantize)) if v is not None]
    given += [name for name, v in (("--sequential", sequential), ("--output-weights", output_weights)) if v]
    if given:
        raise TQCError(
            f"--max-bytes and --max-kl choose each matrix's format (and with --structures its factors) themselves: "
            f"drop {', '.join(given)}"
        )


def _compression_config(
    spec: Optional[Path], planning: dict, max_iterations: int, sequential: bool, output_weights: bool, calibration
) -> CompressionConfig:
    """A spec file's plan (nothing that plans beside it), or a budget's (:func:`_budget_config`); calibration
    text where a refit or output weights need it."""
    if spec is not None:
        _check_spec_alone(**planning)
    config = (
        load_spec(spec) if spec is not None else _budget_config(planning, max_iterations, sequential, output_weights)
    )
    if output_weights and calibration is None:
        raise TQCError("--output-weights weighs outputs by their gradients on calibration text: give --calibration")
    if sequential and calibration is None:
        raise TQCError(
            "--sequential refits layers to calibration text: give --calibration (a text source or 'teacher')"
        )
    return config


def _quantize_to_target(model: str, out: Path, adopt: bool, **targets) -> None:
    """``tqc compress --max-bytes/--max-kl``: what ``tqc quantize`` does with them, its other options at their
    defaults."""
    defaults = dict(
        bits=None, group_size=None, quantizer=None, double_quant=False, corrections=False, fidelity_tokens=1024
    )
    quantize(model=model, out=out, adopt=adopt, **defaults, **targets)


def _budget_config(planning: dict, max_iterations: int, sequential: bool, output_weights: bool) -> CompressionConfig:
    """``tqc compress``'s budget, with the defaults for what is not given."""
    method = "tq" if planning["method"] is None else planning["method"]
    if planning["ratio"] is not None and planning["target_params"] is not None:
        raise TQCError("--ratio and --target-params are two budgets: give one of them")
    no_budget = planning["ratio"] is None and planning["target_params"] is None
    check_count("steps", planning["steps"], 1)
    return CompressionConfig(
        method=method,
        ratio=0.65 if no_budget else planning["ratio"],
        target_params=planning["target_params"],
        target_modules=_split(planning["target_modules"]),
        steps=1 if planning["steps"] is None else planning["steps"],
        max_iterations=max_iterations,
        prefer=planning["prefer"] or "accuracy",
        auto_methods=_auto_methods(planning["auto_methods"], method),
        sequential=sequential,
        output_weights=output_weights,
    )


@app.command()
def quantize(
    model: str = typer.Argument(..., help="a compressed dir or any model --model accepts (the baseline)"),
    bits: QuantizeBits = None,
    group_size: GroupSize = None,
    quantizer: Optional[str] = typer.Option(
        None,
        help="with --bits int4/3/2: rtn (round to nearest, the default) or hqq (HQQ's fitted scales and offsets); "
        "--max-bytes and --max-kl measure both and keep the closer per matrix",
    ),
    double_quant: bool = typer.Option(
        False,
        "--double-quant",
        help="with --bits int4/3/2: scales and offsets stored as 8-bit codes (groups of 32 in about the bytes of 64)",
    ),
    max_bytes: MaxBytes = None,
    max_kl: MaxKL = None,
    structures: PlannedStructures = None,
    corrections: PlannedCorrections = False,
    calibration: QuantizeCalibration = None,
    calibration_tokens: int = typer.Option(8192, help="with --calibration: tokens (in blocks of 256)"),
    fidelity_tokens: int = typer.Option(1024, help="with --max-kl: tokens of each held-out domain it is checked on"),
    out: Path = typer.Option(..., help="output directory"),
    adopt: Adopt = False,
) -> None:
    """Store a model's matrices (factors of a compressed model, or an uncompressed one's layers) in int8/int4:
    one format (--bits), or per matrix the formats that keep it closest to the model within --max-bytes, or the
    smallest such model within --max-kl of it; with --structures a matrix may be stored as factors instead."""

    check_writable(out, inputs=[model, calibration], adopt=adopt)
    target = _check_quantize_options(bits, group_size, max_bytes, max_kl, calibration, quantizer, double_quant)
    planned_structures = _planned_structures(structures, target)
    _check_joins_target("--corrections", corrections, target is not None)
    ranks = CORRECTION_RANKS if corrections else ()
    check_count("calibration-tokens", calibration_tokens, 1, MAX_CALIBRATION_TOKENS)
    check_count("fidelity-tokens", fidelity_tokens, 2)
    settings = (
        QuantizeSettings.parse(bits, group_size, quantizer or "rtn", double_quant)
        if bits is not None
        else QuantizeSettings(8)
    )
    with writer_lock(out):
        loaded = load_model(model)
        plan = read_plan(model) if (Path(model) / STRUCTURE_FILE).is_file() else None
        compression = _read_compression_json(Path(model))  # ours: the plan's table stays with the model
        ids = calibration_ids(calibration, loaded.model, loaded.tokenizer, calibration_tokens) if calibration else None
        formats, search = _planned_formats(loaded, target, ids, fidelity_tokens, planned_structures, ranks)
        if formats is not None:
            report, plan = store_planned(loaded.model, formats)
        else:
            report = quantize_(loaded.model, settings)
        with staged_directory(out, inputs=[model], adopt=adopt) as staging:
            write_model(loaded.model, staging, loaded.tokenizer, base_model=model, plan=plan)
            if compression is not None:
                (staging / "compression.json").write_text(compression)
            _write_quantization(report, staging, model, kept_bytes(loaded.model), formats, search)
    typer.echo(format_quantization_table(json.loads((Path(out) / "quantization.json").read_text())))
    if search is not None:
        typer.echo(search.summary())
    typer.echo(f"wrote {out}")


def _check_quantize_options(
    bits, group_size, max_bytes, max_kl, calibration, quantizer=None, double_quant=False
) -> Optional[tuple[str, float]]:
    """One format, a byte budget or a fidelity target, and the options each takes: ``("bytes", budget)``,
    ``("kl", target)`` or None (one format)."""
    if sum(option is not None for option in (bits, max_bytes, max_kl)) != 1:
        raise TQCError(
            "give one of --bits (one format for every matrix), --max-bytes (a format per matrix within a size) "
            "or --max-kl (the smallest such model within a fidelity KL)"
        )
    if bits is not None and calibration is not None:
        raise TQCError("--calibration measures the errors --max-bytes and --max-kl plan with: drop it with --bits")
    if bits is None and group_size is not None:
        raise TQCError("--max-bytes and --max-kl choose each matrix's int4 group size: drop --group-size")
    if max_kl is not None:
        check_max_kl(max_kl)
    target = ("kl", max_kl) if max_kl is not None else None
    if max_bytes is not None:
        target = ("bytes", parse_bytes(max_bytes))
    if target is not None and (quantizer is not None or double_quant):
        raise TQCError(
            "--max-bytes and --max-kl measure every quantizer and format and keep the closest per matrix: "
            "drop --quantizer and --double-quant"
        )
    return target


def _check_joins_target(option: str, given: bool, targeted: bool) -> None:
    """One line for an option that only joins a --max-bytes or --max-kl plan, given without one."""
    if given and not targeted:
        raise TQCError(f"{option} joins the formats a --max-bytes or --max-kl plan chooses from: give one of them")


def _planned_structures(structures: Optional[str], target) -> tuple[str, ...]:
    """``--structures``' names, checked: registered structures that compress, beside a byte or fidelity target."""
    _check_joins_target("--structures", structures is not None, target is not None)
    if structures is None:
        return ()
    names = tuple(name.strip() for name in structures.split(",") if name.strip())
    for name in names:
        get_structure(name)  # one line for a name that is not a structure that compresses
    return names


def _planned_formats(loaded, target, ids, fidelity_tokens: int, structures: tuple[str, ...] = (), ranks=()):
    """The plan of a byte or fidelity target (and the search behind a fidelity one); (None, None) for --bits.
    ``ranks``: of the corrections on the menu (none: no corrections)."""
    if target is None:
        return None, None
    kind, value = target
    if kind == "bytes":
        check_below_model(loaded.model, int(value))
        return measure_model_mixed(loaded.model, ids, structures, correction_ranks=ranks).plan(int(value)), None
    context = min(512, _positions(loaded.model) or 512, fidelity_tokens)
    domains = heldout_domains(loaded.model, loaded.tokenizer, fidelity_tokens, context)
    menus = measure_model_mixed(loaded.model, ids, structures, correction_ranks=ranks)
    search = smallest_within_kl(loaded.model, menus, value, domains, context, loaded.tokenizer)
    return search.plan, search


def _read_compression_json(model_dir: Path) -> Optional[str]:
    """A compressed dir's compression.json, checked against its schema (None where there is none)."""
    path = model_dir / "compression.json"
    if not path.is_file():
        return None
    read_json_file(path, CompressionFile)
    return path.read_text()


def _write_quantization(report, out: Path, source: str, kept: int, formats=None, search=None) -> None:
    bits = min(setting.bits for setting in formats.settings().values()) if formats else report.settings.bits
    result = {
        "source": source,
        "format": "mixed" if formats else report.settings.name,
        "bits": bits,
        "group_size": report.settings.group_size if report.settings.bits != 8 and not formats else None,
        "weights_file_bytes": (Path(out) / WEIGHTS_FILE).stat().st_size,
        "weights_tensor_bytes": stored_tensor_bytes(Path(out)),
        "quantized_float_bytes": report.float_bytes,
        "quantized_stored_bytes": report.stored_bytes,
        "kept_bytes": kept,  # norms, biases, index buffers: saved as they are
        "layers": [layer.to_dict() for layer in report.layers],
    }
    if formats is not None:
        result["plan"] = formats.to_dict()
    if search is not None:
        result["target"] = search.to_dict()
    (Path(out) / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")


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

    if targets:
        typer.echo(_targets_table(directory, _split(target_modules)))
        return
    read_structure(Path(directory))
    check_layer_names(Path(directory), read_base_config(Path(directory)).to_dict())  # a table of a sound dir only
    compression, quantization = Path(directory) / "compression.json", Path(directory) / "quantization.json"
    if not compression.is_file() and not quantization.is_file():
        raise TQCError(f"{directory} has no compression.json; it was not written by `tqc compress`")
    if compression.is_file():
        typer.echo(format_compression_table(read_json_file(compression, CompressionFile)))
    if quantization.is_file():
        typer.echo(format_quantization_table(read_json_file(quantization, QuantizationFile)))


def _targets_table(model_name: str, patterns: Optional[list[str]]) -> str:

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
    onnx: bool = typer.Option(False, "--onnx", help="ONNX graph, factored layers kept"),
    cache: bool = typer.Option(
        True,
        help="--onnx with a KV cache (past_key_values in, present out: the graph that generates); "
        "--no-cache: input_ids -> logits only",
    ),
    genai: bool = typer.Option(
        False,
        help="--onnx into the folder --out, with genai_config.json and the tokenizer: ONNX Runtime GenAI opens it",
    ),
    adopt: Adopt = False,
) -> None:
    """Export a compressed model: a plain dense HF dir (--dense) or ONNX (--onnx)."""
    if dense == onnx:
        raise TQCError("choose one of --dense or --onnx")
    if dense and (genai or not cache):
        raise TQCError("--no-cache and --genai are options of --onnx; a dense dir opens in transformers as it is")
    if genai and not cache:
        raise TQCError("ONNX Runtime GenAI generates from the graph with a KV cache: drop --no-cache")
    if adopt and not (dense or genai):
        raise TQCError("--adopt is for an --out directory; an ONNX file is replaced only if tqcompressor wrote it")
    if genai:
        export_genai(directory, out, adopt=adopt)
        typer.echo(f"wrote {out} (ONNX with a KV cache, genai_config.json, tokenizer: og.Model({str(out)!r}))")
        return
    if dense:
        check_writable(out, inputs=[directory], adopt=adopt)
        with writer_lock(out):
            export_dense(directory, out, adopt=adopt)
        typer.echo(f"wrote {out} (dense; opens with AutoModelForCausalLM.from_pretrained)")
    else:
        export_onnx(directory, out, cache=cache)
        graph = "with a KV cache; generate with tqcompressor.modelio.onnx_generate" if cache else "input_ids -> logits"
        typer.echo(f"wrote {out} (ONNX, {graph}; run it with onnxruntime)")


@app.command()
def push(
    directory: Path = typer.Argument(..., help="a dir written by `tqc compress`/`tqc run`"),
    repo: str = typer.Option(..., help="Hub repo id, user/name"),
    private: bool = typer.Option(False, help="create the repo as private"),
) -> None:
    """Upload a compressed model dir to the Hugging Face Hub (needs a token: `hf auth login`)."""
    typer.echo(f"uploaded: {push_to_hub(directory, repo, private)}")


def _check_teacher_fraction(value: float) -> None:
    check_teacher_fraction(value)


def _check_training(model, kd, seq_len: int) -> None:
    _check_seq_len(model, seq_len)
    check_memory(kd, model.config)  # before minutes of sampling and compressing, not after


def _check_seq_len(model, seq_len: int) -> None:
    limit = _positions(model)
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
    teacher_start: TeacherStart = recipe.TEACHER_START,
    out: Path = typer.Option(..., help="run dir: checkpoints, metrics.jsonl, the final model"),
    steps: int = typer.Option(100, help="optimizer steps"),
    checkpoint_every: int = typer.Option(50, help="optimizer steps between checkpoints"),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    adopt: Adopt = False,
    kd: object = None,  # the shared distillation options (with_distill_options)
) -> None:
    """Distill a compressed student from its teacher (single stage)."""
    check_writable(out, inputs=[teacher, student, data], kind=RUN, adopt=adopt)  # before anything is written there
    check_count("teacher-pool", teacher_pool, 1, MAX_TEACHER_POOL)
    _check_teacher_fraction(teacher_fraction)
    check_teacher_start(teacher_start)
    mix = (teacher_fraction, teacher_pool, teacher_start)
    with writer_lock(out):
        if is_main_process():  # marked before teacher samples are cached there
            claim_directory(out, inputs=[teacher, student, data], kind=RUN, adopt=adopt)
        _distill(teacher, student, data, fraction, mix, out, resume, kd)


def _distill(teacher, student, data, fraction, mix: tuple, out: Path, resume: bool, kd) -> None:
    """``mix``: the teacher samples' fraction, pool and start."""
    student_model = load(student)
    check_not_quantized(student_model, "distillation")
    loaded = load_model(teacher)
    check_student_matches_teacher(student_model, loaded.model)
    if kd.pairs_blocks:  # before sampling any distillation data from the teacher
        check_same_depth(student_model, loaded.model)
    _check_training(loaded.model, kd, kd.seq_len)
    teacher_fraction, teacher_pool, teacher_start = mix
    blocks = block_source_for(
        data, loaded, kd, out, fraction, teacher_fraction, teacher_pool=teacher_pool, teacher_start=teacher_start
    )
    result = multistep_distill(
        loaded.model,
        student_model,
        blocks,
        kd,
        out,
        resume=resume,
        tokenizer=loaded.tokenizer,
        teacher_name=teacher,
        data_name=data_name(data, teacher_fraction, teacher_pool, teacher_start),
    )
    if is_main_process():  # under torchrun / accelerate launch, rank 0 writes
        save(result.to("cpu"), out / "model", loaded.tokenizer, base_model=teacher)
        typer.echo(f"wrote {out / 'model'}; metrics in {out / 'metrics.jsonl'}")


# `tqc eval` options whose help takes more than a line
EvalData = Annotated[
    Optional[str],
    typer.Option(
        help="text file/dir/glob, a dataset name (wikitext), or lambada / lambada:FILE for last-word accuracy "
        "(optional with --teacher: the fidelity suite needs none)"
    ),
]
EvalTeacher = Annotated[
    Optional[str], typer.Option(help="the model it came from: KL and top-1 agreement on --data, and the fidelity suite")
]
EvalFidelity = Annotated[
    bool,
    typer.Option(
        help="with --teacher: fidelity on held-out text (teacher samples, prose, docs, code), led by fidelity KL"
    ),
]


@app.command(name="eval")
def eval_command(
    model: str = typer.Option(..., help="a compressed dir or any model --model accepts"),
    data: EvalData = None,
    teacher: EvalTeacher = None,
    fidelity: EvalFidelity = True,
    fidelity_tokens: int = typer.Option(8192, help="tokens of each held-out domain"),
    context: int = typer.Option(512, help="window length (tokens)"),
    stride: Optional[int] = typer.Option(None, help="window stride (tokens); default = context"),
    max_tokens: Optional[int] = typer.Option(None, help="evaluate on the first N tokens (LAMBADA: N examples)"),
    batch_size: int = typer.Option(4),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics to this JSON file"),
) -> None:
    """Fidelity to the teacher on held-out text (with --teacher), perplexity (token, word, byte level) on --data."""

    check_count("context", context, 2)
    check_count("stride", stride, 1)
    check_count("max-tokens", max_tokens, 1)
    check_count("batch-size", batch_size, 1)
    check_count("fidelity-tokens", fidelity_tokens, 1)
    if data is None and teacher is None:
        raise TQCError("give --data (a text to score) or --teacher (fidelity on held-out text), or both")
    json_door = _eval_json_door(json_out) if json_out is not None else contextlib.nullcontext()
    with json_door as json_path:  # checked and locked before the evaluation, written whole after it
        loaded = load_model(model)
        if teacher is not None and fidelity:
            _check_fidelity_windows(loaded.model, context, fidelity_tokens)
        if data is not None and (data == "lambada" or data.startswith("lambada:")):
            metrics = _eval_lambada(loaded, data, max_tokens)
        else:
            options = dict(context=context, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
            metrics = _eval_text(loaded, model, data, teacher, fidelity, fidelity_tokens, options)
        if json_path is not None:
            json_path.write_text(json.dumps({EVAL_JSON_KEY: "tqc eval", **metrics}, indent=2) + "\n")


def _positions(model) -> Optional[int]:
    """The most positions ``model`` takes (None where its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def _check_context(model, context: int) -> None:
    limit = _positions(model)
    if limit and context > limit:
        raise TQCError(f"--context {context:,} exceeds the model's {limit:,} positions; choose at most {limit:,}")


def _check_fidelity_windows(model, context: int, fidelity_tokens: int) -> None:
    """The held-out suite scores windows of --context tokens: the model must take one, and each domain
    must hold one. Each refusal names the option at fault."""
    _check_context(model, context)
    if fidelity_tokens < context:
        raise TQCError(
            f"--fidelity-tokens {fidelity_tokens:,} is shorter than one --context window of {context:,}: "
            "raise --fidelity-tokens or lower --context"
        )


def _eval_lambada(loaded, data: str, max_tokens: Optional[int]) -> dict:
    # "lambada" streams the hub dataset; "lambada:FILE" reads one passage per line from a file
    source = data.split(":", 1)[1] if ":" in data else "lambada"
    texts = iter_texts(source, split="test") if source == "lambada" else _passages(source)
    metrics = lambada(loaded.model, loaded.tokenizer, texts, max_examples=max_tokens)
    typer.echo(table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    return {**metrics, "model": loaded.source, "data": data}


def _eval_text(loaded, model: str, data, teacher, fidelity: bool, fidelity_tokens: int, options: dict) -> dict:
    """Fidelity on the held-out suite (with a teacher), then perplexity and agreement on ``data``."""
    context, stride = options["context"], options["stride"]
    teacher_model = load_model(teacher).model if teacher else None
    metrics: dict = {"model": model, "data": data, "teacher": teacher}
    if teacher_model is not None and fidelity:
        domains = heldout_domains(teacher_model, loaded.tokenizer, fidelity_tokens, context)
        measured = measure(
            loaded.model, teacher_model, domains, context, loaded.tokenizer, batch_size=options["batch_size"]
        )
        metrics["fidelity"] = measured
        typer.echo(f"fidelity KL {measured['fidelity_kl']:.4f} nats/token, top-1 {measured['fidelity_top1']:.3f}")
        typer.echo(table(TABLE_HEADER, table_rows(measured), "llrrr"))
    if data is None:
        return metrics
    ids = tokenize_text(data, loaded.tokenizer, options["max_tokens"])
    _check_context(loaded.model, context)
    scored = evaluate(
        loaded.model, ids, context=context, stride=stride, teacher=teacher_model,
        batch_size=options["batch_size"], tokenizer=loaded.tokenizer,
    )  # fmt: skip
    metrics.update(scored)
    keys = ["perplexity", "word_perplexity", "byte_perplexity", "kl_to_teacher", "top1_agreement", "tokens"]
    typer.echo(f"on {data} (not held out unless no step of yours read it):")
    typer.echo(table(["metric", "value"], [[k, scored[k]] for k in keys + ["params"] if k in scored]))
    lead = ", every window led by the tokenizer's start token" if scored["protocol"]["start_token"] else ""
    typer.echo(f"protocol: token level, context {context}, stride {stride or context}{lead}")
    return metrics


EVAL_JSON_KEY = "written_by"  # marks a --json file of ours: the only kind `tqc eval` overwrites


def _eval_json_door(path: Path):
    """The --json file's door: the parent must be a directory, and an existing file is replaced only if
    an earlier `tqc eval` wrote it; locked for the whole evaluation and written whole after it."""
    if not Path(path).expanduser().resolve().parent.is_dir():
        raise TQCError(f"--json {path}: the directory {Path(path).parent} does not exist; create it first")
    return staged_file(path, "--json", _is_our_eval_json)


def _is_our_eval_json(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(EVAL_JSON_KEY) == "tqc eval"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _passages(path: str):
    """LAMBADA passages from a text file, one a line; one line for a file that is missing or not text."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TQCError(
            f"lambada:{path} cannot be read as UTF-8 text ({type(exc).__name__}); pass a text file"
        ) from None


# `tqc run` options whose help takes more than a line
RunRatio = Annotated[
    Optional[float], typer.Option(help="fraction of the whole model's parameters to keep [default: 0.65]")
]
RunMaxBytes = Annotated[
    Optional[str],
    typer.Option(
        "--max-bytes",
        help="instead of --ratio: the size the saved weights may take (60MiB, 60MB, bytes); each matrix gets a "
        "format, or --structures' factors in a format, by measured error per byte; the factors are distilled, "
        "the rest stays in its format (its scales and offsets trained)",
    ),
]
RunMaxKL = Annotated[
    Optional[float],
    typer.Option(
        "--max-kl",
        help="instead of --ratio or --max-bytes: the fidelity KL (held-out, nats/token) the model may have; the "
        "smallest --max-bytes plan within it, one-shot, is found by measuring each candidate, then distilled",
    ),
]
RunStructures = Annotated[
    Optional[str],
    typer.Option(
        "--structures",
        help="with --max-bytes or --max-kl: structures a matrix may be stored as, comma-separated, or 'none' "
        "(formats only) "
        f"[default: {','.join(recipe.BYTE_STRUCTURES) or 'none'}]",
    ),
]
RunStages = Annotated[
    Optional[int], typer.Option(help=f"compression/distillation steps (upper layers first) [default: {recipe.STAGES}]")
]
RunTeacherFraction = Annotated[
    float,
    typer.Option(
        help="fraction of the distillation (and calibration) blocks sampled from the teacher, mixed evenly into --data"
    ),
]
RunTeacherPool = Annotated[
    int, typer.Option(help="teacher blocks sampled once (then cycled) for --data teacher or --teacher-fraction")
]
RunSteps = Annotated[
    Optional[int],
    typer.Option(help=f"distillation steps per stage [default: {recipe.STEPS}, or what --time-budget allows]"),
]
RunCalibrationTokens = Annotated[
    int,
    typer.Option(
        help="distillation tokens the fits are calibrated on (0: weight-space fits, e.g. the paper's tq as is)"
    ),
]
RunSequential = Annotated[
    bool,
    typer.Option(
        help="refit each block's layers to the teacher's outputs from the inputs the compressed "
        "model feeds them, before distilling (needs calibration)"
    ),
]
RunOutputWeights = Annotated[
    Optional[bool],
    typer.Option(
        "--output-weights/--no-output-weights",
        help="weight each layer's outputs by the loss's gradient energy there (Fisher row weights, as FWSVD) when "
        "choosing ranks and fitting; needs calibration and --method auto (default: on wherever it applies)",
    ),
]
RunCompareTokens = Annotated[
    int,
    typer.Option(
        help="beside the student, fidelity of the teacher and the student in fp32, int8 and int4 (groups of 32 "
        "and 128) on this many tokens of each held-out domain, at most --eval-tokens (0: skip the comparison)"
    ),
]
RunInterimTokens = Annotated[
    int,
    typer.Option(
        "--interim-eval-tokens",
        help="score the points during the run (the one-shot model, stages before the last) on the first this "
        "many tokens of each domain, the same windows each time; the final model and the teacher on all "
        "--eval-tokens (0: every point on all of them)",
    ),
]
RunTimeBudget = Annotated[
    Optional[float],
    typer.Option(
        help="minutes the whole job may take: the run times one distillation step and fixes --steps so that "
        "sampling, compression, distillation and evaluation end inside it"
    ),
]


@app.command()
@with_distill_options
def run(
    model: str = typer.Option(DEFAULT_MODEL, help="the model to compress (and the teacher)"),
    method: Optional[str] = typer.Option(None, help=_methods_help() + f" [default: {recipe.METHOD}]"),
    ratio: RunRatio = None,
    stages: RunStages = None,
    prefer: Prefer = None,
    auto_methods: AutoMethods = None,
    spec: Optional[Path] = typer.Option(None, help="explicit per-layer plan instead of --ratio/--stages"),
    data: str = typer.Option("teacher", help="distillation text (file/dir/glob, dataset name) or 'teacher'"),
    fraction: Optional[float] = typer.Option(None, help="fraction of a hub dataset's train split"),
    teacher_fraction: RunTeacherFraction = recipe.TEACHER_FRACTION,
    teacher_pool: RunTeacherPool = recipe.TEACHER_POOL,
    teacher_start: TeacherStart = recipe.TEACHER_START,
    eval_data: Optional[str] = typer.Option(None, help="evaluation text; default: held-out teacher samples"),
    eval_tokens: int = typer.Option(8192, help="tokens to evaluate on"),
    context: int = typer.Option(512, help="evaluation window"),
    steps: RunSteps = None,
    checkpoint_every: int = typer.Option(20, help="optimizer steps between checkpoints"),
    out: Path = typer.Option(Path("out/run"), help="run dir: report.md, results.json, perplexity.png, model/"),
    resume: bool = typer.Option(False, help="continue an interrupted run in --out"),
    calibration_tokens: RunCalibrationTokens = 8192,
    sequential: RunSequential = recipe.SEQUENTIAL,
    output_weights: RunOutputWeights = None,
    compare_tokens: RunCompareTokens = 2048,
    interim_eval_tokens: RunInterimTokens = 2048,
    time_budget: RunTimeBudget = None,
    max_bytes: RunMaxBytes = None,
    max_kl: RunMaxKL = None,
    structures: RunStructures = None,
    adopt: Adopt = False,
    kd: object = None,  # the shared distillation options (with_distill_options)
) -> None:
    """The main job: compress, distill step by step, evaluate fidelity, write report.md and plots."""
    if time_budget is not None and steps is not None:
        raise TQCError("--time-budget chooses --steps itself: drop one of them")
    check_count("stages", stages, 1)
    byte_budget = _run_byte_budget(max_bytes, max_kl, structures, spec, method, ratio, stages, auto_methods)
    compression = _run_compression(
        spec, method, ratio, stages, prefer, auto_methods, sequential, output_weights, calibration_tokens
    )
    run_config = RunConfig(
        *(compression, kd, data, eval_data, out, eval_tokens, context, resume, fraction, calibration_tokens),
        *(teacher_fraction, teacher_pool),
        **dict(compare_tokens=compare_tokens, time_budget=time_budget, teacher_start=teacher_start),
        **dict(interim_tokens=interim_eval_tokens, **byte_budget),
    )
    inputs = [model, spec, data, eval_data]
    check_writable(out, inputs, kind=RUN, adopt=adopt)  # before loading anything
    with writer_lock(out):
        if adopt and is_main_process():  # run_pipeline claims it, as the dir of ours it now is
            claim_directory(out, inputs, kind=RUN, adopt=True)
        loaded = load_model(model)
        _check_training(loaded.model, kd, max(kd.seq_len, context))
        result = run_pipeline(loaded, run_config)
    if not result:
        return  # not rank 0 of a multi-process run: rank 0 reports
    typer.echo(format_report(result) + _kl_target_line(result, max_kl))
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'perplexity.png'}, {out / 'model'}")


def _kl_target_line(result: dict, max_kl: float | None) -> str:
    """Whether ``tqc run --max-kl``'s distilled model met its target, and by how much it missed (a new line)."""
    if max_kl is None:
        return ""
    final, size = result["points"][-1]["fidelity_kl"], f"{result['bytes'] / 2**20:.1f} MiB"
    if final <= max_kl:
        return f"\nfidelity KL {final:.4f} <= --max-kl {max_kl:g} after distillation ({size})"
    return (
        f"\ntarget not met: fidelity KL {final:.4f} after distillation, {final - max_kl:.4f} over --max-kl "
        f"{max_kl:g}; the closest model found is saved ({size})"
    )


def _run_byte_budget(max_bytes, max_kl, structures, spec, method, ratio, stages, auto_methods) -> dict:
    """RunConfig's ``max_bytes``, ``max_kl`` and ``structures`` from ``tqc run --max-bytes`` / ``--max-kl``,
    checked: a byte plan plans every matrix, so the options of a parameter plan are refused, not ignored."""
    if max_bytes is None and max_kl is None:
        if structures is not None:
            raise TQCError(
                "--structures joins the formats a --max-bytes or --max-kl plan chooses from: give one of them too"
            )
        return {}
    target = "--max-bytes" if max_bytes is not None else "--max-kl"
    options = {"spec": spec, "method": method, "ratio": ratio, "stages": stages, "auto_methods": auto_methods}
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if given:
        raise TQCError(f"{target} plans every matrix in bytes; {', '.join(given)} plan in parameters: drop one")
    # both given: RunConfig refuses them in one line
    found = {"max_bytes": parse_bytes(max_bytes) if max_bytes is not None else None, "max_kl": max_kl}
    if structures is None:
        return {**found, "structures": recipe.BYTE_STRUCTURES}
    names = tuple(name.strip() for name in structures.split(",") if name.strip() and name.strip() != "none")
    for name in names:
        get_structure(name)  # one line for a name that is not a structure that compresses
    return {**found, "structures": names}


def _run_compression(
    spec, method, ratio, stages, prefer, auto_methods, sequential, output_weights, calibration_tokens
) -> CompressionConfig:
    """``tqc run``'s compression: a spec file, or the recipe's defaults for what is not given."""
    if spec:
        _check_spec_alone(method=method, ratio=ratio, stages=stages, auto_methods=auto_methods, prefer=prefer)
        return load_spec(spec)
    method, ratio = recipe.METHOD if method is None else method, 0.65 if ratio is None else ratio
    if output_weights is None:  # the recipe's default, wherever it applies (after method's own default)
        output_weights = recipe.OUTPUT_WEIGHTS and method in planning_methods() and calibration_tokens > 0
    return CompressionConfig(
        method=method,
        ratio=ratio,
        steps=recipe.STAGES if stages is None else stages,
        prefer=prefer or "accuracy",
        auto_methods=_auto_methods(auto_methods, method),
        sequential=sequential and calibration_tokens > 0,
        output_weights=output_weights,
    )


def main(argv: Optional[list[str]] = None) -> None:
    """The console entry point: any failure is one ``error:`` line on stderr, never a traceback
    (``--debug`` shows it). Exit status 2: the input or the machine is at fault and the line says
    what to do; 1: a fault of ours (please report it); 130: interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="tqc", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _fail("interrupted", 130)
    except typer.TyperException as exc:  # usage: unknown option, missing value, bad type (Typer's parser)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        context = getattr(exc, "ctx", None)
        hint = f" (`{context.command_path} --help` lists the options)" if context is not None else ""
        _fail(f"error: {message}{hint}", 2)
    except TQCError as exc:
        if debug:
            raise
        _fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:  # the machine: disk full, permissions, a vanished file
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"error: {exc.strerror or exc}{where}; nothing under the final output name was replaced", 2)
    except MemoryError:
        _fail("error: out of memory; use a smaller batch, context or model", 2)
    except Exception as exc:
        if debug:
            raise
        if _out_of_space(exc):  # libraries with their own error types (safetensors, tokenizers) for a full disk
            _fail(f"error: No space left on device ({first_line(exc, 120)}); nothing under the final output "
                  "name was replaced: free some space and run again", 2)  # fmt: skip
        message = first_line(exc, limit=300)
        _fail(
            f"error: internal error ({type(exc).__name__}: {message}); rerun with --debug for the traceback "
            "and report it",
            1,
        )
    sys.exit(code if isinstance(code, int) else 0)


def _out_of_space(exc: BaseException) -> bool:
    """Whether ``exc``, or what it was raised from, is the disk (or quota) running out."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _fail(line: str, status: int) -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar cut short ends its line first
        bar.close()
    typer.echo(line, err=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
