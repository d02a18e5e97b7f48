"""The distillation losses (tqcompressor.training.losses): the chunked logit loss against its textbook form,
and block matching."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tqcompressor.errors import TQCError
from tqcompressor.training.distill import DistillConfig
from tqcompressor.training.losses import (
    block_matching_loss,
    distillation_loss,
    logit_distillation,
    reference_logit_distillation,
)


def _logits(batch, seq, vocab, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(batch, seq, vocab, generator=generator)).to(dtype)
    teacher = (3 * torch.randn(batch, seq, vocab, generator=generator)).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return student, teacher, ids


def _loss_and_grad(loss_fn, student, teacher, ids, *args, scale=1.0, **kwargs):
    student = student.clone().requires_grad_(True)
    total, kl, ce = loss_fn(student, teacher, ids, *args, **kwargs)
    (scale * total).backward()
    return total.detach(), kl, ce, student.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_chunked_logit_loss_equals_the_textbook_form_value_and_gradient(dtype, chunk_rows):
    student, teacher, ids = _logits(3, 7, 50, dtype)
    weights = (2.0, 5.0, 2.0)  # temperature, alpha_kl, alpha_ce
    expected = _loss_and_grad(reference_logit_distillation, student, teacher, ids, *weights, scale=0.5)
    got = _loss_and_grad(logit_distillation, student, teacher, ids, *weights, chunk_rows=chunk_rows, scale=0.5)
    for want, have in zip(expected[:3], got[:3], strict=True):
        assert have.item() == pytest.approx(want.item(), rel=1e-5)
    assert got[3].dtype == dtype  # the gradient comes back in the logits' dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3 * expected[3].abs().max().item()
    torch.testing.assert_close(got[3].float(), expected[3].float(), atol=tolerance, rtol=1e-2)
    assert torch.all(got[3][:, -1] == 0)  # the last position predicts nothing


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.5, 4.0),
    alpha_kl=st.floats(0.0, 5.0),
    alpha_ce=st.floats(0.0, 5.0),
    chunk_rows=st.integers(1, 10),
    reverse_kl=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_chunked_logit_loss_matches_for_any_shape_and_weights(
    batch, seq, vocab, temperature, alpha_kl, alpha_ce, chunk_rows, reverse_kl
):
    student, teacher, ids = _logits(batch, seq, vocab, torch.float64)
    weights = (temperature, alpha_kl, alpha_ce)
    expected = _loss_and_grad(reference_logit_distillation, student, teacher, ids, *weights, reverse_kl=reverse_kl)
    got = _loss_and_grad(
        logit_distillation, student, teacher, ids, *weights, chunk_rows=chunk_rows, reverse_kl=reverse_kl
    )
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_and_mixed_kl_are_the_textbook_divergences_and_their_gradients(dtype):
    student, teacher, ids = _logits(2, 6, 30, dtype)
    temperature = 2.0
    p = torch.softmax(student[:, :-1].double() / temperature, -1)
    q = torch.softmax(teacher[:, :-1].double() / temperature, -1)
    forward = (q * (q.log() - p.log())).sum(-1).mean() * temperature**2
    reverse = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    for share, want in ((0.0, forward), (1.0, reverse), (0.25, 0.75 * forward + 0.25 * reverse)):
        _, kl, _ = logit_distillation(student, teacher, ids, temperature, 1.0, 0.0, chunk_rows=4, reverse_kl=share)
        assert kl.item() == pytest.approx(want.item(), rel=1e-4)
        # the gradient written in the forward pass is autograd's of the textbook form
        expected = _loss_and_grad(reference_logit_distillation, student, teacher, ids, 2.0, 5.0, 1.0, reverse_kl=share)
        got = _loss_and_grad(logit_distillation, student, teacher, ids, 2.0, 5.0, 1.0, chunk_rows=4, reverse_kl=share)
        tolerance = 1e-6 if dtype == torch.float32 else 2e-3 * expected[3].abs().max().item()
        torch.testing.assert_close(got[3].float(), expected[3].float(), atol=tolerance, rtol=1e-2)
    # reverse KL seeks a mode: a student sure of the teacher's top token scores lower in reverse than forward
    sure = torch.zeros(1, 2, 3)
    sure[0, 0] = torch.tensor([20.0, 0.0, 0.0])
    unsure = torch.zeros(1, 2, 3)
    unsure[0, 0] = torch.tensor([1.0, 0.9, 0.0])
    two = torch.zeros(1, 2, dtype=torch.long)
    _, kl_forward, _ = logit_distillation(sure, unsure, two, 1.0, 1.0, 0.0, reverse_kl=0.0)
    _, kl_reverse, _ = logit_distillation(sure, unsure, two, 1.0, 1.0, 0.0, reverse_kl=1.0)
    assert kl_reverse < kl_forward


def test_kl_of_a_student_equal_to_its_teacher_is_zero_and_no_gradient_is_kept_without_grad():
    _, teacher, ids = _logits(2, 5, 30, torch.float32)
    before = teacher.clone()
    total, kl, ce = logit_distillation(teacher, teacher, ids, 2.0, 1.0, 0.0)
    assert torch.equal(teacher, before)  # fp32 logits are read, never scaled in place
    assert abs(kl.item()) < 1e-6 and total.item() == pytest.approx(kl.item())
    assert ce.item() > 0
    assert not total.requires_grad


def test_distillation_loss_uses_the_chunked_form_unless_asked_for_the_textbook_one():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    student, teacher, ids = _logits(2, 6, 40, torch.float32)
    parts = {
        chunked: distillation_loss(Out(student), Out(teacher), ids, DistillConfig(chunked_loss=chunked))
        for chunked in (True, False)
    }
    assert set(parts[True]) == {"kl", "ce", "loss"}
    for name in ("kl", "ce", "loss"):
        assert parts[True][name].item() == pytest.approx(parts[False][name].item(), rel=1e-5)


def test_logit_loss_refuses_mismatched_vocabularies_and_single_token_blocks():
    student, teacher, ids = _logits(1, 4, 10, torch.float32)
    with pytest.raises(TQCError, match="same tokenizer"):
        logit_distillation(student, teacher[..., :9], ids, 2.0, 1.0, 1.0)
    with pytest.raises(TQCError, match="one token"):
        logit_distillation(student[:, :1], teacher[:, :1], ids[:, :1], 2.0, 1.0, 1.0)


def test_block_matching_loss_is_zero_for_the_teacher_and_normalised_per_token():
    torch.manual_seed(0)
    teacher_states = tuple(torch.randn(2, 5, 8) for _ in range(3))  # embeddings + two blocks
    assert block_matching_loss(teacher_states, teacher_states) == 0
    # a student off by 10% on every token of every block: 0.01, however large a token's hidden state
    scaled = tuple(t.clone() for t in teacher_states)
    for t in scaled:
        t[:, 0] *= 1000  # one huge token (as the first token of LLaMA-family models)
    student = tuple(t * 1.1 for t in scaled)
    assert block_matching_loss(student, scaled).item() == pytest.approx(0.01, rel=1e-4)
    # the embedding output (index 0) is not a block's: it is left out
    moved = (teacher_states[0] + 1, *teacher_states[1:])
    assert block_matching_loss(moved, teacher_states) == 0
    with pytest.raises(TQCError, match="layer dropping changes the depth"):
        block_matching_loss(teacher_states[:2], teacher_states)
