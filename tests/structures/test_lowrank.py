import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tqcompressor import LowRankLinear


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_low_rank_linear_matches_dense_and_conv1d():
    torch.manual_seed(3)
    conv = Conv1D(20, 12)
    nn.init.normal_(conv.weight)
    layer = LowRankLinear.from_linear(conv, rank=12)  # full rank: exact
    x = torch.randn(6, 12)
    assert rel(layer(x), conv(x)) < 1e-5
    low = LowRankLinear.from_linear(nn.Linear(12, 20), rank=3)
    assert rel(low(x), x @ low.to_dense().T + low.bias) < 1e-5


def test_low_rank_macs():
    assert LowRankLinear(576, 1536, 10).macs_per_token == 10 * (576 + 1536)
