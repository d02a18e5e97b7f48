"""Distillation on two real processes (torchrun, gloo on CPU) against one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import TOY_TEXT, tiny_gpt2

import tqcompressor as tqc
from tqcompressor import CompressionConfig

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_command(processes: int, teacher, student, data, out, batch_size: int, steps: int, *extra) -> list[str]:
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            "-m",
            "tqcompressor.cli",
        ]
        if processes > 1
        else [sys.executable, "-c", "from tqcompressor.cli import main; main()"]
    )
    # text only: the teacher-sample pool's size follows the per-process batch, which differs between the runs
    return launcher + [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(data),
        "--teacher-fraction",
        "0",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--seq-len",
        "32",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "2",
        *extra,
    ]


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture
def setup(tmp_path, tokenizer):
    # no dropout: the random masks would differ between one and two processes, hiding what is compared
    model = tiny_gpt2(vocab_size=len(tokenizer))
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    gpt2_dir = tmp_path / "teacher"
    model.save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    teacher = tqc.load_model(str(gpt2_dir))
    student, _ = tqc.compress(teacher.model, CompressionConfig(method="svd", ratio=0.8), progress=False)
    tqc.save(student, tmp_path / "student", teacher.tokenizer)
    (tmp_path / "train.txt").write_text(TOY_TEXT * 4)
    return gpt2_dir, tmp_path / "student", tmp_path / "train.txt"


# equivalence is checked in fp32: under bf16 autocast (the default on a CPU with native bf16) one
# process and two round their sums differently, far above these tolerances
FP32 = ("--mixed-precision", "no")


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_follow_the_single_process_schedule_and_result(tmp_path, setup):
    teacher, student, data = setup
    one, two = tmp_path / "one", tmp_path / "two"
    # the same global batch: one process x 2 blocks, or two processes x 1 block (each reading its own)
    r1 = subprocess.run(
        distill_command(1, teacher, student, data, one, 2, 6, *FP32, "--log-every", "1"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=600,
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run(
        distill_command(2, teacher, student, data, two, 1, 6, *FP32, "--log-every", "1"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    single, double = metrics(one), metrics(two)
    assert [m["global_step"] for m in double] == list(range(1, 7))  # rank 0 alone logs, each step once
    assert [m["lr"] for m in double] == pytest.approx([m["lr"] for m in single])  # the schedule, not N times faster
    assert [m["kl"] for m in double] == pytest.approx([m["kl"] for m in single], rel=1e-4)  # the global batch's
    a, b = tqc.load(one / "model").state_dict(), tqc.load(two / "model").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert not list(two.glob("*.partial")) and (two / "checkpoint" / "trainer_state.pt").is_file()


def test_each_process_reads_its_own_blocks():
    from types import SimpleNamespace

    from tqcompressor.training.distill import _sharded

    seen = [list(_sharded(iter(range(12)), SimpleNamespace(num_processes=3, process_index=rank))) for rank in range(3)]
    assert seen == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_two_processes_resume_after_a_kill_without_losing_or_repeating_a_step(tmp_path, setup):
    teacher, student, data = setup
    steps = 120
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = subprocess.run(
        distill_command(2, teacher, student, data, full, 1, steps),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run = subprocess.Popen(
        distill_command(2, teacher, student, data, cut, 1, steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (cut / "checkpoint.previous" / "trainer_state.pt").is_file() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # every process of the run, mid-training
    run.wait()
    assert not (cut / "model").exists(), "the run finished before it was killed; raise `steps`"
    r = subprocess.run(
        distill_command(2, teacher, student, data, cut, 1, steps, "--resume"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["global_step"] for m in metrics(cut)] == [m["global_step"] for m in metrics(full)]
    a, b = tqc.load(full / "model").state_dict(), tqc.load(cut / "model").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
