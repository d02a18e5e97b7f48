"""Quantizing whole models: uncompressed and compressed, saved, reopened, exported, from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_gpt2, tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor.cli import app
from tqcompressor.evaluation.evaluate import evaluate
from tqcompressor.quant.api import quantize_, quantized_layers
from tqcompressor.quant.modules import QuantizedEmbedding, QuantizedFactored, QuantizedLinear, QuantizedLowRankLinear
from tqcompressor.structures import all_structures

IDS = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))
STRUCTURES = [s.name for s in all_structures() if s.capabilities.compresses]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits, tolerance", [("int8", 0.03), ("int4", 0.3)])
def test_uncompressed_model_quantizes_every_matrix_and_keeps_the_head_tied(tmp_path, bits, tolerance):
    model = tiny_llama()
    reference, params = logits(model), tqc.count_parameters(model)
    report = quantize_(model, bits)
    assert tqc.count_parameters(model) == params  # the same parameters, in fewer bits
    assert evaluate(model, IDS.reshape(-1), context=12, progress=False)["params"] == params
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert model.get_output_embeddings().embedding is model.get_input_embeddings()  # one table for both
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(report.layers) == 2 * 7 + 1 and report.stored_bytes < report.float_bytes / (3 if bits == "int8" else 6)
    assert relative(logits(model), reference) < tolerance
    tqc.save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as stored:
        keys = list(stored.keys())
    assert not any(k.startswith("lm_head") for k in keys)
    assert {stored_dtype(tmp_path / "q", k) for k in keys if k.endswith("qdata")} == {
        torch.int8 if bits == "int8" else torch.uint8
    }


def stored_dtype(directory, key):
    with safe_open(str(directory / "model.safetensors"), "pt") as stored:
        return stored.get_tensor(key).dtype


@pytest.mark.parametrize("method", STRUCTURES)
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_compressed_model_quantizes_saves_and_reopens_anywhere(tmp_path, method, bits):
    student, report = tqc.compress(tiny_llama(), tqc.CompressionConfig(method=method, ratio=0.7), progress=False)
    float_logits = logits(student)
    quantize_(student, bits)
    factored = [m for m in student.modules() if isinstance(m, (QuantizedLowRankLinear, QuantizedFactored))]
    assert len(factored) == len(report.layers)
    expected = logits(student)
    assert relative(expected, float_logits) < (0.05 if bits == "int8" else 0.4)
    tqc.save(student, tmp_path / "q", plan=report.plan)
    assert torch.equal(logits(tqc.load(tmp_path / "q")), expected)
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(opened), expected)
    assert quantized_layers(opened) == quantized_layers(student)
    with torch.no_grad():
        assert opened.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=1).shape == (1, 7)
    tqc.export_dense(tmp_path / "q", tmp_path / "dense")  # the float matrices the integers stand for
    dense = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))
    assert relative(dense, expected) < 0.02  # the quantized layers compute in bfloat16


@pytest.mark.parametrize("method", ["tq", "tq_lowrank", "svd"])
def test_a_quantized_gpt2_exports_dense_with_its_biases(tmp_path, method):
    model = tiny_gpt2()
    with torch.no_grad():  # GPT-2 starts with zero biases; these must survive quantization and export
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    student, report = tqc.compress(model, tqc.CompressionConfig(method=method, ratio=0.7), progress=False)
    quantize_(student, "int8")
    expected = logits(student)
    tqc.save(student, tmp_path / "q", plan=report.plan)
    tqc.export_dense(tmp_path / "q", tmp_path / "dense")
    assert relative(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), expected) < 0.02


def test_gpt2_conv1d_layers_quantize(tmp_path):
    model = tiny_gpt2()
    reference = logits(model)
    quantize_(model, "int8")
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert model.transformer.h[0].attn.c_attn.kind == "conv1d"
    assert isinstance(model.transformer.wpe, QuantizedEmbedding)
    assert relative(logits(model), reference) < 0.03
    tqc.save(model, tmp_path / "q")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(model))


def test_quantized_models_refuse_to_be_compressed_distilled_or_quantized_again():
    model = tiny_llama()
    quantize_(model, "int8")
    with pytest.raises(tqc.TQCError, match="compression needs float weights"):
        tqc.compress(model, tqc.CompressionConfig(method="svd", ratio=0.5), progress=False)
    with pytest.raises(tqc.TQCError, match="quantized already"):
        quantize_(model, "int4")


@pytest.mark.parametrize(
    "spec",
    [tqc.LayerSpec("kronecker", rank=2, b_shape=(1, 2)), tqc.LayerSpec("svd", rank=16)],
    ids=["kronecker", "svd"],
)
def test_a_tied_factored_embedding_stays_tied_when_quantized(tmp_path, spec):
    spec = [("model.embed_tokens", spec)]
    student, _ = tqc.compress(tiny_llama(), tqc.CompressionConfig(layers=spec), progress=False)
    float_logits = logits(student)
    quantize_(student, "int8")
    assert student.get_output_embeddings().embedding is student.get_input_embeddings()
    expected_type = "QuantizedLowRankEmbedding" if spec[0][1].method == "svd" else "QuantizedFactored"
    assert type(student.get_input_embeddings()).__name__ == expected_type
    assert relative(logits(student), float_logits) < 0.05
    tqc.save(student, tmp_path / "q")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(student))


run_tqc = run_cli  # the real entry point, in this process: exit codes and stderr are what users see


def test_cli_compress_quantize_info_and_errors(tmp_path, gpt2_dir):
    runner = CliRunner()
    result = runner.invoke(
        app, ["compress", "--model", str(gpt2_dir), "--method", "svd", "--ratio", "0.7", "--quantize", "int4",
              "--out", str(tmp_path / "c4")]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "c4" / "quantization.json").read_text())
    assert written["format"] == "int4-g32" and written["source"] == str(gpt2_dir)
    assert written["weights_file_bytes"] == (tmp_path / "c4" / "model.safetensors").stat().st_size
    with safe_open(str(tmp_path / "c4" / "model.safetensors"), "pt") as stored:  # the factors' layers, and the rest
        tensors = sum(stored.get_tensor(k).numel() * stored.get_tensor(k).element_size() for k in stored.keys())
    assert written["quantized_stored_bytes"] + written["kept_bytes"] == written["weights_tensor_bytes"] == tensors
    info = runner.invoke(app, ["info", str(tmp_path / "c4")])
    assert "int4-g32" in info.output and "svd" in info.output
    baseline = runner.invoke(app, ["quantize", str(gpt2_dir), "--bits", "int8", "--out", str(tmp_path / "t8")])
    assert baseline.exit_code == 0, baseline.output
    assert "| int8 " in runner.invoke(app, ["info", str(tmp_path / "t8")]).output
    for args, message in [
        (("quantize", gpt2_dir, "--bits", "int5", "--out", tmp_path / "x"), "int8, int4, int3 or int2"),
        (("quantize", tmp_path / "t8", "--bits", "int4", "--out", tmp_path / "x"), "quantized already"),
        (
            ("distill", "--teacher", gpt2_dir, "--student", tmp_path / "c4", "--out", tmp_path / "d"),
            "distillation needs float weights",
        ),
    ]:
        failed = run_tqc(*args)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantized_svd_embedding_reads_only_its_rows_and_keeps_gemmas_scale(tmp_path, bits):
    """Gemma 3 scales its lookups by sqrt(hidden) and its tied head uses the raw table: the quantized
    low-rank table keeps both, and its lookups equal rows of the dequantized factors' product."""
    from tests.modelio.test_architectures import tiny_model
    from tqcompressor.quant.modules import QuantizedLowRankEmbedding

    spec = [("model.embed_tokens", tqc.LayerSpec("svd", rank=16))]
    student, _ = tqc.compress(tiny_model("gemma3_text"), tqc.CompressionConfig(layers=spec), progress=False)
    ids = torch.randint(2, 256, (2, 10))
    with torch.no_grad():
        float_logits = student(ids).logits
    quantize_(student, bits)
    table = student.get_input_embeddings()
    assert isinstance(table, QuantizedLowRankEmbedding) and table.output_scale == 8.0
    assert student.get_output_embeddings().embedding is table
    with torch.no_grad():
        assert torch.allclose(table(ids), table.to_dense()[ids] * 8.0, atol=1e-5)
        hidden = torch.randn(3, 64)
        assert torch.allclose(table.project(hidden), hidden @ table.to_dense().T, rtol=2e-2, atol=2e-2)  # bf16 kernels
        quantized_logits = student(ids).logits
    assert relative(quantized_logits, float_logits) < (0.05 if bits == "int8" else 0.3)
    tqc.save(student, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits, quantized_logits)
    tqc.export_dense(tmp_path / "q", tmp_path / "dense")  # the dequantized table, scale and tie kept
    with torch.no_grad():
        dense_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits
    assert relative(dense_logits, quantized_logits) < 0.02
