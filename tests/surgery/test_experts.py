"""MoE experts: split exactly, calibrated on the tokens routed to them, budgeted by use, from the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tqcompressor as tqc
from tests.modelio.test_architectures import MOE_FAMILIES, tiny_model
from tqcompressor.cli import app
from tqcompressor.planning.calibration import calibrate
from tqcompressor.surgery.experts import LinearExperts, split_experts

IDS = torch.randint(2, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))  # the matrix's tiny configs: 4 experts, top-2
def test_splitting_experts_is_exact(family):
    model = tiny_model(family)
    reference, params = logits(model), tqc.count_parameters(model)
    names = split_experts(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    experts = model.get_submodule(names[0])
    assert isinstance(experts, LinearExperts) and len(experts.gate_up) == 4
    assert torch.allclose(logits(model), reference, atol=1e-5) and tqc.count_parameters(model) == params


def route_to_first_two(model) -> None:
    """Every token goes to experts 0 and 1 (weights 0.7 / 0.3): experts 2 and 3 see nothing."""
    for layer in model.model.layers:
        router = layer.mlp.gate

        def forward(hidden, router=router):
            hidden = hidden.reshape(-1, router.hidden_dim)
            index = torch.tensor([0, 1]).expand(hidden.shape[0], 2)
            scores = torch.tensor([0.7, 0.3]).expand(hidden.shape[0], 2)
            return hidden @ router.weight.T, scores, index

        router.forward = forward


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    model = tiny_model("mixtral")
    split_experts(model)
    names = [f"model.layers.0.mlp.experts.gate_up.{e}" for e in range(4)]
    stats = calibrate(model, names, IDS, progress=False)
    # top-2 routing: each token reaches two experts of the layer
    assert sum(stats[n].tokens for n in names) == 2 * IDS.numel()
    route_to_first_two(model)
    stats = calibrate(model, names, IDS, progress=False)
    assert [stats[n].tokens for n in names] == [IDS.numel(), IDS.numel(), 0, 0]
    assert stats[names[2]].grad_sq == 0 and not stats[names[2]].input_cov.any()


def test_unused_experts_are_fitted_to_their_weights_and_auto_spends_nothing_on_them():
    model = tiny_model("mixtral")
    split_experts(model)
    route_to_first_two(model)
    ids = torch.randint(2, 256, (16, 16), generator=torch.Generator().manual_seed(1))  # 256 tokens >= 128 inputs
    svd = tqc.plan_compression(copy.deepcopy(model), tqc.CompressionConfig(method="svd", ratio=0.7), ids, False)
    reasons = {entry.name: entry.spec.reason for entry in svd.layers}
    assert "0 calibration tokens reached it" in reasons["model.layers.0.mlp.experts.down.3"]
    assert "activation-aware" in reasons["model.layers.0.mlp.experts.down.0"]
    auto = tqc.plan_compression(model, tqc.CompressionConfig(method="auto", ratio=0.7), ids, False)
    weight = {name: record["layer_weight"] for name, record in auto.auto.items()}
    chosen = {name: record["chosen"]["params"] for name, record in auto.auto.items()}
    used, unused = "model.layers.1.mlp.experts.down.0", "model.layers.1.mlp.experts.down.3"
    assert weight[unused] == 0 < weight[used]  # the loss an expert carries follows its use
    assert chosen[unused] < chosen[used]


def test_cli_compresses_the_experts_of_a_moe_dir_with_no_other_flag(tmp_path, tokenizer):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    runner = CliRunner()
    targets = runner.invoke(app, ["info", str(tmp_path / "moe"), "--targets"])
    assert targets.exit_code == 0 and "mlp.experts.gate_up.3" in targets.output
    result = runner.invoke(
        app, ["compress", "--model", str(tmp_path / "moe"), "--ratio", "0.6", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "c" / "compression.json").read_text())
    experts = [layer for layer in report["layers"] if ".experts." in layer["name"]]
    assert len(experts) == 2 * 2 * 4 and report["params_after"] <= 0.6 * report["params_before"]
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert isinstance(opened.model.layers[0].mlp.experts, LinearExperts)
    with torch.no_grad():
        assert opened.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=1).shape == (1, 7)
