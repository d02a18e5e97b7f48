"""A storage format per matrix under a byte budget (tqcompressor.planning.formats, tqc quantize --max-bytes)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tests.conftest import TOY_TEXT, run_cli, tiny_llama
from tqcompressor.errors import TQCError
from tqcompressor.planning.calibration import layer_statistics
from tqcompressor.planning.formats import (
    float_bytes,
    format_menu,
    measure_formats,
    parse_bytes,
    plan_formats,
    planned_matrices,
)
from tqcompressor.quant.api import quantize_


@pytest.mark.parametrize(
    "text, size",
    [("90MiB", 90 * 2**20), ("90MB", 90 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096), (" 2 kib ", 2048)],
)
def test_sizes_parse_as_people_write_them(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "90 parsecs", "-5MiB", "0", "1e9", "nan"])
def test_a_size_that_does_not_parse_is_one_line_naming_the_option(text):
    with pytest.raises(TQCError, match="--max-bytes"):
        parse_bytes(text)


def saved_tensor_bytes(directory) -> int:
    """The bytes of every tensor in a saved dir's weights file (its header aside)."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as stored:
        tensors = [stored.get_tensor(key) for key in stored.keys()]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_each_format_is_priced_in_the_bytes_the_saved_dir_holds(tmp_path):
    model = tiny_llama(vocab_size=256)
    smallest = plan_formats(model, 10**9)  # room for everything: every matrix in int8
    assert set(smallest.formats.values()) == {"int8"}
    for fmt in ("int8", "int4-g32", "int4-g128", "int4-g32-dq", "int4-g64-dq-hqq"):
        planned = tiny_llama(vocab_size=256)
        plan = plan_formats(planned, 10**9, formats=(fmt,))
        quantize_(planned, tqc.QuantizeSettings(8), per_layer=plan.settings())
        tqc.save(planned, tmp_path / fmt)
        assert saved_tensor_bytes(tmp_path / fmt) == plan.total_bytes, fmt  # exact: scales, offsets, padding


def test_a_larger_budget_never_plans_a_worse_model_and_the_plan_is_kept(tmp_path):
    model = tiny_llama(vocab_size=256)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = layer_statistics(model, list(planned_matrices(model)), ids, progress=False)
    menus = measure_formats(model, stats)
    cheapest, richest = menus.smallest, plan_formats(model, 10**9, stats).total_bytes
    losses = []
    for budget in torch.linspace(cheapest, richest, 5).long().tolist():
        plan = plan_formats(model, budget, stats)
        assert plan.total_bytes <= budget
        menus = {name: {c.method: c for c in menu} for name, menu in plan.menus.items()}
        losses.append(sum(plan.weights[n] * menus[n][f].error ** 2 for n, f in plan.formats.items()))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]  # the bytes bought something
    with pytest.raises(TQCError, match="below the smallest model these formats make"):
        plan_formats(model, cheapest - 1, stats)


def test_errors_are_of_the_stored_matrix_in_the_output_metric():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    menu = {c.method: c for c in format_menu(weight)}
    assert menu["int8"].error < menu["int4-g32"].error < menu["int4-g128"].error
    assert menu["int8"].params > menu["int4-g32"].params > menu["int4-g128"].params


def test_tqc_quantize_max_bytes_writes_a_mixed_dir_that_opens_anywhere(tmp_path, gpt2_dir):
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    low, high = measure_formats(model).smallest, plan_formats(model, 10**9).total_bytes
    budget = (low + high) // 2
    args = ["quantize", gpt2_dir, "--max-bytes", str(budget), "--out", tmp_path / "mixed"]
    result = run_cli(*args, "--calibration", tmp_path / "calibration.txt", "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "mixed" / "quantization.json").read_text())
    assert written["format"] == "mixed" and len(written["plan"]["format_counts"]) > 1
    assert written["plan"]["total_bytes"] <= budget
    assert saved_tensor_bytes(tmp_path / "mixed") == written["plan"]["total_bytes"]
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    ids = torch.randint(0, 200, (1, 12))
    assert torch.isfinite(opened(ids).logits).all()
    assert float_bytes(model) > budget


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-bytes", "90 parsecs"], "--max-bytes takes a size"),
        (["--max-bytes", "10"], "below the smallest model"),
        (["--max-bytes", "10GiB"], "fits as it is"),
        (["--max-bytes", "1MiB", "--bits", "int8"], "give one of --bits"),
        (["--max-bytes", "1MiB", "--max-kl", "0.1"], "give one of --bits"),
        ([], "give one of --bits"),
        (["--max-bytes", "1MiB", "--group-size", "64"], "drop --group-size"),
        (["--bits", "int8", "--calibration", "teacher"], "drop it with --bits"),
        (["--max-bytes", "1MiB", "--quantizer", "hqq"], "drop --quantizer"),
        (["--max-bytes", "1MiB", "--double-quant"], "drop --quantizer and --double-quant"),
        (["--bits", "int8", "--double-quant"], "int8 keeps one float scale per row"),
        (["--bits", "int8", "--quantizer", "hqq"], "rounds to nearest"),
        (["--bits", "int4", "--quantizer", "awq"], "--quantizer takes one of rtn, hqq"),
        (["--bits", "int8", "--structures", "svd"], "--structures joins the formats"),
        (["--max-bytes", "1MiB", "--structures", "nope"], "unknown method 'nope'"),
        (["--max-bytes", "1MiB", "--structures", "dense"], "unknown method 'dense'"),
    ],
)
def test_bad_budgets_are_one_line_and_nothing_is_written(tmp_path, gpt2_dir, extra, message):
    result = run_cli("quantize", gpt2_dir, "--out", tmp_path / "q", *extra)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "q").exists()


def test_menus_measured_once_plan_every_budget_as_a_fresh_measurement_would():

    model = tiny_llama(vocab_size=256)
    menus = measure_formats(model)
    for budget in (menus.smallest, (menus.smallest + menus.closest) // 2, menus.closest):
        assert menus.plan(budget).formats == plan_formats(model, budget).formats
    assert menus.plan(menus.closest * 2).total_bytes == menus.closest  # past the closest plan nothing is bought


@pytest.mark.parametrize("target, met", [(10.0, True), (1e-12, False)])
def test_max_kl_keeps_the_smallest_plan_within_the_target_or_the_closest_with_its_gap(tmp_path, gpt2_dir, target, met):
    result = run_cli("quantize", gpt2_dir, "--max-kl", target, "--fidelity-tokens", "64", "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "q" / "quantization.json").read_text())
    search = written["target"]
    assert search["met"] is met and search["bytes"] == written["plan"]["total_bytes"]
    tried = {t["bytes"]: t["fidelity_kl"] for t in search["tried"]}
    if met:  # a loose target: the smallest plan is kept, measured first
        assert search["bytes"] == min(tried) and search["fidelity_kl"] <= target
        assert "<= --max-kl" in result.stdout
    else:  # no plan reaches it: the closest one measured is kept, and the line states the gap
        assert search["bytes"] == max(tried) and "target not met" in result.stdout and "over --max-kl" in result.stdout
    assert saved_tensor_bytes(tmp_path / "q") == search["bytes"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_kl_target_that_is_not_a_positive_number_is_one_line(tmp_path, gpt2_dir, value):
    result = run_cli("quantize", gpt2_dir, "--max-kl", value, "--out", tmp_path / "q")
    assert result.returncode == 2 and "--max-kl" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "q").exists()


def test_the_search_bisects_between_a_missed_and_a_met_budget():
    from tqcompressor.evaluation.fidelity import Domain
    from tqcompressor.evaluation.targets import smallest_within_kl

    model = tiny_llama(vocab_size=256)
    menus = measure_formats(model)
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(0))
    domains = {"text": Domain(ids, held_out=True)}  # counted, as a held-out domain is
    loose = smallest_within_kl(model, menus, 1e9, domains, context=32, progress=False)
    assert loose.met and loose.plan.total_bytes == menus.smallest and len(loose.tried) == 1
    kls = [t["fidelity_kl"] for t in smallest_within_kl(model, menus, 1e-12, domains, 32, progress=False).tried]
    middle = (max(kls) + min(kls)) / 2 if max(kls) > min(kls) else max(kls)
    found = smallest_within_kl(model, menus, middle, domains, context=32, progress=False)
    assert found.met and found.fidelity["fidelity_kl"] <= middle
    assert all(t["fidelity_kl"] > middle for t in found.tried if t["bytes"] < found.plan.total_bytes)


def banded_menus(vocab_size: int = 256):
    """A tied table whose calibration text uses only tokens below 64, planned in bands of 16, 32, 64 and the rest."""

    model = tiny_llama(vocab_size=vocab_size)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = layer_statistics(model, list(planned_matrices(model)), ids, progress=False)
    # as a trained model, which hardly predicts the tokens its text never uses (a random one predicts all alike)
    stats["model.embed_tokens"].head.fisher_rows[64:] *= 1e-6
    return model, ids, measure_formats(model, stats, band_rows=(16, 32, 64))


def test_a_tied_table_is_planned_by_bands_of_rows_most_used_first():
    _, _, menus = banded_menus()
    bands = menus.bands["model.embed_tokens"]
    assert bands.sizes == (16, 32, 64, 144)
    assert bands.order[:48].lt(64).all()  # the tokens the text uses come before the rest
    assert sorted(bands.order.tolist()) == list(range(256))
    budget = (menus.smallest + menus.closest) // 2
    plan = menus.plan(budget)
    items = bands.items("model.embed_tokens")
    chosen = [next(c for c in menus.menus[item] if c.method == plan.formats[item]) for item in items]
    per_row = [candidate.params / rows for candidate, rows in zip(chosen, bands.sizes)]
    assert per_row[0] > per_row[-1]  # the used rows got a finer format (more bytes a row) than the tail


def test_a_tied_heads_rows_weigh_by_the_kl_curvature_not_by_the_texts_labels():
    """A token that never comes next in the calibration text still has a logit the KL depends on: its row
    weighs what ``p (1 - p)`` says, not the ``p^2`` the text's labels give it; the head's total is the same."""
    from tqcompressor.planning.formats import _head_rows

    model = tiny_llama(vocab_size=256)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    head = layer_statistics(model, list(planned_matrices(model)), ids, progress=False)["model.embed_tokens"].head
    rows = _head_rows(head)
    assert float(rows.sum()) == pytest.approx(float(head.grad_sq_rows.sum()), rel=1e-9)
    unused, used = slice(64, None), slice(0, 64)
    assert rows[unused].sum() / rows[used].sum() > 2 * head.grad_sq_rows[unused].sum() / head.grad_sq_rows[used].sum()


def test_a_banded_table_is_priced_exactly_and_reopens_as_planned(tmp_path):
    from tqcompressor.quant.formats import TokenBands

    model, ids, menus = banded_menus()
    for budget in torch.linspace(menus.smallest, menus.closest, 6).long().tolist():
        plan = menus.plan(budget)
        assert plan.total_bytes <= budget
        planned = tiny_llama(vocab_size=256)
        quantize_(planned, tqc.QuantizeSettings(8), per_layer=plan.settings())
        tqc.save(planned, tmp_path / str(budget))
        assert saved_tensor_bytes(tmp_path / str(budget)) == plan.total_bytes  # the order counted where stored
        table = plan.settings()["model.embed_tokens"]
        written = plan.to_dict()["bands"]
        if isinstance(table, TokenBands):
            assert sum(band["rows"] for band in written["model.embed_tokens"]) == 256
            opened = AutoModelForCausalLM.from_pretrained(tmp_path / str(budget))
            with torch.no_grad():
                assert torch.equal(opened(ids[:2]).logits, planned(ids[:2]).logits)
        else:
            assert written == {}
    budgets = range(menus.smallest, menus.closest, 2048)
    assert any(isinstance(menus.plan(b).settings()["model.embed_tokens"], TokenBands) for b in budgets)


def test_without_calibration_a_table_is_planned_whole():

    menus = measure_formats(tiny_llama(vocab_size=256), band_rows=(16, 32, 64))
    assert menus.bands == {} and "model.embed_tokens" in menus.menus


def test_tqc_quantize_max_bytes_bands_a_large_table_and_info_shows_it(tmp_path, tokenizer):
    source = tmp_path / "llama"
    tiny_llama(vocab_size=1024).save_pretrained(source)  # 1,024 rows: two bands of 512
    tokenizer.save_pretrained(source)
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    model = AutoModelForCausalLM.from_pretrained(source)
    budget = (measure_formats(model).smallest + plan_formats(model, 10**9).total_bytes) // 2
    args = ["quantize", source, "--max-bytes", str(budget), "--out", tmp_path / "q"]
    result = run_cli(*args, "--calibration", tmp_path / "calibration.txt", "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "q" / "quantization.json").read_text())
    bands = written["plan"]["bands"]["model.embed_tokens"]
    assert [band["rows"] for band in bands] == [512, 512] and bands[0]["format"] != bands[1]["format"]
    assert saved_tensor_bytes(tmp_path / "q") == written["plan"]["total_bytes"] <= budget
    assert written["quantized_stored_bytes"] + written["kept_bytes"] == saved_tensor_bytes(tmp_path / "q")
    info = run_cli("info", tmp_path / "q")
    stored = [band["format"].removesuffix("-hqq") for band in bands]  # the quantizer is not part of the format
    assert info.returncode == 0 and f"{stored[0]} x512 + {stored[1]} x512" in info.stdout


def test_tqc_quantize_int4_by_hqq_stores_the_same_bytes_closer(tmp_path, gpt2_dir):
    errors = {}
    for quantizer in ("rtn", "hqq"):
        result = run_cli(
            "quantize", gpt2_dir, "--bits", "int4", "--quantizer", quantizer, "--out", tmp_path / quantizer
        )
        assert result.returncode == 0, result.stderr
        written = json.loads((tmp_path / quantizer / "quantization.json").read_text())
        errors[quantizer] = sum(layer["error"] for layer in written["layers"])
        assert written["format"] == "int4-g32"
    assert saved_tensor_bytes(tmp_path / "hqq") == saved_tensor_bytes(tmp_path / "rtn")
    assert errors["hqq"] < errors["rtn"]


def test_tqc_quantize_double_quant_stores_codes_that_reopen_anywhere(tmp_path, gpt2_dir):
    result = run_cli("quantize", gpt2_dir, "--bits", "int4", "--double-quant", "--out", tmp_path / "dq")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "dq" / "quantization.json").read_text())
    assert written["format"] == "int4-g32-dq"
    uniform = plan_formats(AutoModelForCausalLM.from_pretrained(gpt2_dir), 10**9, formats=("int4-g32-dq",))
    assert saved_tensor_bytes(tmp_path / "dq") == uniform.total_bytes
    # the quantized layers and what is kept as it is add up to the file's tensors, counted two ways
    total = written["quantized_stored_bytes"] + written["kept_bytes"]
    assert total == written["weights_tensor_bytes"] == saved_tensor_bytes(tmp_path / "dq")
    info = run_cli("info", tmp_path / "dq")
    assert info.returncode == 0 and f"= {total:,}; the weights file's tensors: {total:,}" in info.stdout
    with safe_open(str(tmp_path / "dq" / "model.safetensors"), "pt") as stored:
        assert any(key.endswith("scale_codes") for key in stored.keys())
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "dq")
    assert torch.isfinite(opened(torch.randint(0, 200, (1, 8))).logits).all()


def test_bands_are_kept_only_where_they_lose_less_than_the_table_whole():
    _, _, menus = banded_menus()
    whole = menus.whole_tables()
    assert whole.bands == {} and whole.smallest == menus.smallest and whole.closest == menus.closest
    for budget in torch.linspace(menus.smallest, menus.closest, 7).long().tolist():
        plan = menus.plan(budget)
        assert plan.total_bytes <= budget
        assert plan.loss <= whole.plan(budget).loss + 1e-12
    smallest = menus.plan(menus.smallest)  # no room for a row order: the table whole, the least-error cheapest
    assert smallest.index_bytes == 0 and smallest.total_bytes == menus.smallest
    for name, fmt in smallest.formats.items():
        cheapest = [c for c in smallest.menus[name] if c.params == min(c.params for c in smallest.menus[name])]
        assert fmt == min(cheapest, key=lambda c: c.error).method


def test_tqc_compress_takes_a_size_or_a_fidelity_as_tqc_quantize_plans_it(tmp_path, gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    budget = (measure_formats(model).smallest + plan_formats(model, 10**9).total_bytes) // 2
    result = run_cli("compress", "--model", gpt2_dir, "--max-bytes", str(budget), "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "c" / "quantization.json").read_text())
    assert (
        written["plan"]["total_bytes"] <= budget
        and saved_tensor_bytes(tmp_path / "c") == written["plan"]["total_bytes"]
    )
    result = run_cli("compress", "--model", gpt2_dir, "--max-kl", "10", "--out", tmp_path / "k")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "k" / "quantization.json").read_text())["target"]["met"] is True


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-bytes", "1MiB", "--ratio", "0.5"], "drop --ratio"),
        (["--max-kl", "0.1", "--method", "svd", "--quantize", "int8"], "drop --method, --quantize"),
        (["--max-bytes", "1MiB", "--sequential"], "drop --sequential"),
        (["--structures", "svd"], "--structures joins the formats"),
        (["--max-bytes", "90 parsecs"], "--max-bytes takes a size"),
        (["--max-kl", "-1"], "--max-kl"),
    ],
)
def test_tqc_compress_refuses_a_target_beside_a_parameter_budget_in_one_line(tmp_path, gpt2_dir, extra, message):
    result = run_cli("compress", "--model", gpt2_dir, "--out", tmp_path / "c", *extra)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "c").exists()
