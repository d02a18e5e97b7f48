"""Krony-PT's pruning start (``kronecker_prune``): strided sub-matrices of W, unit selectors in B."""

from __future__ import annotations

import pytest
import torch

from tqcompressor import TQCError
from tqcompressor.linalg.decompose import output_error, relative_error
from tqcompressor.structures import decompose
from tqcompressor.structures.kronecker.fit import pruning_start


def test_keeps_the_strongest_strided_submatrices_exactly_and_zeroes_the_rest():
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64)
    w[1::2, 2::4] *= 10  # offset (p, q) = (1, 2) of a 2x4 B carries the most energy, then (0, 3)
    w[0::2, 3::4] *= 5
    factors = pruning_start(w, (3, 2), (2, 4), rank=2)
    assert factors.b.sum(dim=(1, 2)).tolist() == [1.0, 1.0]  # unit selectors
    kept = {tuple(int(i) for i in torch.nonzero(b)[0]) for b in factors.b}
    assert kept == {(1, 2), (0, 3)}
    dense = factors.to_dense()
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[1::2, 2::4] = mask[0::2, 3::4] = True
    assert torch.equal(dense[mask], w[mask]) and (dense[~mask] == 0).all()
    assert factors.history[-1] == pytest.approx(relative_error(w, dense))
    # every offset kept: W itself; too many asked for: one line
    assert torch.equal(pruning_start(w, (3, 2), (2, 4), rank=8).to_dense(), w)
    with pytest.raises(TQCError, match="at most m2 \\* n2 = 8"):
        pruning_start(w, (3, 2), (2, 4), rank=9)


def test_calibration_keeps_the_columns_whose_inputs_are_strong():
    torch.manual_seed(1)
    w = torch.randn(4, 6, dtype=torch.float64)
    w[:, 0::2] *= 2  # by weight energy alone the even columns win (B 1x2, rank 1)
    assert torch.nonzero(pruning_start(w, (4, 3), (1, 2)).b[0]).tolist() == [[0, 0]]
    cov = torch.diag(torch.tensor([0.01, 1.0] * 3, dtype=torch.float64))  # but the odd inputs are far larger
    factors = pruning_start(w, (4, 3), (1, 2), input_cov=cov)
    assert torch.nonzero(factors.b[0]).tolist() == [[0, 1]]
    assert factors.history[-1] == pytest.approx(output_error(w, factors.to_dense(), cov))


def test_the_registered_structure_is_krony_pts_every_other_column():
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    dense = decompose(w, "kronecker_prune", b_shape=(1, 2), rank=1).to_dense()
    assert torch.equal(dense[:, 1::2], w[:, 1::2]) and (dense[:, 0::2] == 0).all()
