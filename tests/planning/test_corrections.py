"""A stored matrix plus a low-rank correction of its rounding error on a byte plan's menu
(tqcompressor.planning.corrections, quant.modules.CorrectedLinear)."""

import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tests.conftest import TOY_TEXT, run_cli, tiny_llama
from tests.planning.test_mixed import calibrated, saved_tensor_bytes
from tqcompressor.errors import TQCError
from tqcompressor.planning.corrections import corrected_menu, with_corrections
from tqcompressor.planning.formats import measure_formats, planned_matrices, relative_output_error, settings_named
from tqcompressor.quant.api import kept_bytes, quantized_layers
from tqcompressor.quant.modules import CorrectedLinear, QuantizedWeight
from tqcompressor.schemas import module_config
from tqcompressor.surgery.apply import prepare_planned, store_factors, store_planned

NAME = "model.layers.0.mlp.down_proj"


def test_each_corrected_format_is_priced_and_measured_as_stored():
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    weight = planned_matrices(model)[NAME]
    menu = corrected_menu(weight, stats[NAME], bases=("int2-g64-dq", "int3-g64-dq"), ranks=(4, 16))
    assert [c.method for c in menu] == ["int2-g64-dq+r4", "int2-g64-dq+r16", "int3-g64-dq+r4", "int3-g64-dq+r16"]
    for candidate in menu:
        base = QuantizedWeight.from_weight(weight, settings_named(candidate.stored_format))
        alone = relative_output_error(weight, weight - base.dequantize(), stats[NAME])
        # priced as stored: the base's bytes, then U and V in int8 (a byte a value, inputs padded to 16, and a
        # bfloat16 scale per row)
        (rows, inputs), rank = weight.shape, candidate.correction_rank
        correction = rows * (-(-rank // 16) * 16 + 2) + rank * (-(-inputs // 16) * 16 + 2)
        assert candidate.params == base.stored_bytes + correction
        assert candidate.error < alone  # the correction takes part of the rounding error away
    by = {c.method: c.error for c in menu}
    assert by["int2-g64-dq+r16"] < by["int2-g64-dq+r4"] and by["int3-g64-dq+r16"] < by["int3-g64-dq+r4"]


def corrected_only(model, stats):
    """Menus whose every linear matrix must take int2-g64-dq with a rank-8 correction."""
    menus = measure_formats(model, stats, formats=("int2-g64-dq", "int8"))
    menus = with_corrections(menus, model, stats, bases=("int2-g64-dq",), ranks=(8,), progress=False)
    corrected = {name: [c for c in menu if c.correction_rank] or menu for name, menu in menus.menus.items()}
    return dataclasses.replace(menus, menus=corrected)


def test_a_corrected_plan_is_stored_saved_and_reopened_in_the_bytes_it_planned(tmp_path):
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    plan = corrected_only(model, stats).plan(10**9)
    linear = {name for name in planned_matrices(model) if "layers" in name}
    assert plan.corrections() == dict.fromkeys(linear, 8)
    assert plan.to_dict()["format_counts"]["int2-g64-dq+r8"] == len(linear)
    stored = copy.deepcopy(model)
    report, structures = store_planned(stored, plan)
    # the report (quantization.json's layers) counts both parts of each corrected matrix, and its error; taken
    # before any forward, which derives the kernels' layouts
    assert report.stored_bytes + kept_bytes(stored) == plan.total_bytes
    entry = next(layer for layer in report.layers if layer.name == NAME)
    assert entry.format == "int2-g64-dq+r8" and entry.kind == "CorrectedLinear" and 0 < entry.error < 1
    layers = quantized_layers(stored)
    assert all(layers[name] == "int2-g64-dq+r8" for name in linear) and len(layers) == len(linear) + 1
    for name in linear:  # each stored layer closer to its matrix than its base alone
        weight, layer = planned_matrices(model)[name], stored.get_submodule(name)
        corrected = relative_output_error(weight, weight - layer.to_dense(), stats[name])
        assert corrected < relative_output_error(weight, weight - layer.base.to_dense(), stats[name])
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        logits = stored(ids).logits
    tqc.save(stored, tmp_path / "corrected", plan=structures)
    assert saved_tensor_bytes(tmp_path / "corrected") == plan.total_bytes  # exact: both parts' scales too
    reopened = tqc.load(tmp_path / "corrected")
    assert isinstance(reopened.get_submodule(NAME), CorrectedLinear)
    with torch.no_grad():
        assert torch.equal(reopened(ids).logits, logits)


@pytest.mark.parametrize("learn_grids", [False, True])
def test_a_byte_plan_trains_its_corrections_in_float_then_stores_them(learn_grids):
    model = tiny_llama(vocab_size=256)
    stats = calibrated(model)
    plan = corrected_only(model, stats).plan(10**9)
    stored, trained = copy.deepcopy(model), copy.deepcopy(model)
    store_planned(stored, plan)
    prepare_planned(trained, plan, learn_grids=learn_grids)
    ids = torch.randint(0, 256, (2, 16))
    trained(ids).logits.float().pow(2).mean().backward()
    for name in plan.corrections():
        correction = trained.get_submodule(name).correction
        assert correction.u.grad is not None and torch.isfinite(correction.v.grad).all()
    trained.zero_grad()
    store_factors(trained, plan)  # untrained: the model store_planned makes
    assert not [name for name, p in trained.named_parameters() if "correction" in name]  # stored in int8
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, stored(ids).logits)


def test_a_saved_correction_must_match_its_base():
    base = {"type": "QuantizedLinear", "in_features": 8, "out_features": 4, "bias": False, "kind": "linear"}
    base.update(bits=4, group_size=8)
    correction = {"type": "LowRankLinear", "in_features": 8, "out_features": 4, "rank": 2, "bias": False}
    correction["kind"] = "linear"
    module_config({"type": "CorrectedLinear", "base": base, "correction": correction}, "here")
    with pytest.raises(TQCError, match="correction is"):
        module_config({"type": "CorrectedLinear", "base": base, "correction": {**correction, "in_features": 6}}, "x")
    with pytest.raises(TQCError, match="QuantizedLinear base"):
        module_config({"type": "CorrectedLinear", "base": correction, "correction": correction}, "here")


def test_tqc_quantize_corrections_puts_corrected_formats_on_each_linear_matrix_menu(tmp_path, gpt2_dir):
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    budget = (measure_formats(model).smallest + measure_formats(model).closest) // 2
    args = ["quantize", gpt2_dir, "--max-bytes", str(budget), "--corrections", "--out", tmp_path / "q"]
    result = run_cli(*args, "--calibration", tmp_path / "calibration.txt", "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert written["plan"]["total_bytes"] <= budget
    assert saved_tensor_bytes(tmp_path / "q") == written["plan"]["total_bytes"]
    # a random toy's rounding error is white, so no correction pays for its bytes here; each linear matrix was
    # offered them (a corrected plan is stored, saved and reopened above)
    for name, layer in written["plan"]["layers"].items():
        offered = {c["format"] for c in layer["menu"] if c.get("correction_rank")}
        assert bool(offered) == ("wte" not in name and "wpe" not in name), name


def test_corrections_without_a_target_is_one_line(tmp_path, gpt2_dir):
    result = run_cli("quantize", gpt2_dir, "--bits", "int8", "--corrections", "--out", tmp_path / "q")
    assert result.returncode == 2 and "--corrections joins" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "q").exists()
