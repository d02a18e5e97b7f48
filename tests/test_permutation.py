import pytest
import torch

from tqcompressor import decompose
from tqcompressor.decompose import relative_error
from tqcompressor.permutation import permuted_kronecker
from tqcompressor.structures.kronecker import KroneckerFactors


def scrambled_kronecker(m1, n1, m2, n2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m1, n1, generator=g), torch.randn(m2, n2, generator=g)
    k = torch.kron(a, b)
    return k[torch.randperm(k.shape[0], generator=g)][:, torch.randperm(k.shape[1], generator=g)]



@pytest.mark.parametrize("shapes", [(8, 6, 4, 3), (16, 16, 2, 4), (32, 16, 4, 8), (96, 48, 2, 4), (12, 10, 3, 5)])
def test_tq_recovers_scrambled_kronecker_product_that_plain_kronecker_cannot(shapes):
    m1, n1, m2, n2 = shapes
    w = scrambled_kronecker(*shapes, seed=sum(shapes))
    tq = decompose(w, "tq", a_shape=(m1, n1), b_shape=(m2, n2))
    plain = decompose(w, "kronecker", a_shape=(m1, n1), b_shape=(m2, n2))
    assert relative_error(w, tq.to_dense()) < 1e-4
    assert relative_error(w, plain.to_dense()) > 0.1


def test_permutations_are_valid_and_error_never_increases():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    f = permuted_kronecker(w.double(), (12, 10), (4, 4), rank=2)
    for perm, size in ((f.row_perm, 48), (f.col_perm, 40)):
        assert perm.dtype == torch.long
        assert torch.equal(perm.sort().values, torch.arange(size))
    assert len(f.history) >= 1
    assert all(b <= a + 1e-12 for a, b in zip(f.history, f.history[1:]))
    assert f.history[-1] == pytest.approx(relative_error(w.double(), KroneckerFactors(*f).to_dense()), rel=1e-9)


def test_tq_never_worse_than_kronecker_on_random_matrix():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    tq = decompose(w, "tq", b_shape=(2, 4), rank=2)
    plain = decompose(w, "kronecker", b_shape=(2, 4), rank=2)
    assert relative_error(w, tq.to_dense()) <= relative_error(w, plain.to_dense()) + 1e-6


def test_tq_is_deterministic():
    w = torch.randn(32, 24, generator=torch.Generator().manual_seed(3))
    f1, f2 = decompose(w, "tq", b_shape=(2, 2), rank=2), decompose(w, "tq", b_shape=(2, 2), rank=2)
    assert torch.equal(f1.row_perm, f2.row_perm) and torch.equal(f1.col_perm, f2.col_perm)
    assert torch.equal(f1.a, f2.a) and torch.equal(f1.b, f2.b)
