"""tqc run --max-bytes: a byte budget planned over formats and structures, the factors distilled, the model
saved as planned (its weights within the budget), resumable; tqc run --max-kl: the smallest such plan within a
fidelity target, found by measuring each candidate."""

import json

from conftest import TOY_TEXT, run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor.cli import app
from tqcompressor.planning.formats import measure_formats
from tqcompressor.quant.api import quantized_layers


def stored_bytes(directory) -> int:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as stored:
        return sum(stored.get_tensor(k).numel() * stored.get_tensor(k).element_size() for k in stored.keys())


def byte_run(tmp_path, gpt2_dir, budget: int | None, *extra: str):
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    target = ["--max-bytes", str(budget)] if budget is not None else []
    args = ["run", "--model", str(gpt2_dir), *target, "--steps", "3", "--blockwise-steps", "2"]
    args += ["--data", str(tmp_path / "train.txt"), "--teacher-fraction", "0", "--calibration-tokens", "128"]
    args += ["--eval-data", str(tmp_path / "train.txt"), "--eval-tokens", "256", "--context", "64"]
    args += ["--interim-eval-tokens", "128", "--compare-tokens", "128", "--checkpoint-every", "1"]
    args += ["--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "run"), *extra]
    return CliRunner().invoke(app, args)


def test_a_byte_budget_below_every_format_distils_factors_and_saves_the_planned_bytes(tmp_path, gpt2_dir):
    budget = measure_formats(AutoModelForCausalLM.from_pretrained(gpt2_dir)).smallest - 1  # factors needed
    result = byte_run(tmp_path, gpt2_dir, budget, "--structures", "svd")
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "mixed" and results["max_bytes"] == budget and results["structures"] == ["svd"]
    plan = results["byte_plan"]
    assert plan["total_bytes"] <= budget and any(f.startswith("svd ") for f in plan["layers"].values())
    assert not any(f.endswith("hqq") for f in plan["layers"].values())  # the recipe's formats: round-to-nearest
    assert stored_bytes(out / "model") == results["bytes"] == plan["total_bytes"]  # the saved model is the plan
    labels = [p["label"] for p in results["points"]]
    assert labels == ["teacher", "compressed (no KD)", "after KD stage 1"]
    assert any(p["phase"].startswith("distilling") for p in results["phase_seconds"])
    # the comparison: the teacher in each format beside the student as stored, no re-quantized student
    assert [q["format"] for q in results["quantized"] if q["model"] == "student"] == ["as planned"]
    reopened = tqc.load(out / "model")
    assert set(quantized_layers(reopened)) == set(plan["layers"])  # every planned matrix stored in its format
    report = (out / "report.md").read_text()
    assert f"within {budget / 2**20:.1f} MiB" in report and "stored as factors" in report


def test_a_byte_run_resumes_from_its_checkpoint_to_the_same_model(tmp_path, gpt2_dir):
    budget = measure_formats(AutoModelForCausalLM.from_pretrained(gpt2_dir)).smallest - 1
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = byte_run(tmp_path / "a", gpt2_dir, budget, "--structures", "svd")
    assert whole.exit_code == 0, whole.output
    first = byte_run(tmp_path / "b", gpt2_dir, budget, "--structures", "svd")
    assert first.exit_code == 0, first.output
    results = tmp_path / "b" / "run" / "results.json"
    kept = json.loads(results.read_text())
    kept["points"] = kept["points"][:2]  # as if stopped before the final point: the checkpoint is the last step
    results.write_text(json.dumps(kept))
    again = byte_run(tmp_path / "b", gpt2_dir, budget, "--structures", "svd", "--resume")
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / d / "run" / "results.json").read_text()) for d in "ab")
    assert a["points"][-1]["fidelity_kl"] == b["points"][-1]["fidelity_kl"]
    assert stored_bytes(tmp_path / "b" / "run" / "model") == a["bytes"]


def test_byte_budget_options_that_would_be_ignored_are_one_line(tmp_path, gpt2_dir):
    cases = [
        (["--max-bytes", "1MiB", "--ratio", "0.5"], "--ratio"),
        (["--max-bytes", "1MiB", "--method", "svd"], "--method"),
        (["--structures", "svd"], "give one of them too"),
        (["--max-bytes", "1MiB", "--max-kl", "0.1"], "give one target"),
        (["--max-kl", "0.1", "--ratio", "0.5"], "--max-kl plans every matrix in bytes; --ratio"),
        (["--max-kl", "-1"], "--max-kl"),
        (["--max-kl", "nan"], "--max-kl"),
        (["--max-bytes", "lots"], "--max-bytes takes a size"),
        (["--max-bytes", "1MiB", "--structures", "nope"], "nope"),
    ]
    for options, words in cases:
        result = run_cli("run", "--model", gpt2_dir, *options, "--out", tmp_path / "r")
        assert result.returncode == 2 and words in result.stderr, (options, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "r").exists()


def test_a_fidelity_target_distils_the_smallest_plan_within_it_or_states_the_gap(tmp_path, gpt2_dir):
    (tmp_path / "loose").mkdir(), (tmp_path / "tight").mkdir()
    loose = byte_run(tmp_path / "loose", gpt2_dir, None, "--max-kl", "1e9")
    assert loose.exit_code == 0, loose.output
    results = json.loads((tmp_path / "loose" / "run" / "results.json").read_text())
    search = results["max_kl_search"]
    assert results["method"] == "mixed" and results["max_kl"] == 1e9 and search["met"]
    assert len(search["tried"]) == 1 and search["bytes"] == results["bytes"]  # the smallest plan met it at once
    assert stored_bytes(tmp_path / "loose" / "run" / "model") == results["bytes"]
    assert "<= --max-kl 1e+09 after distillation" in loose.output
    assert "the smallest model within fidelity KL 1e+09" in (tmp_path / "loose" / "run" / "report.md").read_text()
    tight = byte_run(tmp_path / "tight", gpt2_dir, None, "--max-kl", "1e-9")
    assert tight.exit_code == 0, tight.output  # the closest model is saved, and the gap stated
    results = json.loads((tmp_path / "tight" / "run" / "results.json").read_text())
    assert not results["max_kl_search"]["met"] and results["bytes"] > search["bytes"]
    assert "target not met" in tight.output and (tmp_path / "tight" / "run" / "model").is_dir()
