"""``dense``: the layer kept as it is. ``auto`` always has it on its menu, and densifying a
factored model rebuilds these plain modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tqcompressor.layers import ScaledEmbedding
from tqcompressor.structures.base import Candidate, Capabilities, Structure, register


@dataclass
class DenseSettings:
    pass


def plain_module(weight: Tensor, bias: Tensor | None, kind: str, scale: float = 1.0) -> nn.Module:
    """The ordinary module holding ``weight`` (out, in; for an embedding (vocab, dim), whose
    lookups are multiplied by ``scale``)."""
    weight = weight.detach().clone()
    if kind == "embedding":
        if scale != 1.0:
            module = ScaledEmbedding(*weight.shape, output_scale=scale, dtype=weight.dtype)
        else:
            module = nn.Embedding(*weight.shape, dtype=weight.dtype)
        module.weight.data = weight
        return module
    out_features, in_features = weight.shape
    if kind == "conv1d":  # GPT-2 stores (in, out) and always has a bias
        module = Conv1D(out_features, in_features)
        module.weight.data = weight.T.contiguous()
        module.bias.data = bias.detach().clone() if bias is not None else torch.zeros(out_features, dtype=weight.dtype)
        return module
    module = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
    module.weight.data = weight
    if bias is not None:
        module.bias.data = bias.detach().clone()
    return module


class Dense(Structure):
    name = "dense"
    help = "keep the layer as it is (auto's baseline)"
    settings_type = DenseSettings
    capabilities = Capabilities(compresses=False)

    def fit(self, weight: Tensor, settings=None, stats=None, max_iterations: int = 20) -> Tensor:
        return weight

    def module(self, factors: Tensor, bias: Tensor | None, kind: str) -> nn.Module:
        return plain_module(factors, bias, kind)

    def candidates(self, weight: Tensor, sketch=None, max_iterations: int = 10) -> tuple[list[Candidate], None]:
        m, n = weight.shape
        return [Candidate("dense", m * n, 0.0, {}, macs=m * n)], None

    def fit_candidate(self, weight: Tensor, candidate: Candidate, state, input_cov) -> Tensor:
        return weight

    def row_scaled(self, candidate: Candidate, out_features: int) -> Candidate:
        return candidate  # the layer stays as it is: nothing to scale back


register(Dense())
