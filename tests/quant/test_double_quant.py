"""Double quantization (group scales and offsets stored as 8-bit codes), and the int3/int2 formats beside int4."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import tqcompressor as tqc
from tqcompressor.errors import TQCError
from tqcompressor.planning.formats import settings_named
from tqcompressor.quant.api import quantize_
from tqcompressor.quant.formats import QuantizeSettings, decode_per_row, double_quantize, quantize_grouped, unpack_int4
from tqcompressor.quant.modules import QuantizedWeight

DQ32 = QuantizeSettings(4, 32, double_quant=True)
IDS = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def on_a_grid(rows: int, inputs: int, group: int) -> torch.Tensor:
    """A matrix already stored in int4 groups with float scales and offsets, each group's minimum and maximum
    on its grid's ends (as a GGUF Q4_1 model's)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (rows, inputs // group, group), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = 0.01 + 0.02 * torch.rand(rows, inputs // group, 1, generator=generator)
    low = -8 * scale + 0.01 * torch.randn(rows, inputs // group, 1, generator=generator)
    return (q * scale + low).reshape(rows, inputs)


def test_codes_cost_a_quarter_bit_per_value_at_groups_of_32_and_one_step_per_row():
    plain64 = QuantizedWeight.from_weight(torch.randn(64, 256), QuantizeSettings(4, 64))
    coded32 = QuantizedWeight.from_weight(torch.randn(64, 256), DQ32)
    assert coded32.stored_bytes == plain64.stored_bytes + 64 * 2 * 2  # the same but for two bfloat16 steps a row
    assert set(coded32.state_dict()) == {"qdata", "scale_codes", "scale_step", "zero_codes", "zero_step"}


def test_a_matrix_on_a_group_of_32_grid_stays_closer_in_int4_g32_dq_than_in_int4_g64():
    weight = on_a_grid(64, 256, 32)
    coded = QuantizedWeight.from_weight(weight, DQ32).dequantize()
    coarser = QuantizedWeight.from_weight(weight, QuantizeSettings(4, 64)).dequantize()
    assert (coded - weight).norm() < 0.25 * (coarser - weight).norm()


def test_each_value_takes_the_nearest_step_of_its_groups_decoded_grid():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    _, scale, zero = quantize_grouped(weight, 32)
    packed, scale_codes, scale_step, zero_codes, zero_step = double_quantize(weight, scale, zero, 32)
    assert scale_codes.dtype == torch.uint8 and zero_codes.dtype == torch.int8 and scale_step.shape == (16,)
    decoded_scale, decoded_zero = decode_per_row(scale_codes, scale_step), decode_per_row(zero_codes, zero_step)
    # within half a code's step, and bfloat16's rounding (of the step, and of what it decodes to)
    assert ((decoded_scale - scale).abs() <= 0.5 * scale_step.float()[:, None] + scale.abs() / 2**7).all()
    steps = unpack_int4(packed).float().reshape(16, 2, 32) - 8
    grid = torch.arange(-8, 8).float()
    groups = weight.reshape(16, 2, 32, 1)
    every = grid * decoded_scale[..., None, None] + decoded_zero[..., None, None]
    nearest = (groups - every).abs().argmin(-1).float() - 8
    assert torch.equal(steps, nearest)


def test_the_cpu_kernel_computes_with_the_decoded_scales_and_files_keep_the_codes():
    weight = QuantizedWeight.from_weight(torch.randn(40, 96), DQ32)
    x = torch.randn(3, 96)
    reference = x @ weight.dequantize().T
    with torch.no_grad():
        fast = weight.linear(x)
    torch.testing.assert_close(fast, reference, rtol=0.03, atol=0.03 * float(reference.abs().max()))
    state = weight.state_dict()
    again = QuantizedWeight(40, 96, DQ32)
    again.load_state_dict(state)
    assert torch.equal(again.dequantize(), weight.dequantize())


@pytest.mark.parametrize("name", ["int4-g32-dq", "int3-g32-dq", "int2-g64", "int3-g64-hqq"])
def test_a_double_quantized_or_low_bit_model_saves_and_reopens_with_plain_from_pretrained(tmp_path, name):
    model = tiny_llama()
    settings = settings_named(name)
    report = quantize_(model, settings)
    assert {layer.format for layer in report.layers} == {settings.name}
    with torch.no_grad():
        expected = model(IDS).logits
    tqc.save(model, tmp_path / "q")
    for opened in (tqc.load(tmp_path / "q"), AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        with torch.no_grad():
            assert torch.equal(opened(IDS).logits, expected)


def test_formats_are_named_and_parsed_back():
    assert settings_named("int4-g32-dq") == DQ32 and DQ32.name == "int4-g32-dq"
    assert settings_named("int3-g128-dq-hqq") == QuantizeSettings(3, 128, "hqq", True)
    assert QuantizeSettings(2, 64).name == "int2-g64" and QuantizeSettings.parse("int3", 64).name == "int3-g64"
    assert settings_named("int4-g64-dq-hqq") == QuantizeSettings(4, 64, "hqq", True)
    assert QuantizeSettings(4, 64, "hqq", True).label == "int4-g64-dq-hqq"


def test_double_quantized_int8_is_one_clear_error():
    with pytest.raises(TQCError, match="int8 keeps one float scale per row"):
        QuantizeSettings(8, double_quant=True)
