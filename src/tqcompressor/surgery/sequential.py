"""Sequential refit: each compressed layer fitted to the teacher's outputs from the inputs the
compressed model really feeds it, block by block, so that later layers compensate for the error
of earlier ones.

Calibrated fits minimise ``E||(W - W') x||^2`` with ``x`` the *teacher's* inputs. In the
compressed model a layer sees ``x_s``, the teacher's input plus the error of every layer before it.
What we want instead is ``E||W x_t - W' x_s||^2``. With ``C_ss = E[x_s x_s^T]`` and
``C_ts = E[x_t x_s^T]`` this equals a constant plus ``tr((W' - W*) C_ss (W' - W*)^T)`` for

    W* = W C_ts C_ss^-1,

the best unconstrained weight for the inputs the layer gets. So every structure's own calibrated
fit, given ``W*`` and ``C_ss``, solves the compensated problem exactly as far as it solved the
plain one (activation-aware SVD: optimally). Only the plan's layers are refitted; layers the plan
leaves dense keep the teacher's weights.

Blocks go in order; the statistics of block ``l`` are measured with blocks ``< l`` already
refitted, in one forward pass of teacher and student over the calibration tokens that stops after
block ``l``. The layers inside one block share one measurement.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tqcompressor.linalg.decompose import damped_cov
from tqcompressor.planning.calibration import LayerStatistics
from tqcompressor.planning.inventory import block_index

# Relative ridge on C_ss in the correction W (C_ts - C_ss) C_ss^-1. The fits' own 1e-4 lets noise
# in the low-energy input directions through: with it the refit made SmolLM2's one-shot perplexity
# worse, 127.0 -> 132.5 (bench/results/sequential/sequential.json, commit 2b9b242).
CORRECTION_RIDGE = 1e-2


class _Stop(Exception):
    """Raised after the last layer a pass needs: nothing later in the model is computed."""


def _stop(module, args, output):
    raise _Stop


def cross_statistics(
    teacher: nn.Module, student: nn.Module, names: list[str], ids: Tensor, batch_size: int = 4
) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Per module name: ``(C_ss, C_ts, tokens)`` over the calibration blocks ``ids``, in float64.
    Both models run up to the last of ``names`` (in the student's module order) and stop there."""
    inputs: dict[str, dict[str, Tensor]] = {"teacher": {}, "student": {}}
    sums: dict[str, list] = {name: [0, 0] for name in names}
    order = [n for n, _ in student.named_modules() if n in sums]

    def capture(which: str, name: str):
        def hook(module, args):
            inputs[which][name] = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()

        return hook

    handles = []
    for which, model in (("teacher", teacher), ("student", student)):
        for name in order:
            handles.append(model.get_submodule(name).register_forward_pre_hook(capture(which, name)))
        handles.append(model.get_submodule(order[-1]).register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size]
                for model in (teacher, student):
                    try:
                        model(batch.to(next(model.parameters()).device))
                    except _Stop:
                        pass
                for name in order:
                    x_t, x_s = inputs["teacher"].pop(name), inputs["student"].pop(name)
                    sums[name][0] = sums[name][0] + x_s.T @ x_s
                    sums[name][1] = sums[name][1] + x_t.T @ x_s
    finally:
        for handle in handles:
            handle.remove()
    tokens = ids.numel()
    return {name: ((c_ss / tokens).cpu(), (c_ts / tokens).cpu(), tokens) for name, (c_ss, c_ts) in sums.items()}


def compensated_weight(weight: Tensor, c_ss: Tensor, c_ts: Tensor, ridge: float = CORRECTION_RIDGE) -> Tensor:
    """``W C_ts C_ss^-1``: the weight that maps the inputs a layer gets to the outputs the teacher's
    layer gives, in least squares; in float64, written ``W + W (C_ts - C_ss) C_ss^-1`` with a
    relative ``ridge`` on ``C_ss``, so that the ridge only tempers the correction (with no upstream
    error the weight stays exactly ``W``)."""
    w = weight.double()
    chol = torch.linalg.cholesky(damped_cov(c_ss, ridge))
    # W D C^-1 = (C^-1 D^T W^T)^T, C symmetric
    return w + torch.cholesky_solve((c_ts - c_ss).T.double() @ w.T, chol).T


def refit_sequentially(
    teacher: nn.Module,
    student: nn.Module,
    layers: list[tuple[str, Tensor]],
    refit,
    ids: Tensor,
    progress: bool = True,
) -> None:
    """For each block in order: measure its layers' cross statistics, then ``refit(name, w_star,
    stats)`` each one (it installs the new module in ``student``). ``layers``: ``(name, teacher's
    dense weight)`` pairs."""
    blocks: dict[int, list[tuple[str, Tensor]]] = {}
    for name, weight in layers:
        blocks.setdefault(block_index(name), []).append((name, weight))
    for block in tqdm(sorted(blocks), desc="sequential refit", unit="block", disable=not progress):
        entries = blocks[block]
        stats = cross_statistics(teacher, student, [name for name, _ in entries], ids)
        for name, weight in entries:
            c_ss, c_ts, tokens = stats[name]
            refit(name, compensated_weight(weight, c_ss, c_ts), LayerStatistics(c_ss, 0.0, tokens))
