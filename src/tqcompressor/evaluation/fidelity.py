"""Fidelity: what a compressed model keeps of its teacher, measured on text no step of ours read.

Perplexity on the test split of the corpus a student was distilled on rewards adapting to that
corpus (a student can score better than its teacher there while disagreeing with it on every
other text). Fidelity compares the two models on the same windows of

- samples of the teacher itself (seeded with :data:`EVAL_SEED`, which no calibration or
  distillation sample uses),
- three real texts shipped in ``tqcompressor/evaluation/heldout`` (prose of 1611, technical documentation,
  source code; licences in its README), which no step reads,

and reports per domain KL(teacher || student) in nats per token, top-1 agreement and the ratio of
the two perplexities. **Fidelity KL** is the mean KL over these held-out domains. A text the
student was distilled on can be scored beside them, labelled in-domain, and never counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tqcompressor.data import teacher_samples, tokenize_text
from tqcompressor.evaluation.evaluate import evaluate

HELDOUT_DIR = Path(__file__).parent / "heldout"
HELDOUT_FILES = {
    "prose 1611 (KJV Job)": "prose-kjv-job.txt",
    "docs (Python argparse)": "docs-python-argparse.rst.txt",
    "code (CPython stdlib)": "code-python-stdlib.py.txt",
}
TEACHER_DOMAIN = "teacher samples"
EVAL_SEED = 12345  # the held-out teacher samples; no training or calibration sample uses this seed


@dataclass(frozen=True)
class Domain:
    """Token ids to score on, and whether they count towards fidelity KL (never for in-domain text)."""

    ids: torch.Tensor
    held_out: bool


EVAL_BATCH = 4  # windows a forward scores at once


def heldout_domains(teacher, tokenizer, tokens: int, context: int, cache_dir: Path | None = None) -> dict[str, Domain]:
    """The teacher's own samples and the shipped texts, ``tokens`` of each (teacher samples in
    whole windows of ``context``). Samples are cached in ``cache_dir`` when given."""
    count = max(1, tokens // context)
    cache = cache_dir / f"eval_teacher_samples-seed{EVAL_SEED}-{count}x{context}.safetensors" if cache_dir else None
    samples = teacher_samples(teacher, tokenizer, count, context, EVAL_SEED, cache)
    domains = {TEACHER_DOMAIN: Domain(samples.reshape(-1), True)}
    for name, file in HELDOUT_FILES.items():
        domains[name] = Domain(tokenize_text(str(HELDOUT_DIR / file), tokenizer, tokens), True)
    return domains


def in_domain(ids: torch.Tensor) -> Domain:
    return Domain(ids, False)


def measure(
    model,
    teacher,
    domains: dict[str, Domain],
    context: int,
    tokenizer=None,
    teacher_perplexity: dict[str, float] | None = None,
    batch_size: int = EVAL_BATCH,
) -> dict:
    """Per domain: the model's perplexity and, against ``teacher``, KL, top-1 agreement and the
    perplexity ratio; plus ``fidelity_kl`` and ``fidelity_top1`` (means over held-out domains).
    ``teacher_perplexity`` (per domain): the ratio's denominators where they are known (by default the
    teacher's perplexity from the same forward passes)."""
    return measure_both(model, teacher, domains, context, tokenizer, teacher_perplexity, batch_size)[0]


def measure_both(
    model,
    teacher,
    domains: dict[str, Domain],
    context: int,
    tokenizer=None,
    teacher_perplexity: dict[str, float] | None = None,
    batch_size: int = EVAL_BATCH,
) -> tuple[dict, dict]:
    """:func:`measure` of ``model`` and of the teacher itself, from one pass of each over every window:
    the teacher's half is what ``measure(teacher, teacher, ...)`` returns (KL 0, top-1 1)."""
    results, own, same = {}, {}, model is teacher
    for name, domain in domains.items():
        metrics = evaluate(
            model,
            domain.ids,
            context=context,
            teacher=None if same else teacher,
            tokenizer=tokenizer,
            batch_size=batch_size,
            progress=False,
        )
        teacher_metrics = metrics if same else metrics.pop("teacher")
        own[name] = {
            **teacher_metrics,
            "kl_to_teacher": 0.0,
            "top1_agreement": 1.0,
            "held_out": domain.held_out,
            "teacher_perplexity": teacher_metrics["perplexity"],
            "perplexity_ratio": 1.0,
        }
        reference = (teacher_perplexity or {}).get(name, teacher_metrics["perplexity"])
        results[name] = (
            own[name]
            if same
            else {
                **metrics,  # evaluate's own: perplexity, KL, top-1, tokens, params, protocol
                "held_out": domain.held_out,
                "teacher_perplexity": reference,
                "perplexity_ratio": metrics["perplexity"] / reference,
            }
        )
    return {**summarize(results), "domains": results}, {**summarize(own), "domains": own}


def summarize(domains: dict[str, dict]) -> dict:
    """Fidelity KL and top-1: means over the held-out domains only."""
    held_out = [m for m in domains.values() if m["held_out"]]
    if not held_out:
        return {"fidelity_kl": None, "fidelity_top1": None}
    return {
        "fidelity_kl": sum(m["kl_to_teacher"] for m in held_out) / len(held_out),
        "fidelity_top1": sum(m["top1_agreement"] for m in held_out) / len(held_out),
    }


def teacher_perplexities(measured: dict) -> dict[str, float]:
    """Per-domain perplexities of a :func:`measure` result of the teacher itself (to reuse)."""
    return {name: m["perplexity"] for name, m in measured["domains"].items()}


def table_rows(measured: dict) -> list[list]:
    """Rows for :func:`tqcompressor.evaluation.report.table`: domain, held out?, KL, top-1, perplexity ratio."""
    rows = [
        [
            name,
            "held out" if m["held_out"] else "in-domain",
            m["kl_to_teacher"],
            m["top1_agreement"],
            m["perplexity_ratio"],
        ]
        for name, m in measured["domains"].items()
    ]
    if measured["fidelity_kl"] is not None:
        rows.append(["fidelity (mean of held out)", "", measured["fidelity_kl"], measured["fidelity_top1"], ""])
    return rows


TABLE_HEADER = ["domain", "", "KL (nats/token)", "top-1 agreement", "perplexity ratio"]
