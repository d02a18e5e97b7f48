"""tqcompressor never writes into, or deletes, a directory it did not write itself."""

import os
import subprocess
import sys

import pytest

import tqcompressor as tqc
from tests.conftest import TOY_TEXT, tiny_llama
from tqcompressor.errors import TQCError
from tqcompressor.outputs import MARKER, check_writable, claim_directory


def tqc_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "from tqcompressor.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


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
    (first / "stale.bin").write_text("from the earlier save")
    tqc.save(model, tmp_path / "m")  # an earlier tqcompressor output: replaced, silently
    assert not (tmp_path / "m" / "stale.bin").exists() and tqc.load(tmp_path / "m") is not None
    (tmp_path / "empty").mkdir()
    tqc.save(model, tmp_path / "empty")
    assert claim_directory(tmp_path / "new" / "run").is_dir()


def test_a_partial_sibling_the_user_owns_is_not_deleted(tmp_path):
    partial = users_dir(tmp_path).with_name("m.partial")
    os.rename(tmp_path / "precious", partial)
    with pytest.raises(TQCError, match="did not write"):
        tqc.save(tiny_llama(), tmp_path / "m")
    assert (partial / "thesis.txt").is_file()


def test_a_file_where_a_directory_should_go_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TQCError, match="is a file"):
        check_writable(tmp_path / "f")
