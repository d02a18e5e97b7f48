"""Calibration: what a few batches of text say about each layer, for activation-aware compression.

One pass of forward + backward over the calibration tokens records, for every target module,

* ``input_cov``: the second moment ``E[x x^T]`` of its inputs. The output error of a
  replacement ``W'`` is ``E||(W - W') x||^2 = tr(D C D^T)``, so this turns weight error into
  output error (and lets SVD minimise it directly);
* ``grad_sq``: the mean squared gradient of the language-model loss with respect to the module's
  output, per output element. A second-order Taylor step with a diagonal, per-layer-constant Fisher
  estimate says the loss grows by about ``grad_sq * E||delta y||^2 / 2``, which makes output errors
  of different layers comparable (the budget goes where the loss is sensitive);
* ``grad_sq_rows``: the same per output element (a vector), to weight a layer's outputs by how much
  the loss depends on each (FWSVD's Fisher row weights; ``bench/output_weighting.py``);
* ``fisher_rows``, of the LM head alone: the mean over tokens of ``p_v (1 - p_v)`` for each token ``v``
  of the vocabulary (``p`` the model's next-token distribution): the curvature of the KL to the model
  in logit ``v``. ``grad_sq_rows`` measures the same with the text's tokens as labels, which gives a token
  that never comes next in the calibration text only ``p_v^2``: tens of thousands of rare tokens would
  seem free to store in two bits, yet noise in their logits moves probability onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tqcompressor.errors import TQCError
from tqcompressor.layers import dense_weight_of, embedding_scale, module_name
from tqcompressor.planning.inventory import is_embedding, tied_embedding


@dataclass
class LayerStatistics:
    input_cov: Tensor  # (in, in) float64, E[x x^T] over calibration tokens
    grad_sq: float  # mean over the tokens the layer saw of ||dL/dy||^2 / out_features
    tokens: int  # tokens the layer saw (an MoE expert: those routed to it)
    grad_sq_rows: Tensor | None = None  # (out,) float64: mean over those tokens of (dL/dy_i)^2
    fisher_rows: Tensor | None = None  # (vocabulary,) float64, the LM head only: mean of p_v (1 - p_v)


@dataclass
class LookupStatistics:
    """What calibration records of a token embedding: its inputs are token ids, not vectors."""

    token_counts: Tensor  # (num_embeddings,) float64: how often each row was looked up
    grad_sq: float  # mean over tokens of ||dL/dy||^2 / embedding_dim, y the looked-up (scaled) row
    tokens: int


@dataclass
class EmbeddingStatistics:
    """A tied token table in both of its roles. As the LM head (``hidden -> logits``) every row is
    used for every token: ``head`` holds that layer's statistics, and the fit minimises its output
    error. As the lookup, a row error ``D_v`` moves the residual stream by ``output_scale * D_v``
    wherever token ``v`` occurs: ``lookup``. ``input_cov``, ``grad_sq`` and ``tokens`` are the
    head's, so a structure's activation-aware fit sees the head metric."""

    head: LayerStatistics
    lookup: LookupStatistics
    output_scale: float  # lookups are multiplied by it (Gemma 3: sqrt(hidden))

    @property
    def input_cov(self) -> Tensor:
        return self.head.input_cov

    @property
    def grad_sq(self) -> float:
        return self.head.grad_sq

    @property
    def tokens(self) -> int:
        return self.head.tokens


@torch.enable_grad()
def calibrate(
    model: nn.Module, names: list[str], ids: Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, LayerStatistics]:
    """Statistics of the modules ``names`` of ``model`` over token blocks ``ids`` (batch, seq_len)."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise TQCError(f"calibration tokens must be a (blocks, seq_len >= 2) tensor, got shape {tuple(ids.shape)}")
    head = model.get_output_embeddings()
    sums = _Sums(names, next((name for name in names if head is not None and model.get_submodule(name) is head), None))
    # first of the hooks: the token table's output asks for a gradient, so that the gradient reaches every
    # layer's output while no parameter needs one (a weight's gradient would cost as much again)
    handles = [model.get_input_embeddings().register_forward_hook(_ask_for_gradient)]
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(sums.input_hook(name)))
        handles.append(module.register_forward_hook(sums.output_hook(name)))
    try:
        _forward_backward(model, ids, batch_size, progress)
    finally:
        for handle in handles:
            handle.remove()
    return sums.statistics(model, ids.numel())


class _Sums:
    """What the hooks add up over the calibration tokens, per module: its inputs' second moment (an
    embedding: how often each token was read), its output gradients' energy, the tokens it saw."""

    def __init__(self, names: list[str], head: str | None = None) -> None:
        self.head, self.fisher_rows = head, 0  # the LM head's name, and its logits' p (1 - p) summed over tokens
        self.cov: dict[str, Tensor] = {}
        self.grad: dict[str, float] = {name: 0.0 for name in names}
        self.grad_rows: dict[str, Tensor] = {}
        self.seen: dict[str, int] = {name: 0 for name in names}  # an MoE expert sees only the tokens routed to it
        self.last_input, self.last_moment, self.last_rows = None, None, 0  # the last input reduced, and its moment

    def input_hook(self, name: str):
        def hook(module, args):
            if args[0] is self.last_input:  # q/k/v and gate/up read one tensor: its moment once
                self.cov[name] = self.cov.get(name, 0) + self.last_moment
                self.seen[name] += self.last_rows
                return
            if is_embedding(module):  # token ids in: count them
                ids = args[0].detach().reshape(-1)
                counts = torch.bincount(ids.cpu(), minlength=module.num_embeddings).double()
                self.cov[name] = self.cov.get(name, 0) + counts
                self.seen[name] += ids.numel()
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.last_input, self.last_moment, self.last_rows = args[0], x.T @ x, x.shape[0]
            self.cov[name] = self.cov.get(name, 0) + self.last_moment
            self.seen[name] += x.shape[0]

        return hook

    def output_hook(self, name: str):
        # a hook on the output tensor, not a module backward hook: those wrap the output in a view
        # that models adding into it in place (Falcon, `mlp_output += attention_output`) cannot modify
        def on_gradient(g):
            rows = g.detach().double().square().reshape(-1, g.shape[-1]).sum(0).cpu()
            self.grad[name] += float(rows.sum()) / g.shape[-1]
            self.grad_rows[name] = self.grad_rows.get(name, 0) + rows

        def hook(module, args, output):
            if name == self.head:
                with torch.no_grad():
                    p = torch.softmax(output.detach().float().reshape(-1, output.shape[-1]), dim=-1)
                    self.fisher_rows = self.fisher_rows + (p * (1 - p)).sum(0, dtype=torch.float64).cpu()
            if output.requires_grad:
                output.register_hook(on_gradient)

        return hook

    def statistics(self, model: nn.Module, tokens: int) -> dict:
        stats = {}
        for name, seen in self.seen.items():
            grad_sq = self.grad[name] / max(seen, 1)
            if is_embedding(model.get_submodule(name)):
                stats[name] = LookupStatistics(self.cov[name].cpu(), grad_sq, seen)
                continue
            # E[x x^T] over all tokens (a token not routed to an expert gives it x = 0), so an expert's
            # covariance carries how often it is used; grad_sq is a mean over the tokens the layer saw
            moment = self.cov[name] / tokens if name in self.cov else _zero_moment(model.get_submodule(name))
            rows = self.grad_rows[name] / max(seen, 1) if name in self.grad_rows else None
            fisher = self.fisher_rows / max(seen, 1) if name == self.head and seen else None
            stats[name] = LayerStatistics(moment.cpu(), grad_sq, seen, rows, fisher)
        return stats


def _ask_for_gradient(module, args, output: Tensor) -> None:
    output.requires_grad_(True)


def _forward_backward(model: nn.Module, ids: Tensor, batch_size: int, progress: bool) -> None:
    """The language-model loss and its gradient over ``ids``, for the hooks; the model's training
    mode and trainable parameters are as before afterwards, and it holds no gradients."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the gradient flows through the activations alone (see calibrate); restored below
        p.requires_grad_(False)
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc="calibrating", unit="batch", disable=not progress):
            batch = ids[start : start + batch_size].to(device)
            # the loss summed over tokens: every token's gradient counts with the same weight
            loss = model(batch, labels=batch).loss * batch[:, 1:].numel()
            loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)


def _zero_moment(module: nn.Module) -> Tensor:
    """The second moment of a layer no calibration token reached (an unused MoE expert)."""
    inputs = dense_weight_of(module)[0].shape[1]
    return torch.zeros(inputs, inputs, dtype=torch.float64)


def layer_statistics(model: nn.Module, names: list[str], calibration, progress: bool = True) -> dict | None:
    """Calibration statistics of ``names``: computed from token ids, or passed through. A tied
    embedding is measured in both roles (:class:`EmbeddingStatistics`)."""
    if calibration is None or isinstance(calibration, dict):
        return calibration
    if not isinstance(calibration, Tensor):
        raise TQCError("calibration must be token ids (a blocks x seq_len tensor) or statistics from calibrate()")
    tied = tied_embedding(model)
    embedding = tied if tied in names else None
    extra = [module_name(model, model.get_output_embeddings())] if embedding is not None else []
    measured = calibrate(model, list(dict.fromkeys(names + extra)), calibration, progress=progress)
    if embedding is not None:
        scale = embedding_scale(model.get_submodule(embedding))
        measured[embedding] = EmbeddingStatistics(measured[extra[0]], measured[embedding], scale)
    return {name: measured[name] for name in names}


def usable_statistics(stats, weight: Tensor):
    """``stats`` if enough tokens reached the layer to fit it in the output metric: at least as many
    as it has inputs (an MoE expert sees only the tokens routed to it); ``None`` otherwise."""
    return stats if stats.tokens >= weight.shape[1] else None
