"""A stored matrix plus a low-rank correction of its rounding error, on a byte plan's menu: ``W ~= Q(W) + U V``.

Rounding a matrix to 2 or 3 bits leaves an error whose *output* (``E||(W - Q(W)) x||``, inputs far from
white) concentrates in a few directions, so a rank-16 correction removes a large share of it for a few per
cent of the matrix's bytes (LQER, EoRA, NNCF's LoRA correction). Measured on SmolLM2-135M's layers, a
corrected int3 often buys less error than the next finer format at fewer bytes. Each linear matrix's menu
gains, for every base format of ``bases`` and every rank of ``ranks``, that matrix stored in the format
with the activation-aware, output-weighted SVD of its rounding error (:func:`correction_factors`), the
correction's factors stored in int8 (:data:`~tqcompressor.quant.modules.CORRECTION_SETTINGS`): priced in
the bytes both parts take and measured as stored. The byte plan's solve then weighs them beside every other
candidate; a byte run's distillation trains the chosen corrections in float, then stores them.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from tqcompressor.linalg.decompose import whitening
from tqcompressor.planning.calibration import LayerStatistics
from tqcompressor.planning.formats import (
    FormatCandidate,
    FormatMenus,
    extend_menus,
    logit_matrices,
    relative_output_error,
    settings_named,
)
from tqcompressor.quant.modules import CORRECTION_SETTINGS, QuantizedLowRankLinear, QuantizedWeight
from tqcompressor.structures.lowrank import LowRankFactors, LowRankLinear, truncated_svd

# the formats a correction is measured on: below 4 bits, and int4 at groups of 64 (SmolLM2's matrices come from
# a GGUF stored at groups of 32, so their int4-g32 has next to no error left to correct)
BASES = ("int2-g64-dq", "int2-g32-dq", "int3-g64-dq", "int3-g32-dq", "int4-g64-dq")
# each correction's ranks, the leading components of one fit: multiples of 16, as int8 pads U's inputs (the rank)
# to 16 values, so that a rank of 8 would cost three quarters of one of 16
RANKS = (16, 32)


def correction_factors(
    weight: Tensor, stored: Tensor, rank: int, stats: LayerStatistics | None = None, whitened=None
) -> LowRankFactors:
    """``U V`` of rank ``rank`` closest to the rounding error ``weight - stored`` in the output metric of
    ``stats`` (inputs' second moment, each output weighted by its gradient energy), in weight space without;
    ``whitened``: the inputs' whitening, where the caller fits many corrections of one matrix."""
    cov = stats.input_cov if stats is not None else None
    rows = getattr(stats, "grad_sq_rows", None)
    rank = min(rank, *weight.shape)
    return truncated_svd(weight.float() - stored.float(), rank, cov, whitened=whitened, row_weights=rows)


def corrected_menu(
    weight: Tensor, stats: LayerStatistics | None, bases: tuple[str, ...] = BASES, ranks: tuple[int, ...] = RANKS
) -> list[FormatCandidate]:
    """Every base format with every rank of correction, for one matrix: the bytes of both parts as stored and
    the relative output error of their sum (the weight's relative error without ``stats``)."""
    whitened = whitening(stats.input_cov) if stats is not None else None
    menu = []
    for base in bases:
        stored = QuantizedWeight.from_weight(weight, settings_named(base))
        rounded = stored.dequantize()
        widest = correction_factors(weight, rounded, max(ranks), stats, whitened)
        for rank in sorted({min(r, widest.rank) for r in ranks}):
            factors = LowRankFactors(widest.u[:, :rank], widest.v[:rank])
            correction = QuantizedLowRankLinear.from_lowrank(LowRankLinear.from_factors(factors), CORRECTION_SETTINGS)
            held = stored.stored_bytes + correction.u.stored_bytes + correction.v.stored_bytes
            error = relative_output_error(weight, weight.float() - rounded - correction.to_dense(), stats)
            menu.append(FormatCandidate(f"{base}+r{rank}", held, error, correction_rank=rank))
    return menu


def with_corrections(
    menus: FormatMenus,
    model: nn.Module,
    stats: dict | None = None,
    bases: tuple[str, ...] = BASES,
    ranks: tuple[int, ...] = RANKS,
    progress: bool = True,
) -> FormatMenus:
    """``menus`` with each plain linear matrix's menu extended by :func:`corrected_menu` (token tables and the
    matrix computing the logits keep theirs), measured with ``stats``, the statistics ``menus`` were measured
    with (kept with the menus: the chosen corrections are fitted with them again)."""
    if not ranks or not bases:
        return menus
    skipped = logit_matrices(model) | {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    measure = functools.partial(corrected_menu, bases=bases, ranks=ranks)
    return extend_menus(menus, model, stats, measure, skipped, "measuring corrected formats", progress)


__all__ = ["BASES", "RANKS", "corrected_menu", "correction_factors", "with_corrections"]
