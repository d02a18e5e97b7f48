"""A compressed dir opens with plain transformers.AutoModelForCausalLM.from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tqcompressor as tqc
from tqcompressor import (
    CompressionConfig,
    KroneckerEmbedding,
    KroneckerLinear,
    LayerSpec,
    LowRankLinear,
    TiedFactoredHead,
    TQCError,
)


def llama_spec():
    return [
        ("model.embed_tokens", LayerSpec("tq", a_shape=(256, 32), b_shape=(2, 2), rank=2)),
        ("mlp.up_proj", LayerSpec("tq", b_shape=(2, 4), rank=3)),
        ("self_attn.q_proj", LayerSpec("svd", rank=8)),
    ]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_plain_from_pretrained_builds_factored_modules_and_matches(tmp_path, llama_model, gpt2_model, tokenizer, which):
    if which == "llama":
        model, _ = tqc.compress(llama_model, CompressionConfig(layers=llama_spec(), ratio=None), progress=False)
    else:
        model, _ = tqc.compress(gpt2_model, CompressionConfig(method="tq", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m", tokenizer)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tqcompressor"

    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    kinds = {type(m) for m in opened.modules()}
    assert KroneckerLinear in kinds
    if which == "llama":
        assert {LowRankLinear, KroneckerEmbedding, TiedFactoredHead} <= kinds
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(opened(ids).logits, model(ids).logits)
    assert tqc.count_parameters(opened) == tqc.count_parameters(model)

    generated = opened.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 15)
    assert AutoTokenizer.from_pretrained(tmp_path / "m").decode(generated[0])

    opened.save_pretrained(tmp_path / "again")  # save_pretrained round trip
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_newer_format_is_refused_with_a_clear_error(tmp_path, llama_model):
    model, _ = tqc.compress(llama_model, CompressionConfig(layers=llama_spec(), ratio=None), progress=False)
    tqc.save(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(TQCError, match="upgrade tqcompressor"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
