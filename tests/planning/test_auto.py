import pytest
import torch
from torch import nn

from tqcompressor import CompressionConfig, KroneckerLinear, LowRankLinear, compress, count_parameters
from tqcompressor.planning.auto import (
    Candidate,
    allocate,
    candidate_menu,
    embedding_candidates,
    embedding_factors,
    factors_for,
    role_scales,
)


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


def test_allocate_spends_what_a_hull_step_too_large_leaves():
    """The hull of "table" jumps 20 -> 100 (the 60-parameter point lies above that segment); with 70
    to spend the step does not fit, but the point between does, and it is taken."""
    menus = {
        "table": [Candidate("svd", 20, 0.8), Candidate("svd", 60, 0.7), Candidate("dense", 100, 0.0)],
        "small": [Candidate("svd", 5, 0.3), Candidate("dense", 10, 0.0)],
    }
    chosen = allocate(menus, {"table": 1.0, "small": 1.0}, budget=70)
    assert chosen["table"].params == 60 and chosen["small"].params == 10
    assert allocate(menus, {"table": 1.0, "small": 1.0}, budget=69)["table"].params == 20  # 60 + 10 > 69


def test_menu_errors_match_real_decompositions():
    from tqcompressor import decompose
    from tqcompressor.linalg.decompose import relative_error

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    menu, _ = candidate_menu(w, methods=["svd", "kronecker"])  # with tq too, kronecker's are left out
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
    from tqcompressor.linalg.decompose import output_error
    from tqcompressor.structures.lowrank import truncated_svd

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 48, dtype=torch.float64)
    cov = x.T @ x / len(x)
    menu, searches = candidate_menu(w, cov, methods=["svd", "tq"])
    menu += candidate_menu(w, cov, methods=["kronecker"])[0]
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


@pytest.mark.parametrize("calibrated", [False, True])
def test_menu_leaves_out_kronecker_when_tq_covers_it(calibrated):
    """tq's candidates start from kronecker's fit at the same sizes, so with both on the menu only
    tq's are measured, and each is at least as good as kronecker's would have been."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    cov = None
    if calibrated:
        x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 48, dtype=torch.float64)
        cov = x.T @ x / len(x)
    both, _ = candidate_menu(w, cov, methods=["tq", "kronecker"])
    assert {c.method for c in both} == {"tq", "dense"}

    def errors(menu, method):
        return {(tuple(c.settings["b_shape"]), c.settings["rank"]): c.error for c in menu if c.method == method}

    plain, tq = errors(candidate_menu(w, cov, methods=["kronecker"])[0], "kronecker"), errors(both, "tq")
    assert plain and plain.keys() == tq.keys()
    assert all(tq[key] <= plain[key] + 1e-4 for key in plain)


def test_calibrated_auto_weighs_layers_by_loss_and_installs_aware_factors():
    from tests.conftest import tiny_llama
    from tqcompressor.planning.calibration import calibrate
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


def test_auto_refuses_an_embedding_it_cannot_measure_before_any_work():
    from tests.conftest import tiny_llama
    from tqcompressor import TQCError

    config = CompressionConfig(method="auto", ratio=0.9, target_modules=["embed_tokens", "up_proj"], tie_lm_head=False)
    with pytest.raises(TQCError, match="measures an embedding through the LM head tied to it"):
        compress(tiny_llama(), config, progress=False)


def test_auto_offers_a_tied_embedding_measured_through_its_head(tmp_path):
    """With no targets named, auto puts a tied token embedding on the budget: here (Gemma 3, its
    lookups scaled by sqrt(hidden)) the table holds most of the model, so it is factored; the head
    stays tied to the factors, the scale stays exact, and plain from_pretrained reopens the result."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import tqcompressor as tqc
    from tests.modelio.test_architectures import SIZES
    from tqcompressor.layers import TiedFactoredHead
    from tqcompressor.planning.calibration import calibrate, layer_statistics
    from tqcompressor.planning.inventory import tied_embedding

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **{**SIZES, "vocab_size": 4096}))
    model.eval()
    assert tied_embedding(model) == "model.embed_tokens"
    ids = torch.randint(2, 4096, (8, 64), generator=torch.Generator().manual_seed(0))
    # the table is measured in both roles: as the head (hidden -> logits) and as the lookup
    measured = layer_statistics(model, ["model.embed_tokens"], ids, progress=False)["model.embed_tokens"]
    head = calibrate(model, ["lm_head"], ids, progress=False)["lm_head"]
    assert torch.allclose(measured.input_cov, head.input_cov) and measured.grad_sq == pytest.approx(head.grad_sq)
    assert measured.lookup.token_counts.sum() == ids.numel() and measured.lookup.grad_sq > 0
    assert measured.output_scale == 8.0
    # an svd candidate's error is the sensitivity-weighted mean of its errors in the two roles
    weight = model.get_input_embeddings().weight.detach()
    menu, states = candidate_menu(weight, measured.input_cov, methods=["svd"], embedding=True)
    head_scale, lookup_scale = role_scales(weight, measured)
    both = embedding_candidates(weight, menu, states, measured, (head_scale, lookup_scale))
    svd = next(c for c in both if c.method == "svd")
    w = weight.double()
    error = w - embedding_factors(weight, svd, states, measured, (head_scale, lookup_scale)).to_dense().double()
    cov = measured.input_cov
    head_error_sq = float((error @ cov * error).sum() / (w @ cov * w).sum())
    counts = measured.lookup.token_counts
    lookup_error_sq = float(counts @ error.square().sum(1) / (counts @ w.square().sum(1)))
    expected = (head_scale * head_error_sq + lookup_scale * lookup_error_sq) / (head_scale + lookup_scale)
    assert svd.error == pytest.approx(expected**0.5, rel=1e-4)

    config = CompressionConfig(method="auto", ratio=0.5)
    student, report = compress(model, config, calibration=ids, progress=False)
    record = report.plan.auto["model.embed_tokens"]
    assert record["metric"].startswith("relative error as LM head and as lookup")
    assert set(record["role_weights"]) == {"head", "lookup"} and min(record["role_weights"].values()) > 0
    assert {c["method"] for c in record["menu"]} == {"dense", "svd", "kronecker"}  # auto's structures for tables
    assert record["chosen"]["method"] != "dense"
    embedding, head_module = student.get_input_embeddings(), student.get_output_embeddings()
    assert embedding.output_scale == 8.0  # sqrt(64), exact
    assert isinstance(head_module, TiedFactoredHead) and head_module.embedding is embedding
    assert count_parameters(student) <= report.plan.target_params
    tqc.save(student, tmp_path / "m", plan=report.plan)
    probe = torch.randint(2, 4096, (2, 12))
    with torch.no_grad():
        expected = student(probe).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(probe).logits, expected, atol=1e-5)


def test_menu_restricted_to_named_methods_keeps_dense():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    menu, states = candidate_menu(w, methods=["svd"])
    assert {c.method for c in menu} == {"svd", "dense"}
    assert "tq" not in states


def test_auto_methods_are_checked():
    from tqcompressor.errors import TQCError
    from tqcompressor.planning.config import CompressionConfig

    assert CompressionConfig(method="auto", auto_methods=["svd", "tq_lowrank"]).auto_methods == ["svd", "tq_lowrank"]
    with pytest.raises(TQCError, match="unknown"):
        CompressionConfig(method="auto", auto_methods=["svdd"])
    with pytest.raises(TQCError, match="only applies to method 'auto'"):
        CompressionConfig(method="svd", auto_methods=["svd"])


def test_auto_refuses_an_unreachable_budget_before_calibrating(monkeypatch):
    """The projections alone cannot reach the budget when the table is most of the model: one
    line, and no calibration pass spent first."""
    from tests.conftest import tiny_llama
    from tqcompressor import TQCError
    from tqcompressor.planning import calibration
    from tqcompressor.planning.inventory import default_target_modules

    model = tiny_llama(vocab_size=4096)  # the tied table holds most of the parameters

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before checking the budget")

    monkeypatch.setattr(calibration, "calibrate", no_calibration)
    config = CompressionConfig(method="auto", ratio=0.3, target_modules=default_target_modules(model))
    ids = torch.randint(2, 4096, (2, 16))
    with pytest.raises(TQCError, match="below the .* parameters outside the target modules"):
        compress(model, config, calibration=ids, progress=False)


def test_output_weights_fit_and_budget_each_layer_in_the_row_weighted_output_metric():
    from tests.conftest import tiny_llama
    from tqcompressor.planning.calibration import calibrate
    from tqcompressor.structures.lowrank import truncated_svd

    model = tiny_llama()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "up_proj", "down_proj"]
    names = [n for n, _ in model.named_modules() if n.endswith(tuple(targets))]
    stats = calibrate(model, names, ids, progress=False)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    config = CompressionConfig(
        method="auto", ratio=0.85, target_modules=targets, auto_methods=["svd"], output_weights=True
    )
    before = count_parameters(model)
    model, report = compress(model, config, progress=False, calibration=stats)
    assert report.params_after <= 0.85 * before
    assert report.auto[names[0]]["metric"].endswith("outputs weighted by gradient energy")
    fitted = [entry for entry in report.plan.layers if entry.spec.method == "svd"]
    assert fitted
    for entry in fitted:  # the factors are the row-weighted activation-aware fit
        expected = truncated_svd(
            weights[entry.name],
            entry.spec.settings.rank,
            stats[entry.name].input_cov,
            row_weights=stats[entry.name].grad_sq_rows,
        ).to_dense()
        assert torch.allclose(model.get_submodule(entry.name).to_dense(), expected, atol=1e-4)
    unweighted = CompressionConfig(**{**vars(config), "output_weights": False})
    plain, _ = compress(tiny_llama(), unweighted, calibration=stats, progress=False)
    changed = [
        e.name
        for e in fitted
        if not isinstance(plain.get_submodule(e.name), LowRankLinear)
        or not torch.allclose(plain.get_submodule(e.name).to_dense(), model.get_submodule(e.name).to_dense(), atol=1e-3)
    ]
    assert changed  # the weights changed what was chosen or fitted


@pytest.mark.parametrize("method", ["tq", "svd"])
def test_output_weights_need_auto(method):
    from tqcompressor import TQCError

    with pytest.raises(TQCError, match="apply to --method auto"):
        CompressionConfig(ratio=0.5, output_weights=True, method=method)


def test_output_weights_give_kronecker_candidates_a_row_scale_and_fit_them_exactly():
    """Over every structure, a Kronecker-family layer chosen with output weights is the fit of
    diag(rows) W scaled back by a stored scale per output: one parameter per row, counted in the
    budget, and the installed layer is exactly what the menu measured (its weighted error)."""
    from tests.conftest import tiny_llama
    from tqcompressor.linalg.decompose import damped_cov
    from tqcompressor.planning.calibration import calibrate
    from tqcompressor.structures.lowrank import damped_row_roots

    model = tiny_llama()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    targets = ["up_proj", "down_proj"]
    names = [n for n, _ in model.named_modules() if n.endswith(tuple(targets))]
    stats = calibrate(model, names, ids, progress=False)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    config = CompressionConfig(
        method="auto", ratio=0.8, target_modules=targets, auto_methods=["tq", "tq_lowrank"], output_weights=True
    )
    model, report = compress(model, config, progress=False, calibration=stats)
    fitted = {entry.name: entry.factors for entry in report.plan.layers}  # in W's row and column order
    for name in names:
        menu = report.auto[name]["menu"]
        assert all(c["row_scale"] for c in menu if c["method"] != "dense")
        chosen = report.auto[name]["chosen"]
        layer = model.get_submodule(name)
        if chosen["method"] == "dense":
            continue
        kronecker = layer if chosen["method"] == "tq" else layer.kronecker
        assert kronecker.row_scale is not None
        assert sum(p.numel() for p in layer.parameters()) == chosen["params"]
        rows = damped_row_roots(stats[name].grad_sq_rows)
        w = weights[name].double()
        cov = damped_cov(stats[name].input_cov)
        delta = (w - fitted[name].to_dense().double()) * rows[:, None]
        weighted = ((delta @ cov * delta).sum() / ((w * rows[:, None]) @ cov * (w * rows[:, None])).sum()).sqrt()
        assert float(weighted) == pytest.approx(chosen["error"], rel=1e-3)
    assert any(report.auto[n]["chosen"]["method"] != "dense" for n in names)
