"""What the bench scripts share: where things are, the options every measurement of a compressed
SmolLM2 takes, and the before/after bar plot. (What a result file records about the code:
:mod:`provenance`.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "wikitext-2"


def bad_input(message: str) -> None:
    """One line on stderr and exit status 2, as the CLI answers bad input."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def eval_options(parser: argparse.ArgumentParser, eval_tokens: int, model: str = "smollm2-135m") -> None:
    """``--model``, and perplexity on ``--eval-tokens`` of ``--test`` in windows of ``--context``."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--test", default=str(DATA / "test.txt"))
    parser.add_argument("--eval-tokens", type=int, default=eval_tokens)
    parser.add_argument("--context", type=int, default=512)


def one_shot_fidelity_options(parser: argparse.ArgumentParser) -> None:
    """A model planned on calibration text and scored one-shot on the held-out fidelity suite."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default=str(DATA / "valid.txt"))
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--fidelity-tokens", type=int, default=1024, help="tokens of each held-out domain")
    parser.add_argument("--context", type=int, default=512)


def teacher_and_domains(args: argparse.Namespace) -> tuple:
    """``(teacher, tokenizer, held-out domains)`` for :func:`one_shot_fidelity_options`' settings."""
    from tqcompressor.evaluation.fidelity import heldout_domains
    from tqcompressor.modelio.models import load_model

    loaded = load_model(args.model)
    domains = heldout_domains(loaded.model, loaded.tokenizer, args.fidelity_tokens, args.context)
    return loaded.model, loaded.tokenizer, domains


def calibrated_options(parser: argparse.ArgumentParser, eval_tokens: int) -> None:
    """:func:`eval_options`, plus ``--ratio`` and ``--calibration-tokens`` of ``--calibration``
    (one-shot measurements: calibrate, compress, evaluate)."""
    eval_options(parser, eval_tokens)
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--calibration", default=str(DATA / "valid.txt"))
    parser.add_argument("--calibration-tokens", type=int, default=8192)


def distillation_options(parser: argparse.ArgumentParser, eval_tokens: int, kd_steps: bool = True) -> None:
    """:func:`eval_options`, plus ``--ratio`` and the protocol of ``compare.json``: calibration and
    distillation on ``--train``, ``--kd-steps`` (unless the script counts KD otherwise) of
    ``--batch-size`` blocks of ``--seq-len`` tokens at peak ``--lr``, on ``--device``, in
    ``--mixed-precision``."""
    eval_options(parser, eval_tokens)
    parser.add_argument("--ratio", type=float, default=0.65)
    parser.add_argument("--train", default=str(DATA / "valid.txt"))
    if kd_steps:
        parser.add_argument("--kd-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--mixed-precision", default="auto", help="training autocast: auto (bf16 where native, else fp32) | bf16 | no"
    )


def distill_config(args: argparse.Namespace, steps: int | None = None, checkpoint_every: int = 10**9):
    """The :class:`~tqcompressor.training.distill.DistillConfig` of :func:`distillation_options` (``steps``
    instead of ``--kd-steps`` where given); no checkpoint unless asked: a bench run is one go."""
    from tqcompressor.training.distill import DistillConfig, training_precision

    return DistillConfig(
        mixed_precision=training_precision(args.mixed_precision),  # recorded as what it meant on this machine
        steps=steps or args.kd_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        checkpoint_every=checkpoint_every,
        log_every=10,
    )


def fidelity_options(parser: argparse.ArgumentParser, tokens: int = 4096) -> None:
    """``--fidelity-tokens``: how much of each held-out domain (teacher samples and the shipped texts)
    fidelity is measured on."""
    parser.add_argument(
        "--fidelity-tokens",
        type=int,
        default=tokens,
        help="tokens of each held-out domain (teacher samples, prose, docs, code) for fidelity to the teacher",
    )


class Fidelity:
    """The fidelity suite of a run (:mod:`tqcompressor.evaluation.fidelity`): the held-out domains, sampled and
    tokenized once, and the teacher's perplexity on each, measured once. ``point(model)`` is what every
    bench records first for a model: fidelity KL and top-1 (means over the held-out domains) and, per
    domain, KL, top-1 and the perplexity ratio to the teacher."""

    def __init__(self, teacher, tokenizer, tokens: int, context: int, cache_dir: Path | None = None) -> None:
        from tqcompressor.evaluation import fidelity

        self.teacher, self.tokenizer, self.context = teacher, tokenizer, context
        self.domains = fidelity.heldout_domains(teacher, tokenizer, tokens, context, cache_dir)
        measured = fidelity.measure(teacher, teacher, self.domains, context, tokenizer)
        self.teacher_perplexity = fidelity.teacher_perplexities(measured)

    def point(self, model) -> dict:
        from tqcompressor.evaluation import fidelity

        measured = fidelity.measure(
            model.eval(), self.teacher, self.domains, self.context, self.tokenizer, self.teacher_perplexity
        )
        return {
            "fidelity_kl": measured["fidelity_kl"],
            "fidelity_top1": measured["fidelity_top1"],
            "held_out": {
                name: {k: m[k] for k in ("kl_to_teacher", "top1_agreement", "perplexity_ratio")}
                for name, m in measured["domains"].items()
            },
        }

    def protocol(self) -> dict:
        """What the fidelity figures were measured on, for the result file."""
        return {
            "domains": {name: int(domain.ids.numel()) for name, domain in self.domains.items()},
            "context": self.context,
            "teacher_perplexity": self.teacher_perplexity,
            "fidelity_kl": "mean KL(teacher || model) in nats/token over these held-out domains",
        }


def pyplot():
    """matplotlib's pyplot drawing to files only (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_log_plot(fig, ax, path: Path) -> None:
    """Legend, a grid on both log axes, and the figure written to ``path`` and closed."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def before_after_bars(
    path: Path,
    bars: dict[str, tuple[float, float]],
    tick_labels: list[str],
    teacher: tuple[float, str] | None,
    title: str,
    before_label: str,
    ylabel: str = "WikiText-2 test perplexity, in-domain (log)",
) -> None:
    """Grouped bars per method, perplexity before and after KD (log scale), the after-KD value
    written on its bar, the teacher's perplexity as a dashed line; ``bars``: method -> (before, after),
    ``teacher``: (perplexity, its legend label)."""
    plt = pyplot()
    x = range(len(bars))
    fig, ax = plt.subplots(figsize=(7, 4))
    before, after = [b for b, _ in bars.values()], [a for _, a in bars.values()]
    ax.bar([i - 0.2 for i in x], before, width=0.4, label=before_label, color="#bbbbbb")
    drawn = ax.bar([i + 0.2 for i in x], after, width=0.4, label="after KD", color="#1f77b4")
    for bar, value in zip(drawn, after):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    if teacher is not None:
        ax.axhline(teacher[0], color="black", linestyle="--", label=teacher[1])
    ax.set_xticks(list(x), tick_labels)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
