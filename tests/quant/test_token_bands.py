"""A token table stored in bands of rows, each in its own format (tqcompressor.quant.modules.QuantizedTokenBands)."""

import pytest
import torch

from tqcompressor.errors import TQCError
from tqcompressor.quant.formats import QuantizeSettings
from tqcompressor.quant.modules import QuantizedTokenBands, QuantizedWeight
from tqcompressor.schemas import module_config

INT8, INT4 = QuantizeSettings(8), QuantizeSettings(4, 32)


def banded_table(output_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, QuantizedTokenBands]:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(100, 64, generator=generator)
    order = torch.randperm(100, generator=generator)
    return table, order, QuantizedTokenBands.from_dense(table, order, [(32, INT8), (68, INT4)], output_scale)


def test_each_band_stores_its_rows_in_its_own_format():
    table, order, module = banded_table()
    dense = module.to_dense()
    first = QuantizedWeight.from_weight(table[order[:32]], INT8).dequantize()
    rest = QuantizedWeight.from_weight(table[order[32:]], INT4).dequantize()
    assert torch.equal(dense[order[:32]], first) and torch.equal(dense[order[32:]], rest)
    assert (dense[order[:32]] - table[order[:32]]).abs().max() < (dense[order[32:]] - table[order[32:]]).abs().max()
    assert module.format_name == "int8 x32 + int4-g32 x68"


@pytest.mark.parametrize("output_scale", [1.0, 8.0])
def test_lookups_and_tied_logits_are_those_of_the_table_it_stands_for(output_scale):
    _, _, module = banded_table(output_scale)
    dense = module.to_dense()
    ids = torch.tensor([[0, 99, 5, 5, 42], [7, 31, 32, 68, 1]])
    assert torch.equal(module(ids), dense[ids] * output_scale)
    hidden = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    expected = hidden @ dense.T  # the head computes in bfloat16: agree to its precision, token by token
    torch.testing.assert_close(module.project(hidden), expected, rtol=0.02, atol=0.05)


def test_a_lookup_whose_tokens_all_fall_in_one_band_reads_that_band_alone():
    """One token at a time, as generation looks them up: the other band gets no rows."""
    _, order, module = banded_table()
    for token in (order[0], order[99]):  # in the int8 band, then in the int4 band
        ids = token.reshape(1, 1)
        assert torch.equal(module(ids), module.to_dense()[ids])


def test_bytes_count_every_band_and_the_order():
    _, _, module = banded_table()
    parts = sum(part.stored_bytes for part in module.parts)
    assert module.index_bytes == 100 * 4
    saved = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert saved == parts + module.index_bytes


def test_a_description_whose_bands_do_not_make_the_table_is_refused():
    _, _, module = banded_table()
    description = {"type": "QuantizedTokenBands", **module.config()}
    assert module_config(description, "here")["bands"][0]["rows"] == 32
    description["bands"] = [{"rows": 32, "bits": 8, "group_size": 32}]
    with pytest.raises(TQCError, match="do not make the table's 100 rows"):
        module_config(description, "here")
    with pytest.raises(ValueError, match="do not make 100 rows"):
        QuantizedTokenBands(100, 64, [(32, INT8)])
