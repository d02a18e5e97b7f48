import pytest
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


def test_svd_with_row_weights_minimises_the_row_weighted_output_error():
    from tqcompressor.linalg.decompose import damped_cov
    from tqcompressor.structures.lowrank import damped_row_roots, truncated_svd

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    cov = x.T @ x / len(x)
    r = torch.rand(30, generator=gen, dtype=torch.float64) ** 4  # outputs of very different weight

    def weighted_error(approx):  # ||diag(sqrt r') (W - W') S||_F^2 in the metric the fit minimises
        d = damped_row_roots(r)[:, None] * (w - approx)
        return float((d @ damped_cov(cov) * d).sum())

    fit = truncated_svd(w, 5, cov, row_weights=r)
    best = weighted_error(fit.to_dense())
    assert best < weighted_error(truncated_svd(w, 5, cov).to_dense())  # the unweighted fit is worse here
    total = weighted_error(torch.zeros_like(w))
    assert fit.history[0] == pytest.approx((best / total) ** 0.5, rel=1e-6)  # it reports its own metric
    for seed in range(5):  # and no nearby rank-5 matrix does better
        noise = torch.Generator().manual_seed(seed)
        u = fit.u + 1e-3 * torch.randn(fit.u.shape, generator=noise, dtype=torch.float64)
        v = fit.v + 1e-3 * torch.randn(fit.v.shape, generator=noise, dtype=torch.float64)
        assert weighted_error(u @ v) >= best
    same = truncated_svd(w, 5, cov, row_weights=torch.full((30,), 7.0))  # equal weights: the unweighted fit
    assert torch.allclose(same.to_dense(), truncated_svd(w, 5, cov).to_dense(), atol=1e-10)


@pytest.mark.parametrize("bad", [torch.zeros(30), -torch.ones(30), torch.full((30,), float("nan")), torch.ones(3, 10)])
def test_bad_row_weights_are_a_clear_error(bad):
    from tqcompressor import TQCError
    from tqcompressor.structures.lowrank import truncated_svd

    with pytest.raises(TQCError, match="row weights must be"):
        truncated_svd(torch.randn(30, 16), 4, row_weights=bad)
