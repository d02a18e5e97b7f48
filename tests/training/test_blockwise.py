"""Block-wise reconstruction (tqcompressor.training.blockwise): each student block fitted to its teacher's."""

import copy

import pytest
import torch

import tqcompressor as tqc
from tests.conftest import tiny_llama
from tqcompressor.errors import TQCError
from tqcompressor.planning.config import CompressionConfig
from tqcompressor.surgery.baselines import keep_layers
from tqcompressor.training.blockwise import BlockwiseConfig, block_inputs, estimated_seconds, reconstruct_blocks


def teacher_and_student():
    teacher = tiny_llama(vocab_size=256)
    student, _ = tqc.compress(copy.deepcopy(teacher), CompressionConfig(method="svd", ratio=0.6), progress=False)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids


def kl_to_teacher(student, teacher, ids) -> float:
    with torch.no_grad():
        log_p = teacher(ids).logits.log_softmax(-1)
        log_q = student(ids).logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_each_block_ends_closer_to_its_teacher_and_so_does_the_model():
    teacher, student, ids = teacher_and_student()
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = kl_to_teacher(student, teacher, ids)
    report = reconstruct_blocks(student, teacher, ids, BlockwiseConfig(steps=40, lr=3e-3), progress=False)
    assert [r["block"] for r in report] == [0, 1]
    assert all(r["error_after"] < r["error_before"] for r in report)
    assert kl_to_teacher(student, teacher, ids) < before
    assert all(torch.equal(v, reference[k]) for k, v in teacher.state_dict().items())  # the teacher as it was
    assert all(p.grad is None for p in student.parameters())


def test_zero_steps_changes_nothing_and_reports_the_one_shot_errors():
    teacher, student, ids = teacher_and_student()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    report = reconstruct_blocks(student, teacher, ids, BlockwiseConfig(steps=0), progress=False)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    assert all(r["error_after"] == pytest.approx(r["error_before"]) for r in report)


def test_block_inputs_are_what_the_first_block_sees():
    teacher, _, ids = teacher_and_student()
    caught = block_inputs(teacher, ids, batch_size=4)
    assert len(caught) == 2
    hidden, kwargs = caught[0]
    assert torch.equal(hidden, teacher.model.embed_tokens(ids[:4]))
    assert "position_embeddings" in kwargs


def test_a_student_of_another_depth_is_one_clear_error():
    teacher, _, ids = teacher_and_student()
    shallow = keep_layers(copy.deepcopy(teacher), [0])
    with pytest.raises(TQCError, match="student has 1 blocks and the teacher 2"):
        reconstruct_blocks(shallow, teacher, ids, BlockwiseConfig(steps=1), progress=False)
    with pytest.raises(TQCError, match="steps >= 0"):
        BlockwiseConfig(steps=-1)


class _Stop(Exception):
    pass


def test_a_refit_resumed_after_a_block_ends_as_an_uninterrupted_one():
    teacher, student, ids = teacher_and_student()
    config = BlockwiseConfig(steps=5, lr=3e-3)
    uninterrupted = copy.deepcopy(student)
    reconstruct_blocks(uninterrupted, teacher, ids, config, progress=False)

    def stop(index: int) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        reconstruct_blocks(student, teacher, ids, config, progress=False, on_block_end=stop)  # killed after block 0
    report = reconstruct_blocks(student, teacher, ids, config, progress=False, start=1)
    assert [r["block"] for r in report] == [1]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, student.state_dict()[key]), key


def test_its_time_is_estimated_from_one_timed_block_step():
    _, student, ids = teacher_and_student()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    assert estimated_seconds(student, ids, BlockwiseConfig(steps=5)) > 0
    assert estimated_seconds(student, ids, BlockwiseConfig(steps=0)) == 0
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())  # it timed a copy
