import pytest
import torch

from tests.conftest import tiny_gpt2, tiny_llama
from tqcompressor import CompressionConfig, LowRankLinear, TQCError, compress
from tqcompressor.planning.calibration import calibrate
from tqcompressor.planning.planners import plan_compression


def test_input_covariance_is_the_second_moment_of_the_layer_inputs():
    model = tiny_llama()
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(seen)
    stats = calibrate(
        model, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"], ids, batch_size=2, progress=False
    )
    got = stats["model.layers.1.mlp.down_proj"]
    assert got.tokens == 48 and got.input_cov.shape == (128, 128)
    assert torch.allclose(got.input_cov, x.T @ x / len(x), rtol=1e-6, atol=1e-9)
    assert all(s.grad_sq > 0 for s in stats.values())


def test_gradient_energy_per_output_is_recorded_and_averages_to_the_layer_scalar():
    model = tiny_llama()
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: outputs.append(out))
    loss = model(ids, labels=ids).loss * ids[:, 1:].numel()  # calibrate's loss: summed over tokens
    handle.remove()
    (g,) = torch.autograd.grad(loss, outputs)
    expected = g.double().square().reshape(-1, g.shape[-1]).mean(0)
    stats = calibrate(model, [name], ids, batch_size=3, progress=False)[name]
    assert stats.grad_sq_rows.shape == (model.get_submodule(name).out_features,)
    assert torch.allclose(stats.grad_sq_rows, expected, rtol=1e-5)
    assert stats.grad_sq == pytest.approx(float(stats.grad_sq_rows.mean()), rel=1e-9)


def test_calibration_leaves_the_model_as_it_was():
    model = tiny_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 512, (2, 16))
    calibrate(model, ["transformer.h.0.mlp.c_fc"], ids, progress=False)  # Conv1D: inputs are (.., in) too
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert not model.transformer.h[0].mlp.c_fc._forward_pre_hooks


def test_calibrated_svd_is_activation_aware_and_beats_plain_svd_on_the_calibration_text():
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    teacher = tiny_llama()
    with torch.no_grad():
        reference = teacher(ids).logits
    losses = {}
    for label, calibration in (("plain", None), ("aware", ids)):
        model = tiny_llama()
        model, report = compress(
            model, CompressionConfig(method="svd", ratio=0.7), progress=False, calibration=calibration
        )
        assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
        with torch.no_grad():
            losses[label] = float((model(ids).logits - reference).square().mean())
    assert losses["aware"] < losses["plain"]
    assert "activation-aware" in report.layers[0].reason


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)])
def test_bad_calibration_input_is_a_clear_error(bad):
    with pytest.raises(TQCError, match="calibration tokens"):
        calibrate(tiny_llama(), ["model.layers.0.mlp.up_proj"], bad, progress=False)


def test_calibration_with_a_spec_file_fits_each_module_once_at_its_first_step():
    from tqcompressor import LayerSpec

    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    config = CompressionConfig(
        layers=[
            ("up_proj", LayerSpec("tq", rank=1, b_shape=(2, 2), step=1)),
            ("up_proj", LayerSpec("tq", rank=1, b_shape=(2, 4), step=2)),
            ("embed_tokens", LayerSpec("tq", rank=1, b_shape=(1, 2), step=1)),
        ]
    )
    plan = plan_compression(tiny_llama(), config, calibration=ids, progress=False)
    fitted = {(e.name, e.spec.step): e for e in plan.layers}
    up = [name for name, step in fitted if name.endswith("up_proj") and step == 1]
    assert up and all(fitted[(name, 1)].factors is not None for name in up)
    assert all("calibration text" in fitted[(name, 1)].spec.reason for name in up)
    assert all(fitted[(name, 2)].factors is None for name in up)  # re-factors the step-1 factors later
    assert fitted[("model.embed_tokens", 1)].factors is None  # embeddings: fitted in weight space when applied
    assert all(fitted[(name, 2)].spec.reason.count("calibration text") == 0 for name in up)


@pytest.mark.parametrize("method", ["tq", "kronecker"])
def test_calibrated_kronecker_methods_fit_the_outputs_and_stay_plain_layers(method):
    import copy

    from tqcompressor import KroneckerLinear
    from tqcompressor.linalg.decompose import output_error

    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    model, name = tiny_llama(), "model.layers.0.self_attn.o_proj"  # (MLP layers get their permutations folded)
    stats = calibrate(model, [name], ids, progress=False)
    weight = model.get_submodule(name).weight.detach().clone()
    config = CompressionConfig(method=method, ratio=0.8)
    calibrated, report = compress(copy.deepcopy(model), config, progress=False, calibration=ids)
    plain, _ = compress(copy.deepcopy(model), config, progress=False)
    layer = calibrated.get_submodule(name)
    assert isinstance(layer, KroneckerLinear)  # same layer type, only other factors
    reason = next(entry.reason for entry in report.layers if entry.name == name)
    assert "fitted to the outputs on the calibration text" in reason
    errors = [
        output_error(weight, m.get_submodule(name).to_dense(), stats[name].input_cov) for m in (calibrated, plain)
    ]
    assert errors[0] < errors[1]


def test_the_heads_fisher_rows_are_the_kl_curvature_of_each_logit():
    """``p_v (1 - p_v)`` averaged over every position: the head's rows by how much the KL to the model moves
    with their logits, whether or not their token came next in the text."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(model(ids).logits.double().reshape(-1, 512), dim=-1)
    stats = calibrate(model, ["lm_head", "model.layers.0.mlp.down_proj"], ids, batch_size=2, progress=False)
    assert torch.allclose(stats["lm_head"].fisher_rows, (p * (1 - p)).mean(0), rtol=1e-4)
    assert stats["model.layers.0.mlp.down_proj"].fisher_rows is None  # not a head: no logits
