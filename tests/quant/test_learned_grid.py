"""Stored matrices that learn their scales and offsets, the integers kept (a byte plan's distillation)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tqcompressor.planning.formats import settings_named
from tqcompressor.quant import modules
from tqcompressor.quant.api import freeze_grids_, learn_grids_, quantize_
from tqcompressor.quant.modules import QuantizedWeight

IDS = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int3-g64-dq", "int2-g32-dq"])
def test_a_learning_grid_starts_where_it_was_trains_by_gradient_and_stores_what_it_learned(name):
    torch.manual_seed(0)
    weight = QuantizedWeight.from_weight(torch.randn(48, 64), settings_named(name))
    x, target = torch.randn(16, 64), torch.randn(16, 48)
    before, values = weight.dequantize(), weight.portable_qdata().clone()
    with torch.no_grad():
        weight.linear(x)  # in the kernel's layout now: learning takes it back
    weight.learn_grid()
    assert weight.learning and torch.equal(weight.dequantize(), before)
    names = {n for n, _ in weight.named_parameters()}
    assert names == ({"grid_scale"} if name == "int8" else {"grid_scale", "grid_zero"})
    optimizer = torch.optim.Adam(weight.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (weight.linear(x).float() - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    learned = weight.dequantize().detach()
    weight.freeze_grid()
    assert not weight.learning and not list(weight.parameters())
    if not weight.settings.double_quant:  # the integers never moved (coded scales: rounded to the coded grid)
        assert torch.equal(weight.portable_qdata(), values)
    # bfloat16 scales (double-quantized: 8-bit codes) round what was learned a little
    assert (weight.dequantize() - learned).norm() < 0.05 * (learned - before).norm() + 0.01 * learned.norm()
    assert "grid_scale" not in weight.state_dict()


def test_a_model_learns_its_grids_and_saves_them_for_plain_from_pretrained(tmp_path):
    model = tiny_llama()
    quantize_(model, settings_named("int3-g32-dq"))
    assert learn_grids_(model) == len([m for m in model.modules() if isinstance(m, QuantizedWeight)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    freeze_grids_(model)
    with torch.no_grad():
        expected = model(IDS).logits
    tqc.save(model, tmp_path / "q")
    opened = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(opened(IDS).logits, expected)


@pytest.mark.parametrize("native", [True, False])
def test_a_training_matrix_multiplies_in_bfloat16_only_where_the_cpu_has_it_natively(monkeypatch, native):
    """Emulated bfloat16 cost a 2-core AVX2 CPU about 17x float32's time for a learning matrix's step."""
    monkeypatch.setattr(modules, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert modules.dequantized_dtype(torch.device("cpu")) == expected
    torch.manual_seed(0)
    weight = QuantizedWeight.from_weight(torch.randn(48, 64), settings_named("int4-g32"))
    weight.learn_grid()
    x = torch.randn(16, 64)
    y = weight.linear(x)
    assert y.dtype == torch.float32 and y.requires_grad
    in_bfloat16 = torch.equal(y, y.to(torch.bfloat16).float())  # every value one bfloat16 holds
    assert in_bfloat16 == native
    exact = x @ weight.dequantize().T
    assert (y - exact).norm() < (0.01 if native else 1e-5) * exact.norm()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", ["int8", "int4-g32", "int3-g32"])
def test_a_frozen_matrix_runs_the_kernels_a_token_at_a_time_and_many_rows_in_float32_where_bfloat16_is_emulated(
    monkeypatch, native, name
):
    monkeypatch.setattr(modules, "cpu_has_native_bf16", lambda: native)
    torch.manual_seed(0)
    weight = QuantizedWeight.from_weight(torch.randn(48, 64), settings_named(name))
    exact = lambda x: x @ weight.dequantize().T  # noqa: E731
    few, many = torch.randn(modules.DEQUANTIZE_ROWS - 1, 64), torch.randn(2, modules.DEQUANTIZE_ROWS // 2, 64)
    with torch.no_grad():
        for x in (few, many, few):  # the kernel's layout, made by the first call, serves both afterwards
            y = weight.linear(x)
            in_bfloat16 = torch.equal(y, y.to(torch.bfloat16).float())  # every value one bfloat16 holds
            assert in_bfloat16 == (native or x is few), "the kernels compute in bfloat16"
            assert (y - exact(x)).norm() < (0.01 if in_bfloat16 else 1e-5) * exact(x).norm()
