"""The smallest model within a fidelity target: byte budgets searched, each candidate verified end to end.

The planner's output error is a proxy; fidelity KL on the held-out suite is what a user asked for. So
the search plans at a byte budget (:meth:`~tqcompressor.planning.formats.FormatMenus.plan`), stores the
teacher in that plan, measures its fidelity KL, and bisects on bytes: the smallest plan first (done if
it meets the target), the closest plan next (if even that misses, it is kept and the gap stated), then
halves the interval between the largest budget that missed and the smallest that met.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.evaluation.fidelity import Domain, measure
from tqcompressor.planning.formats import FormatMenus, FormatPlan
from tqcompressor.surgery.apply import store_planned

SEARCH_STEPS = 6  # bisection steps between the smallest and the closest plan: 1/64 of that interval


def check_max_kl(max_kl: float) -> None:
    if not (math.isfinite(max_kl) and max_kl > 0):
        raise TQCError(f"--max-kl is a fidelity KL in nats per token: give a finite number above 0, got {max_kl}")


@dataclass
class TargetSearch:
    """The plan kept (the smallest that met the target, else the closest found), its fidelity, whether it
    met the target, and every plan tried: ``{bytes, fidelity_kl}`` in the order measured."""

    plan: FormatPlan
    fidelity: dict
    met: bool
    max_kl: float
    tried: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "max_kl": self.max_kl,
            "met": self.met,
            "fidelity_kl": self.fidelity["fidelity_kl"],
            "fidelity_top1": self.fidelity["fidelity_top1"],
            "bytes": self.plan.total_bytes,
            "tried": self.tried,
        }

    def summary(self) -> str:
        size = f"{self.plan.total_bytes / 2**20:.1f} MiB"
        kl = self.fidelity["fidelity_kl"]
        if self.met:
            return f"fidelity KL {kl:.4f} <= --max-kl {self.max_kl:g} at {size} ({len(self.tried)} plans measured)"
        return (
            f"target not met: the closest model these formats make has fidelity KL {kl:.4f}, {kl - self.max_kl:.4f} "
            f"over --max-kl {self.max_kl:g}; it is saved ({size})"
        )


def measure_plan(
    teacher: nn.Module,
    plan: FormatPlan,
    domains: dict[str, Domain],
    context: int,
    tokenizer=None,
) -> dict:
    """Fidelity (:func:`~tqcompressor.evaluation.fidelity.measure`) of a copy of ``teacher`` stored as
    ``plan`` says (:func:`~tqcompressor.surgery.apply.store_planned`); the teacher itself is left as it is (its
    perplexities, for the ratios, come from the same passes)."""
    model = copy.deepcopy(teacher)
    store_planned(model, plan, measure_error=False)
    return measure(model, teacher, domains, context, tokenizer)


def smallest_within_kl(
    teacher: nn.Module,
    menus: FormatMenus,
    max_kl: float,
    domains: dict[str, Domain],
    context: int,
    tokenizer=None,
    steps: int = SEARCH_STEPS,
    progress: bool = True,
) -> TargetSearch:
    """The smallest plan of ``menus`` whose stored model is within ``max_kl`` of ``teacher`` on ``domains``."""
    check_max_kl(max_kl)
    measured: dict[int, tuple[FormatPlan, dict]] = {}
    tried: list[dict] = []
    bar = tqdm(total=steps + 2, desc="searching byte budgets", unit="plan", disable=not progress)

    def score(budget: int) -> tuple[FormatPlan, dict]:
        plan = menus.plan(budget)
        if plan.total_bytes not in measured:
            found = measure_plan(teacher, plan, domains, context, tokenizer)
            measured[plan.total_bytes] = (plan, found)
            tried.append({"bytes": plan.total_bytes, "fidelity_kl": found["fidelity_kl"]})
            bar.update()
        return measured[plan.total_bytes]

    def within(result: tuple[FormatPlan, dict]) -> bool:
        return result[1]["fidelity_kl"] <= max_kl

    try:
        best = score(menus.smallest)
        if not within(best):
            closest = score(menus.closest)
            if not within(closest):
                return TargetSearch(*closest, False, max_kl, tried)
            low, best = menus.smallest, closest
            high = closest[0].total_bytes
            for _ in range(steps):
                middle = (low + high) // 2
                if middle <= low:
                    break
                result = score(middle)
                if within(result):
                    best, high = result, result[0].total_bytes
                else:
                    low = middle
        return TargetSearch(*best, True, max_kl, tried)
    finally:
        bar.close()


__all__ = ["TargetSearch", "check_max_kl", "measure_plan", "smallest_within_kl"]
