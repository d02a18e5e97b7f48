"""The pictures of a run: perplexity against parameters, and the plan as a grid of blocks x matrices."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.quant.modules import MODULE_TYPES, QuantizedLowRankLinear, QuantizedWeight
from tqcompressor.structures import REGISTRY

BLOCK = re.compile(r"\.(\d+)\.")  # the block index in names like model.layers.10.mlp.up_proj


def plan_cells(teacher: nn.Module, student: nn.Module) -> list[dict]:
    """One cell per linear layer of the numbered blocks: block index, matrix name (e.g.
    ``self_attn.q_proj``), the structure the student has there (``dense`` when untouched; a stored
    layer's format beside it, ``svd int8``) and the fraction of the teacher's parameters it keeps (of a
    stored layer: of the teacher's bytes)."""
    structure_of = {cls: name for name, s in REGISTRY.items() for cls in s.module_types}
    structure_of[QuantizedLowRankLinear] = "svd"
    cells = []
    for name, module in teacher.named_modules():
        found = BLOCK.search(name)
        if not found or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        method, kept = _cell(module, student.get_submodule(name), structure_of)
        cells.append({"block": int(found.group(1)), "matrix": name[found.end() :], "method": method, "kept": kept})
    return cells


def _cell(original: nn.Module, replaced: nn.Module, structure_of: dict) -> tuple[str, float]:
    """``(structure, kept)`` of one cell (a stored layer: its structure and format, kept by bytes);
    ``structure_of``: a module class's structure name."""
    if not isinstance(replaced, MODULE_TYPES):
        kept = sum(p.numel() for p in replaced.parameters()) / sum(p.numel() for p in original.parameters())
        return structure_of.get(type(replaced), "dense"), kept
    stored = [m for m in replaced.modules() if isinstance(m, QuantizedWeight)]
    kept = sum(m.stored_bytes for m in stored) / sum(p.numel() * p.element_size() for p in original.parameters())
    structure = structure_of.get(type(getattr(replaced, "inner", replaced)))
    fmt = stored[0].settings.name
    return (f"{structure} {fmt}" if structure else fmt), kept


def plot_plan(cells: list[dict], path: Path, title: str) -> None:
    """Blocks down, matrices across; colour = structure, shade and label = fraction of parameters kept."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    matrices = list(dict.fromkeys(c["matrix"] for c in cells))
    blocks = sorted({c["block"] for c in cells})
    methods = sorted({c["method"] for c in cells}, key=lambda m: (m != "dense", m))
    colours = ["#bbbbbb", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    colours += ["#bcbd22", "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78", "#c49c94"]
    palette = {m: colours[i % len(colours)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(matrices), 1.0 + 0.22 * len(blocks)))
    for c in cells:
        x, y = matrices.index(c["matrix"]), blocks.index(c["block"])
        alpha = 1.0 if c["method"] == "dense" else 0.35 + 0.65 * (1 - min(c["kept"], 1.0))
        ax.add_patch(plt.Rectangle((x, y), 1, 1, color=palette[c["method"]], alpha=alpha, linewidth=0))
        if c["method"] != "dense":
            ax.text(x + 0.5, y + 0.5, f"{100 * c['kept']:.0f}%", ha="center", va="center", fontsize=6)
    ax.set_xlim(0, len(matrices))
    ax.set_ylim(len(blocks), 0)
    ax.set_xticks([i + 0.5 for i in range(len(matrices))], [m.split(".")[-1] for m in matrices], fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(len(blocks))], [str(b) for b in blocks], fontsize=6)
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    ax.legend(
        handles=[Patch(color=palette[m], label=m) for m in methods],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="structure (label: % kept)",
        title_fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_points(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity (log scale) against parameters, one labelled point per stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["params"] / 1e6, r["perplexity"], s=40)
        ax.annotate(
            r["label"], (r["params"] / 1e6, r["perplexity"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.set_xlabel("parameters (M, all counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fidelity(points: list[dict], quantized: list[dict], path: Path, title: str) -> None:
    """Fidelity KL against parameters for the run's points, and against bytes held for the
    quantized teacher and student: what a given size keeps of the teacher, whichever way it is reached."""
    plt = _pyplot()
    fig, (by_params, by_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    for p in points:
        by_params.scatter(p["params"] / 1e6, p["fidelity_kl"], s=40)
        by_params.annotate(
            p["label"], (p["params"] / 1e6, p["fidelity_kl"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    by_params.set_xlabel("parameters (M, all counted)")
    for q in quantized:
        marker = "o" if q["model"] == "teacher" else "s"
        by_bytes.scatter(q["memory_bytes"] / 2**20, q["fidelity_kl"], s=40, marker=marker)
        by_bytes.annotate(
            f"{q['model']} {q['format']}",
            (q["memory_bytes"] / 2**20, q["fidelity_kl"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    by_bytes.set_xlabel("MiB held in memory")
    for ax in (by_params, by_bytes):
        ax.set_ylabel("fidelity KL (nats/token, held-out text)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: closeness to the teacher on text no step read")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt
