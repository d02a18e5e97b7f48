"""Sequential refit: compensating earlier layers' errors brings the compressed model closer to the teacher."""

import copy

import pytest
import torch

import tqcompressor as tqc
from tests.conftest import tiny_gpt2, tiny_llama
from tqcompressor.layers import dense_weight_of
from tqcompressor.surgery.sequential import compensated_weight, cross_statistics


def test_compensated_weight_is_the_least_squares_map_from_student_to_teacher_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x_t = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    x_s = x_t + 0.3 * torch.randn(4000, 8, generator=g, dtype=torch.float64)  # upstream error
    c_ss, c_ts = x_s.T @ x_s / 4000, x_t.T @ x_s / 4000
    solution = torch.linalg.lstsq(x_s, x_t @ w.T).solution.T  # min ||x_s W'^T - x_t W^T||
    assert torch.allclose(compensated_weight(w, c_ss, c_ts, ridge=1e-6), solution, atol=1e-3)


def test_cross_statistics_of_identical_models_are_the_input_second_moment():
    model = tiny_llama()
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    stats = cross_statistics(model, copy.deepcopy(model), names, ids)
    for name in names:
        c_ss, c_ts, tokens = stats[name]
        assert tokens == 64 and torch.allclose(c_ss, c_ts) and torch.allclose(c_ss, c_ss.T)


@pytest.mark.parametrize("method, arch", [("svd", "llama"), ("auto", "llama"), ("svd", "gpt2")])
def test_sequential_refit_brings_the_outputs_closer_to_the_teacher_on_its_calibration_text(method, arch):
    teacher = tiny_llama() if arch == "llama" else tiny_gpt2()
    calibration = torch.randint(0, 512, (32, 32), generator=torch.Generator().manual_seed(2))

    def compressed(sequential: bool):
        config = tqc.CompressionConfig(method=method, ratio=0.6, sequential=sequential)
        return tqc.compress(copy.deepcopy(teacher), config, calibration=calibration, progress=False)

    (plain, _), (refitted, report) = compressed(False), compressed(True)
    assert tqc.count_parameters(refitted) == tqc.count_parameters(plain)  # same plan, same sizes
    assert all("refitted sequentially" in layer.reason for layer in report.layers)
    # the first layer sees the teacher's own inputs: nothing to compensate
    first = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    refitted_weight = dense_weight_of(refitted.get_submodule(first))[0]
    assert torch.allclose(refitted_weight, dense_weight_of(plain.get_submodule(first))[0], atol=1e-4)
    with torch.no_grad():
        reference = teacher(calibration).logits.log_softmax(-1)

        def kl(model):
            return torch.nn.functional.kl_div(
                model(calibration).logits.log_softmax(-1), reference, log_target=True, reduction="batchmean"
            )

        assert kl(refitted) < kl(plain)


def test_sequential_refit_needs_token_ids():
    with pytest.raises(tqc.TQCError, match="token ids"):
        tqc.compress(tiny_llama(), tqc.CompressionConfig(method="svd", ratio=0.6, sequential=True), calibration={})
