"""Fold a Kronecker layer's input gather into the layers that feed it, exactly.

In an MLP ``down(act(gate(x)) * up(x))`` the activation and the product act on each feature
alone, so gathering their output columns is the same as gathering the columns of ``gate(x)`` and
``up(x)`` first. A ``KroneckerLinear`` down projection starts with such a gather (its searched
column permutation fused with the contraction's layout); folding moves it into the producers'
stored weights (a dense layer's rows, a low-rank ``U``'s rows, a one-row-``B`` Kronecker layer's
``A`` rows) or output permutation (any other Kronecker producer, whose output gather it composes
with, so it costs nothing there). The down projection then gathers nothing. This is a
reparametrisation of the stored state, not a runtime switch: ``save`` / ``load``, ``to_dense``
and export see the folded model and compute the same function.

The structures' modules take part through :class:`~tqcompressor.layers.FactoredModule`'s folding
methods: a consumer's ``input_permutation()`` and ``take_input_gathered()``, a producer's
``permute_outputs(gather)`` (where ``permutes_outputs``); plain ``nn.Linear`` / ``Conv1D`` producers are
permuted here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.layers import FactoredModule

# consumer -> the producers whose outputs reach it through feature-wise ops only
MLP_PRODUCERS = {"down_proj": ("gate_proj", "up_proj"), "c_proj": ("c_fc",), "fc2": ("fc1",)}


def fold_mlp_permutations(model: nn.Module, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Fold every foldable MLP's down-projection input gather into its producers; returns the
    names of the MLPs folded. ``skip``: module names (producers or consumers) that must not change,
    e.g. layers a later compression step will still factor from their current weights.

    Each fold is checked on a random input (the MLP's output must not change beyond float
    rounding) and undone if it does not hold, so an MLP whose forward is not the assumed
    feature-wise form is left as it was.
    """
    folded = []
    for name, mlp in model.named_modules():
        for consumer_name, producer_names in MLP_PRODUCERS.items():
            consumer = getattr(mlp, consumer_name, None)
            producers = [getattr(mlp, p, None) for p in producer_names]
            full = [f"{name}.{n}" if name else n for n in (consumer_name, *producer_names)]
            if (
                not isinstance(consumer, FactoredModule)
                or consumer.input_permutation() is None
                or not all(_can_permute_outputs(p) for p in producers)
                or skip.intersection(full)
            ):
                continue
            if _fold_checked(mlp, consumer, producers):
                folded.append(name)
    return folded


def _can_permute_outputs(module: nn.Module | None) -> bool:
    """Dense layers, and factored ones that say how (``permutes_outputs``)."""
    return type(module) in (nn.Linear, Conv1D) or (isinstance(module, FactoredModule) and module.permutes_outputs)


def _fold_checked(mlp: nn.Module, consumer: nn.Module, producers: list[nn.Module]) -> bool:
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (consumer, *producers)]
    was_training = mlp.training
    mlp.eval()
    param = next(consumer.parameters())
    in_features = producers[0].weight.shape[0] if isinstance(producers[0], Conv1D) else producers[0].in_features
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    try:
        with torch.no_grad():
            try:
                before = mlp(x)
            except Exception:  # a block that is not a plain MLP (e.g. fc1/fc2 inside a decoder layer): leave it
                return False
            _fold(consumer, producers)
            after = mlp(x)
    finally:
        mlp.train(was_training)
    scale = before.abs().max().clamp_min(1e-12)
    tolerance = 1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2
    if ((after - before).abs().max() / scale) <= tolerance:
        return True
    for module, state in zip((consumer, *producers), saved):  # not the assumed form: undo
        _restore(module, state)
    return False


def _fold(consumer: nn.Module, producers: list[nn.Module]) -> None:
    gather = consumer.input_permutation().cpu()
    for producer in producers:
        _permute_outputs(producer, gather)
    consumer.take_input_gathered()


def _permute_outputs(module: nn.Module, gather: Tensor) -> None:
    """Make ``module(x)`` return ``module(x)[..., gather]`` by changing its stored state."""
    if isinstance(module, FactoredModule):
        module.permute_outputs(gather)
        return
    with torch.no_grad():
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            module.weight.copy_(module.weight[:, gather.to(module.weight.device)])
        else:
            module.weight.copy_(module.weight[gather.to(module.weight.device)])
        if module.bias is not None:
            module.bias.copy_(module.bias[gather.to(module.bias.device)])


def _restore(module: nn.Module, state: dict[str, Tensor]) -> None:
    for name in ("input_index", "output_index"):  # the fold may have added or dropped an index buffer
        if hasattr(module, name):
            if name not in state:
                module.register_buffer(name, None)
            elif getattr(module, name) is None:
                module.register_buffer(name, torch.empty_like(state[name]))
    module.load_state_dict(state)  # a KroneckerLinear rebuilds its gathers on load
