"""The distillation losses, as pure functions of model outputs.

The KL and cross-entropy terms on next-token logits are computed by :class:`LogitDistillation`, which
walks the logits a few rows at a time and writes the gradient in the same pass: a batch's logits over
a 49k vocabulary are hundreds of MB, and the textbook form (``log_softmax`` of student and teacher,
``kl_div``, ``cross_entropy``, then autograd through each) reads and writes them about fifteen times,
which cost twice the matrix products of the whole model on 2 CPU cores (bench/results/throughput/throughput.json
has the profile). Chunked, each row block stays in cache; the fp32 copies of the whole batch's logits
are never made.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tqcompressor.errors import TQCError


class LossWeights(Protocol):
    """What :func:`distillation_loss` reads from a config (``DistillConfig`` has these fields)."""

    temperature: float
    alpha_kl: float
    alpha_ce: float
    reverse_kl: float
    alpha_hidden: float
    alpha_blocks: float
    chunked_loss: bool


# rows of logits per chunk: small enough to stay in a CPU core's cache at a 50k vocabulary (16 x 49152 x 4 B =
# 3 MB), large enough on a GPU that a chunk's kernels are not launch-bound
CHUNK_ROWS = {"cpu": 16, "cuda": 2048}


class LogitDistillation(torch.autograd.Function):
    """``alpha_kl * T² * D + alpha_ce * CE(s, next token)``, averaged over the predicted positions, for
    logits ``s`` (student) and ``t`` (teacher) of shape (batch, seq, vocab), with ``p = softmax(s/T)``,
    ``q = softmax(t/T)`` and ``D = (1 − r)·KL(q ‖ p) + r·KL(p ‖ q)``: the forward KL, the reverse KL
    (``r = 1``, mode-seeking, as in MiniLLM and generalized KD) or a mix. Position i predicts token i + 1,
    so the last position of each row is not scored.

    Returns the weighted loss (differentiable in ``s``) and its two terms (detached, for logging). The
    gradient, ``alpha_kl·T·[(1 − r)·(p − q) + r·p⊙(log p − log q − KL(p ‖ q))] + alpha_ce·(softmax(s) −
    onehot)`` over the number of positions, is computed in the forward pass, chunk by chunk, and kept in
    ``s``'s dtype.
    """

    @staticmethod
    def forward(
        ctx, s, t, input_ids, temperature: float, alpha_kl: float, alpha_ce: float, chunk_rows: int, reverse: float
    ):
        batch, seq, _ = s.shape
        positions = batch * (seq - 1)
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s) if needs_grad else None
        if needs_grad:
            grad[:, -1] = 0  # the last position predicts nothing
        kl_total = torch.zeros((), dtype=torch.float64, device=s.device)
        ce_total = torch.zeros((), dtype=torch.float64, device=s.device)
        kl_scale, ce_scale = alpha_kl * temperature / positions, alpha_ce / positions
        for row in range(batch):
            for start in range(0, seq - 1, chunk_rows):
                stop = min(start + chunk_rows, seq - 1)
                # fp32 copies (never views: they are divided in place)
                student = s[row, start:stop].to(torch.float32, copy=True)
                teacher = t[row, start:stop].to(torch.float32, copy=True)
                targets = input_ids[row, start + 1 : stop + 1, None]
                student_log_probs = torch.log_softmax(student, -1)
                student_log_soft = torch.log_softmax(student.div_(temperature), -1)
                teacher_log_soft = torch.log_softmax(teacher.div_(temperature), -1)
                teacher_soft = teacher_log_soft.exp()
                ce_total -= student_log_probs.gather(1, targets).sum(dtype=torch.float64)
                if reverse > 0:
                    student_soft = student_log_soft.exp()
                    log_ratio = student_log_soft.sub_(teacher_log_soft)  # log p − log q (in place: p is kept)
                    reverse_rows = (student_soft * log_ratio).sum(-1, keepdim=True)
                    forward_kl = -(teacher_soft * log_ratio).sum(dtype=torch.float64)
                    kl_total += (1 - reverse) * forward_kl + reverse * reverse_rows.sum(dtype=torch.float64)
                    if needs_grad:
                        chunk_grad = log_ratio.sub_(reverse_rows).mul_(student_soft).mul_(reverse)
                        chunk_grad.add_(student_soft.sub_(teacher_soft), alpha=1 - reverse).mul_(kl_scale)
                else:
                    kl_total += (teacher_soft * (teacher_log_soft - student_log_soft)).sum(dtype=torch.float64)
                    if needs_grad:
                        chunk_grad = student_log_soft.exp_().sub_(teacher_soft).mul_(kl_scale)
                if needs_grad:
                    chunk_grad.add_(student_log_probs.exp_(), alpha=ce_scale)
                    chunk_grad.scatter_add_(1, targets, torch.full(targets.shape, -ce_scale, device=s.device))
                    grad[row, start:stop] = chunk_grad
        if needs_grad:
            ctx.save_for_backward(grad)
        kl = (kl_total * temperature**2 / positions).float()
        ce = (ce_total / positions).float()
        return alpha_kl * kl + alpha_ce * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def logit_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    input_ids: Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    chunk_rows: int | None = None,
    reverse_kl: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The KL and cross-entropy terms on next-token logits (:class:`LogitDistillation`): the weighted
    loss and the two terms. ``reverse_kl`` is the share of the KL term taken in reverse, KL(student ‖
    teacher); ``chunk_rows`` by default from :data:`CHUNK_ROWS` for the logits' device."""
    if student_logits.shape != teacher_logits.shape:
        raise TQCError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "distillation needs the same tokenizer (vocabulary) in both"
        )
    if student_logits.shape[1] < 2:
        raise TQCError("a block of one token has no next token to predict: use --seq-len 2 or more")
    rows = chunk_rows or CHUNK_ROWS.get(student_logits.device.type, CHUNK_ROWS["cuda"])
    return LogitDistillation.apply(
        student_logits, teacher_logits, input_ids, temperature, alpha_kl, alpha_ce, rows, reverse_kl
    )


def reference_logit_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    input_ids: Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    reverse_kl: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same loss in its textbook form (whole-batch fp32 ``log_softmax``, ``kl_div``,
    ``cross_entropy``): what :class:`LogitDistillation` is tested against, and the baseline row of
    bench/throughput.py."""
    s_logits = student_logits[:, :-1].float()
    t_logits = teacher_logits[:, :-1].float()
    vocab = s_logits.shape[-1]
    student_log = F.log_softmax(s_logits / temperature, -1).reshape(-1, vocab)
    teacher_log = F.log_softmax(t_logits / temperature, -1).reshape(-1, vocab)
    forward = F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")
    reverse = F.kl_div(teacher_log, student_log, log_target=True, reduction="batchmean")
    kl = ((1 - reverse_kl) * forward + reverse_kl * reverse) * temperature**2
    ce = F.cross_entropy(s_logits.reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    return alpha_kl * kl + alpha_ce * ce, kl, ce


def distillation_loss(student_out, teacher_out, input_ids: Tensor, config: LossWeights) -> dict[str, Tensor]:
    """The weighted KD loss of ``config`` on a student's and a teacher's outputs (logits, and hidden
    states where a hidden term has a weight): the total (``loss``) and its parts."""
    logit_loss = logit_distillation if config.chunked_loss else reference_logit_distillation
    total, kl, ce = logit_loss(
        student_out.logits,
        teacher_out.logits,
        input_ids,
        config.temperature,
        config.alpha_kl,
        config.alpha_ce,
        reverse_kl=config.reverse_kl,
    )
    parts = {"kl": kl, "ce": ce}
    if config.alpha_hidden > 0:
        parts["hidden"] = hidden_cosine_loss(student_out.hidden_states[-1], teacher_out.hidden_states[-1])
        total = total + config.alpha_hidden * parts["hidden"]
    if config.alpha_blocks > 0:
        parts["blocks"] = block_matching_loss(student_out.hidden_states, teacher_out.hidden_states)
        total = total + config.alpha_blocks * parts["blocks"]
    parts["loss"] = total
    return parts


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """``1 − cos`` between the last hidden states, averaged over tokens (DistilBERT's cosine term)."""
    return 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()


def block_matching_loss(student_states, teacher_states) -> Tensor:
    """Mean over blocks and tokens of ``‖h_student - h_teacher‖² / ‖h_teacher‖²`` on every block's
    output (layer-wise distillation as in ZipLM): a compressed student keeps the teacher's depth and
    width, so each block gets a target of its own instead of one signal at the end. Normalised per
    token, because a few tokens (the first, above all) carry hidden states far larger than the rest."""
    if len(student_states) != len(teacher_states):  # hidden states: the embeddings' output, then each block's
        raise depth_mismatch(len(student_states) - 1, len(teacher_states) - 1)
    terms = [normalised_state_error(s, t) for s, t in zip(student_states[1:], teacher_states[1:], strict=True)]
    return torch.stack(terms).mean()


def normalised_state_error(states: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of ``||h - h*||^2 / ||h*||^2`` (hidden states, last dimension the width)."""
    target = target.float()
    return ((states.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def depth_mismatch(student_blocks: int, teacher_blocks: int) -> TQCError:
    return TQCError(
        f"alpha-blocks and blockwise-steps pair each block with the teacher's, but the student has {student_blocks} "
        f"blocks and the teacher {teacher_blocks} (layer dropping changes the depth): set both to 0"
    )
