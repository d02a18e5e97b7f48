"""Training after compression: transformers' Trainer fine-tunes a compressed dir opened with plain
from_pretrained, and PEFT's LoRA attaches to its factored layers by their usual names."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import tqcompressor as tqc
from tqcompressor import CompressionConfig, LayerSpec, QuantizeSettings, TQCError
from tqcompressor.training.adapters import FactoredLoraLinear, with_factored_layers

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def compressed_dir(tmp_path, family, llama_model, gpt2_model, tokenizer, quantize=False):
    """A tiny model of ``family`` with its attention projections factored (svd and tq), saved."""
    if family == "llama":
        layers = [
            ("self_attn.q_proj", LayerSpec("svd", rank=8)),
            ("self_attn.v_proj", LayerSpec("tq", b_shape=(2, 4), rank=3)),
        ]
        model, _ = tqc.compress(llama_model, CompressionConfig(layers=layers, ratio=None), progress=False)
    else:
        model, _ = tqc.compress(gpt2_model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    if quantize:
        tqc.quantize_(model, QuantizeSettings(8, 32))
    path = tmp_path / f"{family}{'-int8' if quantize else ''}"
    tqc.save(model, path, tokenizer)
    return path


def token_dataset(count=8, length=16):
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, 256, (length,), generator=generator) for _ in range(count)]
    return [{"input_ids": ids, "labels": ids.clone()} for ids in rows]


def trainer(model, tmp_path, steps=3, lr=1e-3):
    args = TrainingArguments(
        str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=token_dataset())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_fine_tunes_every_factor_and_the_result_reopens(tmp_path, family, llama_model, gpt2_model, tokenizer):
    path = compressed_dir(tmp_path, family, llama_model, gpt2_model, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer(model, tmp_path).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    factored = [name for name, m in model.named_modules() if isinstance(m, tqc.layers.FactoredModule)]
    assert factored
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith(tuple(factored)) for n in moved), "the factors themselves trained"

    model.save_pretrained(tmp_path / "tuned")
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    ids = torch.randint(2, 256, (2, 12))
    assert torch.equal(reopened(ids).logits, model.eval()(ids).logits)
    assert tqc.count_parameters(reopened) == tqc.count_parameters(model)


def test_int8_factors_are_refused_by_trainer_and_by_lora_with_a_reason(tmp_path, llama_model, gpt2_model, tokenizer):
    path = compressed_dir(tmp_path, "llama", llama_model, gpt2_model, tokenizer, quantize=True)
    with pytest.raises(ValueError, match="purely quantized"):  # integers cannot be trained as they are
        trainer(AutoModelForCausalLM.from_pretrained(path), tmp_path)
    with pytest.raises(TQCError, match="int8/int4 .* train the float compressed model"):
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(path), with_factored_layers(LoraConfig(target_modules=["q_proj"]))
        )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_attaches_to_factored_layers_by_their_names_and_saves_and_reopens(
    tmp_path, family, llama_model, gpt2_model, tokenizer
):
    path = compressed_dir(tmp_path, family, llama_model, gpt2_model, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(2, 256, (2, 12))
    untouched = base(ids).logits
    model = get_peft_model(base, with_factored_layers(LoraConfig(target_modules=TARGETS[family], r=4)))
    wrapped = [m for m in model.modules() if isinstance(m, FactoredLoraLinear)]
    assert len(wrapped) == len(TARGETS[family]) * 2  # the targets in each of the two blocks
    assert all(isinstance(m.base_layer, tqc.layers.FactoredModule) for m in wrapped)
    assert torch.equal(model(ids).logits, untouched)  # B starts at zero: the adapter adds nothing yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the adapters train"

    trainer(model, tmp_path, steps=4, lr=1e-2).train()
    tuned = model.eval()(ids).logits
    assert not torch.allclose(tuned, untouched)
    model.save_pretrained(tmp_path / "adapter")
    config = with_factored_layers(LoraConfig.from_pretrained(tmp_path / "adapter"))
    reopened = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter", config=config
    )
    assert torch.allclose(reopened(ids).logits, tuned, atol=1e-6)


def test_lora_refuses_merging_and_factored_embeddings_in_one_line(tmp_path, llama_model, gpt2_model, tokenizer):
    path = compressed_dir(tmp_path, "llama", llama_model, gpt2_model, tokenizer)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path), with_factored_layers(LoraConfig(target_modules=["q_proj"]))
    )
    with pytest.raises(TQCError, match="would make it dense"):
        model.merge_and_unload()

    layers = [("model.embed_tokens", LayerSpec("svd", rank=8))]
    compressed, _ = tqc.compress(llama_model, CompressionConfig(layers=layers, ratio=None), progress=False)
    with pytest.raises(TQCError, match="factored embedding"):
        get_peft_model(compressed, with_factored_layers(LoraConfig(target_modules=["embed_tokens"])))
