import pytest
import torch
from torch import nn

from tqcompressor import CompressionConfig, KroneckerLinear, LowRankLinear, compress, count_parameters
from tqcompressor.auto import Candidate, allocate, candidate_menu, factors_for


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
            plans.append(report.plan.to_list())
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
    from tqcompressor import decompose
    from tqcompressor.decompose import relative_error

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    menu, _ = candidate_menu(w)
    checked = set()
    for c in menu:
        if c.method == "svd":
            assert abs(relative_error(w, decompose(w, "svd", **c.settings).to_dense()) - c.error) < 1e-5
            checked.add("svd")
        if c.method == "kronecker" and c.settings["rank"] == 2 and c.settings["b_shape"] == [2, 4]:
            f = decompose(w, "kronecker", b_shape=(2, 4), rank=2)
            assert abs(relative_error(w, f.to_dense()) - c.error) < 1e-5
            checked.add("kronecker")
    assert checked == {"svd", "kronecker"}


def test_menu_output_errors_match_real_decompositions():
    from tqcompressor import decompose
    from tqcompressor.decompose import output_error
    from tqcompressor.structures.lowrank import truncated_svd

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 48, dtype=torch.float64)
    cov = x.T @ x / len(x)
    menu, searches = candidate_menu(w, cov)
    checked = set()  # the menu measures with the slightly damped covariance: agree to 1e-4
    for c in menu:
        if c.method == "svd" and c.settings["rank"] == 3:
            assert abs(output_error(w, truncated_svd(w, 3, cov).to_dense(), cov) - c.error) < 1e-4
            checked.add("svd")
        if c.method == "kronecker" and c.settings["rank"] == 2 and c.settings["b_shape"] == [2, 4]:
            f = decompose(w, "kronecker", b_shape=(2, 4), rank=2)  # kronecker's candidates stay Van Loan's
            assert abs(output_error(w, f.to_dense(), cov) - c.error) < 1e-4
            checked.add("kronecker")
        if c.method == "tq" and c.settings["rank"] == 3 and c.settings["b_shape"] == [2, 4]:
            f = factors_for(w, c, searches, cov)  # what compress would install
            assert abs(output_error(w, f.to_dense(), cov) - c.error) < 1e-4
            checked.add("tq")
    assert checked == {"svd", "kronecker", "tq"}


def test_calibrated_auto_weighs_layers_by_loss_and_installs_aware_factors():
    from tests.conftest import tiny_llama
    from tqcompressor.calibration import calibrate
    from tqcompressor.structures.lowrank import truncated_svd

    model = tiny_llama()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "up_proj", "down_proj"))]
    stats = calibrate(model, names, ids, progress=False)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    config = CompressionConfig(method="auto", ratio=0.85, target_modules=["q_proj", "up_proj", "down_proj"])
    before = count_parameters(model)
    model, report = compress(model, config, progress=False, calibration=stats)
    assert report.params_after <= 0.85 * before
    entry = report.auto[names[0]]
    assert entry["metric"].startswith("relative output error") and entry["layer_weight"] > 0
    for entry in report.plan.layers:
        layer = model.get_submodule(entry.name)
        if entry.spec.method == "svd":  # the activation-aware fit, not the plain SVD
            expected = truncated_svd(
                weights[entry.name], entry.spec.settings.rank, stats[entry.name].input_cov
            ).to_dense()
            assert torch.allclose(layer.to_dense(), expected, atol=1e-5)
    # a second run from raw token ids makes the same choices
    again = tiny_llama()
    again, again_report = compress(again, config, progress=False, calibration=ids)
    assert again_report.plan.to_list() == report.plan.to_list()


def test_auto_refuses_embeddings_before_any_work():
    import pytest

    from tests.conftest import tiny_llama
    from tqcompressor import TQCError

    config = CompressionConfig(method="auto", ratio=0.9, target_modules=["embed_tokens", "up_proj"])
    with pytest.raises(TQCError, match="covers linear layers"):
        compress(tiny_llama(), config, progress=False)


def test_menu_restricted_to_named_methods_keeps_dense():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    menu, states = candidate_menu(w, methods=["svd"])
    assert {c.method for c in menu} == {"svd", "dense"}
    assert "tq" not in states


def test_auto_methods_are_checked():
    from tqcompressor.config import CompressionConfig
    from tqcompressor.errors import TQCError

    assert CompressionConfig(method="auto", auto_methods=["svd", "tq_lowrank"]).auto_methods == ["svd", "tq_lowrank"]
    with pytest.raises(TQCError, match="unknown"):
        CompressionConfig(method="auto", auto_methods=["svdd"])
    with pytest.raises(TQCError, match="only applies to method 'auto'"):
        CompressionConfig(method="svd", auto_methods=["svd"])
