import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOY_TEXT, tiny_gpt2

import tqcompressor as tqc
from tqcompressor import CompressionConfig, TQCError
from tqcompressor.data import text_block_source
from tqcompressor.training import distill
from tqcompressor.training.distill import (
    DistillConfig,
    is_on_policy_step,
    multistep_distill,
    teacher_weights_dtype,
    training_precision,
)

REPO = Path(__file__).resolve().parents[2]


def setup(tmp_path, tokenizer):
    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    blocks = text_block_source(str(tmp_path / "train.txt"), tokenizer, 32)
    plan = tqc.plan_compression(teacher, CompressionConfig(method="tq", ratio=0.8, steps=2))
    config = DistillConfig(
        steps=6,
        batch_size=2,
        seq_len=32,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=2,
        log_every=1,
        alpha_hidden=0.5,
        alpha_ce=0.0,
    )  # random teacher: match it, not the text
    return teacher, blocks, plan, config


@pytest.mark.parametrize("precision", ["no", "bf16"])  # both, whatever this CPU computes natively
def test_multistep_distillation_lowers_kd_loss_and_logs(tmp_path, tokenizer, precision):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    config = DistillConfig(**{**vars(config), "mixed_precision": precision})
    stages_seen = []
    student = multistep_distill(
        teacher,
        copy.deepcopy(teacher),
        blocks,
        config,
        tmp_path / "run",
        plan,
        tokenizer=tokenizer,
        on_stage_end=lambda s, m: stages_seen.append(s),
        progress=False,
    )
    assert stages_seen == [1, 2]
    # accelerate's autocast wrapper is gone: what follows training (evaluation, timing) runs in fp32
    assert student.forward.__func__ is type(student).forward and "_original_forward" not in vars(student)
    assert tqc.count_parameters(student) <= 0.8 * tqc.count_parameters(teacher)
    records = [json.loads(entry) for entry in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == list(range(1, 13))
    assert {"loss", "kl", "ce", "hidden", "lr", "tokens_per_s"} <= set(records[0])
    # distillation brings the student closer to the teacher than compression alone leaves it
    from tqcompressor.evaluation.evaluate import evaluate

    ids = next(blocks(0))
    one_shot = copy.deepcopy(teacher)
    tqc.apply_plan(one_shot, plan, progress=False)
    before = evaluate(one_shot, ids, context=32, teacher=teacher, progress=False)["kl_to_teacher"]
    after = evaluate(student, ids, context=32, teacher=teacher, progress=False)["kl_to_teacher"]
    assert after < before
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.pt").is_file()


def test_a_half_precision_teacher_trains_the_student_and_leaves_the_callers_teacher_as_it_was(tmp_path, tokenizer):
    teacher, blocks, _, config = setup(tmp_path, tokenizer)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = DistillConfig(**{**vars(config), "teacher_dtype": "bf16", "alpha_hidden": 0.0, "alpha_kl": 1.0})
    multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "run", progress=False)
    after = teacher.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert teacher_weights_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert teacher_weights_dtype("auto", torch.device("cpu")) == torch.float32  # exact where casts are cheap
    assert teacher_weights_dtype("fp16", torch.device("cpu")) == torch.float16  # what the user asks for wins


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it():
    assert training_precision("auto", cuda=True, cpu_bf16=False) == "bf16"
    assert training_precision("auto", cuda=False, cpu_bf16=True) == "bf16"
    assert training_precision("auto", cuda=False, cpu_bf16=False) == "no"  # emulated bf16 is slower than fp32
    assert training_precision("no", cuda=True, cpu_bf16=True) == "no"  # what the user asks for wins
    assert training_precision("fp16", cuda=False, cpu_bf16=False) == "fp16"
    assert training_precision("auto") in ("bf16", "no")  # this machine's answer


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tokenizer):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    full = multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "full", plan, progress=False)
    # interrupted after 4 optimizer steps (mid stage 1? no: stage 1 has 6; 8 = mid stage 2)
    for stop in (4, 8):
        run = tmp_path / f"cut{stop}"
        multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, stop_after=stop, progress=False)
        resumed = multistep_distill(
            teacher, copy.deepcopy(teacher), blocks, config, run, plan, resume=True, progress=False
        )
        full_state, resumed_state = full.state_dict(), resumed.state_dict()
        assert full_state.keys() == resumed_state.keys()
        for key in full_state:
            assert torch.equal(full_state[key], resumed_state[key]), key
        steps = [json.loads(entry)["global_step"] for entry in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 13))  # no step lost or repeated


def test_blocks_are_refit_before_each_stage_and_a_run_killed_while_refitting_resumes_to_the_same_result(
    tmp_path, tokenizer, monkeypatch
):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    config = dataclasses.replace(config, blockwise_steps=3, blockwise_lr=1e-3, alpha_hidden=0.0)
    seen = []
    real = distill.reconstruct_blocks

    def counting(*args, **kwargs):
        seen.append(kwargs.get("start", args[5] if len(args) > 5 else 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "reconstruct_blocks", counting)
    full = multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "full", plan, progress=False)
    assert seen == [0, 0]  # before each of the two stages, from the first block
    plain = dataclasses.replace(config, blockwise_steps=0)
    without = multistep_distill(teacher, copy.deepcopy(teacher), blocks, plain, tmp_path / "no", plan, progress=False)
    assert any(not torch.equal(v, without.state_dict()[k]) for k, v in full.state_dict().items())

    class Killed(Exception):
        pass

    def killed_after_the_first_block(*args, **kwargs):
        done = args[6] if len(args) > 6 else kwargs["on_block_end"]

        def then_killed(index: int) -> None:
            done(index)
            raise Killed

        return real(*args[:6], then_killed, **{k: v for k, v in kwargs.items() if k != "on_block_end"})

    monkeypatch.setattr(distill, "BLOCK_CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every block
    monkeypatch.setattr(distill, "reconstruct_blocks", killed_after_the_first_block)
    with pytest.raises(Killed):
        multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "cut", plan, progress=False)
    seen.clear()
    monkeypatch.setattr(distill, "reconstruct_blocks", counting)
    resumed = multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "cut", plan, resume=True, progress=False
    )
    assert seen == [1, 0]  # the second block of stage 1, not the first again; then all of stage 2's
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_on_policy_steps_are_the_share_asked_for_spread_evenly():
    assert [is_on_policy_step(k, 0.25) for k in range(8)] == [False, False, False, True] * 2
    assert not any(is_on_policy_step(k, 0.0) for k in range(50))
    assert all(is_on_policy_step(k, 1.0) for k in range(50))
    assert sum(is_on_policy_step(k, 0.3) for k in range(100)) == 30


def test_on_policy_steps_train_on_the_students_samples_and_resume_to_the_same_result(tmp_path, tokenizer, monkeypatch):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    config = DistillConfig(**{**vars(config), "on_policy": 0.5, "reverse_kl": 0.5, "seq_len": 16})
    sampled = []
    real_samples = distill.student_samples

    def recording(student, tok, cfg, seed):
        batch = real_samples(student, tok, cfg, seed)
        assert student.training  # back in training mode, as the step expects
        sampled.append(batch)
        return batch

    monkeypatch.setattr(distill, "student_samples", recording)
    full = multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "full", plan, tokenizer=tokenizer, progress=False
    )
    assert len(sampled) == 6  # every other step of 2 stages x 6
    assert all(b.shape == (2, 16) and b.dtype == torch.long for b in sampled)
    state = torch.load(tmp_path / "full" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["data_position"] == 6 * 2  # the data stream gave only the other steps' blocks
    run = tmp_path / "cut"
    multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, run, plan, tokenizer=tokenizer, stop_after=5, progress=False
    )
    resumed = multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, run, plan, tokenizer=tokenizer, resume=True, progress=False
    )
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    with pytest.raises(TQCError, match="give the run its tokenizer"):
        multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "no-tok", plan, progress=False)
    assert not (tmp_path / "no-tok").exists()  # refused before any work


def test_resume_refuses_another_runs_checkpoint_or_an_empty_dir(tmp_path, tokenizer):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "a", plan, stop_after=2, progress=False
    )
    other = DistillConfig(**{**config.__dict__, "lr": 5e-4})
    with pytest.raises(TQCError, match="another run"):
        multistep_distill(
            teacher, copy.deepcopy(teacher), blocks, other, tmp_path / "a", plan, resume=True, progress=False
        )
    with pytest.raises(TQCError, match="nothing to resume"):
        multistep_distill(
            teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "b", plan, resume=True, progress=False
        )


def test_toy_scale_recipe_runs_end_to_end(tmp_path, tokenizer, gpt2_dir):
    """recipes/gpt2-tq.yaml at toy scale: the same plan and loss settings, a tiny model, a few steps."""
    from typer.testing import CliRunner

    from tqcompressor.cli import app

    recipe = yaml.safe_load((REPO / "recipes" / "gpt2-tq.yaml").read_text())
    assert recipe["model"] == "gpt2" and recipe["fraction"] == pytest.approx(0.031)
    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    (tmp_path / "eval.txt").write_text(TOY_TEXT)
    args = [
        "run",
        "--model",
        str(gpt2_dir),
        "--method",
        recipe["method"],
        "--ratio",
        "0.8",
        "--stages",
        str(recipe["stages"]),
        "--data",
        str(tmp_path / "train.txt"),
        "--eval-data",
        str(tmp_path / "eval.txt"),
        "--eval-tokens",
        "200",
        "--context",
        "64",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    labels = [p["label"] for p in results["points"]]
    assert labels[:2] == ["teacher", "compressed (no KD)"] and f"after KD stage {recipe['stages']}" in labels
    assert results["complete"] and (tmp_path / "run" / "perplexity.png").stat().st_size > 1000
    assert "perplexity" in (tmp_path / "run" / "report.md").read_text()
    assert tqc.load(tmp_path / "run" / "model") is not None


def test_cli_distill_bad_inputs(tmp_path, gpt2_dir, tokenizer):
    from tests.conftest import run_cli as run  # the real entry point, in this process

    other = tiny_gpt2(vocab_size=300)
    tqc.save(other, tmp_path / "student")

    r = run("distill", "--teacher", str(gpt2_dir), "--student", str(tmp_path / "student"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not match the teacher" in r.stderr
    good = tiny_gpt2(vocab_size=len(tokenizer))
    tqc.save(good, tmp_path / "good")
    r = run(
        "distill",
        "--teacher",
        str(gpt2_dir),
        "--student",
        str(tmp_path / "good"),
        "--out",
        str(tmp_path / "o"),
        "--data",
        str(tmp_path / "missing.txt"),
        "--seq-len",
        "32",
    )
    assert r.returncode == 2 and "no text files" in r.stderr
    r = run(
        "distill",
        "--teacher",
        str(gpt2_dir),
        "--student",
        str(tmp_path / "good"),
        "--out",
        str(tmp_path / "o"),
        "--seq-len",
        "100000",
    )
    assert r.returncode == 2 and "exceeds the model's context" in r.stderr
    (tmp_path / "t.txt").write_text(TOY_TEXT)
    r = run(
        "distill",
        "--teacher",
        str(gpt2_dir),
        "--student",
        str(tmp_path / "good"),
        "--out",
        str(tmp_path / "o2"),
        "--data",
        str(tmp_path / "t.txt"),
        "--seq-len",
        "32",
        "--resume",
    )
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    # block matching with a layer-dropped student: refused before the teacher samples any data
    from tqcompressor.surgery.baselines import keep_layers

    dropped = tiny_gpt2(vocab_size=len(tokenizer))
    keep_layers(dropped, [0])
    tqc.save(dropped, tmp_path / "dropped")
    args = ["--teacher", str(gpt2_dir), "--student", str(tmp_path / "dropped"), "--out", str(tmp_path / "o3")]
    r = run("distill", *args, "--seq-len", "32", "--alpha-blocks", "1")
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert r.returncode == 2 and errors == [  # one line (beside transformers' weight-loading bar)
        "error: alpha-blocks and blockwise-steps pair each block with the teacher's, but the student has 1 "
        "blocks and the teacher 2 (layer dropping changes the depth): set both to 0"
    ]
    assert not list((tmp_path / "o3").glob("teacher_*"))


def test_resumed_calibrated_svd_run_fits_later_stages_activation_aware(tmp_path, tokenizer):
    """A resumed run (a new process that plans again) compresses its later stages exactly as an uninterrupted one:
    activation-aware fits to the distilled student."""
    teacher, blocks, _, config = setup(tmp_path, tokenizer)
    compression = CompressionConfig(method="svd", ratio=0.8, steps=2)
    calibration = torch.stack([next(blocks(0)) for _ in range(1)] + [b for b, _ in zip(blocks(1), range(3))])
    runs = {}
    for label in ("straight", "resumed"):
        student = copy.deepcopy(teacher)
        plan = tqc.plan_compression(student, compression, calibration)
        out = tmp_path / label
        if label == "resumed":
            multistep_distill(
                teacher, student, blocks, config, out, plan, stop_after=3, progress=False, calibration=calibration
            )
            # a fresh process plans again; the stage-1 factors it fitted are not in the checkpoint
            student, plan = (
                copy.deepcopy(teacher),
                tqc.plan_compression(copy.deepcopy(teacher), compression, calibration),
            )
        runs[label] = multistep_distill(
            teacher,
            student,
            blocks,
            config,
            out,
            plan,
            resume=label == "resumed",
            progress=False,
            calibration=calibration,
        )
    for (name, a), (_, b) in zip(runs["straight"].named_parameters(), runs["resumed"].named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "-1", "lr must be a positive learning rate, got -1.0"),
        ("--steps", "0", "steps must be positive, got 0"),
        ("--batch-size", "-2", "batch-size must be positive, got -2"),
        ("--seq-len", "0", "seq-len must be positive, got 0"),
        ("--grad-accum", "0", "grad-accum must be positive, got 0"),
        ("--checkpoint-every", "0", "checkpoint-every must be positive, got 0"),
        ("--temperature", "0", "temperature must be positive, got 0.0"),
        ("--alpha-blocks", "-1", "alpha-blocks must be 0 or more, got -1.0"),
        ("--reverse-kl", "1.5", "reverse-kl is a share: give a number from 0 to 1, got 1.5"),
        ("--on-policy", "-0.5", "on-policy is a share: give a number from 0 to 1, got -0.5"),
        ("--mixed-precision", "fp8", "mixed-precision must be auto, bf16, fp16 or no, got 'fp8'"),
    ],
)
def test_distillation_settings_that_cannot_work_get_one_line(tmp_path, gpt2_dir, option, value, message):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tqcompressor.cli import main; main()",
            "distill",
            "--teacher",
            str(gpt2_dir),
            "--student",
            str(gpt2_dir),
            "--out",
            str(tmp_path / "o"),
            option,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr
    assert not (tmp_path / "o" / "model").exists()


def test_metrics_hold_each_step_once_after_an_interruption_between_checkpoints(tmp_path, tokenizer):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    run = tmp_path / "run"
    # checkpoints every 2 steps: stopping after 3 loses step 3, which the resumed run does again
    multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, stop_after=3, progress=False)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"stage": 1, "step": 4, "glo')  # a line cut off by the kill
    multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, resume=True, progress=False)
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, stop_after=2, progress=False)
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # a fresh run in the same directory starts a fresh log


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_says_which_file(tmp_path, tokenizer):
    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    full = multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "full", plan, progress=False)
    run = tmp_path / "cut"
    # checkpoints after steps 2 and 4; the one of step 4 is then damaged (a disk error, a bad copy)
    multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, stop_after=5, progress=False)
    assert (run / "checkpoint.previous" / "trainer_state.pt").is_file()
    (run / "checkpoint" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    resumed = multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, resume=True, progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name  # from step 2 the run is the same
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    # nothing readable left: one line naming the damaged files
    for name in ("checkpoint", "checkpoint.previous"):
        (run / name / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(TQCError, match=r"cannot read the checkpoint .*checkpoint \(.*damaged"):
        multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, run, plan, resume=True, progress=False)


def test_distillation_with_block_matching_lowers_it_on_both_families(tmp_path, tokenizer):
    from conftest import tiny_llama

    from tqcompressor.training.losses import block_matching_loss

    (tmp_path / "train.txt").write_text(TOY_TEXT * 3)
    blocks = text_block_source(str(tmp_path / "train.txt"), tokenizer, 32)
    ids = next(blocks(0)).unsqueeze(0)
    for build in (tiny_gpt2, tiny_llama):
        teacher = build(vocab_size=len(tokenizer))
        student = copy.deepcopy(teacher)
        tqc.apply_plan(student, tqc.plan_compression(student, CompressionConfig(method="svd", ratio=0.6)))

        def blocks_error(model, teacher=teacher):
            with torch.no_grad():
                s, t = (m(ids, output_hidden_states=True).hidden_states for m in (model, teacher))
            return block_matching_loss(s, t).item()

        before = blocks_error(student)
        config = DistillConfig(
            steps=8, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, alpha_kl=0, alpha_ce=0, alpha_blocks=1
        )
        run = tmp_path / build.__name__
        student = multistep_distill(teacher, student, blocks, config, run, progress=False)
        assert blocks_error(student) < 0.7 * before
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "blocks" in records[0]


def test_block_matching_refuses_a_student_of_another_depth_before_any_work(tmp_path, tokenizer):
    from tqcompressor.surgery.baselines import keep_layers

    (tmp_path / "train.txt").write_text(TOY_TEXT)
    blocks = text_block_source(str(tmp_path / "train.txt"), tokenizer, 32)
    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    student = copy.deepcopy(teacher)
    keep_layers(student, [0])
    config = DistillConfig(steps=2, batch_size=2, seq_len=32, alpha_blocks=1.0)
    with pytest.raises(TQCError, match="the student has 1 blocks and the teacher 2"):
        multistep_distill(teacher, student, blocks, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_loss_that_stops_being_finite_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tokenizer, monkeypatch
):
    from tqcompressor.training import distill

    teacher, blocks, plan, config = setup(tmp_path, tokenizer)
    real_loss, calls = distill.distillation_loss, []

    def diverging(*args, **kwargs):  # finite for three optimizer steps, then NaN
        parts = real_loss(*args, **kwargs)
        calls.append(1)
        return {**parts, "loss": parts["loss"] * float("nan")} if len(calls) > 3 else parts

    monkeypatch.setattr(distill, "distillation_loss", diverging)
    with pytest.raises(TQCError, match="loss became nan at step 4.*last good checkpoint") as caught:
        multistep_distill(teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "run", plan, progress=False)
    assert "\n" not in str(caught.value)
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 2  # checkpoint_every=2: the step-2 checkpoint, never a NaN one
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [1, 2, 3]  # valid JSON: no NaN was logged
    monkeypatch.setattr(distill, "distillation_loss", real_loss)
    student = multistep_distill(
        teacher, copy.deepcopy(teacher), blocks, config, tmp_path / "run", plan, resume=True, progress=False
    )
    assert all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("temperature", float("nan")), ("seed", -1)])
def test_non_finite_and_out_of_range_settings_are_refused(field, value):
    with pytest.raises(TQCError, match=field):
        DistillConfig(**{field: value})
