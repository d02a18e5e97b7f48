"""The ``tqc`` command line. Thin: parse options, call the library, print a table.

Every user-facing problem is a :class:`TQCError`; :func:`main` prints it as one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tqcompressor.errors import TQCError
from tqcompressor.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs with permuted Kronecker factorizations (TQCompressor).")


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@app.command()
def compress(
    model: str = typer.Option(DEFAULT_MODEL, help="hub id, local HF dir, .gguf file, or 'smollm2-135m'"),
    method: str = typer.Option("tq", help="tq | kronecker | svd"),
    ratio: Optional[float] = typer.Option(None, help="fraction of the whole model's parameters to keep, in (0, 1]"),
    target_params: Optional[int] = typer.Option(None, help="absolute parameter budget (instead of --ratio)"),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated module names/patterns"),
    spec: Optional[Path] = typer.Option(None, help="explicit per-layer spec file (YAML/JSON) instead of a budget"),
    steps: int = typer.Option(1, help="spread the automatic plan over this many distillation steps"),
    out: Path = typer.Option(..., help="output directory"),
    max_iterations: int = typer.Option(20, help="permutation-search rounds per matrix (tq)"),
) -> None:
    """Compress a model and write a model dir plus compression.json."""
    from tqcompressor.checkpoint import save
    from tqcompressor.config import CompressionConfig, load_spec
    from tqcompressor.models import load_model
    from tqcompressor.report import format_compression_table
    from tqcompressor.surgery import compress as run_compress

    if spec is not None:
        config = load_spec(spec)
    else:
        if ratio is None and target_params is None:
            ratio = 0.65
        config = CompressionConfig(method=method, ratio=ratio, target_params=target_params,
                                   target_modules=_split(target_modules), steps=steps, max_iterations=max_iterations)
    loaded = load_model(model)
    compressed, report = run_compress(loaded.model, config)
    save(compressed, out, loaded.tokenizer, base_model=model)
    (Path(out) / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    typer.echo(format_compression_table(report.to_dict()))
    typer.echo(f"wrote {out}")


@app.command()
def info(directory: Path = typer.Argument(..., help="a dir written by `tqc compress`")) -> None:
    """Print the compression table of a compressed model dir."""
    from tqcompressor.checkpoint import read_structure
    from tqcompressor.report import format_compression_table

    read_structure(directory)
    path = directory / "compression.json"
    if not path.is_file():
        raise TQCError(f"{directory} has no compression.json; it was not written by `tqc compress`")
    typer.echo(format_compression_table(json.loads(path.read_text())))


@app.command()
def export(
    directory: Path = typer.Argument(..., help="a dir written by `tqc compress`"),
    out: Path = typer.Option(..., help="output directory"),
    dense: bool = typer.Option(True, "--dense", help="merge the factors into a plain HF model dir"),
) -> None:
    """Export a compressed model as a plain Hugging Face model dir (factors merged)."""
    from tqcompressor.checkpoint import export_dense

    export_dense(directory, out)
    typer.echo(f"wrote {out} (dense; opens with AutoModelForCausalLM.from_pretrained)")


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
