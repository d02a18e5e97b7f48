import itertools

import pytest
import torch

from tqcompressor import decompose
from tqcompressor.linalg.decompose import (
    damped_cov,
    inverse_permutation,
    kronecker_sum,
    nearest_kronecker,
    output_error,
    output_metric_kronecker,
    relative_error,
)
from tqcompressor.linalg.permutation import (
    CONVERGE_STEPS,
    output_metric_search,
    output_row_assignment,
    permuted_kronecker,
)
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


def test_skipped_starts_still_find_planted_structure_and_never_end_worse_than_kronecker(monkeypatch):
    from tqcompressor.structures.kronecker.settings import AUTO_STARTS

    w = scrambled_kronecker(16, 16, 2, 4, seed=4).double()
    found = permuted_kronecker(w, (16, 16), (2, 4), 1, start_names=AUTO_STARTS)
    assert found.history[-1] < 1e-6  # the spectral start still runs: it begins ahead
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    every = permuted_kronecker(w, (12, 8), (2, 4), 2, skip_worse_starts=False)
    skipping = permuted_kronecker(w, (12, 8), (2, 4), 2)
    similarity = permuted_kronecker(w, (12, 8), (2, 4), 2, start_names=("similarity",))
    plain = relative_error(w, kronecker_sum(*nearest_kronecker(w, (12, 8), (2, 4), 2)))
    assert every.history[-1] <= skipping.history[-1] <= min(similarity.history[-1], plain)
    # a start given explicitly is always searched from, even one that begins behind
    import tqcompressor.linalg.permutation as permutation

    searched = []
    alternate = permutation._alternate
    monkeypatch.setattr(permutation, "_alternate", lambda *args: searched.append(args[4]) or alternate(*args))
    assert plain >= similarity.history[-1]  # so the identity begins behind the similarity start's end
    behind = (similarity.row_perm.flip(0), torch.arange(32))
    permuted_kronecker(w, (12, 8), (2, 4), 2, start_names=("similarity", "identity"), starts=[behind])
    assert len(searched) == 2 and torch.equal(searched[-1], behind[0])  # identity skipped, the given start not
    with pytest.raises(ValueError, match="unknown search start 'random'"):
        permuted_kronecker(w, (12, 8), (2, 4), 2, start_names=("random",))


def test_tq_is_deterministic():
    w = torch.randn(32, 24, generator=torch.Generator().manual_seed(3))
    f1, f2 = decompose(w, "tq", b_shape=(2, 2), rank=2), decompose(w, "tq", b_shape=(2, 2), rank=2)
    assert torch.equal(f1.row_perm, f2.row_perm) and torch.equal(f1.col_perm, f2.col_perm)
    assert torch.equal(f1.a, f2.a) and torch.equal(f1.b, f2.b)


def planted(m1, n1, m2, n2, rank, noise=0.0, seed=0):
    """A scrambled ``sum_k A_k (x) B_k`` (plus relative ``noise``) and the permutations that unscramble it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, m1, n1, generator=g, dtype=torch.float64)
    b = torch.randn(rank, m2, n2, generator=g, dtype=torch.float64)
    k = kronecker_sum(a, b)
    k = k + noise * k.norm() / k.numel() ** 0.5 * torch.randn(k.shape, generator=g, dtype=torch.float64)
    rows, cols = torch.randperm(m1 * m2, generator=g), torch.randperm(n1 * n2, generator=g)
    return k[rows][:, cols], inverse_permutation(rows), inverse_permutation(cols), a, b


def shuffle_some(perm, fraction, seed):
    """``perm`` with ``fraction`` of its entries moved among themselves."""
    g = torch.Generator().manual_seed(seed)
    moved = torch.randperm(len(perm), generator=g)[: int(fraction * len(perm))]
    perm = perm.clone()
    perm[moved] = perm[moved[torch.randperm(len(moved), generator=g)]]
    return perm


@pytest.mark.parametrize("rank", [2, 3])
def test_search_repairs_a_start_with_some_labels_wrong(rank):
    """The alternation is a local search: from a start with 5% of rows and columns misplaced it
    reaches the planted rank-2/3 structure exactly, which none of its own starts finds."""
    w, rows, cols, _, _ = planted(16, 16, 4, 4, rank, seed=rank)
    start = (shuffle_some(rows, 0.05, 1), shuffle_some(cols, 0.05, 2))
    repaired = permuted_kronecker(w, (16, 16), (4, 4), rank, max_iterations=50, starts=[start])
    assert repaired.history[-1] < 1e-8
    assert permuted_kronecker(w, (16, 16), (4, 4), rank).history[-1] > 0.3  # the limit, measured


def test_output_metric_search_never_ends_above_its_best_start_and_its_steps_only_lower_the_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 32, dtype=torch.float64)
    cov = x.T @ x / len(x)
    (m1, n1), (m2, n2) = (6, 8), (4, 4)
    starts = []
    for _ in range(2):
        rows, cols = torch.randperm(24, generator=g), torch.randperm(32, generator=g)
        starts.append((rows, cols, *nearest_kronecker(w[rows][:, cols], (m1, n1), (m2, n2), 2)))
    found = output_metric_search(w, cov, starts, max_iterations=10)
    for rows, cols, a, b in starts:
        refined = output_metric_kronecker(w[rows][:, cols], cov[cols][:, cols], a, b, CONVERGE_STEPS, 1e-4)[2][-1]
        assert found.history[0] <= refined + 1e-12
    assert all(later < earlier for earlier, later in zip(found.history, found.history[1:]))
    dense = KroneckerFactors(*found).to_dense()
    assert found.history[-1] == pytest.approx(output_error(w, dense, damped_cov(cov)), rel=1e-9)


def test_output_row_assignment_is_exact_under_correlated_inputs():
    """Rows do not interact with C, so the row step's cost is exact: no row order (all 720 tried)
    has less output error than the one it returns."""
    w, _, cols, a, b = planted(3, 4, 2, 2, rank=2, noise=0.3, seed=5)
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = (mix @ mix.T / 8)[cols][:, cols]  # strongly correlated inputs
    target, w = kronecker_sum(a, b), w[:, cols]
    found = output_error(w[output_row_assignment(w, cov, target)], target, cov)
    brute = min(output_error(w[list(p)], target, cov) for p in itertools.permutations(range(6)))
    assert found == pytest.approx(brute, rel=1e-12)
