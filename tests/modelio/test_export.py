import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor import CompressionConfig, LayerSpec, TQCError
from tqcompressor.cli import app
from tqcompressor.modelio.export import push_to_hub


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
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    ids = torch.randint(0, 256, (3, 9))  # another batch and length than the export example
    onnx_logits = session.run(None, {"input_ids": ids.numpy()})[0]
    torch_logits = model(ids).logits.detach().numpy()
    assert np.abs(onnx_logits - torch_logits).max() / np.abs(torch_logits).max() < 1e-5


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
