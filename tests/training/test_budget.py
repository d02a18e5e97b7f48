"""tqc run --time-budget: the steps that fit, measured on the run's own model and settings."""

import copy
import json

import pytest
import torch
from conftest import TOY_TEXT, tiny_gpt2
from typer.testing import CliRunner

from tqcompressor import TQCError
from tqcompressor.cli import app
from tqcompressor.training import recipe
from tqcompressor.training.budget import SAFETY, plan_steps, seconds_after_distillation, seconds_per_step
from tqcompressor.training.distill import DistillConfig


def test_what_is_still_needed_after_distillation_is_the_last_point_the_comparison_and_the_interim_points():
    # one stage: the last point on every window, the comparison's share, a quarter of an evaluation in reserve
    assert seconds_after_distillation(30, 10, stages=1, comparison_evaluations=6) == 30 * (1 + 6 + 0.25) + 5
    # each stage before the last adds one point on the interim windows
    assert seconds_after_distillation(30, 10, stages=3, comparison_evaluations=0) == 30 * 1.25 + 10 * 2 + 5


def test_the_steps_fill_what_is_left_after_the_evaluations_still_to_come():
    after = seconds_after_distillation(30, 10, stages=1, comparison_evaluations=6)
    plan = plan_steps(10, spent=120, step_seconds=2.0, evaluation_seconds=30, after=after, stages=1)
    assert plan.reserved_after_distillation == after and plan.evaluation_seconds == 30
    assert plan.steps_per_stage == int((600 - 120 - after) / (2.0 * SAFETY))
    two = plan_steps(10, spent=120, step_seconds=2.0, evaluation_seconds=30, after=100, stages=2)
    assert two.steps_per_stage == int((600 - 120 - 100) / (2.0 * SAFETY * 2))
    with pytest.raises(TQCError, match="leaves no time to distill") as caught:
        plan_steps(1, spent=50, step_seconds=2.0, evaluation_seconds=30, after=after, stages=1)
    assert "\n" not in str(caught.value)
    least = int(str(caught.value).split("give at least ")[1].split(" min")[0])  # what it asks for fits a step
    assert plan_steps(least, spent=50, step_seconds=2.0, evaluation_seconds=30, after=after, stages=1).steps_per_stage
    with pytest.raises(TQCError, match=f"give at least {least} min"):
        plan_steps(least - 1, spent=50, step_seconds=2.0, evaluation_seconds=30, after=after, stages=1)


def test_block_wise_refits_take_their_time_from_each_stage_before_the_steps():
    plain = plan_steps(10, spent=120, step_seconds=2.0, evaluation_seconds=30, after=100, stages=2)
    refit = plan_steps(10, 120, 2.0, 30, after=100, stages=2, blockwise_seconds=50)
    assert refit.blockwise_seconds_per_stage == 50
    assert refit.steps_per_stage == int((600 - 120 - 100 - 50 * SAFETY * 2) / (2.0 * SAFETY * 2))
    assert refit.steps_per_stage < plain.steps_per_stage
    with pytest.raises(TQCError, match="min to refit blocks"):
        plan_steps(10, 120, 2.0, 30, after=100, stages=2, blockwise_seconds=300)


def test_timing_a_step_changes_no_weight(tokenizer):
    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    student = copy.deepcopy(teacher).requires_grad_(False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = torch.randint(0, len(tokenizer), (2, 16))
    seconds = seconds_per_step(teacher, student, batch, DistillConfig(batch_size=2, seq_len=16, grad_accum=2))
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in student.parameters())


def test_timing_an_on_policy_step_times_the_students_sampling_on_a_copy(tokenizer, monkeypatch):
    from tqcompressor.training import budget

    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    student = copy.deepcopy(teacher).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    sampled_from = []

    def recording(model, tok, config, seed):
        sampled_from.append(model)
        return torch.zeros(config.batch_size, config.seq_len, dtype=torch.long)

    monkeypatch.setattr(budget, "student_samples", recording)
    config = DistillConfig(batch_size=2, seq_len=16, on_policy=0.5)
    assert seconds_per_step(teacher, student, torch.randint(0, 100, (2, 16)), config, tokenizer=tokenizer) > 0
    assert len(sampled_from) == 1 and sampled_from[0] is not student  # a copy samples, once
    assert not student.training and all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    seconds_per_step(teacher, student, torch.randint(0, 100, (2, 16)), DistillConfig(batch_size=2, seq_len=16))
    assert len(sampled_from) == 1  # off-policy steps sample nothing


def budgeted_run(tmp_path, gpt2_dir, teacher_fraction="0", calibration_tokens="0", compare_tokens="0") -> list[str]:
    """The arguments of a `tqc run` of GPT-2 in half a minute's budget, on a toy text written to ``tmp_path``."""
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    args = ["run", "--model", str(gpt2_dir), "--method", "svd", "--ratio", "0.8", "--data", str(tmp_path / "train.txt")]
    args += ["--teacher-fraction", teacher_fraction, "--calibration-tokens", calibration_tokens]
    args += ["--eval-tokens", "128", "--context", "64", "--batch-size", "2", "--seq-len", "32"]
    return [*args, "--compare-tokens", compare_tokens, "--time-budget", "0.5"]


def test_a_budgeted_run_fixes_its_steps_once_and_resumes_with_them(tmp_path, gpt2_dir):
    args = budgeted_run(tmp_path, gpt2_dir)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert results["budget"] == budget and budget["budget"] == 30 and budget["steps_per_stage"] >= 1
    assert results["distill"]["steps"] == budget["steps_per_stage"]
    assert budget["quantized_forward_cost"] == 1.0  # no comparison: nothing quantized was timed
    assert "Time budget: 0.5 min" in (tmp_path / "run" / "report.md").read_text()
    assert results["phase_seconds"][0]["phase"].startswith("distillation data")  # each phase and its seconds
    assert all(phase["seconds"] >= 0 for phase in results["phase_seconds"])
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "budget.json").read_text()) == budget  # kept, not measured again


def test_a_budgeted_run_that_refits_blocks_counts_them_and_says_so(tmp_path, gpt2_dir):
    args = budgeted_run(tmp_path, gpt2_dir, calibration_tokens="256", compare_tokens="64")
    result = CliRunner().invoke(app, [*args, "--blockwise-steps", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert budget["blockwise_seconds_per_stage"] > 0
    assert budget["quantized_forward_cost"] > 0  # timed on windows of the evaluation's shape
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["quantized"]) == 2 + 6  # the comparison the budget counted ran
    assert results["distill"]["blockwise_steps"] == 2
    assert "refitting blocks (stage 1)" in [phase["phase"] for phase in results["phase_seconds"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--time-budget", "0"], "--time-budget must be"),
        (["--time-budget", "nan"], "--time-budget must be"),
        (["--time-budget", "inf"], "--time-budget must be"),
        (["--time-budget", "5", "--steps", "10"], "drop one of them"),
        (["--interim-eval-tokens", "10"], "--interim-eval-tokens must be 512 or more"),
    ],
)
def test_budget_options_are_checked_before_any_work(tmp_path, capsys, extra, message):
    from tqcompressor.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "--model", "missing-model", "--out", str(tmp_path / "o"), *extra])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_comparison_counts_each_quantized_copy_at_its_measured_cost(tokenizer):
    from tqcompressor.evaluation.fidelity import Domain
    from tqcompressor.pipeline import QUANTIZED_FORMATS, comparison_evaluations, comparison_share
    from tqcompressor.training.budget import quantized_forward_cost

    # one float pass of the teacher and one of the student, then six quantized copies (three: a byte budget)
    assert comparison_evaluations(1.0) == (2 + 2 * len(QUANTIZED_FORMATS)) / 2
    assert comparison_evaluations(1.0, quantized_cost=2.5) == (2 + 6 * 2.5) / 2
    assert comparison_evaluations(0.25, student_forms=False, quantized_cost=2.0) == (2 + 3 * 2.0) / 2 / 4
    # the comparison reads the first tokens of the held-out domains; the last point every token of every domain
    sets = {"text": Domain(torch.zeros(4096, dtype=torch.long), False)}
    sets |= {name: Domain(torch.zeros(4096, dtype=torch.long), True) for name in ("a", "b", "c", "d")}
    assert comparison_share(sets, 1024, 512) == 4 * 1024 / (5 * 4096)
    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cost = quantized_forward_cost(teacher, torch.randint(0, len(tokenizer), (2, 16)), QUANTIZED_FORMATS[1])
    assert cost > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # a copy was quantized


def test_steps_that_need_more_teacher_samples_pay_for_sampling_them():
    def sampling(steps: int) -> float:  # the pool holds 10 steps' worth; each step beyond costs 1 s to sample
        return max(0, steps - 10) * 1.0

    plain = plan_steps(10, spent=120, step_seconds=2.0, evaluation_seconds=30, after=100, stages=1)
    paid = plan_steps(10, spent=120, step_seconds=2.0, evaluation_seconds=30, after=100, stages=1, sampling=sampling)
    available = 600 - 120 - 100
    assert plain.sampling_seconds == 0 and paid.sampling_seconds == sampling(paid.steps_per_stage)
    assert paid.steps_per_stage * 2.0 * SAFETY + paid.sampling_seconds <= available  # it fits
    assert (paid.steps_per_stage + 1) * 2.0 * SAFETY + sampling(paid.steps_per_stage + 1) > available  # the most
    assert 10 < paid.steps_per_stage < plain.steps_per_stage
    free = plan_steps(10, 120, 2.0, 30, after=100, stages=1, sampling=lambda steps: 0.0)
    assert free.steps_per_stage == plain.steps_per_stage


def test_a_budgeted_run_grows_its_teacher_pool_to_what_its_steps_take(tmp_path, gpt2_dir, monkeypatch):
    from safetensors.torch import load_file

    from tqcompressor import data

    monkeypatch.setattr(data, "POOL_CHUNK", 2)
    args = budgeted_run(tmp_path, gpt2_dir, teacher_fraction="0.5")
    result = CliRunner().invoke(app, [*args, "--teacher-pool", "40", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    pool = load_file(str(tmp_path / "run" / "teacher_pool-seed0-40x32.safetensors"))["blocks"]
    # a step takes one teacher block (2 x 0.5), each seen at most TEACHER_VIEWS times, in chunks of 2
    views = recipe.TEACHER_VIEWS
    assert budget["teacher_blocks"] == len(pool) == min(40, max(2, 2 * -(-budget["steps_per_stage"] // (2 * views))))
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"The teacher's pool holds {len(pool)} samples for those steps" in report
