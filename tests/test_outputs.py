"""tqcompressor never writes into, or deletes, a directory it did not write itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tqcompressor as tqc
from tests.conftest import TOY_TEXT, run_cli, tiny_llama, writer_held
from tqcompressor.errors import TQCError
from tqcompressor.outputs import MARKER, check_writable, claim_directory

ROOT = Path(__file__).resolve().parents[1]


tqc_cli = run_cli  # in this process: the same exit status and lines, without seconds of imports per call


def users_dir(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    return precious


def assert_refused(result, precious):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "did not write" in lines[0] and "Traceback" not in result.stderr
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_compress_refuses_a_users_directory_and_keeps_the_file(tmp_path, gpt2_dir):
    precious = users_dir(tmp_path)
    assert_refused(tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(precious)), precious)
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"]
    assert not precious.with_name("precious.partial").exists()


def test_out_dot_is_refused_in_a_directory_with_files(tmp_path, gpt2_dir):
    precious = users_dir(tmp_path)
    assert_refused(
        tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", ".", cwd=precious), precious
    )


def test_distill_run_and_dense_export_refuse_a_users_directory(tmp_path, gpt2_dir):
    precious = users_dir(tmp_path)
    (tmp_path / "train.txt").write_text(TOY_TEXT)
    assert_refused(
        tqc_cli(
            "distill",
            "--teacher",
            str(gpt2_dir),
            "--student",
            str(gpt2_dir),
            "--data",
            str(tmp_path / "train.txt"),
            "--out",
            str(precious),
        ),
        precious,
    )
    assert_refused(
        tqc_cli("run", "--model", str(gpt2_dir), "--data", str(tmp_path / "train.txt"), "--out", str(precious)),
        precious,
    )
    compressed = tmp_path / "c"
    assert tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(compressed)).returncode == 0
    assert_refused(tqc_cli("export", str(compressed), "--dense", "--out", str(precious)), precious)
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"]


def test_own_outputs_are_replaced_and_empty_or_new_directories_used(tmp_path):
    model = tiny_llama()
    first = tqc.save(model, tmp_path / "m")
    assert (first / MARKER).is_file()
    tqc.save(tiny_llama(seed=1), tmp_path / "m")  # an earlier tqcompressor output: replaced, silently
    assert not torch.equal(tqc.load(tmp_path / "m").lm_head.weight, model.lm_head.weight)
    (tmp_path / "empty").mkdir()
    tqc.save(model, tmp_path / "empty")
    assert claim_directory(tmp_path / "new" / "run").is_dir()


def test_a_file_the_user_put_in_an_output_of_ours_is_never_deleted(tmp_path):
    first = tqc.save(tiny_llama(), tmp_path / "m")
    (first / "notes.txt").write_text("my thesis")
    with pytest.raises(TQCError, match="notes.txt, which tqcompressor did not write"):
        tqc.save(tiny_llama(), tmp_path / "m")
    assert (first / "notes.txt").read_text() == "my thesis" and tqc.load(first) is not None
    (first / "notes.txt").unlink()
    tqc.save(tiny_llama(), tmp_path / "m")


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_output_is_the_users_until_adopted(tmp_path, how):
    import shutil

    original = tqc.save(tiny_llama(), tmp_path / "m")
    there = tmp_path / "there"
    shutil.copytree(original, there) if how == "copy" else os.rename(original, there)
    before = {p.name: p.read_bytes() for p in there.iterdir()}
    with pytest.raises(TQCError, match="copied or moved here, so it is yours now.*--adopt"):
        tqc.save(tiny_llama(seed=1), there)
    with pytest.raises(TQCError, match="copied or moved here"):
        claim_directory(there, kind="model")
    assert {p.name: p.read_bytes() for p in there.iterdir()} == before
    check_writable(there, adopt=True)  # the user says it is ours: its own files may be replaced


def test_a_copy_with_a_users_file_keeps_it_whatever_the_command(tmp_path, gpt2_dir):
    import shutil

    student = tmp_path / "student"
    assert (
        tqc_cli(
            "compress", "--model", str(gpt2_dir), "--method", "svd", "--ratio", "0.8", "--out", str(student)
        ).returncode
        == 0
    )
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    (copy / "notes.txt").write_text("my thesis")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    for args in (
        ("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(copy)),
        ("quantize", str(student), "--bits", "int8", "--out", str(copy)),
        ("export", str(student), "--dense", "--out", str(copy)),
        ("export", str(student), "--dense", "--out", str(copy), "--adopt"),
        ("distill", "--teacher", str(gpt2_dir), "--student", str(student), "--out", str(copy)),
    ):
        result = tqc_cli(*args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == before, args
    (copy / "notes.txt").unlink()
    result = tqc_cli("quantize", str(student), "--bits", "int8", "--out", str(copy), "--adopt")
    assert result.returncode == 0, result.stderr
    assert json.loads((copy / MARKER).read_text())["path"] == str(copy.resolve())


def test_one_kind_of_output_never_replaces_another(tmp_path):
    model_dir = tqc.save(tiny_llama(), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    with pytest.raises(TQCError, match="holds a tqcompressor model output, not a run one"):
        claim_directory(model_dir, kind="run")
    with pytest.raises(TQCError, match="not a onnx-genai one"):
        check_writable(model_dir, kind="onnx-genai")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_a_partial_sibling_the_user_owns_is_not_deleted(tmp_path):
    partial = users_dir(tmp_path).with_name("m.partial")
    os.rename(tmp_path / "precious", partial)
    with pytest.raises(TQCError, match="did not write"):
        tqc.save(tiny_llama(), tmp_path / "m")
    assert (partial / "thesis.txt").is_file()


def test_a_deletion_cut_short_leaves_the_directory_still_ours(tmp_path, monkeypatch):
    from tqcompressor import outputs

    ours = outputs.claim_directory(tmp_path / "m.partial")
    for name in ("a.json", "b.safetensors", "c.txt"):
        (ours / name).write_text("x")
    (ours / "sub").mkdir()
    real_unlink, calls = Path.unlink, []

    def killed_on_second_file(path, *args, **kwargs):  # as kill -9 would stop it, part-way
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        outputs.remove_ours(ours)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert outputs.written_by_us(ours)  # the marker goes last: the half-deleted directory is still ours
    outputs.remove_ours(ours)  # so the next run removes it instead of refusing it
    assert not ours.exists()


def test_a_file_where_a_directory_should_go_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TQCError, match="is a file"):
        check_writable(tmp_path / "f")


# -- ownership by marker only -----------------------------------------------------------------------


@pytest.mark.parametrize("earlier_name", ["results.json", "metrics.jsonl", "tqcompressor.json"])
def test_no_file_name_makes_a_users_directory_ours(tmp_path, gpt2_dir, earlier_name):
    precious = users_dir(tmp_path)
    (precious / earlier_name).write_text("{}")
    assert_refused(tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(precious)), precious)
    assert (precious / earlier_name).read_text() == "{}"


def test_an_output_is_never_the_input_it_reads(tmp_path, gpt2_dir):
    compressed = tmp_path / "c"
    assert tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(compressed)).returncode == 0
    before = {p.name: p.read_bytes() for p in compressed.iterdir() if p.is_file()}
    for args in (
        ("export", str(compressed), "--dense", "--out", str(compressed)),
        ("export", str(compressed), "--onnx", "--out", str(compressed / "model.onnx")),
        ("quantize", str(compressed), "--bits", "int8", "--out", str(compressed)),
        ("compress", "--model", str(compressed), "--ratio", "0.9", "--out", str(compressed)),
    ):
        result = tqc_cli(*args)
        assert result.returncode == 2 and "would overwrite the input" in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in compressed.iterdir() if p.is_file()} == before


def test_quantize_keeps_compression_json_and_export_leaves_no_stale_files(tmp_path, gpt2_dir):
    compressed, quantized, dense = tmp_path / "c", tmp_path / "q", tmp_path / "d"
    assert tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(compressed)).returncode == 0
    assert tqc_cli("quantize", str(compressed), "--bits", "int8", "--out", str(quantized)).returncode == 0
    assert {"compression.json", "quantization.json", MARKER} <= {p.name for p in quantized.iterdir()}
    # a dense export into an earlier compressed output replaces it whole: no tqcompressor.json beside dense weights
    assert tqc_cli("export", str(compressed), "--dense", "--out", str(quantized)).returncode == 0
    assert not (quantized / "tqcompressor.json").exists() and not (quantized / "compression.json").exists()
    assert tqc_cli("export", str(compressed), "--dense", "--out", str(dense)).returncode == 0
    assert (dense / MARKER).is_file()


def test_a_symlinked_partial_is_never_followed(tmp_path):
    precious = users_dir(tmp_path)
    (tmp_path / "m.partial").symlink_to(precious)
    with pytest.raises(TQCError, match="did not write"):
        tqc.save(tiny_llama(), tmp_path / "m")
    assert (precious / "thesis.txt").is_file()


# -- swapped in whole: kill -9 at any instant --------------------------------------------------------


def write_generations(final, start: int) -> None:
    """Write complete outputs, one generation after another, with random pauses between files."""
    import random
    import time

    from tqcompressor.outputs import staged_directory

    random.seed(start)
    for generation in range(start, start + 1000):
        with staged_directory(final) as staging:
            for name in ("config.json", "model.safetensors", "tqcompressor.json", "compression.json"):
                (staging / name).write_text(str(generation) * 1000)
                time.sleep(random.random() * 0.002)


def complete_generation(path) -> int:
    """The generation a complete output holds (every file present and from the same write)."""
    texts = {(path / name).read_text() for name in ("config.json", "model.safetensors", "tqcompressor.json")}
    texts.add((path / "compression.json").read_text())
    assert len(texts) == 1 and (path / MARKER).is_file()
    text = next(iter(texts))
    return int(text[: len(text) // 1000])


def test_kill_9_at_any_instant_leaves_a_complete_old_or_new_output(tmp_path):
    import multiprocessing
    import random
    import time

    final = tmp_path / "out"
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")  # the writer needs no torch: forking is safe and quick
    seen = []
    for trial in range(40):
        process = fork.Process(target=write_generations, args=(final, trial * 1000))
        process.start()
        time.sleep(
            0.02 + rng.random() * 0.15
        )  # past the fork, into the writes: a kill lands in a different one each time
        process.kill()  # SIGKILL
        process.join()
        if final.exists():  # the first writers may be killed before any write completes
            seen.append(complete_generation(final))
    assert len(seen) > 20 and len(set(seen)) > 10  # the kills did land at many different instants


def test_kill_9_of_a_real_model_save_leaves_a_loadable_model(tmp_path):
    import random
    import signal
    import time

    script = (
        "import sys\nimport tqcompressor as tqc\nfrom tests.conftest import tiny_llama\n"
        "models = [tiny_llama(seed=s) for s in range(3)]\n"
        "for i in range(1000):\n    tqc.save(models[i % 3], sys.argv[1])\n    print('saved', flush=True)\n"
    )
    rng = random.Random(1)
    for _ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "m")], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "saved"
        time.sleep(rng.random() * 0.3)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert tqc.load(tmp_path / "m") is not None


# -- one writer at a time ------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, gpt2_dir):
    out = tmp_path / "out"
    with writer_held(out) as holder:
        with pytest.raises(TQCError, match=f"pid {holder.pid}"):
            tqc.save(tiny_llama(), out)
        result = tqc_cli("compress", "--model", str(gpt2_dir), "--ratio", "0.8", "--out", str(out))
        assert result.returncode == 2 and f"pid {holder.pid}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        result = tqc_cli("distill", "--teacher", str(gpt2_dir), "--student", str(gpt2_dir), "--out", str(out))
        assert result.returncode == 2 and f"pid {holder.pid}" in result.stderr
    tqc.save(tiny_llama(), out)  # the holder is gone: its lock went with it
    assert tqc.load(out) is not None


def test_the_lock_is_reentrant_and_leaves_no_file_behind(tmp_path):
    from tqcompressor.outputs import lock_path, writer_lock

    out = tmp_path / "out"
    with writer_lock(out):
        with writer_lock(out):
            tqc.save(tiny_llama(), out)
        assert lock_path(out.resolve()).exists() and lock_path(out).parent != tmp_path
    assert not lock_path(out.resolve()).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing beside the output, held or not


def test_a_writer_killed_while_holding_the_lock_leaves_nothing_beside_the_output(tmp_path):
    out = tmp_path / "out"
    with writer_held(out):
        pass  # killed on leaving the block, its lock held
    assert list(tmp_path.iterdir()) == []
    tqc.save(tiny_llama(), out)  # the lock died with its holder


# -- out of space ---------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("this platform cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_out_of_space_keeps_the_old_output_and_says_so_in_one_line(small_tmpfs, tmp_path, gpt2_dir):
    from tests.conftest import tiny_gpt2

    tqc.save(tiny_gpt2(vocab_size=64), small_tmpfs / "m")  # small enough to fit
    before = {p.name: p.read_bytes() for p in (small_tmpfs / "m").iterdir()}
    big = tmp_path / "big"
    tiny_gpt2(vocab_size=16384).save_pretrained(big)  # 4 MB of embeddings: does not fit beside it
    result = tqc_cli("compress", "--model", str(big), "--ratio", "0.95", "--out", str(small_tmpfs / "m"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # after progress bars
    assert len(errors) == 1 and "No space left" in errors[0] and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (small_tmpfs / "m").iterdir()} == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["m"]


def test_every_writer_out_of_space_says_so_in_one_line_and_leaves_nothing(small_tmpfs, tmp_path):
    from tests.conftest import make_tokenizer, tiny_gpt2

    big = tmp_path / "big"
    tiny_gpt2(vocab_size=16384).save_pretrained(big)  # 4 MB of embeddings: more than the 3 MB there
    make_tokenizer().save_pretrained(big)
    student = tmp_path / "student"
    assert (
        tqc_cli("compress", "--model", str(big), "--method", "svd", "--ratio", "0.95", "--out", str(student)).returncode
        == 0
    )
    (tmp_path / "train.txt").write_text(TOY_TEXT)
    for args in (
        ("export", str(student), "--dense", "--out", str(small_tmpfs / "dense")),
        ("export", str(student), "--onnx", "--genai", "--out", str(small_tmpfs / "genai")),
        ("export", str(student), "--onnx", "--out", str(small_tmpfs / "m.onnx")),
        ("distill", "--teacher", str(big), "--student", str(student), "--data", str(tmp_path / "train.txt"),
         "--steps", "2", "--seq-len", "16", "--batch-size", "1", "--out", str(small_tmpfs / "run")),
    ):  # fmt: skip
        result = tqc_cli(*args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "No space left" in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
        left = [p for p in small_tmpfs.rglob("*") if p.is_file() and p.name != MARKER]
        assert args[0] == "distill" or not any(small_tmpfs.iterdir()), (args, left)
