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


def test_row_weighted_svd_is_plain_svd_for_equal_weights_and_favours_heavy_rows():
    from tqcompressor.structures.lowrank import row_weighted_svd, truncated_svd

    w = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    equal = row_weighted_svd(w, 4, torch.ones(40)).to_dense()
    assert torch.allclose(equal, truncated_svd(w, 4).to_dense(), atol=1e-4)
    weights = torch.ones(40)
    weights[:3] = 1e6  # three rows read far more often than the rest: rank 3 keeps them exactly
    heavy = row_weighted_svd(w, 3, weights).to_dense()
    assert torch.allclose(heavy[:3], w[:3], atol=1e-3)
    assert (heavy[:3] - w[:3]).norm() < (truncated_svd(w, 3).to_dense()[:3] - w[:3]).norm()
