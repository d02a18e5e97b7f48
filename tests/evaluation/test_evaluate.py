import copy
import math

import pytest
import torch
from conftest import TOY_TEXT
from typer.testing import CliRunner

from tqcompressor import TQCError
from tqcompressor.cli import app
from tqcompressor.evaluation.evaluate import evaluate, windows
from tqcompressor.evaluation.fidelity import HELDOUT_FILES


@pytest.mark.parametrize("n, context, stride", [(100, 16, 4), (100, 16, 15), (5, 16, 8), (17, 16, 16), (100, 16, 16)])
def test_windows_score_each_token_once_with_context(n, context, stride):
    scored = []
    for begin, end, count in windows(n, context, stride):
        assert end - begin <= context and 1 <= count <= end - begin - 1
        scored.extend(range(end - count, end))
    assert len(scored) == len(set(scored))
    if stride < context:  # every token but the first
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: at most each window's first token goes unscored
        assert len(scored) >= (n - 1) - n // context


def test_perplexity_matches_direct_loss_for_single_window(llama_model):
    ids = torch.randint(0, 512, (40,))
    result = evaluate(llama_model, ids, context=64, progress=False)
    loss = llama_model(ids[None], labels=ids[None]).loss
    assert result["perplexity"] == pytest.approx(math.exp(float(loss.detach())), rel=1e-4)
    assert result["tokens"] == 39
    assert result["protocol"] == {"level": "token", "context": 64, "stride": 64, "start_token": False}


def test_every_window_is_led_by_the_tokenizers_start_token_unscored(llama_model):
    from tests.conftest import make_bos_tokenizer

    with_bos = make_bos_tokenizer()
    ids = torch.randint(2, 256, (40,))
    result = evaluate(llama_model, ids, context=64, tokenizer=with_bos, progress=False)
    inputs = torch.cat([torch.tensor([with_bos.bos_token_id]), ids])
    with torch.no_grad():
        logits = llama_model(inputs[None]).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[1:-1], ids[1:])  # the same 39 tokens, with <bos> before them
    assert result["tokens"] == 39 and result["protocol"]["start_token"] is True
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    without = evaluate(llama_model, ids, context=64, tokenizer=with_bos, progress=False, lead_with_start=False)
    assert without["protocol"]["start_token"] is False and without["perplexity"] != pytest.approx(result["perplexity"])


def test_teacher_against_itself_has_zero_kl_and_full_agreement(llama_model, tokenizer):
    ids = torch.randint(0, 256, (70,))
    result = evaluate(llama_model, ids, context=32, stride=16, teacher=llama_model, tokenizer=tokenizer, progress=False)
    assert abs(result["kl_to_teacher"]) < 1e-5 and result["top1_agreement"] == 1.0
    assert result["word_perplexity"] > 0 and result["byte_perplexity"] > 0


def test_context_beyond_model_is_rejected(llama_model):
    with pytest.raises(TQCError, match="exceeds the model"):
        evaluate(llama_model, torch.arange(10), context=4096, progress=False)


def test_lambada_last_word_metrics(llama_model, tokenizer):
    from tqcompressor.evaluation.evaluate import lambada

    texts = ["the quick brown fox jumps over the lazy dog", "a model that is smaller runs faster", "oneword"]
    result = lambada(llama_model, tokenizer, texts, progress=False)
    assert result["lambada_examples"] == 2 and 0 <= result["lambada_accuracy"] <= 1
    assert result["lambada_perplexity"] > 1


def test_tqc_eval_lambada_file_and_perplexity_json(tmp_path, gpt2_dir):
    import json

    from typer.testing import CliRunner

    from tqcompressor.cli import app

    passages = tmp_path / "lambada.txt"
    passages.write_text("the quick brown fox jumps over the lazy dog\nknowledge distillation trains the student\n")
    result = CliRunner().invoke(
        app, ["eval", "--model", str(gpt2_dir), "--data", f"lambada:{passages}", "--json", str(tmp_path / "l.json")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "l.json").read_text())["lambada_examples"] == 2
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 30)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(gpt2_dir),
            "--data",
            str(text),
            "--context",
            "64",
            "--stride",
            "32",
            "--teacher",
            str(gpt2_dir),
            "--json",
            str(tmp_path / "p.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "p.json").read_text())
    assert {
        "perplexity",
        "kl_to_teacher",
        "top1_agreement",
        "tokens",
        "params",
        "word_perplexity",
        "byte_perplexity",
    } <= set(metrics)
    assert metrics["protocol"] == {"level": "token", "context": 64, "stride": 32, "start_token": False}
    assert metrics["kl_to_teacher"] < 1e-5
    # with a teacher, the fidelity suite leads: every held-out domain, the model being its own teacher here
    fidelity = metrics["fidelity"]
    assert set(fidelity["domains"]) == {"teacher samples", *HELDOUT_FILES}
    assert fidelity["fidelity_kl"] < 1e-5 and fidelity["fidelity_top1"] == 1.0
    assert all(d["held_out"] and d["perplexity_ratio"] == pytest.approx(1.0) for d in fidelity["domains"].values())
    assert result.output.index("fidelity KL") < result.output.index("perplexity")


def test_eval_without_data_scores_fidelity_alone_and_needs_one_of_them(tmp_path, gpt2_dir):
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(gpt2_dir), "--teacher", str(gpt2_dir), "--fidelity-tokens", "128", "--context", "64"],
    )
    assert result.exit_code == 0, result.output
    assert "fidelity (mean of held out)" in result.output and "code (CPython stdlib)" in result.output
    refused = CliRunner().invoke(app, ["eval", "--model", str(gpt2_dir)])
    assert refused.exit_code != 0 and "--data" in str(refused.exception)


def test_the_heldout_texts_are_shipped_with_their_licences():
    from tqcompressor.evaluation.fidelity import HELDOUT_DIR

    readme = (HELDOUT_DIR / "README.md").read_text()
    assert (HELDOUT_DIR / "PSF-LICENSE.txt").is_file()
    for file in HELDOUT_FILES.values():
        assert file in readme and len((HELDOUT_DIR / file).read_text()) > 60_000  # 16k tokens and more


def test_word_and_byte_perplexity_divide_by_the_scored_text_only(llama_model, tokenizer):
    """With disjoint windows the first token of each window is not scored: its word/bytes are not counted."""
    ids = torch.tensor(tokenizer(TOY_TEXT, add_special_tokens=False)["input_ids"][:96])
    result = evaluate(llama_model, ids, context=32, tokenizer=tokenizer, progress=False)
    nll = result["nll_per_token"] * result["tokens"]
    scored = [tokenizer.decode(ids[e - s : e].tolist()) for _, e, s in windows(len(ids), 32, 32)]
    assert result["tokens"] == 93  # 3 windows, each without its first token
    assert result["byte_perplexity"] == pytest.approx(math.exp(nll / sum(len(t.encode()) for t in scored)))
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / sum(len(t.split()) for t in scored)))
    everything = tokenizer.decode(ids[1:].tolist())
    assert sum(len(t.encode()) for t in scored) < len(everything.encode())


def test_the_teachers_own_figures_come_from_the_same_passes(llama_model, tokenizer):
    from tqcompressor.evaluation.fidelity import Domain, measure, measure_both

    torch.manual_seed(0)
    teacher, student = llama_model, copy.deepcopy(llama_model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 200, (300,))
    both = evaluate(student, ids, context=64, teacher=teacher, tokenizer=tokenizer, progress=False)
    alone = evaluate(teacher, ids, context=64, tokenizer=tokenizer, progress=False)
    assert set(both["teacher"]) == set(alone)
    for key in ("perplexity", "nll_per_token", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert both["teacher"][key] == pytest.approx(alone[key], rel=1e-5)
    assert both["teacher"]["tokens"] == alone["tokens"] and both["teacher"]["params"] == alone["params"]
    assert both["perplexity"] != pytest.approx(alone["perplexity"], rel=1e-3)  # the student's own, not the teacher's
    domains = {"a": Domain(ids[:200], True), "b": Domain(ids[100:], False)}
    measured, own = measure_both(student, teacher, domains, 64, tokenizer)
    itself = measure(teacher, teacher, domains, 64, tokenizer)
    assert own["fidelity_kl"] == 0 and own["fidelity_top1"] == 1
    for name in domains:
        assert own["domains"][name]["perplexity"] == pytest.approx(itself["domains"][name]["perplexity"], rel=1e-5)
        assert own["domains"][name]["held_out"] == domains[name].held_out
        ratio = measured["domains"][name]["perplexity"] / own["domains"][name]["perplexity"]
        assert measured["domains"][name]["perplexity_ratio"] == pytest.approx(ratio)
    assert measured == measure(student, teacher, domains, 64, tokenizer)


def test_a_remembered_teacher_runs_once_for_many_students_and_scores_them_alike(llama_model, tokenizer):
    from tqcompressor.evaluation.evaluate import RememberedTeacher

    ids = torch.randint(0, 256, (150,))
    students = [copy.deepcopy(llama_model) for _ in range(3)]
    for k, student in enumerate(students):
        with torch.no_grad():
            student.lm_head.weight.mul_(1 + 0.1 * (k + 1))
    calls = []
    llama_model.register_forward_hook(lambda *_: calls.append(1))
    remembered = RememberedTeacher(llama_model)
    for student in students:
        plain = evaluate(student, ids, context=32, teacher=llama_model, tokenizer=tokenizer, progress=False)
        calls_before = len(calls)
        again = evaluate(student, ids, context=32, teacher=remembered, tokenizer=tokenizer, progress=False)
        assert again == plain  # every figure the same, the teacher's own included
        batches = len(range(0, len(windows(150, 32, 32)), 4))  # evaluate's default batch of 4 windows
        assert len(calls) - calls_before == (batches if student is students[0] else 0)  # the teacher ran once
