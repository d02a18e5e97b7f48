import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tqcompressor as tqc
from tests.conftest import run_cli, writer_held
from tqcompressor.cli import app

run_tqc = run_cli  # the real entry point, in this process (so exit codes and stderr are what users see)


def test_compress_info_export(tmp_path, gpt2_dir):
    out = tmp_path / "c"
    result = CliRunner().invoke(
        app, ["compress", "--model", str(gpt2_dir), "--method", "tq", "--ratio", "0.8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression.json").read_text())
    assert report["params_after"] <= 0.8 * report["params_before"]
    assert report["method"] == "tq" and report["layers"] and "counting" in report
    assert all(
        {"name", "shape", "method", "settings", "params_before", "params_after", "relative_error", "seconds"}
        <= set(layer)
        for layer in report["layers"]
    )
    assert all({"rank", "a_shape", "b_shape", "row_scale"} == set(layer["settings"]) for layer in report["layers"])
    assert "total:" in result.output
    model = tqc.load(out)
    assert tqc.count_parameters(model) == report["params_after"]
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "mlp.c_fc" in info.output
    export = CliRunner().invoke(app, ["export", str(out), "--dense", "--out", str(tmp_path / "d")])
    assert export.exit_code == 0 and (tmp_path / "d" / "config.json").is_file()


def test_compress_with_spec_file(tmp_path, gpt2_dir):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"layers": [{"modules": ["transformer.h.1.mlp.c_fc"], "method": "tq", "rank": 2, "b_shape": [4, 2]}]}
        )
    )
    result = CliRunner().invoke(
        app, ["compress", "--model", str(gpt2_dir), "--spec", str(spec), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "s" / "compression.json").read_text())["layers"]
    assert [(entry["name"], entry["settings"]["b_shape"], entry["settings"]["rank"]) for entry in layers] == [
        ("transformer.h.1.mlp.c_fc", [4, 2], 2)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--model", "./no/such/model", "--out", "x"], "does not exist"),
        (["compress", "--model", "missing.gguf", "--out", "x"], "GGUF file"),
        (["compress", "--model", "{dir}", "--ratio", "1.5", "--out", "x"], "(0, 1]"),
        (["compress", "--model", "{dir}", "--method", "magic", "--out", "x"], "unknown method"),
        (["compress", "--model", "{dir}", "--target-modules", "nope", "--out", "x"], "match no"),
        (["compress", "--model", "{dir}", "--spec", "{bad_spec}", "--out", "x"], "does not divide"),
        (["info", "{empty}"], "half written"),
        (
            ["eval", "--model", "nosuchmodel", "--data", "{bad_spec}"],
            "neither a local path nor in the Hugging Face cache",
        ),
        (
            ["compress", "--model", "{dir}", "--method", "svd", "--auto-methods", "svd", "--out", "x"],
            "only applies to --method auto",
        ),
        (
            ["compress", "--model", "{dir}", "--method", "auto", "--auto-methods", "svdd", "--out", "x"],
            "unknown method",
        ),
        (["compress", "--model", "{dir}", "--method", "svd", "--sequential", "--out", "x"], "give --calibration"),
        (["compress", "--model", "{dir}", "--method", "tq", "--output-weights", "--out", "x"], "to --method auto"),
        (["compress", "--model", "{dir}", "--method", "auto", "--output-weights", "--out", "x"], "give --calibration"),
        (
            ["run", "--model", "{dir}", "--output-weights", "--calibration-tokens", "0", "--out", "{empty}/r"],
            "keep --calibration-tokens",
        ),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, gpt2_dir, args, message, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the same answer wherever the tests run
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("layers:\n  - modules: [mlp.c_fc]\n    method: tq\n    b_shape: [5, 3]\n")
    (tmp_path / "empty").mkdir()
    args = [a.format(dir=gpt2_dir, bad_spec=bad_spec, empty=tmp_path / "empty") for a in args]
    result = run_tqc(*args)
    assert result.returncode == 2, result.stderr
    lines = [entry for entry in result.stderr.strip().splitlines() if entry.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_compress_auto_with_calibration_text(tmp_path, gpt2_dir):
    from conftest import TOY_TEXT

    (tmp_path / "cal.txt").write_text(TOY_TEXT * 5)
    out = tmp_path / "a"
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            str(gpt2_dir),
            "--method",
            "auto",
            "--ratio",
            "0.8",
            "--calibration",
            str(tmp_path / "cal.txt"),
            "--calibration-tokens",
            "512",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression.json").read_text())
    assert report["params_after"] <= 0.8 * report["params_before"]
    linear = {name: entry for name, entry in report["auto"].items() if name != "transformer.wte"}
    assert all(entry["metric"] == "relative output error on the calibration text" for entry in linear.values())
    assert report["auto"]["transformer.wte"]["metric"].startswith("relative error as LM head and as lookup")
    assert tqc.count_parameters(tqc.load(out)) == report["params_after"]
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "errors are the relative output error" in info.output and "auto chose" in info.output
    assert "transformer.wte *" in info.output and "* errors are the relative error as LM head" in info.output
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"layers": [{"modules": ["transformer.h.1.mlp.c_fc"], "method": "tq", "rank": 2, "b_shape": [4, 2]}]}
        )
    )
    with_spec = run_tqc(
        "compress",
        "--model",
        str(gpt2_dir),
        "--spec",
        str(spec),
        "--calibration",
        "teacher",
        "--calibration-tokens",
        "64",
        "--out",
        str(tmp_path / "t"),
    )
    assert with_spec.returncode == 0, with_spec.stderr  # spec files take calibration too
    layer = json.loads((tmp_path / "t" / "compression.json").read_text())["layers"][0]
    assert "calibration text" in layer["reason"]


def test_info_targets_says_auto_also_weighs_a_tied_embedding(tmp_path):
    from tests.modelio.test_architectures import tiny_model

    tiny_model("gemma3_text").save_pretrained(tmp_path / "bare")
    targets = CliRunner().invoke(app, ["info", str(tmp_path / "bare"), "--targets"])
    assert targets.exit_code == 0
    assert "--method auto also weighs the tied embedding model.embed_tokens (16,384 parameters" in targets.output


def test_a_dir_of_config_and_weights_compresses_with_no_target_names_and_text_needs_a_tokenizer(tmp_path):
    from tests.modelio.test_architectures import tiny_model

    tiny_model("qwen3").save_pretrained(tmp_path / "bare")  # config.json + model.safetensors only
    targets = CliRunner().invoke(app, ["info", str(tmp_path / "bare"), "--targets"])
    assert targets.exit_code == 0 and "14 target modules" in targets.output and "mlp.down_proj" in targets.output
    result = run_tqc("compress", "--model", str(tmp_path / "bare"), "--ratio", "0.7", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    assert tqc.count_parameters(tqc.load(tmp_path / "c")) <= 0.7 * tqc.count_parameters(tiny_model("qwen3"))
    (tmp_path / "text.txt").write_text("some words to score\n" * 50)
    refused = run_tqc("eval", "--model", str(tmp_path / "c"), "--data", str(tmp_path / "text.txt"))
    assert refused.returncode == 2 and "has no usable tokenizer" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


# -- numbers are checked where they enter, bad input is one line and exit 2 ----------------------------

BAD_NUMBERS = {
    "distill": {
        "--lr": ["inf", "nan", "-1", "0", "5"],
        "--temperature": ["inf", "nan", "0", "-2"],
        "--alpha-blocks": ["inf", "nan", "-1"],
        "--alpha-ce": ["inf", "nan", "-1"],
        "--batch-size": ["0", "-4", "1000000000"],
        "--seq-len": ["0", "-1"],
        "--grad-accum": ["0"],
        "--seed": ["-1", "1000000000000000000000000"],
        "--steps": ["0", "-5"],
        "--log-every": ["0"],
        "--teacher-pool": ["0", "-3"],
        "--teacher-fraction": ["1.5", "-0.1", "nan"],
        "--teacher-start": ["eos", "Random"],
    },
    "eval": {"--context": ["0", "-1"], "--stride": ["0"], "--max-tokens": ["0", "-1"], "--batch-size": ["0"]},
    "run": {
        "--eval-tokens": ["0", "-5"],
        "--context": ["0"],
        "--calibration-tokens": ["-100", "1000000000000"],
        "--ratio": ["0", "1.5", "nan"],
        "--stages": ["0"],
        "--lr": ["inf"],
        "--teacher-start": ["first"],
    },
    "compress": {
        "--ratio": ["0", "-0.5", "inf", "nan"],
        "--calibration-tokens": ["0", "-100", "1000000000000"],
        "--max-iterations": ["0"],
        "--target-params": ["-10"],
    },
}
REQUIRED = {
    "distill": ["--student", "missing-student", "--teacher", "missing-teacher"],
    "eval": ["--model", "missing-model", "--data", "missing.txt"],
    "run": ["--model", "missing-model"],
    "compress": ["--model", "missing-model"],
}


@pytest.mark.parametrize(
    "command, option, value",
    [(c, o, v) for c, options in BAD_NUMBERS.items() for o, values in options.items() for v in values],
)
def test_a_bad_number_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, command, option, value):
    from tqcompressor.cli import main

    out = [] if command == "eval" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        main([command, *REQUIRED[command], *out, option, value])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert "missing" not in lines[0], "the number must be refused before any model is looked for"
    assert not (tmp_path / "out").exists()


def test_spec_with_planning_options_is_refused_not_ignored(tmp_path, capsys):
    from tqcompressor.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("layers:\n  - modules: [x]\n    method: svd\n    rank: 2\n")
    with pytest.raises(SystemExit) as exited:
        main(["compress", "--model", "m", "--spec", str(spec), "--ratio", "0.5", "--out", str(tmp_path / "o")])
    assert exited.value.code == 2 and "--ratio would be ignored" in capsys.readouterr().err


def test_usage_errors_and_unexpected_failures_are_one_line(capsys, monkeypatch):
    from tqcompressor import cli

    for args in (["compress", "--no-such-option"], ["compress"], ["eval", "--batch-size", "abc"], ["nope"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err

    def broken(*args, **kwargs):
        raise RuntimeError("something of ours broke\nsecond line")

    monkeypatch.setattr(cli, "load_model", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main(["info", "x", "--targets"])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and len(err.strip().splitlines()) == 1 and "--debug" in err
    with pytest.raises(RuntimeError, match="something of ours"):
        cli.main(["info", "x", "--targets", "--debug"])


def test_eval_json_is_checked_before_the_evaluation(tmp_path, gpt2_dir, capsys):
    from tqcompressor.cli import main

    (tmp_path / "t.txt").write_text("hello world " * 50)
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    for target, message in (
        (tmp_path, "is a directory"),
        (tmp_path / "no" / "m.json", "does not exist"),
        (tmp_path / "notes.json", "not written by tqcompressor"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["eval", "--model", str(gpt2_dir), "--data", str(tmp_path / "t.txt"), "--json", str(target)])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    for _ in range(2):  # its own file it replaces
        assert (
            run_tqc(
                "eval",
                "--model",
                str(gpt2_dir),
                "--data",
                str(tmp_path / "t.txt"),
                "--context",
                "16",
                "--json",
                str(tmp_path / "m.json"),
            ).returncode
            == 0
        )
    assert json.loads((tmp_path / "m.json").read_text())["tokens"] > 0


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["lr", "temperature", "alpha_blocks", "alpha_kl", "clip", "weight_decay"]),
    value=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_float_setting_is_accepted_only_when_finite_and_in_range(field, value):
    from tqcompressor.errors import TQCError
    from tqcompressor.training.distill import DistillConfig

    try:
        config = DistillConfig(**{field: value})
    except TQCError as exc:
        assert "\n" not in str(exc) and field.replace("_", "-") in str(exc)
    else:
        assert math.isfinite(getattr(config, field)) and getattr(config, field) >= 0


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["steps", "batch_size", "grad_accum", "seq_len", "log_every", "seed", "warmup_steps"]),
    value=st.integers(min_value=-(10**30), max_value=10**30),
)
def test_any_integer_setting_is_accepted_only_in_range(field, value):
    from tqcompressor.errors import TQCError
    from tqcompressor.training.distill import DistillConfig

    try:
        config = DistillConfig(**{field: value})
    except TQCError as exc:
        assert "\n" not in str(exc)
    else:
        assert 0 <= getattr(config, field) < 2**63
        assert config.batch_size * config.seq_len <= 1 << 24


@pytest.mark.parametrize(
    ("command", "option", "words"),
    [
        ("run", "--time-budget", "minutes the whole job may take"),
        ("run", "--output-weights", "Fisher row weights"),
        ("run", "--prefer", "budget solver"),
        ("compress", "--sequential", "refit each block's layers"),
        ("compress", "--auto-methods", "comma-separated structures"),
        ("eval", "--fidelity", "held-out text"),
    ],
)
def test_every_option_shows_its_help(command, option, words):
    """Options declared once for several commands (and those `tqc run` gets through its distillation
    options wrapper) keep their help text."""
    result = CliRunner().invoke(app, [command, "--help"])
    text = " ".join(result.output.replace("│", " ").split())  # the help as one line, table borders gone
    assert option in text and words in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--model", "{dir}", "--method", "", "--out", "{out}"], "unknown method"),
        (["compress", "--model", "{dir}", "--steps", "0", "--out", "{out}"], "--steps must be"),
        (["compress", "--model", "{dir}", "--ratio", "0.5", "--target-params", "50000", "--out", "{out}"], "give one"),
        (["compress", "--model", "{dir}", "--group-size", "7", "--out", "{out}"], "--group-size applies to --quantize"),
        (["quantize", "{dir}", "--bits", "int8", "--group-size", "64", "--out", "{out}"], "int4/3/2 only"),
        (["compress", "--model", "{dir}", "--spec", "{twice}", "--out", "{out}"], "is listed twice for step 1"),
        (["run", "--model", "{dir}", "--stages", "0", "--out", "{out}"], "--stages must be"),
        (["eval", "--model", "{dir}", "--data", "{blank}", "--context", "16"], "holds no text"),
        (["eval", "--model", "{dir}", "--teacher", "{dir}", "--context", "1000000"], "--context 1,000,000 exceeds"),
        (["eval", "--model", "{dir}", "--data", "{blank}", "--context", "1000000"], "holds no text"),
        (["eval", "--model", "{dir}", "--data", "{text}", "--context", "1000000"], "--context 1,000,000 exceeds"),
    ],
)
def test_an_option_accepted_does_what_it_says_and_a_refusal_names_it(tmp_path, gpt2_dir, capsys, args, message):
    from tqcompressor.cli import main

    twice = tmp_path / "twice.yaml"
    entry = "  - modules: [transformer.h.1.mlp.c_fc]\n    method: svd\n    rank: 2\n"
    twice.write_text("layers:\n" + entry + entry)
    (tmp_path / "blank.txt").write_text(" \n\t\n   \n")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog . " * 20)
    values = dict(
        dir=gpt2_dir, out=tmp_path / "out", twice=twice, blank=tmp_path / "blank.txt", text=tmp_path / "text.txt"
    )
    with pytest.raises(SystemExit) as exited:
        main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exited.value.code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_eval_json_is_locked_and_leaves_nothing_when_the_evaluation_fails(tmp_path, gpt2_dir, capsys, monkeypatch):
    from tqcompressor import cli

    (tmp_path / "t.txt").write_text("hello world " * 50)
    target = tmp_path / "m.json"
    args = ["eval", "--model", str(gpt2_dir), "--data", str(tmp_path / "t.txt"), "--context", "16", "--json"]
    with writer_held(target) as holder:
        with pytest.raises(SystemExit) as exited:
            cli.main([*args, str(target)])
        assert exited.value.code == 2 and f"pid {holder.pid}" in capsys.readouterr().err

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "evaluate", disk_full)
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, str(target)])
    assert exited.value.code == 2 and "No space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt", "tiny-gpt2"]  # no .partial, no lock file


def test_a_full_disk_inside_a_library_is_one_line_and_exit_2(capsys, monkeypatch):
    from tqcompressor import cli

    def full(*_, **__):  # safetensors and tokenizers report the OS's error as their own exception types
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })") from OSError(
            28, "No space left on device"
        )

    monkeypatch.setattr(cli, "load_model", full)
    with pytest.raises(SystemExit) as exited:
        cli.main(["info", "x", "--targets"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err
