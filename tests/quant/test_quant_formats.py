"""The quantization math: formats, packing, padding, and the CPU kernels against plain dequantization."""

from __future__ import annotations

import pytest
import torch

from tqcompressor.errors import TQCError
from tqcompressor.quant.formats import (
    QuantizeSettings,
    dequantize_grouped,
    dequantize_int8,
    group_size_for,
    int4_from_cpu_layout,
    pack_bits,
    pack_int4,
    padded_shape,
    quantize_grouped,
    quantize_grouped_hqq,
    quantize_int8,
    relative_error,
    unpack_bits,
    unpack_int4,
)
from tqcompressor.quant.modules import QuantizedWeight


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits, packed_width", [(4, 16), (3, 12), (2, 8)])
def test_low_bit_packing_round_trips_in_bits_per_value(bits, packed_width):
    q = torch.randint(0, 2**bits, (5, 32), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape == (5, packed_width) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits), q)
    assert unpack_bits(packed[:0], bits).shape == (0, 32)  # a lookup that leaves a band without rows


def test_int8_is_within_half_a_step_of_each_weight():
    w = torch.randn(7, 40)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_grouped_values_are_within_half_a_step_and_keep_each_groups_range(bits):
    w = torch.randn(6, 64)
    packed, scale, zero = quantize_grouped(w, 32, bits)
    assert unpack_bits(packed, bits).max() == 2**bits - 1
    back = dequantize_grouped(packed, scale, zero, 32, bits)
    step = scale.repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-5).all()
    groups, back_groups = w.reshape(6, 2, 32), back.reshape(6, 2, 32)
    assert torch.allclose(back_groups.amin(-1), groups.amin(-1), atol=1e-5)  # the minimum is a grid point


def test_padding_follows_what_the_kernels_need():
    assert padded_shape((13, 17), QuantizeSettings(8)) == (13, 32)
    assert padded_shape((13, 17), QuantizeSettings(4, 32)) == (16, 32)
    assert padded_shape((64, 200), QuantizeSettings(4, 128)) == (64, 224)
    assert group_size_for(200, QuantizeSettings(4, 128)) == 32  # 224 = 7 x 32: no padding to 256
    assert group_size_for(576, QuantizeSettings(4, 128)) == 64 and group_size_for(512, QuantizeSettings(4, 128)) == 128


@pytest.mark.parametrize(
    "text, group, message",
    [("int5", 32, "int8, int4, int3 or int2"), ("int4", 48, "group size 48"), ("int3", 48, "group size 48")],
)
def test_bad_settings_are_one_clear_error(text, group, message):
    with pytest.raises(TQCError, match=message):
        QuantizeSettings.parse(text, group)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape", [(13, 17), (48, 64), (5, 100), (40, 192)])
def test_cpu_kernel_matches_dequantized_matmul(bits, shape):
    """The CPU kernels (bfloat16 activations) compute what the stored integers stand for, for
    shapes that need padding too; the grad path (dequantize, then matmul) agrees with them."""
    torch.manual_seed(0)
    weight = QuantizedWeight.from_weight(torch.randn(shape), QuantizeSettings(bits, 128))
    x = torch.randn(3, 4, shape[1])
    reference = x @ weight.dequantize().T
    with torch.no_grad():
        fast = weight.linear(x)
    assert fast.shape == (3, 4, shape[0])
    assert torch.allclose(fast, reference, rtol=0.03, atol=0.03 * reference.abs().max().item())
    x.requires_grad_(True)
    slow = weight.linear(x)  # the kernels have no backward: this goes through dequantization
    slow.sum().backward()
    assert x.grad is not None and torch.allclose(slow.detach(), fast, rtol=0.03, atol=0.03 * fast.abs().max().item())


def test_int8_kernel_survives_misaligned_integers():
    """from_pretrained may hand over memory-mapped tensors at any offset; the kernel needs alignment."""
    weight = QuantizedWeight.from_weight(torch.randn(32, 64), QuantizeSettings(8))
    storage = torch.zeros(32 * 64 + 3, dtype=torch.int8)
    storage[3:] = weight.qdata.reshape(-1)
    weight.qdata = storage[3:].view(32, 64)
    assert weight.qdata.data_ptr() % 64
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(weight.linear(x), x @ weight.dequantize().T, rtol=0.03, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_rows_are_the_dequantized_rows(bits):
    weight = QuantizedWeight.from_weight(torch.randn(40, 24), QuantizeSettings(bits, 32))
    index = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(weight.rows(index), weight.dequantize()[index])


@pytest.mark.parametrize("shape", [(16, 32), (48, 64), (80, 96), (64, 576)])
def test_the_cpu_kernel_layout_reads_back_to_the_portable_one(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(int4_from_cpu_layout(kernel, shape), pack_int4(q))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_grouped_formats_run_from_the_kernel_layout_alone_and_still_save_the_portable_one(bits):
    """In memory an int4 matrix holds half a byte per value, as on disk (an embedding's table,
    read by lookups too, keeps both layouts); int3 and int2 run from the same int4 layout and save
    ``bits`` bits a value."""
    weight = QuantizedWeight.from_weight(torch.randn(48, 64), QuantizeSettings(bits, 32))
    assert weight.stored_bytes == 48 * 64 * bits // 8 + 2 * 48 * 2 * 2  # values, bfloat16 scale and offset
    portable, dense, stored = weight.qdata.clone(), weight.dequantize(), weight.stored_bytes
    with torch.no_grad():
        weight.linear(torch.randn(2, 64))
    assert weight.kernel_layout and not torch.equal(weight.qdata, portable) and weight.cpu_int4 is None
    assert weight.stored_bytes == stored and torch.equal(weight.dequantize(), dense)
    state = weight.state_dict()
    assert torch.equal(state["qdata"], portable)
    assert state["scale"].is_contiguous() and state["zero"].is_contiguous()  # what safetensors takes
    weight.load_state_dict(state)
    assert not weight.kernel_layout and torch.equal(weight.qdata, portable)


def test_int4_scales_are_held_once_beside_the_kernels_copy():
    from tqcompressor.evaluation.footprint import memory_bytes

    weight = QuantizedWeight.from_weight(torch.randn(48, 64), QuantizeSettings(4, 32))
    scale, zero, stored = weight.scale.clone(), weight.zero.clone(), weight.stored_bytes
    with torch.no_grad():
        weight.linear(torch.randn(2, 64))
    assert torch.equal(weight.scale, scale) and torch.equal(weight.zero, zero)
    assert weight.scale.untyped_storage().data_ptr() == weight.cpu_scale_zero.untyped_storage().data_ptr()
    assert memory_bytes(weight) == stored  # in memory as on disk: integers, scales, offsets once


def test_hqq_values_read_back_as_hqq_itself_dequantizes_them():
    from hqq.core.quantize import Quantizer

    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    for bits in (4, 3, 2):
        packed, scale, zero = quantize_grouped_hqq(weight, 64, bits)
        assert unpack_bits(packed, bits).max() <= 2**bits - 1
        q, meta = Quantizer.quantize(weight, nbits=bits, group_size=64, axis=1, bitpack=False, device="cpu")
        theirs = Quantizer.dequantize(q, {**meta, "compute_dtype": torch.float32}).reshape(32, 128)
        back = dequantize_grouped(packed, scale, zero, 64, bits)
        torch.testing.assert_close(back, theirs.float(), rtol=1e-5, atol=1e-5)


def test_hqq_fits_closer_than_rounding_to_nearest_in_the_same_bytes():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    rtn = QuantizedWeight.from_weight(weight, QuantizeSettings(4, 64))
    hqq = QuantizedWeight.from_weight(weight, QuantizeSettings(4, 64, "hqq"))
    assert hqq.stored_bytes == rtn.stored_bytes
    assert relative_error(weight, hqq.dequantize()) < relative_error(weight, rtn.dequantize())


@pytest.mark.parametrize(
    "settings, message",
    [((8, 32, "hqq"), "int8 .* rounds to nearest"), ((4, 32, "gptq"), "--quantizer takes one of rtn, hqq")],
)
def test_a_quantizer_that_does_not_apply_is_one_clear_error(settings, message):
    with pytest.raises(TQCError, match=message):
        QuantizeSettings(*settings)
