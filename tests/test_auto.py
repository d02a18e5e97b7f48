import torch
from torch import nn

from tqcompressor import CompressionConfig, compress, count_parameters
from tqcompressor.auto import Candidate, allocate, candidate_menu
from tqcompressor.layers import KroneckerLinear, LowRankLinear


class ThreeLayers(nn.Module):
    """One exact scrambled Kronecker product, one exact low-rank matrix, one random dense matrix."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kron = nn.Linear(64, 64, bias=False)
        k = torch.kron(torch.randn(32, 16, generator=g), torch.randn(2, 4, generator=g))
        self.kron.weight.data = k[torch.randperm(64, generator=g)][:, torch.randperm(64, generator=g)]
        self.lowrank = nn.Linear(64, 64, bias=False)
        self.lowrank.weight.data = torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g)
        self.dense = nn.Linear(64, 64, bias=False)
        self.dense.weight.data = torch.randn(64, 64, generator=g)
        self.config = None

    def forward(self, x):
        return self.dense(self.lowrank(self.kron(x)))


def test_auto_picks_the_structure_that_fits_each_matrix():
    model = ThreeLayers()
    before = count_parameters(model)
    config = CompressionConfig(method="auto", ratio=0.6, target_modules=["kron", "lowrank", "dense"])
    model, report = compress(model, config, progress=False)
    assert report.params_after <= 0.6 * before
    assert isinstance(model.kron, KroneckerLinear) and model.kron.b.shape[1:] == (2, 4)
    assert isinstance(model.lowrank, LowRankLinear) and model.lowrank.rank >= 3
    assert isinstance(model.dense, nn.Linear)  # a random matrix keeps the leftover budget
    errors = {layer.name: layer.relative_error for layer in report.layers}
    assert errors["kron"] < 1e-4 and errors["lowrank"] < 1e-4
    assert set(report.auto) == {"kron", "lowrank", "dense"}
    assert report.auto["dense"]["chosen"]["method"] == "dense" and len(report.auto["kron"]["menu"]) > 10


def test_auto_is_deterministic_and_never_exceeds_budget():
    for ratio in (0.3, 0.5, 0.8):
        plans = []
        for _ in range(2):
            model = ThreeLayers()
            config = CompressionConfig(method="auto", ratio=ratio, target_modules=["kron", "lowrank", "dense"])
            model, report = compress(model, config, progress=False)
            assert report.params_after <= ratio * report.params_before
            plans.append([(n, s.method, s.rank, s.b_shape) for n, s in model.tqc_plan])
        assert plans[0] == plans[1]


def test_allocate_follows_error_per_parameter():
    menus = {
        "sensitive": [Candidate("dense", 100, 0.0), Candidate("svd", 20, 0.9), Candidate("svd", 50, 0.3)],
        "robust": [Candidate("dense", 100, 0.0), Candidate("svd", 20, 0.1), Candidate("svd", 50, 0.05)],
    }
    norms = {"sensitive": 1.0, "robust": 1.0}
    chosen = allocate(menus, norms, budget=120)
    assert sum(c.params for c in chosen.values()) <= 120
    assert chosen["sensitive"].params == 100 and chosen["robust"].params == 20


def test_menu_errors_match_real_decompositions():
    from tqcompressor.decompose import decompose, relative_error
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    menu, _ = candidate_menu(w)
    for c in menu:
        if c.method == "svd" and c.rank == 4:
            assert abs(relative_error(w, decompose(w, "svd", rank=4).to_dense()) - c.error) < 1e-5
        if c.method == "kronecker" and c.rank == 2 and c.b_shape == (2, 4):
            f = decompose(w, "kronecker", b_shape=(2, 4), rank=2)
            assert abs(relative_error(w, f.to_dense()) - c.error) < 1e-5
