"""What every registered structure must do. A new structure is tested here by registering it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import tqcompressor as tqc
from tests.conftest import tiny_gpt2, tiny_llama
from tqcompressor.linalg.decompose import OutputSketch, output_error, relative_error
from tqcompressor.structures import all_structures, settings_dict

STRUCTURES = [s for s in all_structures() if s.capabilities.compresses]
IDS = [s.name for s in STRUCTURES]


def half_budget(structure, shape=(32, 48)):
    """Settings that keep about half of a matrix of ``shape``, as the budget solver picks them."""
    found = structure.for_budget(shape, 0.5, "accuracy")
    assert found is not None, f"{structure.name} has no settings for {shape} at half its parameters"
    return found[0]


def dense_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv1d":  # GPT-2: weight stored (in, out)
        layer = Conv1D(32, 48)
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.bias, std=0.1)
        return layer
    return nn.Linear(48, 32)


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_module_computes_what_to_dense_says_and_counts_honestly(structure, kind):
    dense = dense_layer(kind)
    weight, got_kind = tqc.layers.dense_weight_of(dense)
    settings = half_budget(structure)
    factors = structure.fit(weight, settings)
    module = structure.module(factors, dense.bias.detach(), got_kind)
    x = torch.randn(3, 5, 48)
    expected = x @ module.to_dense().T + dense.bias
    assert torch.allclose(module(x), expected, atol=1e-5)
    assert torch.allclose(module.to_dense(), factors.to_dense().to(module.to_dense().dtype), atol=1e-6)
    own = sum(p.numel() for p in module.parameters()) - dense.bias.numel()
    assert own == factors.num_params <= 0.5 * weight.numel()
    assert structure.is_applied(module, settings)
    assert settings_dict(structure.settings_of(module)).keys() == settings_dict(settings).keys()
    # factored better than nothing: the fit explains part of the weight
    assert relative_error(weight, module.to_dense()) < 1.0


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_gradients_reach_every_parameter(structure):
    dense = dense_layer("linear")
    module = structure.module(
        structure.fit(dense.weight.detach(), half_budget(structure)), dense.bias.detach(), "linear"
    )
    module(torch.randn(4, 48)).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_candidates_report_the_error_of_what_auto_installs(structure):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 48, dtype=torch.float64)
    cov = x.T @ x / len(x)
    for sketch, input_cov in ((None, None), (OutputSketch(cov), cov)):
        menu, state = structure.candidates(w, sketch, max_iterations=5)
        if not structure.capabilities.offers_candidates:
            assert menu == []
            continue
        assert menu, f"{structure.name} offers auto no candidate for a 32x48 matrix"
        for c in menu:
            assert c.method == structure.name and 0 < c.params < w.numel() and c.macs > 0
            installed = structure.fit_candidate(w, c, state, input_cov).to_dense().double()
            measured = relative_error(w, installed) if input_cov is None else output_error(w, installed, cov)
            # the menu measures the output metric with the damped covariance: agree to 1e-4
            assert measured <= c.error + 1e-4, (c.to_dict(), measured)


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_row_scaled_candidates_install_their_fit_of_the_row_weighted_matrix_exactly(structure):
    """Output weights: auto measures a candidate on diag(rows) W; what it installs, scaled back by
    ``divide_rows``, times diag(rows) is that fit, with the parameters and settings ``row_scaled`` says."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    rows = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(400, 48, generator=g, dtype=torch.float64)
    cov = x.T @ x / len(x)
    menu, state = structure.candidates(w * rows[:, None], OutputSketch(cov), max_iterations=5)
    for c in menu:
        scaled = structure.row_scaled(c, 32)
        fitted = structure.fit_candidate(w * rows[:, None], scaled, state, cov)
        module = structure.module(structure.divide_rows(fitted, rows), None, "linear")
        assert torch.allclose(module.to_dense().double() * rows[:, None], fitted.to_dense().double(), atol=1e-5)
        assert sum(p.numel() for p in module.parameters()) == scaled.params
        assert structure.is_applied(module, structure.make_settings(scaled.settings))


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compressed_model_saves_loads_reopens_and_densifies(tmp_path, tokenizer, structure, arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    before = tqc.count_parameters(model)
    model, report = tqc.compress(model, tqc.CompressionConfig(method=structure.name, ratio=0.8), progress=False)
    assert report.layers and all(entry.method == structure.name for entry in report.layers)
    assert tqc.count_parameters(model) == report.params_after <= 0.8 * before
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
    tqc.save(model, tmp_path / "m", tokenizer, plan=report.plan)
    assert tqc.read_plan(tmp_path / "m").to_list() == report.plan.to_list()
    loaded = tqc.load(tmp_path / "m")
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.allclose(opened(ids).logits, expected, atol=1e-6)
        assert tqc.count_parameters(loaded) == report.params_after
        assert torch.allclose(tqc.densify(loaded)(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_onnx_export_keeps_the_structure(tmp_path, structure):
    ort = pytest.importorskip("onnxruntime")
    from tqcompressor.modelio.export import export_onnx

    model, report = tqc.compress(tiny_llama(), tqc.CompressionConfig(method=structure.name, ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m", plan=report.plan)
    export_onnx(tmp_path / "m", tmp_path / "m.onnx", cache=False)  # the logits-only graph: all positions scored
    ids = torch.randint(0, 512, (3, 9))
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


@pytest.mark.parametrize("structure", STRUCTURES, ids=IDS)
def test_spec_settings_are_validated_by_the_structure(structure):
    with pytest.raises(tqc.TQCError, match="has no setting"):
        tqc.LayerSpec(structure.name, colour="red")
    spec = tqc.LayerSpec(structure.name, **settings_dict(half_budget(structure)))
    assert tqc.LayerSpec.from_dict(spec.to_dict()) == spec
