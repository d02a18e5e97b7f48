"""Mixed storage formats under a byte budget: each matrix of a model in the format that buys the most
fidelity per byte.

Every matrix :func:`~tqcompressor.quant.api.quantize_` would quantize gets a menu of formats
(:data:`MENU`: each int4 format by round-to-nearest and by HQQ), each priced in the bytes it takes in
the saved dir (integers, scales, offsets, padding: :attr:`QuantizedWeight.stored_bytes`) and measured by
the output error of the *stored* matrix, ``E||(W - Q(W)) x||^2 / E||W x||^2`` on calibration inputs (the
weight error without them). Layers are weighted by the loss's sensitivity to them (``grad_sq * E||W x||^2``,
as ``auto`` weighs them); a tied token table counts in both of its roles, as the LM head and as the lookup.
One solve, the convex-hull greedy of :func:`tqcompressor.planning.auto.allocate` with bytes as the cost,
spreads the budget. Measured on SmolLM2-135M, one layer type alone at int4-g128 moves fidelity KL by 0.07
to 0.14 and the moves nearly add up, which is what makes a per-layer solve worth doing.

A tied token table with calibration statistics is planned in bands of rows, the rows the loss depends on
most first (:func:`row_importance`): a few thousand of its tens of thousands of tokens carry most of what
the loss sees of it, so they buy a finer format for a small share of its bytes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from tqcompressor.errors import TQCError
from tqcompressor.layers import dense_weight_of, factored_modules, module_name
from tqcompressor.planning.auto import allocate, layer_scale, role_scales
from tqcompressor.planning.calibration import EmbeddingStatistics, LayerStatistics, LookupStatistics, layer_statistics
from tqcompressor.planning.inventory import tied_embedding
from tqcompressor.quant.api import tensor_bytes
from tqcompressor.quant.formats import QuantizeSettings, TokenBands
from tqcompressor.quant.modules import QuantizedWeight
from tqcompressor.structures import Candidate

# The stored formats, cheapest first (``-dq``: scales and offsets in 8-bit codes, a quarter-bit a value less
# at groups of 32); int4's group sizes above 128 save a few bytes for much more error
FORMATS = ("int4-g128-dq", "int4-g128", "int4-g64-dq", "int4-g64", "int4-g32-dq", "int4-g32", "int8")
# Below 4 bits a value, with 8-bit-coded scales only (at 3 and 2 bits a bfloat16 scale and offset per group
# are a larger share of the bytes). Planned per matrix they reach budgets under every int4 format at a
# fraction of the error the factors of a structure cost there (bench/results/frontier/frontier-low-bit.json)
LOW_BIT_FORMATS = ("int2-g64-dq", "int2-g32-dq", "int3-g128-dq", "int3-g64-dq", "int3-g32-dq")
# The matrix that computes the logits keeps at least this many bits a value: its errors act on the output
# through exp(), and a planner's quadratic error model cannot see that. Measured on SmolLM2-135M
# (bench/results/frontier/head-bits.json), the 32,768 token rows calibration weighs least stored in
# int2-g64-dq as the head alone took fidelity KL from 0 to 1.66, as the lookup alone to 0.14
HEAD_BITS = 4
# What a plan chooses from: each int4 format by both quantizers (same bytes; the lower error wins per matrix).
# On SmolLM2-135M, HQQ's uniform int4-g64 is closer to the teacher than round-to-nearest's, its int4-g32 not
MENU = LOW_BIT_FORMATS + FORMATS + tuple(f"{name}-hqq" for name in FORMATS if name.startswith("int4"))
# A tied token table is planned in bands of rows, most important first (the last band takes the rest):
# a few thousand tokens carry most of what the loss sees of the table, in both of its roles
BAND_ROWS = (512, 1024, 2048, 4096, 8192, 16384)


def settings_named(name: str) -> QuantizeSettings:
    """``int8``, ``intB-gN`` or ``intB-gN-dq`` (B: 4, 3 or 2) as :attr:`QuantizeSettings.name` writes them;
    ``...-hqq`` by HQQ."""
    if name == "int8":
        return QuantizeSettings(8)
    match = re.fullmatch(r"int([234])-g(\d+)(-dq)?(-hqq)?", name)
    if match is None:
        raise TQCError(f"unknown storage format {name!r}; use one of {', '.join(MENU)}")
    bits, group, double_quant, hqq = match.groups()
    return QuantizeSettings(int(bits), int(group), "hqq" if hqq else "rtn", bool(double_quant))


@dataclass(frozen=True)
class FormatCandidate:
    """One format for one matrix, in the terms :func:`~tqcompressor.planning.auto.allocate` spends:
    ``params`` is the cost (here stored bytes), ``error`` the relative error, ``method`` the format. With
    ``structure`` (a structure's candidate, :mod:`tqcompressor.planning.mixed`) the matrix is stored as that
    structure's factors, each in the format: ``method`` is then ``"<structure's candidate>/<format>"``. With
    ``correction_rank`` (:mod:`tqcompressor.planning.corrections`) the matrix is stored in the format plus a
    low-rank correction of its rounding error: ``method`` is then ``"<format>+r<rank>"``."""

    method: str
    params: int
    error: float
    structure: Candidate | None = None
    correction_rank: int = 0

    @property
    def stored_format(self) -> str:
        """The format the matrix (or each of its factors) is stored in."""
        return self.method.rpartition("/")[2].partition("+")[0]

    def to_dict(self) -> dict:
        found = {"format": self.method, "bytes": self.params, "error": self.error}
        if self.structure is not None:
            found["structure"] = {"method": self.structure.method, **self.structure.settings}
        if self.correction_rank:
            found["correction_rank"] = self.correction_rank
        return found


def parse_bytes(text: str, option: str = "--max-bytes") -> int:
    """``90MiB``, ``90MB``, ``1.5GiB``, ``94371840``: a positive size in bytes; one line otherwise."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in units:
        raise TQCError(f"{option} takes a size such as 90MiB, 90MB, 1.5GiB or a number of bytes, got {text!r}")
    size = int(float(match.group(1)) * units[match.group(2).lower()])
    if size < 1:
        raise TQCError(f"{option} must be a positive size, got {text!r}")
    return size


def planned_matrices(model: nn.Module) -> dict[str, Tensor]:
    """The matrices :func:`~tqcompressor.quant.api.quantize_` stores in a format, by module name: every
    ``nn.Linear`` / ``Conv1D`` but a head tied to the token table, the token table and plain embeddings
    (GPT-2's positions)."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", 0)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not (tied and module is head):
            found[name] = dense_weight_of(module)[0].detach()
        elif type(module) is nn.Embedding or (module is embedding and isinstance(module, nn.Embedding)):
            found[name] = module.weight.detach()
    return found


def logit_matrices(model: nn.Module) -> set[str]:
    """The planned matrices that compute the logits: the token table tied to the LM head, or the head."""
    tied = tied_embedding(model)
    if tied is not None:
        return {tied}
    head = model.get_output_embeddings()
    return {module_name(model, head)} if head is not None else set()


def format_menu(weight: Tensor, stats=None, formats: tuple[str, ...] = MENU) -> list[FormatCandidate]:
    """Every format of ``formats`` for one matrix: its stored bytes and the relative error of the stored
    matrix, in the output metric of ``stats`` (a tied table's: both roles combined) or of the weight."""
    menu = []
    for name in formats:
        stored = QuantizedWeight.from_weight(weight, settings_named(name))
        difference = weight.float() - stored.dequantize()
        menu.append(FormatCandidate(name, stored.stored_bytes, relative_output_error(weight, difference, stats)))
    return menu


def relative_output_error(weight: Tensor, difference: Tensor, stats=None) -> float:
    """``sqrt(tr(D C D^T) / tr(W C W^T))`` (``C``: the inputs' second moment), the Frobenius ratio without
    statistics; a tied table's two roles weighed by their loss sensitivity (:func:`role_scales`)."""
    w, d = weight.double(), difference.double()
    if stats is None:
        return float(d.norm() / w.norm())
    if isinstance(stats, EmbeddingStatistics):
        head, lookup = role_scales(weight, stats)
        head_sq = _energy(d, stats.head.input_cov) / _energy(w, stats.head.input_cov)
        lookup_sq = _looked_up(d, stats.lookup) / _looked_up(w, stats.lookup)
        return ((head * head_sq + lookup * lookup_sq) / (head + lookup)) ** 0.5
    if isinstance(stats, LookupStatistics):  # an embedding alone (positions): the rows read, as often as read
        read = _looked_up(w, stats)
        return (_looked_up(d, stats) / read) ** 0.5 if read > 0 else float(d.norm() / w.norm())
    return (_energy(d, stats.input_cov) / _energy(w, stats.input_cov)) ** 0.5


def _energy(matrix: Tensor, cov: Tensor) -> float:
    # the product in float32 (a tenth of float64's time on a CPU; the planner compares errors to a few digits),
    # summed in float64
    m = matrix.float()
    return float((m @ cov.float() * m).sum(dtype=torch.float64))


def _looked_up(matrix: Tensor, lookup: LookupStatistics) -> float:
    return float(lookup.token_counts.double() @ matrix.double().square().sum(1))


def layer_weight(weight: Tensor, stats=None) -> float:
    """What one unit of squared relative error of this matrix costs (a tied table: both roles)."""
    if isinstance(stats, EmbeddingStatistics):
        return sum(role_scales(weight, stats))
    if isinstance(stats, LookupStatistics):
        return stats.grad_sq * _looked_up(weight, stats) / max(stats.tokens, 1)
    return layer_scale(weight, stats)


@dataclass(frozen=True)
class RowBands:
    """A token table's rows by importance, most important first (``order``), cut into bands of ``sizes``."""

    order: Tensor
    sizes: tuple[int, ...]

    @property
    def index_bytes(self) -> int:
        """What the saved dir spends on the order (int32 per row) where the bands differ in format."""
        return self.order.numel() * 4

    def items(self, table: str) -> list[str]:
        """The planner's name of each band: ``table#0`` is the most important."""
        return [f"{table}#{k}" for k in range(len(self.sizes))]

    def settings(self, formats: list[str]) -> QuantizeSettings | TokenBands:
        """The table's storage, each band in its format (adjacent bands alike merged; one format: plain)."""
        merged: list[list] = []
        for rows, fmt in zip(self.sizes, formats):
            if merged and merged[-1][1] == fmt:
                merged[-1][0] += rows
            else:
                merged.append([rows, fmt])
        if len(merged) == 1:
            return settings_named(merged[0][1])
        return TokenBands(self.order, tuple((rows, settings_named(fmt)) for rows, fmt in merged))


def band_sizes(rows: int, band_rows: tuple[int, ...] = BAND_ROWS) -> tuple[int, ...]:
    """``band_rows`` while they leave rows over, then the rest: 49,152 rows make 7 bands."""
    sizes, left = [], rows
    for size in band_rows:
        if left <= size:
            break
        sizes.append(size)
        left -= size
    return (*sizes, left)


def row_importance(weight: Tensor, stats) -> Tensor | None:
    """Per row of a tied token table, what one unit of squared relative error of that row costs in the
    loss: as the head ``fisher[v] * W_v C W_v^T`` (the logit of token ``v`` matters as much as the KL's
    curvature there: :func:`_head_rows`), as the lookup ``grad_sq * scale^2 * count[v] * ||W_v||^2 / tokens``:
    the rows of :func:`~tqcompressor.planning.auto.role_scales`, whose head term weighs every logit alike.
    ``None`` without those statistics."""
    if not isinstance(stats, EmbeddingStatistics) or stats.head.grad_sq_rows is None:
        return None
    head, lookup = _row_coefficients(stats)
    w = weight.float()
    energy = ((w @ stats.head.input_cov.float()) * w).sum(1).double()
    return head * energy + lookup * w.double().square().sum(1)


def _row_coefficients(stats: EmbeddingStatistics) -> tuple[Tensor, Tensor]:
    lookup = stats.lookup
    per_lookup = lookup.grad_sq * stats.output_scale**2 / max(lookup.tokens, 1)
    return _head_rows(stats.head), per_lookup * lookup.token_counts.double()


def _head_rows(head) -> Tensor:
    """Each logit's share of the head's sensitivity: the KL's curvature ``p_v (1 - p_v)`` where calibration
    measured it (a token that never came next in the text still costs what its probability says), scaled to
    the loss gradients' total so the head weighs against the lookup and the other layers as before."""
    measured = head.grad_sq_rows.double()
    if head.fisher_rows is None or float(head.fisher_rows.sum()) <= 0:
        return measured
    fisher = head.fisher_rows.double()
    return fisher * (measured.sum() / fisher.sum())


def band_menus(
    weight: Tensor, stats: EmbeddingStatistics, bands: RowBands, importance: Tensor, formats: tuple[str, ...] = MENU
) -> list[tuple[list[FormatCandidate], float]]:
    """Each band's menu and weight: a format's error in a band is ``sqrt(sum of its rows' loss costs /
    sum of their importance)`` (:func:`row_importance`), so the weighted errors add up over bands to the
    table's loss cost (``importance``: :func:`row_importance`, by token id); bytes are what the band's rows
    take stored alone. Each stored format keeps the one quantizer that loses least over the whole table, so
    bands differ only where their formats do."""
    head, lookup = _row_coefficients(stats)
    w, cov = weight.float(), stats.head.input_cov.float()
    importance = importance[bands.order]
    best: dict[str, tuple[str, Tensor]] = {}  # per stored format: the quantizer's name and its rows' costs
    for name in formats:
        d = w - QuantizedWeight.from_weight(w, settings_named(name)).dequantize()
        cost = (head * ((d @ cov) * d).sum(1).double() + lookup * d.double().square().sum(1))[bands.order]
        stored = settings_named(name).name
        if stored not in best or float(cost.sum()) < float(best[stored][1].sum()):
            best[stored] = (name, cost)
    costs = dict(best.values())
    found, start = [], 0
    for rows in bands.sizes:
        total = float(importance[start : start + rows].sum())
        menu = []
        for name in costs:
            spent = float(costs[name][start : start + rows].sum())
            stored = QuantizedWeight(rows, weight.shape[1], settings_named(name)).stored_bytes
            menu.append(FormatCandidate(name, stored, (spent / total) ** 0.5 if total > 0 else 0.0))
        found.append((menu, total))
        start += rows
    return found


@dataclass
class FormatPlan:
    """Each matrix's format, and what the plan measured and spent."""

    formats: dict[str, str]
    budget: int  # bytes the whole weights file may take
    fixed_bytes: int  # what is not planned: norms, biases, anything else kept float
    planned_bytes: int  # the planned matrices' stored bytes
    menus: dict[str, list[FormatCandidate]]
    weights: dict[str, float]
    bands: dict[str, RowBands] = field(default_factory=dict)  # tables planned band by band
    stats: dict | None = None  # the calibration statistics the menus were measured with (a structure's fit)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.planned_bytes + self.index_bytes

    @property
    def loss(self) -> float:
        """What the planner minimised: the weighted squared errors of the chosen formats, summed."""
        errors = {name: {c.method: c.error for c in menu} for name, menu in self.menus.items()}
        return sum(self.weights[name] * errors[name][fmt] ** 2 for name, fmt in self.formats.items())

    @property
    def index_bytes(self) -> int:
        """The row orders of the tables whose bands ended in different formats."""
        banded = [table for table in self.bands if isinstance(self._table_settings(table), TokenBands)]
        return sum(self.bands[table].index_bytes for table in banded)

    def _table_settings(self, table: str) -> QuantizeSettings | TokenBands:
        bands = self.bands[table]
        return bands.settings([self.formats[item] for item in bands.items(table)])

    def chosen(self, name: str) -> FormatCandidate:
        return next(c for c in self.menus[name] if c.method == self.formats[name])

    def structures(self) -> dict[str, Candidate]:
        """The matrices stored as a structure's factors, and the structure's candidate for each."""
        chosen = {name: self.chosen(name) for name in self.formats}
        return {name: c.structure for name, c in chosen.items() if c.structure is not None}

    def corrections(self) -> dict[str, int]:
        """The matrices stored with a low-rank correction of their rounding error, and its rank."""
        chosen = {name: self.chosen(name) for name in self.formats}
        return {name: c.correction_rank for name, c in chosen.items() if c.correction_rank}

    def settings(self) -> dict[str, QuantizeSettings | TokenBands]:
        """Per module name, what :func:`~tqcompressor.quant.api.quantize_`'s ``per_layer`` takes (a matrix
        stored as factors: its factors' format)."""
        banded = {item for table, bands in self.bands.items() for item in bands.items(table)}
        found = {name: settings_named(self.chosen(name).stored_format) for name in self.formats if name not in banded}
        for table in self.bands:
            found[table] = self._table_settings(table)
        return found

    def to_dict(self) -> dict:
        settings = self.settings()
        counts: dict[str, int] = {}  # per matrix: a banded table counts once, under its bands' formats
        corrections = self.corrections()
        for name, stored in settings.items():
            label = getattr(stored, "label", stored.name) + (f"+r{corrections[name]}" if name in corrections else "")
            counts[label] = counts.get(label, 0) + 1
        return {
            "budget_bytes": self.budget,
            "total_bytes": self.total_bytes,
            "fixed_bytes": self.fixed_bytes,
            "planned_bytes": self.planned_bytes,
            "index_bytes": self.index_bytes,
            "format_counts": counts,
            "bands": {
                table: [{"rows": rows, "format": fmt.label} for rows, fmt in settings[table].bands]
                for table in self.bands
                if isinstance(settings[table], TokenBands)
            },
            "layers": {
                name: {
                    "format": fmt,
                    "layer_weight": self.weights[name],
                    "menu": [c.to_dict() for c in self.menus[name]],
                }
                for name, fmt in self.formats.items()
            },
        }


@dataclass(frozen=True)
class FormatMenus:
    """Every planned matrix's menu and weight, and the bytes kept as they are: measured once, planned
    at any number of budgets (:meth:`plan`)."""

    menus: dict[str, list[FormatCandidate]]
    weights: dict[str, float]
    fixed: int
    bands: dict[str, RowBands] = field(default_factory=dict)  # tables whose menus are per band of rows
    stats: dict | None = None  # where a structure's factors are on the menu: what they were fitted with

    @property
    def smallest(self) -> int:
        """The bytes of the smallest model the menus make (every matrix in its cheapest format)."""
        return self.fixed + sum(min(c.params for c in menu) for menu in self.menus.values())

    @property
    def closest(self) -> int:
        """The bytes past which no budget buys anything: every matrix in its least-error format."""
        return self.fixed + sum(min(menu, key=lambda c: (c.error, c.params)).params for menu in self.menus.values())

    def plan(self, budget: int) -> FormatPlan:
        """Each matrix's format within ``budget`` bytes, least weighted output error; one line where none fits."""
        if budget < self.smallest:
            raise TQCError(
                f"--max-bytes {budget:,} is below the smallest model these formats make ({self.smallest:,} bytes, "
                f"{self.smallest / 2**20:.1f} MiB, every matrix in its cheapest format); give at least that"
            )
        whole = self.whole_tables()
        plans = [whole._plan_within(budget, budget - self.fixed)]
        # bands in different formats cost their table's row order too: planned with that kept aside, and
        # kept where they lose less than the tables planned whole
        room = budget - self.fixed - sum(bands.index_bytes for bands in self.bands.values())
        if self.bands and room >= self.smallest - self.fixed:
            plans.append(self._plan_within(budget, room))
        return min(plans, key=lambda plan: plan.loss)

    def _plan_within(self, budget: int, room: int) -> FormatPlan:
        choice = allocate(self.menus, self.weights, room)
        planned = sum(candidate.params for candidate in choice.values())
        formats = {name: choice[name].method for name in self.menus}
        return FormatPlan(formats, budget, self.fixed, planned, self.menus, self.weights, self.bands, self.stats)

    def whole_tables(self) -> FormatMenus:
        """These menus with each banded table as one matrix: a format's bytes and loss cost summed over its bands."""
        menus, weights = dict(self.menus), dict(self.weights)
        for table, bands in self.bands.items():
            items = bands.items(table)
            total = sum(weights[item] for item in items)
            merged = []
            for candidate in menus[items[0]]:
                parts = [next(c for c in menus[item] if c.method == candidate.method) for item in items]
                cost = sum(weights[item] * part.error**2 for item, part in zip(items, parts))
                error = (cost / total) ** 0.5 if total > 0 else 0.0
                merged.append(FormatCandidate(candidate.method, sum(part.params for part in parts), error))
            for item in items:
                del menus[item], weights[item]
            menus[table], weights[table] = merged, total
        return FormatMenus(menus, weights, self.fixed, stats=self.stats)


def extend_menus(
    menus: FormatMenus,
    model: nn.Module,
    stats: dict | None,
    measure: Callable[[Tensor, LayerStatistics | None], list[FormatCandidate]],
    skipped: set[str],
    desc: str,
    progress: bool = True,
) -> FormatMenus:
    """``menus`` with each planned matrix that has one (``skipped`` aside) given more candidates,
    ``measure(weight, its linear statistics or None)``; those statistics are kept with the menus (the chosen
    candidates are fitted with them again)."""
    matrices = {name: w for name, w in planned_matrices(model).items() if name in menus.menus and name not in skipped}
    linear = {name: s for name, s in (stats or {}).items() if name in matrices and isinstance(s, LayerStatistics)}
    extended = dict(menus.menus)
    for name, weight in tqdm(matrices.items(), desc=desc, disable=not progress):
        extended[name] = extended[name] + measure(weight, linear.get(name))
    return dataclasses.replace(menus, menus=extended, stats={**(menus.stats or {}), **linear})


def measure_formats(
    model: nn.Module, stats: dict | None = None, formats=MENU, band_rows: tuple[int, ...] = BAND_ROWS
) -> FormatMenus:
    """Every planned matrix's menu (:func:`format_menu`) and weight in the loss, and the fixed bytes; a
    tied token table with calibration statistics gets a menu per band of rows (:func:`band_menus`)."""
    matrices = planned_matrices(model)
    menus, weights, bands = {}, {}, {}
    heads, head_formats = logit_matrices(model), tuple(f for f in formats if settings_named(f).bits >= HEAD_BITS)
    for name, weight in matrices.items():
        layer_stats = stats.get(name) if stats else None
        formats_here = head_formats if name in heads else formats
        importance = row_importance(weight, layer_stats)
        sizes = band_sizes(weight.shape[0], band_rows)
        if importance is None or len(sizes) == 1:
            menus[name] = format_menu(weight, layer_stats, formats_here)
            weights[name] = layer_weight(weight, layer_stats)
            continue
        bands[name] = RowBands(torch.argsort(importance, descending=True, stable=True), sizes)
        measured = band_menus(weight, layer_stats, bands[name], importance, formats_here)
        for item, (menu, total) in zip(bands[name].items(name), measured):
            menus[item], weights[item] = menu, total
    return FormatMenus(menus, weights, fixed_bytes(model, matrices), bands)


def plan_formats(model: nn.Module, budget: int, stats: dict | None = None, formats=MENU) -> FormatPlan:
    """The format of every planned matrix (:func:`planned_matrices`) that keeps the model's weights within
    ``budget`` bytes and loses the least weighted output error; one line where no plan fits."""
    return measure_formats(model, stats, formats).plan(budget)


def plan_model_formats(
    model: nn.Module, budget: int, calibration: Tensor | None = None, progress: bool = True
) -> FormatPlan:
    """:func:`plan_formats` for a model as loaded: refused for one whose weights already fit ``budget``;
    see :func:`measure_model_formats`."""
    check_below_model(model, budget)
    return measure_model_formats(model, calibration, progress).plan(budget)


def check_below_model(model: nn.Module, budget: int) -> None:
    """One line for a byte budget the model's weights already fit in."""
    whole = float_bytes(model)
    if budget >= whole:
        raise TQCError(
            f"--max-bytes {budget:,} is not below the model's own {whole:,} bytes ({whole / 2**20:.1f} MiB): "
            "it fits as it is"
        )


def measure_model_formats(model: nn.Module, calibration: Tensor | None = None, progress: bool = True) -> FormatMenus:
    """:func:`measure_formats` for a model as loaded, errors measured on the token ids ``calibration``
    (blocks x seq_len) where given; refused for a model holding factored layers (their factors'
    formats are not on this menu yet)."""
    factored = [name for name, _ in factored_modules(model)]
    if factored:
        raise TQCError(
            f"a byte or fidelity target plans the formats of plain layers; {factored[0]} is factored: use --bits"
        )
    names = list(planned_matrices(model))
    stats = layer_statistics(model, names, calibration, progress) if calibration is not None else None
    return measure_formats(model, stats)


def fixed_bytes(model: nn.Module, matrices: dict[str, Tensor]) -> int:
    """Bytes of every tensor the saved dir keeps as it is: all of the state but the planned matrices
    (each tensor once, however many names share it)."""
    return tensor_bytes(model, {t.data_ptr() for t in matrices.values()})


def float_bytes(model: nn.Module) -> int:
    """The model's weights as they are (each tensor once)."""
    return fixed_bytes(model, {})


__all__ = [
    "FORMATS",
    "LOW_BIT_FORMATS",
    "check_below_model",
    "extend_menus",
    "FormatMenus",
    "FormatPlan",
    "format_menu",
    "measure_formats",
    "measure_model_formats",
    "parse_bytes",
    "plan_formats",
    "plan_model_formats",
]
