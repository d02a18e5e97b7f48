"""The benchmark scripts' own measuring code (the scripts run from bench/; the runs are not tests)."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tqcompressor as tqc
from tests.conftest import tiny_llama
from tqcompressor.linalg.decompose import relative_error
from tqcompressor.planning.inventory import find_target_modules

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling provenance.py
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_whole_model_errors_are_measured_in_the_original_order_not_the_folded_one():
    decomposition = bench_module("decomposition")
    model = tiny_llama()
    originals = {n: model.get_submodule(n).weight.detach().double().clone() for n in find_target_modules(model, None)}
    plan = tqc.plan_compression(model, tqc.CompressionConfig(method="tq", ratio=0.7), progress=False)
    approximations = decomposition.planned_approximations(model, plan)
    report = tqc.apply_plan(model, plan, progress=False)
    assert report.folded_mlps  # the case that matters: permutations moved between MLP layers
    for layer in report.layers:  # the error the report states for each layer, measured when it was swapped in
        assert relative_error(originals[layer.name], approximations[layer.name]) == pytest.approx(
            layer.relative_error, rel=1e-4
        )
    up = next(n for n in originals if n.endswith("up_proj") and any(n.startswith(f) for f in report.folded_mlps))
    after_folding = model.get_submodule(up).to_dense().double()
    assert relative_error(originals[up], approximations[up]) < 1.0 < relative_error(originals[up], after_folding)


def test_compare_merges_only_an_interrupted_run_of_the_same_commit_and_settings(capsys):
    compare = bench_module("compare")
    run = {"commit": "abc", "settings": {"ratio": "0.65", "kd_steps": "40"}, "methods": {"svd": {}}}
    assert compare.mergeable(copy.deepcopy(run), {**run, "methods": {}}) == run
    for earlier, result, message in [
        ({**run, "commit": "def"}, run, "one run of one committed version"),
        ({**run, "settings": {"ratio": "0.65", "kd_steps": "80"}}, run, "settings differ (kd_steps)"),
        ({k: v for k, v in run.items() if k != "commit"}, run, "one run of one committed version"),
        (run, {**run, "commit": "abc+uncommitted"}, "one run of one committed version"),
    ]:
        with pytest.raises(SystemExit) as exit_info:  # refused as bad input: one line, exit status 2
            compare.mergeable(earlier, {**result, "methods": {}})
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("--merge: ") and message in error and error.count("\n") == 1


def test_quantize_bench_measures_every_family_in_every_format(tmp_path):
    quantize_bench = bench_module("quantize")
    teacher = tiny_llama()
    student = tqc.compress(copy.deepcopy(teacher), tqc.CompressionConfig(method="svd", ratio=0.6), progress=False)[0]
    seen = {}
    for family, name, model in quantize_bench.variants(teacher, student):
        seen[family, name] = quantize_bench.weights_file_bytes(model, tmp_path)
    assert set(seen) == {(f, n) for f in ("teacher", "svd_aware") for n in quantize_bench.FORMATS}
    for family in ("teacher", "svd_aware"):  # fewer bits, fewer bytes; int4 with larger groups fewer still
        sizes = [seen[family, n] for n in ("fp32", "int8", "int4-g32", "int4-g128")]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
    assert seen["svd_aware", "int8"] < seen["teacher", "int8"]


def test_quantized_forward_times_both_ways_and_scores_each_against_the_float_model(tmp_path, gpt2_dir, monkeypatch):
    bench = bench_module("quantized_forward")
    out = tmp_path / "forward.json"
    argv = ["quantized_forward.py", "--model", str(gpt2_dir), "--batch", "1", "--context", "16", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["commit"] and result["cpu"]["cores"] >= 1 and result["float_seconds"] > 0
    assert [row["format"] for row in result["models"]] == ["int8", "int4-g32", "int4-g128"]
    for row in result["models"] + result["matrices"]:
        assert set(row["seconds"]) == set(bench.WAYS) and all(s > 0 for s in row["seconds"].values())
    for row in result["models"]:  # both ways compute the same model: close to each other, not to the float one
        kernels, dequantized = row["kl_to_float"]["kernels"], row["kl_to_float"]["float32 dequantized"]
        assert 0 < dequantized and abs(kernels - dequantized) < 0.5 * dequantized + 1e-3
    assert {row["rows"] for row in result["matrices"]} == set(bench.ROWS)


def test_moe_bench_shared_basis_finds_a_basis_the_experts_share():
    moe = bench_module("moe")
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4)).Q.T  # 4 x 32: every expert reads the same 4 directions
    experts = torch.randn(6, 16, 4) @ basis  # (experts, rows, cols) = (6, 16, 32)
    budget = 4 * (32 + 6 * 16)  # exactly a rank-4 shared input basis
    approx, side, rank = moe.best_shared(experts, budget)
    assert (side, rank) == ("inputs", 4) and torch.allclose(approx, experts, atol=1e-5)
    own = moe.per_expert_svd(experts, 2)  # per expert, rank 2 of 4: not exact
    assert (own - experts).norm() > 0.1 * experts.norm()
    assert torch.allclose(moe.per_expert_svd(experts, 4), experts, atol=1e-5)


def test_compare_records_which_structures_a_student_holds():
    compare = bench_module("compare")
    student = tqc.compress(tiny_llama(), tqc.CompressionConfig(method="svd", ratio=0.7), progress=False)[0]
    assert compare.layer_types(student) == {"LowRankLinear": 14}


def test_compare_factors_the_tied_embedding_with_every_method_when_asked():
    """--embedding: the uniform-budget families factor the tied table too (a Gemma-like model whose
    table holds most parameters could not reach the budget otherwise); layer dropping is refused."""
    import argparse

    compare = bench_module("compare")
    args = argparse.Namespace(ratio=0.5, embedding=True, auto_methods=None)
    student, record = compare.build_student("svd", tiny_llama(vocab_size=4096), None, args)
    assert record == {}  # only auto weighs the table
    assert compare.layer_types(student) == {"LowRankLinear": 14, "LowRankEmbedding": 1, "TiedFactoredHead": 1}
    assert tqc.count_parameters(student) <= 0.5 * tqc.count_parameters(tiny_llama(vocab_size=4096))


def test_kd_scaling_stops_and_resumes_one_run_without_changing_it(tmp_path):
    from tqcompressor.training.distill import DistillConfig, multistep_distill

    def blocks(start: int):  # block i depends on i alone, as a resumed stream needs
        for i in range(start, start + 10**6):
            yield torch.randint(2, 512, (16,), generator=torch.Generator().manual_seed(i))

    kd_scaling = bench_module("kd_scaling")
    teacher = tiny_llama()
    student = tqc.compress(copy.deepcopy(teacher), tqc.CompressionConfig(method="svd", ratio=0.7), progress=False)[0]
    config = DistillConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1, checkpoint_every=2, log_every=1)
    measured = []

    def measure(model):
        measured.append(copy.deepcopy(model.state_dict()))
        return {"perplexity": float(len(measured)), "kl_to_teacher": 0.0, "top1_agreement": 1.0}

    stops = kd_scaling.stop_steps([64, 128], tokens_per_step=32)
    curve, stopped = kd_scaling.distill_curve(
        teacher, copy.deepcopy(student), blocks, config, stops, tmp_path / "curve", measure, progress=False
    )
    assert stops == [2, 4] and [p["tokens"] for p in curve] == [0, 64, 128]
    assert kd_scaling.layer_types(stopped) == {"LowRankLinear": len(find_target_modules(teacher, None))}
    straight = multistep_distill(teacher, student, blocks, config, tmp_path / "straight", progress=False)
    for name, value in straight.state_dict().items():  # stopping and resuming left the run as it was
        assert torch.equal(value, stopped.state_dict()[name]), name
    assert not torch.equal(measured[0]["lm_head.weight"], measured[1]["lm_head.weight"])  # it did train in between
    steps = [
        json.loads(line)["global_step"] for line in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]  # each step logged once across the stops


def test_kd_scaling_refuses_points_that_are_not_whole_steps_or_multiples_of_the_first():
    kd_scaling = bench_module("kd_scaling")
    with pytest.raises(ValueError, match="multiple of batch size x seq len = 1024"):
        kd_scaling.stop_steps([1000, 102400], tokens_per_step=1024)
    with pytest.raises(ValueError, match="multiple of the first"):
        kd_scaling.stop_steps([2048, 3072], tokens_per_step=1024)


def test_bench_scripts_answer_an_unknown_method_with_one_line_and_exit_2(capsys):
    compare = bench_module("compare")
    assert compare.chosen_methods("svd,auto,kronecker_prune") == ["svd", "auto", "kronecker_prune"]
    with pytest.raises(SystemExit) as exit_info:
        compare.chosen_methods("svd,nope")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("unknown method(s) nope; choose from tq, kronecker, svd") and error.count("\n") == 1


def test_auto_menus_reads_its_menus_and_answers_bad_ones_with_one_line_and_exit_2(capsys):
    auto_menus = bench_module("auto_menus")
    assert auto_menus.parse_menus("svd; svd,tq ;all") == {"svd": ["svd"], "svd,tq": ["svd", "tq"], "all": None}
    for text, message in [("svd;nope", "--menus: unknown structure 'nope'"), (" ; ", "--menus: name at least one")]:
        with pytest.raises(SystemExit) as exit_info:
            auto_menus.parse_menus(text)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith(message) and error.count("\n") == 1


def test_teacher_pool_scores_a_run_on_its_pool_and_held_out_samples(tmp_path, gpt2_dir, tokenizer, monkeypatch, capsys):
    from safetensors.torch import save_file

    teacher_pool = bench_module("teacher_pool")
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["teacher_pool.py", "--run", str(run), "--context", "16"])
    with pytest.raises(SystemExit) as exit_info:  # not a run: one line
        teacher_pool.main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    # a "run" whose student is its teacher: the same scores on both sets, KL 0
    loaded = tqc.load_model(str(gpt2_dir))
    tqc.save(loaded.model, run / "model", tokenizer)
    (run / "results.json").write_text(json.dumps({"base_model": str(gpt2_dir), "teacher_pool_blocks": 4}))
    ids = torch.randint(0, len(tokenizer), (4, 24))
    save_file({"blocks": ids}, str(run / "teacher_pool-seed0-4x24.safetensors"))
    save_file({"blocks": ids[:2]}, str(run / "eval_teacher_samples-seed12345-2x24.safetensors"))
    out = tmp_path / "pool.json"
    monkeypatch.setattr(sys, "argv", ["teacher_pool.py", "--run", str(run), "--context", "16", "--out", str(out)])
    teacher_pool.main()
    pool, held = json.loads(out.read_text())["sets"].values()
    assert (pool["sequences"], held["sequences"]) == (4, 2)
    assert pool["tokens"] == 4 * 15 and held["tokens"] == 2 * 15  # one window per sequence, its first 16 tokens
    for row in (pool, held):
        assert row["kl_to_teacher"] == pytest.approx(0, abs=1e-5) and row["top1_agreement"] == 1
        assert row["perplexity"] == pytest.approx(row["teacher_perplexity"])
    monkeypatch.setattr(sys, "argv", ["teacher_pool.py", "--run", str(run), "--context", "64"])
    with pytest.raises(SystemExit) as exit_info:  # longer than the sequences: one line
        teacher_pool.main()
    assert exit_info.value.code == 2


def test_demo_curve_extrapolates_a_power_law_to_the_kl_goal():
    demo_curve = bench_module("demo_curve")
    law = lambda tokens: 2.0 * tokens**-0.25  # noqa: E731 - KL 0.5 at (2 / 0.5) ** 4 = 256 tokens
    curve = [{"tokens": 0, "teacher samples": {"kl_to_teacher": 3.0}}] + [
        {"tokens": t, "teacher samples": {"kl_to_teacher": law(t)}} for t in (4, 16, 64)
    ]
    # the one-shot point (0 tokens) is left out of the fit
    fit = demo_curve.extrapolate(curve, "teacher samples", goal=0.5)
    assert fit["a"] == pytest.approx(2.0) and fit["b"] == pytest.approx(0.25)
    assert fit["tokens_to_goal"] == pytest.approx(256.0)
    flat = [{"tokens": t, "teacher samples": {"kl_to_teacher": 1.0 + t / 100}} for t in (4, 16, 64)]
    assert demo_curve.extrapolate(flat, "teacher samples")["tokens_to_goal"] is None  # KL that does not fall
    # by default the curve's summary figure, fidelity KL, against issue #36's goal of 0.6
    fidelity = [{"tokens": t, "fidelity_kl": law(t)} for t in (4, 16, 64)]
    fit = demo_curve.extrapolate(fidelity)
    assert fit["domain"] == "fidelity" and fit["goal_kl"] == 0.6
    assert fit["tokens_to_goal"] == pytest.approx((2.0 / 0.6) ** 4)


@pytest.mark.parametrize(
    "arguments, message",
    [(["--points", "100,150", "--steps", "300"], "multiples of the first"), (["--work", "."], "exists")],
)
def test_demo_curve_refuses_bad_points_and_an_existing_work_dir(arguments, message, monkeypatch, capsys):
    demo_curve = bench_module("demo_curve")
    monkeypatch.setattr(sys, "argv", ["demo_curve.py", *arguments])
    with pytest.raises(SystemExit) as exit_:
        demo_curve.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_output_weighting_fits_each_variant_in_its_own_metric():
    from tqcompressor.planning.calibration import calibrate
    from tqcompressor.planning.inventory import default_target_modules

    output_weighting = bench_module("output_weighting")
    teacher = tiny_llama()
    names = default_target_modules(teacher)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(teacher, names, ids, progress=False)
    plain, plain_proxy = output_weighting.fitted_student(teacher, names, stats, 0.5, weighted=False)
    rows, rows_proxy = output_weighting.fitted_student(teacher, names, stats, 0.5, weighted=True)
    assert tqc.count_parameters(plain) == tqc.count_parameters(rows) < tqc.count_parameters(teacher)
    # each fit is best in the metric it minimises (up to the whitening's 1e-4 ridge)
    assert rows_proxy["loss_proxy_rows"] < plain_proxy["loss_proxy_rows"]
    assert plain_proxy["loss_proxy_scalar"] <= rows_proxy["loss_proxy_scalar"] * 1.001
    assert isinstance(teacher.get_submodule(names[0]), torch.nn.Linear)  # the teacher is left as it was


def test_output_weighting_refuses_keeps_outside_zero_to_one(monkeypatch, capsys):
    output_weighting = bench_module("output_weighting")
    monkeypatch.setattr(sys, "argv", ["output_weighting.py", "--keeps", "0.5,1.5"])
    with pytest.raises(SystemExit) as exit_:
        output_weighting.main()
    assert exit_.value.code == 2 and "--keeps 0.5,1.5" in capsys.readouterr().err


def test_demo_curve_draws_its_figure_from_a_result_file(tmp_path):
    demo_curve = bench_module("demo_curve")
    law = lambda tokens: 8.0 * tokens**-0.17  # noqa: E731
    point = lambda t, kl: {"perplexity": 20.0, "kl_to_teacher": kl, "top1_agreement": 0.5}  # noqa: E731
    curve = [
        {"tokens": t, "fidelity_kl": law(t), "fidelity_top1": 0.5, "test.txt (in-domain)": point(t, 0.9 * law(t))}
        | {"teacher samples": point(t, law(t))}
        for t in (10, 20)
    ]
    one_shot = {"tokens": 0, "fidelity_kl": 2.3, "fidelity_top1": 0.3, "test.txt (in-domain)": point(0, 2.0)}
    result = {
        "settings": {"ratio": "0.65"},  # as cpu_run records settings: strings
        "teacher": {"test.txt (in-domain)": {"perplexity": 29.6}, "teacher samples": {"perplexity": 7.6}},
        "curve": [one_shot | {"teacher samples": point(0, 2.3)}] + curve,
        "extrapolation": demo_curve.extrapolate(curve),
    }
    demo_curve.plot(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    text = demo_curve.format_table(result)
    assert "fidelity KL = " in text and "0.6 at" in text
    assert text.splitlines()[0].split("|")[3].strip() == "fidelity KL"  # fidelity leads the table


def test_trust_probe_tells_each_kind_of_failure_apart(tmp_path, monkeypatch):
    probe = bench_module("trust_probe")
    keep = tmp_path / "thesis.txt"
    keep.write_text("years of work")
    scripts = {
        "import sys; open(sys.argv[1], 'w').write('gone')": "data loss",
        "import this": "code from a dir",
        "raise SystemExit(0)": "silent wrong result",
        "raise ValueError('boom')": "traceback",
        "import sys; print('error: a\\nerror: b', file=sys.stderr); sys.exit(2)": "traceback",
        "import time; time.sleep(30)": "hang",
        "import sys; print('error: bad input, do this', file=sys.stderr); sys.exit(2)": None,
    }
    for script, failure in scripts.items():
        monkeypatch.setattr(probe, "TQC", [sys.executable, "-c", script])
        record = probe.run_case(probe.Case("case", [str(keep)], keep=[keep]), timeout=5)
        assert record.get("failure") == failure, script
        keep.write_text("years of work")
    monkeypatch.setattr(probe, "TQC", [sys.executable, "-c", "raise SystemExit(2)"])
    assert probe.run_case(probe.Case("good input", [], refuse=False), timeout=5)["failure"] == "refused a good input"


def test_throughput_counts_flops_per_kd_token_as_stated_and_the_ceiling_per_shape():
    throughput = bench_module("throughput")
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    tqc.compress(student, tqc.CompressionConfig(method="svd", ratio=0.7), progress=False)
    layers, hidden, seq = teacher.config.num_hidden_layers, teacher.config.hidden_size, 16
    expected = (
        6 * tqc.count_parameters(student)
        + 12 * layers * hidden * seq
        + 2 * tqc.count_parameters(teacher)
        + 4 * layers * hidden * seq
    )
    assert throughput.kd_flops_per_token(student, teacher, seq) == expected
    ceiling = throughput.ceiling_row(teacher, tokens=32, device="cpu", repeats=1)
    linear = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(ceiling["shapes"].values()) == len(linear)  # every linear layer, the LM head included
    assert ceiling["flops_per_s"] > 0


def test_throughput_ratios_are_taken_inside_one_run():
    throughput = bench_module("throughput")
    row = {"flops_per_token": 1e9, "heldout_text_kl": 1.0}
    result = {
        "device": "NVIDIA H100 80GB HBM3",
        "rows": {
            "baseline": {**row, "tokens_per_s": 1000.0},
            "new defaults": {**row, "tokens_per_s": 12000.0, "heldout_text_kl": 1.005},
            "anchor": {"flops_per_token": 1e9, "tokens_per_s": 16000.0},
            "ceiling": {"flops_per_s": 8e14},
        },
    }
    throughput.add_ratios(result, teacher=None)
    new = result["rows"]["new defaults"]
    assert new["speedup"] == pytest.approx(12.0)
    assert new["share_of_anchor"] == pytest.approx(0.75)
    assert new["heldout_text_kl_change"] == pytest.approx(0.005)
    assert new["mfu_of_ceiling"] == pytest.approx(12000 * 1e9 / 8e14)
    assert new["mfu_of_spec"] == pytest.approx(12000 * 1e9 / 989e12)


def test_speed_builds_llama_3_2_shapes_without_the_hub():
    speed = bench_module("speed")
    with torch.device("meta"):
        sizes = {name: tqc.count_parameters(speed.random_model(name)) for name in ("llama-3.2-1b", "llama-3.2-3b")}
    # the published parameter counts of Llama-3.2-1B and 3B (tied embeddings)
    assert sizes == {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824}


def test_bench_fidelity_suite_scores_the_teacher_perfect_and_a_student_by_held_out_kl(tmp_path, tokenizer):
    from conftest import tiny_gpt2

    common = bench_module("common")
    teacher = tiny_gpt2(vocab_size=len(tokenizer))
    suite = common.Fidelity(teacher, tokenizer, tokens=64, context=32, cache_dir=tmp_path)
    protocol = suite.protocol()
    assert "teacher samples" in protocol["domains"] and len(protocol["domains"]) == 4  # + prose, docs, code
    perfect = suite.point(teacher)
    assert perfect["fidelity_kl"] == pytest.approx(0.0, abs=1e-6) and perfect["fidelity_top1"] == 1.0
    student = copy.deepcopy(teacher)
    tqc.compress(student, tqc.CompressionConfig(method="svd", ratio=0.5), progress=False)
    point = suite.point(student)
    assert point["fidelity_kl"] > 0.0
    assert set(point["held_out"]) == set(protocol["domains"])
    kls = [m["kl_to_teacher"] for m in point["held_out"].values()]
    assert point["fidelity_kl"] == pytest.approx(sum(kls) / len(kls))  # the mean over the held-out domains


def test_deploy_exports_both_models_the_same_way_and_compares_them_in_onnxruntime(
    tmp_path, gpt2_dir, tokenizer, monkeypatch, capsys
):
    pytest.importorskip("onnxruntime")
    deploy = bench_module("deploy")
    monkeypatch.setattr(sys, "argv", ["deploy.py", "--student", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:  # not a compressed dir: one line
        deploy.main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1

    loaded = tqc.load_model(str(gpt2_dir))
    student, _ = tqc.compress(loaded.model, tqc.CompressionConfig(method="svd", ratio=0.6), progress=False)
    tqc.save(student, tmp_path / "student", tokenizer, base_model=str(gpt2_dir))
    out = tmp_path / "deploy.json"
    argv = ["deploy.py", "--student", str(tmp_path / "student"), "--prefill-tokens", "16", "--new-tokens", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--equal-tokens", "4", "--repeats", "1", "--out", str(out)])
    deploy.main()
    result = json.loads(out.read_text())
    assert result["teacher"] == str(gpt2_dir) and result["tokens_equal"] == {"teacher": True, "student": True}
    assert set(result["tokens_per_s"]["student"]) == {"prefill_batch1", "prefill_batch8", "generation"}
    assert result["prefill_speedup"] == min(result["prefill_speedup_by_batch"].values()) > 0
    assert result["generation_speedup"] > 0 and result["peak_rss_bytes"]["student"] > 0
    assert result["bytes"]["student_onnx"] < result["bytes"]["teacher_onnx"]  # factored layers stay factored
    assert "student / teacher" in capsys.readouterr().out


def run_frontier(tmp_path, gpt2_dir, monkeypatch, name: str, *extra: str):
    """``(bench/frontier.py as a module, its result)`` after a toy run on GPT-2 with ``extra`` options."""
    from tests.conftest import TOY_TEXT

    frontier = bench_module("frontier")
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    out = tmp_path / name
    argv = ["frontier.py", "--model", str(gpt2_dir), "--calibration", str(tmp_path / "calibration.txt")]
    argv += ["--calibration-tokens", "256", "--fidelity-tokens", "64", "--context", "32", "--out", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    frontier.main()
    return frontier, json.loads(out.read_text())


def test_frontier_writes_uniform_and_planned_points_each_within_its_budget(tmp_path, gpt2_dir, monkeypatch):
    frontier, result = run_frontier(tmp_path, gpt2_dir, monkeypatch, "frontier.json")
    out = tmp_path / "frontier.json"
    fields = {"label", "kind", "quantizer", "bytes", "fidelity_kl", "fidelity_top1", "kd_tokens"}
    assert all(fields <= set(p) for p in result["points"]) and out.with_suffix(".png").is_file()
    uniform = {p["label"]: p for p in result["points"] if p["kind"] == "uniform" and p["quantizer"] == "rtn"}
    int4 = {f"teacher int4-g{g}{dq}" for g in (32, 64, 128) for dq in ("", "-dq")}
    assert set(uniform) == {"teacher int8"} | int4
    by_hqq = {p["label"]: p for p in result["points"] if p["quantizer"] == "hqq"}
    assert set(by_hqq) == {f"teacher int4-g{g} (hqq)" for g in (32, 64, 128)}
    assert all(p["bytes"] == uniform[label.removesuffix(" (hqq)")]["bytes"] for label, p in by_hqq.items())
    planned = [p for p in result["points"] if p["kind"] == "planned"]
    assert planned and all(p["bytes"] <= p["budget_bytes"] for p in planned)
    assert {p["budget_bytes"] for p in planned} >= {p["bytes"] for p in uniform.values()}  # each format's own size
    assert frontier.planned_budgets([10, 20, 40], 1) == [10, 15, 20, 30, 40]
    search = result["max_kl_search"]
    assert search["max_kl"] == 0.01 and search["tried"] and search["bytes"] in {t["bytes"] for t in search["tried"]}


def test_frontier_with_structures_plans_below_every_format_beside_the_formats_alone(tmp_path, gpt2_dir, monkeypatch):
    options = ["--uniform", "int4-g128-dq", "--structures", "svd", "--max-kl", "0", "--budgets", "49.5KiB,100KiB"]
    _, result = run_frontier(tmp_path, gpt2_dir, monkeypatch, "frontier-structures.json", *options)
    out = tmp_path / "frontier-structures.json"
    assert [p["label"] for p in result["points"] if p["kind"] == "uniform"] == ["teacher int4-g128-dq"]
    planned = {(p["quantizer"], p["budget_bytes"]): p for p in result["points"] if p["kind"] == "planned"}
    # 49.5 KiB is below every format of this model (50.8 KiB at the least, in int2 but the int4 head): only the
    # plan with structures reaches it
    budgets = {("planned+svd", 49.5 * 1024), ("planned", 100 * 1024), ("planned+svd", 100 * 1024)}
    assert set(planned) == budgets
    assert all(p["bytes"] <= budget for (_, budget), p in planned.items())
    assert any(fmt.startswith("svd ") for fmt in planned[("planned+svd", 49.5 * 1024)]["formats"].values())
    assert result["max_kl_search"] is None and out.with_suffix(".png").is_file()


def test_recovery_gives_each_recovery_the_same_seconds_from_one_student(tmp_path, gpt2_dir, monkeypatch):
    from tests.conftest import TOY_TEXT

    recovery = bench_module("recovery")
    (tmp_path / "train.txt").write_text(TOY_TEXT * 4)
    out = tmp_path / "recovery.json"
    argv = ["recovery.py", "--model", str(gpt2_dir), "--train", str(tmp_path / "train.txt"), "--ratio", "0.8"]
    argv += ["--calibration-tokens", "256", "--fidelity-tokens", "64", "--context", "32", "--seq-len", "32"]
    argv += ["--batch-size", "2", "--recovery-seconds", "4", "--blockwise-steps", "2", "--blockwise-tokens", "128"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out), "--work", str(tmp_path / "work")])
    recovery.main()
    result = json.loads(out.read_text())
    fields = {"label", "method", "stages", "seconds", "kd_tokens", "fidelity_kl", "fidelity_top1"}
    assert all(fields <= set(run) for run in result["runs"]) and out.with_suffix(".png").is_file()
    runs = {run["stages"]: run for run in result["runs"]}
    assert list(runs) == ["none", "global", "blockwise", "blockwise+global"]
    assert runs["global"]["kd_tokens"] > 0 and runs["blockwise"]["kd_tokens"] == 0
    assert len(result["blocks"]) == 2 and result["commit"]


def test_demo_curve_builds_the_byte_budget_student_and_measures_it_as_stored(monkeypatch):
    import argparse

    from tqcompressor.planning.formats import FORMATS, measure_formats
    from tqcompressor.quant.api import quantized_layers
    from tqcompressor.training import recipe

    demo_curve = bench_module("demo_curve")
    teacher = tiny_llama(vocab_size=256)
    # int4 and int8 only: this toy's matrices are too small for factors to go below int3 and int2
    monkeypatch.setattr(recipe, "BYTE_FORMATS", FORMATS)
    monkeypatch.setattr(recipe, "BYTE_STRUCTURES", ("svd",))
    budget = measure_formats(teacher, formats=FORMATS).smallest - 1  # below every format: factors needed
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    frozen, _ = demo_curve.build_student(
        teacher, calibration, argparse.Namespace(max_bytes=str(budget), frozen_grids=True)
    )
    assert not [name for name, _ in frozen.named_parameters() if "grid_" in name]
    student, stored = demo_curve.build_student(teacher, calibration, argparse.Namespace(max_bytes=str(budget)))
    assert [name for name, _ in student.named_parameters() if "grid_" in name]  # the recipe trains the grids
    trained = set(quantized_layers(student))
    final = stored(student)
    assert trained < set(quantized_layers(final))  # the factors are stored only in the measured copy
    assert set(quantized_layers(student)) == trained and quantized_layers(teacher) == {}


def test_head_bits_stores_the_least_weighed_rows_in_one_role_at_a_time(tmp_path, gpt2_dir, monkeypatch):
    from tests.conftest import TOY_TEXT

    head_bits = bench_module("head_bits")
    (tmp_path / "calibration.txt").write_text(TOY_TEXT * 4)
    out = tmp_path / "head-bits.json"
    argv = ["head_bits.py", "--model", str(gpt2_dir), "--calibration", str(tmp_path / "calibration.txt")]
    argv += ["--calibration-tokens", "256", "--fidelity-tokens", "64", "--context", "32", "--rows", "64"]
    monkeypatch.setattr(sys, "argv", [*argv, "--formats", "int4-g32,int2-g32", "--out", str(out)])
    head_bits.main()
    result = json.loads(out.read_text())
    assert [(p["format"], p["role"]) for p in result["points"]] == [
        ("int4-g32", "head"),
        ("int4-g32", "lookup"),
        ("int2-g32", "head"),
        ("int2-g32", "lookup"),
    ]
    kl = {(p["format"], p["role"]): p["fidelity_kl"] for p in result["points"]}
    assert all(value >= 0 for value in kl.values()) and kl[("int2-g32", "head")] > kl[("int4-g32", "head")]
    assert 0 <= result["rows_seen_in_calibration"] <= 64
