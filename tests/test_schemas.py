"""Every file tqcompressor reads is checked against its schema before any tensor is allocated:
whatever one key of it is changed to, a load either refuses with a TQCError (one line and exit 2
from the CLI) or, where the edit is harmless, loads; a full-size model is never built first."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tqcompressor as tqc
from tests.conftest import tiny_llama
from tests.modelio.test_checkpoint import compressed_llama
from tqcompressor import TQCError
from tqcompressor.modelio.checkpoint import STRUCTURE_FILE
from tqcompressor.planning.config import load_spec
from tqcompressor.schemas import (
    CompressionFile,
    QuantizationFile,
    check_data,
    json_schemas,
    module_config,
    render_markdown,
)

BAD_VALUES = st.one_of(
    st.sampled_from(
        [None, "abc", "", "no", 4.7, float("nan"), float("inf"), -1, 0, 10**8, 10**24, [], [2, 2, 2], {}, True]
    ),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(max_size=5),
    st.lists(st.integers(-3, 10**9), max_size=3),
)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    model, plan = compressed_llama(tiny_llama())
    return tqc.save(model, tmp_path_factory.mktemp("schemas") / "m", plan=plan)


def guard_allocation(monkeypatch) -> list[str]:
    """Record every model built outside the meta device (a real allocation)."""
    from transformers import AutoModelForCausalLM

    built = []
    original = AutoModelForCausalLM.from_config

    def from_config(*args, **kwargs):
        if torch.get_default_device().type != "meta":
            built.append("real")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    return built


def load_edited(source: Path, target: Path, edit) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    structure = json.loads((target / STRUCTURE_FILE).read_text())
    edit(structure)
    (target / STRUCTURE_FILE).write_text(json.dumps(structure))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=BAD_VALUES, delete=st.booleans())
def test_any_edit_of_a_module_description_is_refused_before_allocation(
    saved_dir, tmp_path, monkeypatch, data, value, delete
):
    structure = json.loads((saved_dir / STRUCTURE_FILE).read_text())
    module = data.draw(st.sampled_from(sorted(structure["modules"])))
    key = data.draw(st.sampled_from(sorted(structure["modules"][module])))

    def edit(s):
        if delete:
            del s["modules"][module][key]
        else:
            s["modules"][module][key] = value

    load_edited(saved_dir, tmp_path / "edited", edit)
    built = guard_allocation(monkeypatch)
    try:
        tqc.load(tmp_path / "edited")
    except TQCError as exc:
        assert "\n" not in str(exc) and built == []
    else:  # the edit was harmless (the same value, or a key with a default): it loads completely
        assert built == ["real"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format_version", "dtype", "modules", "plan", "base_model"]), value=BAD_VALUES)
def test_any_edit_of_the_structure_files_top_level_is_refused_or_harmless(saved_dir, tmp_path, key, value):
    load_edited(saved_dir, tmp_path / "edited", lambda s: s.__setitem__(key, value))
    try:
        tqc.load(tmp_path / "edited")
    except TQCError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("model_type"), "model_type|config.json"),
        (lambda c: c.update(num_hidden_layers=2000), "num_hidden_layers is 2,000"),
        (lambda c: c.update(num_hidden_layers=100_000_000), "num_hidden_layers is 100,000,000"),
        (lambda c: c.update(hidden_size=-4), "config.json"),
        (lambda c: c.update(hidden_act="bogus"), "config.json|activation"),
        (lambda c: c.update(vocab_size="many"), "config.json"),
    ],
)
def test_the_base_config_is_checked_at_the_same_door(saved_dir, tmp_path, monkeypatch, edit, message):
    shutil.copytree(saved_dir, tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    edit(config)
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    built = guard_allocation(monkeypatch)
    with pytest.raises(TQCError, match=message):
        tqc.load(tmp_path / "edited")
    assert built == []


def test_a_missing_tensor_is_an_error_even_with_a_tied_embedding(saved_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(saved_dir, tmp_path / "edited")
    weights = tmp_path / "edited" / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(TQCError, match="not in its weights"):
        tqc.load(tmp_path / "edited")


def test_module_types_are_only_our_own_classes():
    with pytest.raises(TQCError, match="unknown module type"):
        module_config({"type": "os.system"}, "modules['x']")
    experts = {
        "type": "LinearExperts",
        "num_experts": 100_000_000,
        "hidden_dim": 8,
        "intermediate_dim": 8,
        "has_gate": True,
        "has_bias": False,
        "hidden_act": "silu",
        "fused_class": "this.s",
    }
    with pytest.raises(TQCError, match="num_experts"):
        module_config(experts, "modules['x']")
    with pytest.raises(TQCError, match="activation"):
        module_config(experts | {"num_experts": 4, "hidden_act": "bogus"}, "modules['x']")


SPEC_ENTRY = {"modules": ["model.layers.0.mlp.up_proj"], "method": "tq", "rank": 2, "b_shape": [2, 4], "step": 1}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", "abc", "rank"),
        ("rank", float("nan"), "rank"),
        ("rank", 4.7, "rank"),
        ("rank", -3, "rank"),
        ("step", float("inf"), "step"),
        ("b_shape", [2, 2, 2], "b_shape"),
        ("b_shape", [-2, 4], "b_shape"),
        ("row_scale", "no", "row_scale"),
        ("method", "nope", "unknown method"),
        ("colour", "blue", "colour"),
        ("modules", [], "modules"),
    ],
)
def test_spec_file_values_are_typed(tmp_path, key, value, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"layers": [SPEC_ENTRY | {key: value}]}))
    with pytest.raises(TQCError, match=message) as caught:
        load_spec(path)
    assert "\n" not in str(caught.value)


def test_spec_files_need_layers_and_any_suffix_case_reads_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("layers: []\n")
    with pytest.raises(TQCError, match="layers"):
        load_spec(empty)
    upper = tmp_path / "spec.YAML"
    upper.write_text(yaml.safe_dump({"layers": [SPEC_ENTRY]}))
    config = load_spec(upper)
    assert [(name, spec.settings.rank) for name, spec in config.layers] == [("model.layers.0.mlp.up_proj", 2)]


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(["params_before", "params_after", "method", "layers"]), value=BAD_VALUES)
def test_compression_json_edits_are_refused_or_harmless(key, value):
    good = {"params_before": 10, "params_after": 5, "method": "tq", "layers": []}
    check_data(copy.deepcopy(good), CompressionFile, "compression.json")
    try:
        check_data(good | {key: value}, CompressionFile, "compression.json")
    except TQCError as exc:
        assert str(exc).startswith("compression.json: ") and "\n" not in str(exc)


def test_quantization_json_bits_are_8_4_3_or_2():
    good = {
        "format": "int8",
        "bits": 8,
        "group_size": None,
        "weights_file_bytes": 1,
        "quantized_float_bytes": 1,
        "quantized_stored_bytes": 1,
        "layers": [],
    }
    check_data(good, QuantizationFile, "q")
    with pytest.raises(TQCError, match="bits"):
        check_data(good | {"bits": 5}, QuantizationFile, "q")


def test_file_formats_doc_is_generated_from_the_schemas():
    doc = Path(__file__).resolve().parents[1] / "docs" / "file-formats.md"
    assert doc.read_text() == render_markdown(), "regenerate it: python -m tqcompressor.schemas > docs/file-formats.md"
    assert set(json_schemas()) >= {"tqcompressor.json", "compression.json", "quantization.json"}


def test_plain_from_pretrained_goes_through_the_same_door(saved_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(saved_dir) is not None
    shutil.copytree(saved_dir, tmp_path / "edited")
    weights = tmp_path / "edited" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}, str(weights))
    with pytest.raises(TQCError, match="not in its weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
