"""Structures beside formats under one byte budget (tqcompressor.planning.mixed, tqc quantize --structures)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

import tqcompressor as tqc
from tests.conftest import TOY_TEXT, run_cli, tiny_llama
from tqcompressor.planning.calibration import layer_statistics
from tqcompressor.planning.formats import FORMATS, measure_formats, planned_matrices, relative_output_error
from tqcompressor.planning.mixed import FACTOR_FORMATS, factored_menu, with_structures
from tqcompressor.quant.api import quantized_layers
from tqcompressor.quant.modules import QuantizedWeight
from tqcompressor.surgery.apply import prepare_planned, store_factors, store_planned


def saved_tensor_bytes(directory) -> int:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as stored:
        return sum(stored.get_tensor(key).numel() * stored.get_tensor(key).element_size() for key in stored.keys())


def calibrated(model):
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return layer_statistics(model, list(planned_matrices(model)), ids, progress=False)


def test_each_factored_candidate_is_priced_and_measured_as_stored():
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    name = "model.layers.0.mlp.down_proj"
    weight = planned_matrices(model)[name]
    menu = factored_menu(weight, stats[name])
    assert menu and {c.stored_format for c in menu} == set(FACTOR_FORMATS)
    ranks = sorted({c.structure.settings["rank"] for c in menu})
    assert len(ranks) > 1 and all(c.structure.method == "svd" for c in menu)
    for candidate in menu:
        rank = candidate.structure.settings["rank"]
        assert candidate.method == f"svd rank={rank}/{candidate.stored_format}"
        # priced: each factor's integers and scales, no more bytes than factors of that rank in int8 hold
        assert 0 < candidate.params <= rank * sum(weight.shape) + 2 * 4 * sum(weight.shape)
    # measured on the stored layer: a higher rank, or a finer format at one rank, is no further from the matrix
    by = {(c.structure.settings["rank"], c.stored_format): c for c in menu}
    for fmt in FACTOR_FORMATS:
        errors = [by[(rank, fmt)].error for rank in ranks]
        assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert by[(ranks[-1], "int8")].error < by[(ranks[-1], "int4-g64-dq")].error
    assert relative_output_error(weight, torch.zeros_like(weight), stats[name]) == 0


def test_a_budget_below_every_format_stores_matrices_as_factors_and_the_dir_holds_those_bytes(tmp_path):
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    formats_only = measure_formats(model, stats, formats=FORMATS)  # int4 and int8: factors go below them
    mixed = with_structures(formats_only, model, stats, progress=False)
    assert mixed.smallest < formats_only.smallest  # factors make smaller models than any format
    plan = mixed.plan(formats_only.smallest - 1)
    chosen = plan.structures()
    assert chosen and all(size.method == "svd" for size in chosen.values())
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 16))
        _, structures = store_planned(model, plan)
        logits = model(ids).logits
    assert {entry.name for entry in structures.layers} == set(chosen)
    tqc.save(model, tmp_path / "mixed", plan=structures)
    assert saved_tensor_bytes(tmp_path / "mixed") == plan.total_bytes  # exact: factors' scales and offsets too
    reopened = tqc.load(tmp_path / "mixed")
    assert torch.allclose(reopened(ids).logits, logits, rtol=2e-2, atol=2e-2)  # bf16 kernels on both sides


def test_a_larger_budget_plans_a_closer_model_over_structures_and_formats():
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    menus = with_structures(measure_formats(model, stats), model, stats, progress=False)
    losses = [menus.plan(budget).loss for budget in torch.linspace(menus.smallest, menus.closest, 4).long().tolist()]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0]


def test_tqc_quantize_structures_writes_a_dir_of_factors_and_formats(tmp_path, gpt2_dir):
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    budget = measure_formats(model).smallest - 1  # below every format alone
    args = ["quantize", gpt2_dir, "--max-bytes", str(budget), "--structures", "svd", "--out", tmp_path / "q"]
    result = run_cli(*args, "--calibration", tmp_path / "calibration.txt", "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert written["plan"]["total_bytes"] <= budget == written["plan"]["budget_bytes"]
    assert saved_tensor_bytes(tmp_path / "q") == written["plan"]["total_bytes"]
    factored = [layer for layer in written["plan"]["layers"].values() if layer["format"].startswith("svd ")]
    assert factored
    assert any(layer["kind"] == "LowRankLinear" for layer in written["layers"])
    reopened = tqc.load(tmp_path / "q")
    stored = [m for m in reopened.modules() if isinstance(m, QuantizedWeight)]
    assert stored and torch.isfinite(reopened(torch.randint(0, 200, (1, 8))).logits).all()


@pytest.mark.parametrize("learn_grids", [False, True])
def test_a_byte_plan_trains_its_factors_beside_stored_matrices_and_stores_them_as_planned(learn_grids):
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    formats_only = measure_formats(model, stats, formats=FORMATS)  # int4 and int8: factors go below them
    plan = with_structures(formats_only, model, stats, progress=False).plan(formats_only.smallest - 1)
    stored, trained = copy.deepcopy(model), copy.deepcopy(model)
    store_planned(stored, plan)
    prepare_planned(trained, plan, learn_grids=learn_grids)
    quantized = set(quantized_layers(trained))
    assert quantized == set(plan.settings()) - set(plan.structures())  # the factors wait in float
    ids = torch.randint(0, 256, (2, 16))
    trained(ids).logits.float().pow(2).mean().backward()  # through the stored layers to the factors
    for name in plan.structures():
        grads = [p.grad for p in trained.get_submodule(name).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    grids = [p for name, p in trained.named_parameters() if "grid_" in name]
    assert len(grids) == (2 * len(quantized) if learn_grids else 0)  # scales and offsets of each stored matrix
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in grids)
    trained.zero_grad()
    store_factors(trained, plan)  # untrained: the same model store_planned makes
    assert set(quantized_layers(trained)) == set(quantized_layers(stored)) == set(plan.settings())
    assert not [name for name, _ in trained.named_parameters() if "grid_" in name]
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, stored(ids).logits)
