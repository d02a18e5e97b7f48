"""tq_lowrank: a permuted Kronecker sum plus a low-rank residual (the shared behaviour is tested in
test_every_structure.py, which covers it because it is registered)."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tqcompressor as tqc
from tqcompressor.cli import app
from tqcompressor.linalg.decompose import output_error, relative_error
from tqcompressor.structures.kronecker_lowrank import (
    KroneckerLowRankLinear,
    KroneckerLowRankSettings,
    fit_kronecker_lowrank,
)


def planted(seed=0, scramble=True):
    """A scrambled A (x) B plus a rank-2 matrix: neither tq nor svd alone can represent it."""
    g = torch.Generator().manual_seed(seed)
    k = torch.kron(
        torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    )
    if scramble:
        k = k[torch.randperm(32, generator=g)][:, torch.randperm(48, generator=g)]
    return k + 0.3 * torch.randn(32, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 48, generator=g, dtype=torch.float64
    )


def test_alternation_recovers_a_planted_kronecker_plus_low_rank_matrix():
    w = planted(scramble=False)
    settings = KroneckerLowRankSettings(rank=1, b_shape=(2, 4), residual_rank=2)
    once = fit_kronecker_lowrank(w, settings, search=False, rounds=0)
    alternated = fit_kronecker_lowrank(w, settings, search=False, rounds=300)
    assert relative_error(w, once.to_dense()) > 0.05  # the first Kronecker fit soaks up part of U V
    assert relative_error(w, alternated.to_dense()) < 1e-8
    assert alternated.lowrank.history[0] == pytest.approx(relative_error(w, alternated.to_dense()), abs=1e-12)


def test_beats_tq_and_svd_alone_on_such_a_matrix():
    w = planted(scramble=False)
    both = tqc.decompose(w, "tq_lowrank", b_shape=(2, 4), rank=1, residual_rank=2)
    tq = tqc.decompose(w, "tq", b_shape=(2, 4), rank=1)
    svd = tqc.decompose(w, "svd", rank=both.num_params // (32 + 48))  # at least as many parameters
    assert relative_error(w, both.to_dense()) < 0.2 * min(
        relative_error(w, tq.to_dense()), relative_error(w, svd.to_dense())
    )


def test_calibrated_residual_minimises_the_output_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 48, dtype=torch.float64)
    cov = x.T @ x / len(x)
    structure = tqc.get_structure("tq_lowrank")
    settings = structure.make_settings({"rank": 1, "b_shape": (2, 4), "residual_rank": 4})
    stats = type("Stats", (), {"input_cov": cov})()
    aware = structure.fit(w, settings, stats).to_dense()
    plain = structure.fit(w, settings).to_dense()
    assert output_error(w, aware, cov) < output_error(w, plain, cov)


def test_calibrated_alternation_refits_both_parts_in_the_output_metric():
    g = torch.Generator().manual_seed(2)
    w = planted(seed=2, scramble=False) + 0.1 * torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 48, dtype=torch.float64)
    cov = x.T @ x / len(x)
    settings = KroneckerLowRankSettings(rank=1, b_shape=(2, 4), residual_rank=2)
    once = fit_kronecker_lowrank(w, settings, cov, search=False, rounds=0)
    alternated = fit_kronecker_lowrank(w, settings, cov, search=False)
    assert output_error(w, alternated.to_dense(), cov) < 0.7 * output_error(w, once.to_dense(), cov)


def test_auto_buys_it_where_it_measures_better():
    model = nn.Sequential(nn.Linear(48, 32, bias=False))
    model[0].weight.data = planted(scramble=False).float()  # auto measures it without a permutation search
    model.config = None
    before = tqc.count_parameters(model)
    config = tqc.CompressionConfig(method="auto", ratio=0.5, target_modules=["0"])
    model, report = tqc.compress(model, config, progress=False)
    assert report.params_after <= 0.5 * before
    assert isinstance(model[0], KroneckerLowRankLinear), report.auto["0"]["chosen"]
    chosen = report.auto["0"]["chosen"]
    rivals = [
        c["error"] for c in report.auto["0"]["menu"] if c["method"] != "tq_lowrank" and c["params"] <= chosen["params"]
    ]
    assert report.layers[0].relative_error == pytest.approx(chosen["error"], abs=1e-5)  # auto installs what it measured
    assert chosen["error"] < 0.2 * min(rivals)


def test_cli_compress_and_spec_file(tmp_path, gpt2_dir):
    out = tmp_path / "c"
    result = CliRunner().invoke(
        app, ["compress", "--model", str(gpt2_dir), "--method", "tq_lowrank", "--ratio", "0.8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression.json").read_text())
    assert {entry["method"] for entry in report["layers"]} == {"tq_lowrank"}
    assert all(entry["settings"]["residual_rank"] >= 1 for entry in report["layers"])
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "residual_rank" in info.output
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "layers:\n  - modules: [mlp.c_fc]\n    method: tq_lowrank\n    rank: 2\n    b_shape: [4, 2]\n"
        "    residual_rank: 3\n"
    )
    result = CliRunner().invoke(
        app, ["compress", "--model", str(gpt2_dir), "--spec", str(spec), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    model = tqc.load(tmp_path / "s")
    layer = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(layer, KroneckerLowRankLinear) and layer.lowrank.rank == 3 and layer.kronecker.rank == 2
