"""Perplexity with the sliding-window protocol, plus KL divergence and top-1 agreement with a teacher.

Windows of ``context`` tokens end every ``stride`` tokens; each token is scored at most once, by
the first window that reaches it (the protocol of the Hugging Face perplexity guide; with
``stride == context`` the first token of each window has no context and is not scored).
``stride == context`` gives disjoint windows; a smaller stride gives every scored token at least
``context - stride`` tokens of context. Word- and byte-level perplexity divide the same total
negative log-likelihood by the number of whitespace-separated words / UTF-8 bytes of the scored
tokens (decoded window by window), as lm-evaluation-harness defines them for wikitext.
"""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tqcompressor.data import start_token
from tqcompressor.errors import TQCError
from tqcompressor.planning.inventory import count_parameters


def windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: the last ``scored`` tokens of ``ids[begin:end]`` are scored.

    The first window scores all its tokens but the first; each later one ends ``stride`` tokens
    further, reaches back a full ``context`` and scores only its new tokens.
    """
    if context < 2 or not 0 < stride <= context:
        raise TQCError(f"need context >= 2 and 0 < stride <= context, got context={context}, stride={stride}")
    if num_tokens < 2:
        return []
    end = min(context, num_tokens)
    out = [(0, end, end - 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        begin = max(0, new_end - context)
        # a token needs one earlier token in its window: with stride == context the first token of
        # each window goes unscored, exactly as in the Hugging Face protocol
        out.append((begin, new_end, min(new_end - end, new_end - begin - 1)))
        end = new_end
    return out


@torch.no_grad()
def evaluate(
    model,
    ids: torch.Tensor,
    context: int = 512,
    stride: int | None = None,
    teacher=None,
    batch_size: int = 4,
    tokenizer=None,
    progress: bool = True,
    lead_with_start: bool = True,
) -> dict:
    """Perplexity of ``model`` on the token sequence ``ids``; with ``teacher``, also KL(teacher || model)
    and top-1 agreement on the same scored positions, and under ``"teacher"`` the teacher's own figures
    from the same forward passes (what ``evaluate(teacher, ids)`` returns, without a second pass over
    the teacher). ``lead_with_start``: put the tokenizer's
    :func:`~tqcompressor.data.start_token` (e.g. Gemma's ``<bos>``), where it has one, before every
    window; it is never scored."""
    for name, value in (("context", context), ("stride", stride), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise TQCError(f"{name} must be 1 or more, got {value}")
    stride = stride or context
    start = start_token(tokenizer) if lead_with_start else None
    lead = [start] if start is not None else []
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions and context + len(lead) > max_positions:
        with_start = " plus the start token" if lead else ""
        raise TQCError(f"context {context}{with_start} exceeds the model's maximum of {max_positions} positions")
    device = next(model.parameters()).device
    plan = windows(len(ids), context, stride)
    if not plan:
        raise TQCError("not enough tokens to evaluate (need at least 2)")
    nll, teacher_nll, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    batches = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        for group in _same_length_groups(batch):
            inputs = torch.stack([torch.cat([ids.new_tensor(lead), ids[b:e]]) for b, e, _ in group]).to(device)
            logits = model(inputs).logits.float()
            teacher_logits = teacher(inputs).logits.float() if teacher is not None else None
            for row, (b, e, scored) in enumerate(group):
                sums = _scored_sums(inputs[row], logits[row], teacher_logits, row, e - b + len(lead), scored)
                nll, teacher_nll, kl, agree = nll + sums[0], teacher_nll + sums[1], kl + sums[2], agree + sums[3]
                count += scored
    protocol = {"level": "token", "context": context, "stride": stride, "start_token": bool(lead)}
    result = _summary(model, nll, count, protocol, ids, plan, tokenizer)
    if teacher is not None:
        result["kl_to_teacher"] = kl / count
        result["top1_agreement"] = agree / count
        result["teacher"] = _summary(teacher, teacher_nll, count, protocol, ids, plan, tokenizer)
    return result


class RememberedTeacher(nn.Module):
    """A teacher whose logits on each batch of windows are computed once and remembered (float32, as
    :func:`evaluate` reads them): scoring many models against it on the same windows (the quantized
    comparison of a run) runs the teacher once instead of once per model, the figures unchanged. Holds
    ``4 * vocabulary`` bytes per token scored; meant for a few thousand tokens, then dropped."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.logits: dict[tuple, torch.Tensor] = {}

    @property
    def config(self):
        return self.teacher.config

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        key = (tuple(input_ids.shape), hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest())
        if key not in self.logits:
            self.logits[key] = self.teacher(input_ids).logits.float()
        return SimpleNamespace(logits=self.logits[key])


def _summary(model, nll: float, count: int, protocol: dict, ids, plan, tokenizer) -> dict:
    """One model's figures from its summed negative log-likelihood over ``count`` scored tokens."""
    result = {
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "tokens": count,
        "protocol": protocol,
        "params": count_parameters(model),
    }
    if tokenizer is not None:
        result.update(_text_level(nll, ids, plan, tokenizer))
    return result


def _scored_sums(inputs, logits, teacher_logits, row: int, length: int, scored: int) -> tuple[float, float, float, int]:
    """Negative log-likelihoods of the model and of the teacher, KL(teacher || model) and top-1
    agreements over one window's last ``scored`` positions (``teacher_logits``: the batch's, or ``None``)."""
    pred = logits[length - scored - 1 : length - 1]
    target = inputs[length - scored :]
    log_probs = F.log_softmax(pred, dim=-1)
    nll = -float(log_probs.gather(-1, target[:, None]).sum())
    if teacher_logits is None:
        return nll, 0.0, 0.0, 0
    t_log_probs = F.log_softmax(teacher_logits[row, length - scored - 1 : length - 1], dim=-1)
    teacher_nll = -float(t_log_probs.gather(-1, target[:, None]).sum())
    kl = float((t_log_probs.exp() * (t_log_probs - log_probs)).sum())
    return nll, teacher_nll, kl, int((t_log_probs.argmax(-1) == pred.argmax(-1)).sum())


def _text_level(nll: float, ids, plan, tokenizer) -> dict:
    """Word- and byte-level perplexity: words and bytes of the scored tokens only, like the NLL they divide."""
    spans = [tokenizer.decode(ids[e - scored : e].tolist()) for _, e, scored in plan]
    words, text_bytes = sum(len(t.split()) for t in spans), sum(len(t.encode("utf-8")) for t in spans)
    return {
        "word_perplexity": math.exp(nll / max(words, 1)),
        "byte_perplexity": math.exp(nll / max(text_bytes, 1)),
        "bits_per_byte": nll / max(text_bytes, 1) / math.log(2),
    }


def _same_length_groups(batch):
    groups: dict[int, list] = {}
    for window in batch:
        groups.setdefault(window[1] - window[0], []).append(window)
    return list(groups.values())


@torch.no_grad()
def lambada(model, tokenizer, texts, max_examples: int | None = None, progress: bool = True) -> dict:
    """LAMBADA last-word accuracy and perplexity: the model sees a passage without its last word and
    must produce that word (all its tokens greedily correct); perplexity is over the last word's tokens."""
    device = next(model.parameters()).device
    correct, nll, count, examples = 0, 0.0, 0, 0
    for text in tqdm(texts, desc="lambada", unit="example", disable=not progress):
        text = text.strip()
        if " " not in text:
            continue
        context, word = text.rsplit(" ", 1)
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + target_ids], device=device)
        logits = model(ids).logits[0, len(context_ids) - 1 : -1].float()
        target = ids[0, len(context_ids) :]
        log_probs = F.log_softmax(logits, dim=-1)
        nll -= float(log_probs.gather(-1, target[:, None]).sum())
        count += len(target_ids)
        correct += int(bool((logits.argmax(-1) == target).all()))
        examples += 1
        if max_examples is not None and examples >= max_examples:
            break
    if examples == 0:
        raise TQCError("no LAMBADA examples to evaluate")
    return {
        "lambada_accuracy": correct / examples,
        "lambada_perplexity": math.exp(nll / count),
        "lambada_examples": examples,
    }


@torch.no_grad()
def greedy_continuations(models: dict, tokenizer, prompts: list[str], new_tokens: int = 24) -> list[dict]:
    """Each prompt continued greedily by each model (e.g. ``{"teacher": t, "student": s}``):
    ``[{"prompt": ..., "teacher": ..., "student": ...}, ...]``, the continuations as text."""
    rows = []
    for prompt in prompts:
        row = {"prompt": prompt}
        for name, model in models.items():
            device = next(model.parameters()).device
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            out = model.eval().generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            row[name] = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        rows.append(row)
    return rows
