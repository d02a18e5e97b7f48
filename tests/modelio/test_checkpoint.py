import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tests.conftest import shard_weights
from tqcompressor import CompressionConfig, LayerSpec, TQCError, compress
from tqcompressor.modelio.checkpoint import STRUCTURE_FILE, WEIGHTS_FILE


def compressed_llama(llama_model, tie=True):
    spec = [
        ("model.embed_tokens", LayerSpec("tq", a_shape=(256, 32), b_shape=(2, 2), rank=2)),
        ("mlp.up_proj", LayerSpec("tq", b_shape=(2, 4), rank=3)),
        ("self_attn.q_proj", LayerSpec("svd", rank=8)),
    ]
    model, report = compress(llama_model, CompressionConfig(layers=spec, ratio=None, tie_lm_head=tie), progress=False)
    return model, report.plan


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_gives_identical_logits(tmp_path, llama_model, tokenizer, tie):
    model, plan = compressed_llama(llama_model, tie)
    ids = torch.randint(0, 512, (2, 10))
    expected = model(ids).logits
    tqc.save(model, tmp_path / "m", tokenizer, base_model="tiny-llama", plan=plan)
    loaded = tqc.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, expected)
    assert tqc.count_parameters(loaded) == tqc.count_parameters(model)
    structure = json.loads((tmp_path / "m" / STRUCTURE_FILE).read_text())
    assert structure["base_model"] == "tiny-llama" and structure["plan"] == plan.to_list()
    assert tqc.read_plan(tmp_path / "m").to_list() == plan.to_list()
    assert not list(tmp_path.glob("*.partial"))


def test_gpt2_conv1d_round_trip_and_dense_export(tmp_path, gpt2_model, tokenizer):
    model, _ = compress(gpt2_model, CompressionConfig(method="tq", ratio=0.8), progress=False)
    ids = torch.randint(0, 512, (1, 9))
    expected = model(ids).logits
    tqc.save(model, tmp_path / "c", tokenizer)
    assert torch.equal(tqc.load(tmp_path / "c")(ids).logits, expected)
    tqc.export_dense(tmp_path / "c", tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.allclose(dense(ids).logits, expected, atol=1e-4)


def test_dense_export_of_factored_tied_embedding(tmp_path, llama_model):
    model, _ = compressed_llama(llama_model, tie=True)
    ids = torch.randint(0, 512, (1, 7))
    expected = model(ids).logits
    tqc.save(model, tmp_path / "c")
    tqc.export_dense(tmp_path / "c", tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(dense(ids).logits, expected, atol=1e-4)


def test_dirs_that_name_the_tied_head_by_its_old_class_name_still_load(tmp_path, llama_model):
    model, _ = compressed_llama(llama_model, tie=True)
    ids = torch.randint(0, 512, (1, 7))
    tqc.save(model, tmp_path / "m")
    structure_file = tmp_path / "m" / STRUCTURE_FILE
    text = structure_file.read_text()
    assert '"TiedFactoredHead"' in text
    structure_file.write_text(text.replace('"TiedFactoredHead"', '"TiedKroneckerHead"'))  # as written before
    loaded = tqc.load(tmp_path / "m")
    assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_missing_corrupt_and_half_written_dirs(tmp_path, llama_model):
    with pytest.raises(TQCError, match="not a directory"):
        tqc.load(tmp_path / "nothing")
    model, _ = compressed_llama(llama_model)
    tqc.save(model, tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(TQCError, match="corrupt or half written"):
        tqc.load(tmp_path / "m")
    tqc.save(model, tmp_path / "h")
    (tmp_path / "h" / STRUCTURE_FILE).unlink()
    with pytest.raises(TQCError, match="half written"):
        tqc.load(tmp_path / "h")
    tqc.save(model, tmp_path / "v")
    structure = json.loads((tmp_path / "v" / STRUCTURE_FILE).read_text())
    structure["format_version"] = 99
    (tmp_path / "v" / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(TQCError, match="upgrade tqcompressor"):
        tqc.load(tmp_path / "v")


def test_mismatched_base_model_and_missing_tokenizer(tmp_path, llama_model, gpt2_model):
    from tqcompressor.modelio.checkpoint import load_tokenizer

    model, _ = compressed_llama(llama_model)
    tqc.save(model, tmp_path / "m")
    gpt2_model.config.save_pretrained(tmp_path / "m")  # config.json of another model
    with pytest.raises(TQCError, match="different models"):
        tqc.load(tmp_path / "m")
    with pytest.raises(TQCError, match="no tokenizer"):
        load_tokenizer(tmp_path / "m")


@pytest.mark.parametrize(
    "edit, message",
    [
        # a huge shape edited in the structure file: it does not stand for the base layer
        (lambda m: m["model.layers.0.mlp.up_proj"].update(a_shape=[1000000, 1000000]), "layer is 128x64"),
        # past any real model's size: refused by the structure file's schema already
        (lambda m: m["model.layers.0.mlp.up_proj"].update(a_shape=[100000000, 100000000]), "less than or equal"),
        # a shape edited consistently with the base layer, but not with the weights file
        (lambda m: m["model.layers.0.mlp.up_proj"].update(a_shape=[32, 32], b_shape=[4, 2]), "in its structure file"),
        # edited consistently with nothing: a low-rank layer standing for another shape than its base layer
        (lambda m: m["model.layers.0.self_attn.q_proj"].update(out_features=96), "base model's layer is 64x64"),
    ],
)
def test_shapes_are_checked_before_anything_is_allocated(tmp_path, llama_model, edit, message):
    model, _ = compressed_llama(llama_model)
    tqc.save(model, tmp_path / "m")
    structure = json.loads((tmp_path / "m" / STRUCTURE_FILE).read_text())
    edit(structure["modules"])
    (tmp_path / "m" / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(TQCError, match=message):
        tqc.load(tmp_path / "m")


def test_row_scaled_kronecker_layers_save_load_and_open_anywhere(tmp_path, tokenizer):
    """auto over tq with output weights stores one scale per output in its Kronecker layers: they
    survive tqc.load, plain from_pretrained and densify."""
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    config = CompressionConfig(
        method="auto", ratio=0.8, target_modules=["up_proj", "down_proj"], auto_methods=["tq"], output_weights=True
    )
    model, report = compress(model, config, calibration=ids, progress=False)
    scaled = [n for n, m in model.named_modules() if getattr(m, "row_scale", None) is not None]
    assert scaled and all(report.auto[n]["chosen"]["row_scale"] for n in scaled)
    test = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        expected = model(test).logits
    tqc.save(model, tmp_path / "m", tokenizer, plan=report.plan)
    loaded = tqc.load(tmp_path / "m")
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert tqc.count_parameters(loaded) == report.params_after
    assert all(loaded.get_submodule(n).row_scale is not None for n in scaled)
    with torch.no_grad():
        assert torch.equal(loaded(test).logits, expected)
        assert torch.allclose(opened(test).logits, expected, atol=1e-6)
        assert torch.allclose(tqc.densify(loaded)(test).logits, expected, atol=1e-4)  # in place: last


def test_a_config_promising_a_hundred_million_layers_is_refused_before_any_is_built(tmp_path, llama_model):
    from safetensors.torch import load_file, save_file

    model, _ = compressed_llama(llama_model)
    path = tqc.save(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 100_000_000
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors["model.layers.99999999.x"] = torch.zeros(1)  # one tensor with a huge number is one layer, not 1e8
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(TQCError, match="numbered layers at most"):
        tqc.load(path)
    with pytest.raises(TQCError, match="numbered layers at most"):
        AutoModelForCausalLM.from_pretrained(path)  # refused in the plugin, before transformers builds the model


def test_a_sharded_dir_opens_like_one_file_and_a_missing_tensor_is_an_error(tmp_path, llama_model):
    model, _ = compressed_llama(llama_model)
    ids = torch.randint(0, 256, (2, 9))
    expected = model(ids).logits
    complete = tqc.save(model, tmp_path / "complete")
    shard_weights(complete)
    assert torch.equal(tqc.load(complete)(ids).logits, expected)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(complete)(ids).logits, expected)
    incomplete = tqc.save(model, tmp_path / "incomplete")
    shard_weights(incomplete, drop="self_attn.q_proj.")
    with pytest.raises(TQCError, match="not in its weights"):
        tqc.load(incomplete)
    with pytest.raises(TQCError, match="not in its weights"):
        AutoModelForCausalLM.from_pretrained(incomplete)
    (incomplete / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TQCError, match="the shard model-00002-of-00002.safetensors"):
        tqc.load(incomplete)
