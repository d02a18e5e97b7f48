import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor import CompressionConfig, LayerSpec, QuantizeSettings, TQCError
from tqcompressor.cli import app
from tqcompressor.modelio.export import push_to_hub
from tqcompressor.modelio.onnx_generate import OnnxDecoder


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_onnx_export_runs_in_onnxruntime_with_equal_outputs(tmp_path, gpt2_model, llama_model, which):
    ort = pytest.importorskip("onnxruntime")
    if which == "llama":
        spec = [
            ("model.embed_tokens", LayerSpec("tq", a_shape=(256, 32), b_shape=(2, 2), rank=2)),
            ("mlp.*", LayerSpec("tq", b_shape=(2, 4), rank=3)),
            ("self_attn.q_proj", LayerSpec("svd", rank=8)),
        ]
        model, _ = tqc.compress(llama_model, CompressionConfig(layers=spec, ratio=None), progress=False)
    else:
        model, _ = tqc.compress(gpt2_model, CompressionConfig(method="tq", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m")
    args = ["export", str(tmp_path / "m"), "--onnx", "--no-cache", "--out", str(tmp_path / "m.onnx")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    ids = torch.randint(0, 256, (3, 9))  # another batch and length than the export example
    onnx_logits = session.run(None, {"input_ids": ids.numpy()})[0]
    torch_logits = model(ids).logits.detach().numpy()
    assert np.abs(onnx_logits - torch_logits).max() / np.abs(torch_logits).max() < 1e-5


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_onnx_with_a_kv_cache_generates_transformers_greedy_tokens(tmp_path, gpt2_model, llama_model, which):
    pytest.importorskip("onnxruntime")
    base = llama_model if which == "llama" else gpt2_model
    model, _ = tqc.compress(base, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0 and "KV cache" in result.output, result.output
    decoder = OnnxDecoder(tmp_path / "m.onnx")
    assert len(decoder.past_names) == 2 * model.config.num_hidden_layers

    prompts = torch.randint(2, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False)
    assert np.array_equal(decoder.greedy(prompts.numpy(), 12), expected.numpy())

    # every cached step's logits are the whole sequence's, computed at once without a cache
    full = model(expected).logits.detach().numpy()
    logits, past = decoder.step(expected[:, :7].numpy(), decoder.empty_cache(2))
    for position in range(7, 12):
        logits, past = decoder.step(expected[:, position : position + 1].numpy(), past)
        assert np.abs(logits[:, -1] - full[:, position]).max() < 1e-4 * np.abs(full).max()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_onnx_runtime_genai_opens_the_export_and_generates_transformers_greedy_tokens(
    tmp_path, gpt2_model, llama_model, tokenizer, which
):
    og = pytest.importorskip("onnxruntime_genai")
    base = llama_model if which == "llama" else gpt2_model
    model, _ = tqc.compress(base, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m", tokenizer)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("a user's file")
    args = ["export", str(tmp_path / "m"), "--onnx", "--genai", "--out"]
    refused = CliRunner().invoke(app, [*args, str(tmp_path / "theirs")])
    assert refused.exit_code != 0 and (tmp_path / "theirs" / "notes.txt").read_text() == "a user's file"

    result = CliRunner().invoke(app, [*args, str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "g").iterdir()}
    prompt = torch.randint(2, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    genai_model = og.Model(str(tmp_path / "g"))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=17, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0)) == expected[0].tolist()


def test_onnx_options_that_cannot_work_are_one_line(tmp_path, gpt2_model, capsys):
    from tqcompressor.cli import main

    model, _ = tqc.compress(gpt2_model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m")
    for flags, message in [
        (["--dense", "--no-cache"], "are options of --onnx"),
        (["--dense", "--genai"], "are options of --onnx"),
        (["--onnx", "--genai", "--no-cache"], "drop --no-cache"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["export", str(tmp_path / "m"), *flags, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1 and message in err
        assert not (tmp_path / "out").exists()
    args = ["export", str(tmp_path / "m"), "--onnx", "--no-cache", "--out", str(tmp_path / "m.onnx")]
    assert CliRunner().invoke(app, args).exit_code == 0
    with pytest.raises(TQCError, match="no KV cache inputs"):
        OnnxDecoder(tmp_path / "m.onnx")

    tqc.quantize_(model, QuantizeSettings(8, 32))
    tqc.save(model, tmp_path / "int8")
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path / "int8"), "--onnx", "--out", str(tmp_path / "int8.onnx")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "export the float compressed dir" in err
    assert not (tmp_path / "int8.onnx").exists()


def test_push_calls_the_hub_with_the_dir(tmp_path, gpt2_model, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["upload"] = (folder_path, repo_id)
            return "https://huggingface.co/me/tiny/commit/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model, _ = tqc.compress(gpt2_model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m")
    assert push_to_hub(tmp_path / "m", "me/tiny").endswith("abc")
    assert calls["create"] == ("me/tiny", False, True) and calls["upload"] == (str(tmp_path / "m"), "me/tiny")
    with pytest.raises(TQCError, match="user/name"):
        push_to_hub(tmp_path / "m", "tiny")
    with pytest.raises(TQCError, match="half written"):
        (tmp_path / "empty").mkdir()
        push_to_hub(tmp_path / "empty", "me/tiny")


def test_export_needs_exactly_one_format(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tqcompressor.cli import main; main()",
            "export",
            str(tmp_path),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--dense or --onnx" in r.stderr
