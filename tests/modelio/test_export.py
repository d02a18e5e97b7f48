import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tqcompressor as tqc
from tests.conftest import writer_held
from tqcompressor import CompressionConfig, LayerSpec, QuantizeSettings, TQCError
from tqcompressor.cli import app
from tqcompressor.modelio.export import export_genai, export_onnx, push_to_hub
from tqcompressor.modelio.onnx_generate import OnnxDecoder
from tqcompressor.outputs import MARKER


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

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls["upload"] = (folder_path, repo_id)
            calls["ignored"] = ignore_patterns
            return "https://huggingface.co/me/tiny/commit/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model, _ = tqc.compress(gpt2_model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(model, tmp_path / "m")
    assert push_to_hub(tmp_path / "m", "me/tiny").endswith("abc")
    assert calls["create"] == ("me/tiny", False, True) and calls["upload"] == (str(tmp_path / "m"), "me/tiny")
    assert MARKER in calls["ignored"]  # the marker says who wrote this path: it does not travel with a download
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


# -- the ONNX writers go through the output door -----------------------------------------------------


@pytest.fixture
def svd_dir(tmp_path, gpt2_model, tokenizer):
    model, _ = tqc.compress(gpt2_model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    return tqc.save(model, tmp_path / "m", tokenizer)


def test_onnx_weights_past_the_inline_limit_get_a_file_of_their_own_and_the_old_one_goes(
    tmp_path, svd_dir, monkeypatch
):
    ort = pytest.importorskip("onnxruntime")
    from tqcompressor.modelio import export

    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 0)  # as a model past 2 GiB is written
    out = tmp_path / "onnx" / "m.onnx"
    out.parent.mkdir()
    names = []
    for _ in range(2):
        export.export_onnx(svd_dir, out, cache=False)
        names.append(sorted(p.name for p in out.parent.iterdir()))
    for listing in names:  # the graph and its one weights file, named for that export; nothing else
        assert len(listing) == 2 and listing[0] == "m.onnx" and listing[1].startswith("m.onnx.")
    assert names[0][1] != names[1][1]  # the first export's weights went with its graph
    session = ort.InferenceSession(str(out))
    assert session.run(None, {"input_ids": np.zeros((1, 4), dtype=np.int64)})[0].shape == (1, 4, 512)


def test_onnx_export_refuses_a_users_file_a_second_writer_and_a_name_that_is_not_onnx(tmp_path, svd_dir, capsys):
    from tqcompressor.cli import main

    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(b"not ours")
    held = tmp_path / "held.onnx"
    with writer_held(held) as holder:
        for out, message in (
            (theirs, "was not written by tqcompressor"),
            (held, f"pid {holder.pid}"),
            (tmp_path / "m.txt", "does not end in .onnx"),
        ):
            with pytest.raises(SystemExit) as exited:
                main(["export", str(svd_dir), "--onnx", "--out", str(out)])
            err = capsys.readouterr().err
            assert exited.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert theirs.read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "theirs.onnx"]


def test_a_genai_folder_never_lands_in_another_output_of_ours(tmp_path, svd_dir, capsys):
    pytest.importorskip("onnxruntime_genai")
    from tqcompressor.cli import main

    other = tqc.save(tqc.load(svd_dir), tmp_path / "other")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(SystemExit) as exited:
        main(["export", str(svd_dir), "--onnx", "--genai", "--out", str(other)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "holds a tqcompressor model output, not a onnx-genai one" in err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not (tmp_path / "other.partial").exists()


KILLED_EXPORT = """
import sys
from tqcompressor.modelio.export import export_onnx, export_genai
print("started", flush=True)
for _ in range(100):
    if sys.argv[3] == "genai":
        export_genai(sys.argv[1], sys.argv[2])
    else:
        export_onnx(sys.argv[1], sys.argv[2], cache=False)
"""


@pytest.mark.parametrize("form", ["onnx", "genai"])
def test_an_onnx_export_killed_at_any_instant_leaves_the_old_output_or_the_new(tmp_path, svd_dir, form):
    import random
    import signal
    import time

    ort = pytest.importorskip("onnxruntime")
    if form == "genai":
        pytest.importorskip("onnxruntime_genai")
    out = tmp_path / ("g" if form == "genai" else "m.onnx")
    graph = out / "model.onnx" if form == "genai" else out
    rng = random.Random(3)
    for _ in range(2):
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_EXPORT, str(svd_dir), str(out), form], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "started"
        time.sleep(1 + rng.random() * 3)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if graph.exists():
            ort.InferenceSession(str(graph))  # complete: it opens
    leftovers = {p.name for p in tmp_path.iterdir()} - {"m", out.name, out.name + ".partial"}
    assert not leftovers  # no scratch folder, no lock file beside the output
    (export_genai if form == "genai" else export_onnx)(svd_dir, out)  # the next export clears the partial
    assert {p.name for p in tmp_path.iterdir()} == {"m", out.name}
