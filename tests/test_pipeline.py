"""The main job end to end at toy scale: what the report holds."""

import json

import pytest
from conftest import TOY_TEXT
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor.cli import app
from tqcompressor.evaluation.fidelity import HELDOUT_FILES
from tqcompressor.pipeline import PROMPTS, TEACHER_DOMAIN


def test_run_reports_both_domains_the_plan_continuations_and_costs(tmp_path, gpt2_dir):
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    (tmp_path / "eval.txt").write_text(TOY_TEXT)
    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(gpt2_dir),
        "--method",
        "auto",
        "--auto-methods",
        "svd",
        "--ratio",
        "0.8",
        "--stages",
        "2",
        "--data",
        str(tmp_path / "train.txt"),
        "--teacher-fraction",
        "0.5",
        "--teacher-pool",
        "3",
        "--teacher-start",
        "random",
        "--calibration-tokens",
        "128",
        "--eval-data",
        str(tmp_path / "eval.txt"),
        "--eval-tokens",
        "256",
        "--interim-eval-tokens",
        "128",
        "--context",
        "64",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["teacher_fraction"] == 0.5 and results["teacher_pool_blocks"] == 3
    assert results["teacher_start"] == "random"
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu_capability"]  # where it was measured
    assert isinstance(results["machine"]["native_bf16"], bool)
    from safetensors.torch import load_file

    pool = load_file(str(out / "teacher_pool-random-start-seed0-3x32.safetensors"))["blocks"]
    assert pool.shape == (3, 32)  # 2 stages x 2 steps x 2 blocks, half of them the teacher's: capped at 3
    assert [p["label"] for p in results["points"]] == [
        "teacher",
        "compressed (no KD)",
        "after KD stage 1",
        "after KD stage 2",
    ]
    held_out = {TEACHER_DOMAIN, *HELDOUT_FILES}
    for point in results["points"]:
        assert set(point["domains"]) == {str(tmp_path / "eval.txt")} | held_out
        in_domain = point["domains"][str(tmp_path / "eval.txt")]
        assert in_domain["perplexity"] == point["perplexity"] and in_domain["held_out"] is False
        for name in held_out:
            domain = point["domains"][name]
            assert domain["held_out"] is True and domain["tokens"] > 0 and domain["perplexity"] > 1
            assert domain["perplexity_ratio"] == pytest.approx(domain["perplexity"] / domain["teacher_perplexity"])
            assert domain["kl_to_teacher"] >= 0 and 0 <= domain["top1_agreement"] <= 1
        # fidelity KL: the mean over the held-out domains only, never the in-domain text
        kls = [point["domains"][name]["kl_to_teacher"] for name in held_out]
        assert point["fidelity_kl"] == pytest.approx(sum(kls) / len(kls))
    teacher_point, final = results["points"][0], results["points"][-1]
    assert teacher_point["fidelity_kl"] == 0 and teacher_point["fidelity_top1"] == 1
    assert final["fidelity_kl"] > 0
    # points during the run on the first windows of each domain, the same ones each time; the final model
    # and the teacher (measured in the final model's passes) on every window
    tokens = [{name: d["tokens"] for name, d in point["domains"].items()} for point in results["points"]]
    assert tokens[1] == tokens[2] and tokens[0] == tokens[3]
    assert all(tokens[1][name] < tokens[0][name] for name in tokens[0])
    for name, domain in final["domains"].items():
        assert domain["teacher_perplexity"] == teacher_point["domains"][name]["perplexity"]
    # where the time went: each phase, the recovery ones named
    phases = [p["phase"] for p in results["phase_seconds"]]
    assert {"distilling (stage 1)", "distilling (stage 2)", "saving the model"} <= set(phases)
    # quantization beside the student: the teacher and the student in fp32, int8, int4 (groups of 32, 128)
    quantized = results["quantized"]
    assert [(q["model"], q["format"]) for q in quantized] == [("teacher", "fp32"), ("student", "fp32")] + [
        (m, f) for m in ("teacher", "student") for f in ("int8", "int4-g32", "int4-g128")
    ]
    by = {(q["model"], q["format"]): q for q in quantized}
    assert by[("teacher", "int8")]["memory_bytes"] < by[("teacher", "fp32")]["memory_bytes"]
    assert by[("teacher", "int4-g32")]["memory_bytes"] < by[("teacher", "int8")]["memory_bytes"]
    assert 0 < by[("teacher", "int8")]["fidelity_kl"] < by[("student", "int8")]["fidelity_kl"]
    # the plan: every linear layer of both blocks, svd or dense, and svd ones smaller than the teacher's
    cells = results["plan_cells"]
    assert {c["block"] for c in cells} == {0, 1} and len(cells) == 8
    assert {c["method"] for c in cells} <= {"svd", "dense"} and any(c["method"] == "svd" for c in cells)
    assert all(c["kept"] < 1 for c in cells if c["method"] == "svd")
    assert [c["prompt"] for c in results["continuations"]] == PROMPTS
    assert all(isinstance(c["teacher"], str) and isinstance(c["student"], str) for c in results["continuations"])
    stored = load_file(str(out / "model" / "model.safetensors"))
    assert results["bytes"] == sum(t.numel() * t.element_size() for t in stored.values())  # weights, headers aside
    cost = results["footprint"]
    assert cost["student"]["params"] == results["points"][-1]["params"] < cost["teacher"]["params"]
    assert cost["student"]["memory_bytes"] < cost["teacher"]["memory_bytes"]
    assert cost["speed"]["prefill_time_ratio"] > 0 and cost["speed"]["generation_time_ratio"] > 0
    for picture in ("plan.png", "perplexity.png", "fidelity.png"):
        assert (out / picture).stat().st_size > 1000
    report = (out / "report.md").read_text()
    for section in (
        "## The plan",
        "## The same prompts, continued greedily",
        "## What it costs to hold and run",
        "## How this was measured",
        "## Fidelity to the teacher, on text no step of the run read",
        "## What quantization alone gives",
        "## Where the time went",
        "Each form of the student against the teacher quantized into no more bytes",
        "the first windows of each domain only",
        "KL (code (CPython stdlib))",
        "ppl, in-domain (eval.txt)",
        "50% of the blocks sampled from the teacher",
        # tqc run's default for auto over svd with calibration, recorded and said
        "auto over svd (or dense), fitted to the calibration tokens' outputs; each layer's outputs weighted",
    ):
        assert section in report, section
    assert results["compression"]["output_weights"] is True
    # what the default precision meant on this machine is recorded, and said in the report
    from tqcompressor.training.distill import training_precision

    assert results["training_precision"] == training_precision("auto")
    assert ("bf16 autocast" in report) == (results["training_precision"] == "bf16")
    assert tqc.load(out / "model") is not None


def test_the_evaluation_seed_is_not_used_for_training(tmp_path, gpt2_dir):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tqcompressor.cli import main; main()",
            "run",
            "--model",
            str(gpt2_dir),
            "--data",
            "teacher",
            "--seed",
            "12345",
            "--out",
            str(tmp_path / "o"),
            "--seq-len",
            "32",
            "--context",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "seed 12345 is reserved" in r.stderr, r.stderr


def test_a_teacher_fraction_outside_0_1_is_refused_before_sampling(tmp_path, gpt2_dir):
    (tmp_path / "train.txt").write_text(TOY_TEXT)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            str(gpt2_dir),
            "--data",
            str(tmp_path / "train.txt"),
            "--teacher-fraction",
            "1.5",
            "--seq-len",
            "32",
            "--context",
            "64",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "the teacher fraction must be in [0, 1], got 1.5" in str(result.exception)
    assert not list((tmp_path / "o").glob("teacher_*"))  # nothing was sampled


def test_a_one_stage_run_refits_once_and_distils_the_one_shot_model(tmp_path, gpt2_dir, monkeypatch):
    import tqcompressor.surgery.apply as surgery

    calls = []
    real = surgery.refit_sequentially
    monkeypatch.setattr(surgery, "refit_sequentially", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    args = ["run", "--model", str(gpt2_dir), "--ratio", "0.8", "--stages", "1", "--steps", "2", "--sequential"]
    args += ["--data", str(tmp_path / "train.txt"), "--teacher-fraction", "0", "--calibration-tokens", "128"]
    args += ["--eval-data", str(tmp_path / "train.txt"), "--eval-tokens", "256", "--context", "64"]
    args += ["--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # the one-shot point's refit is the student distillation starts from
    points = json.loads((tmp_path / "run" / "results.json").read_text())["points"]
    assert [p["label"] for p in points][:2] == ["teacher", "compressed (no KD)"]


def test_run_defaults_are_the_recipes_auto_with_output_weights(tmp_path, gpt2_dir, monkeypatch):
    """What `make demo` runs: no --method given means the recipe's auto, calibrated, with output weights."""
    from tqcompressor import cli
    from tqcompressor.training import recipe

    seen = {}

    def capture(loaded, run):
        seen.update(run=run)
        return {}

    monkeypatch.setattr(cli, "run_pipeline", capture)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            str(gpt2_dir),
            "--context",
            "64",
            "--seq-len",
            "32",
            "--eval-tokens",
            "128",
            "--time-budget",
            "25",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    compression = seen["run"].compression
    assert compression.method == recipe.METHOD == "auto" and compression.output_weights is True
    assert compression.auto_methods == list(recipe.AUTO_METHODS) and compression.ratio == 0.65
    run = seen["run"]
    assert run.time_budget == 25 and run.distill.steps == recipe.STEPS  # the budget replaces it in the run
