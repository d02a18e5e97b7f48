import pytest
import torch

from tqcompressor import TQCError, decompose
from tqcompressor.linalg.decompose import inverse_permutation, kronecker_sum, relative_error


def test_kronecker_to_dense_equals_torch_kron():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(4))
    f = decompose(w, "kronecker", a_shape=(3, 4), b_shape=(4, 5), rank=1)
    assert torch.allclose(f.to_dense(), torch.kron(f.a[0], f.b[0]), atol=1e-6)
    f2 = decompose(w, "kronecker", a_shape=(3, 4), rank=3)
    expected = sum(torch.kron(f2.a[k], f2.b[k]) for k in range(3))
    assert torch.allclose(f2.to_dense(), expected, atol=1e-6)
    assert f2.num_params == 3 * (12 + 20)


def test_kronecker_rank_is_optimal_for_exact_sum():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 6, 4, generator=g), torch.randn(2, 3, 5, generator=g)
    w = kronecker_sum(a, b)
    f = decompose(w, "kronecker", a_shape=(6, 4), b_shape=(3, 5), rank=2)
    assert relative_error(w, f.to_dense()) < 1e-5


def test_svd_matches_eckart_young():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(6))
    f = decompose(w, "svd", rank=5)
    s = torch.linalg.svdvals(w.double())
    expected = float((s[5:] ** 2).sum().sqrt() / s.norm())
    assert relative_error(w, f.to_dense()) == pytest.approx(expected, rel=1e-4)
    assert f.num_params == 5 * (30 + 20)


def test_inverse_permutation():
    p = torch.randperm(10)
    assert torch.equal(p[inverse_permutation(p)], torch.arange(10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope", b_shape=(2, 2)), "unknown method"),
        (dict(method="tq", b_shape=(3, 2)), "does not divide"),
        (dict(method="tq", a_shape=(4, 4), b_shape=(2, 3)), "not the weight shape"),
        (dict(method="tq"), "a_shape or b_shape"),
        (dict(method="svd", rank=0), "rank"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(TQCError, match=message):
        decompose(torch.randn(8, 8), **kwargs)


def _correlated_inputs(n: int, tokens: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)  # strongly unequal input directions
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.double().T


def test_activation_aware_svd_minimises_output_error():
    from tqcompressor.linalg.decompose import output_error
    from tqcompressor.structures.lowrank import truncated_svd

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = _correlated_inputs(32)
    cov = x.T @ x / len(x)
    aware, plain = truncated_svd(w, 6, cov, damping=1e-12), truncated_svd(w, 6)
    err_aware, err_plain = output_error(w, aware.to_dense(), cov), output_error(w, plain.to_dense(), cov)
    assert err_aware < 0.8 * err_plain  # the plain SVD spends rank on directions the inputs never use
    assert abs(aware.history[0] - err_aware) < 1e-6  # history reports the metric it minimised
    # the error is what the layer really does on those inputs
    measured = ((x @ (w - aware.to_dense()).T).norm() / (x @ w.T).norm()).item()
    assert abs(measured - err_aware) < 1e-6
    # and no other rank-6 matrix does better: compare with random perturbations of the optimum
    for seed in range(5):
        noise = torch.randn(24, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-3
        u, s, vh = torch.linalg.svd(aware.to_dense() + noise)
        other = (u[:, :6] * s[:6]) @ vh[:6]
        assert output_error(w, other, cov) >= err_aware - 1e-9


def test_whitening_inverts_and_damps():
    from tqcompressor.linalg.decompose import whitening

    x = _correlated_inputs(16)
    cov = x.T @ x / len(x)
    root, back = whitening(cov, damping=1e-3)
    assert torch.allclose(root @ back, torch.eye(16, dtype=torch.float64), atol=1e-8)
    damped = cov + 1e-3 * cov.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(root @ root.T, damped, rtol=1e-6, atol=1e-10)
    with pytest.raises(TQCError, match="square"):
        whitening(torch.ones(3, 4))


def test_kronecker_scaling_recovers_an_exact_kronecker_scale():
    from tqcompressor.structures.kronecker.fit import kronecker_scaling

    d_a, d_b = torch.rand(6, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) + 0.5
    got_a, got_b = kronecker_scaling(torch.kron(d_a, d_b), 6, 4)
    assert torch.allclose(torch.kron(got_a, got_b), torch.kron(d_a, d_b), rtol=1e-10)
    assert bool((got_a > 0).all()) and bool((got_b > 0).all())


@pytest.mark.parametrize("method", ["kronecker", "tq"])
def test_input_scaled_kronecker_fit_is_folded_into_the_factors(method):
    from tqcompressor.linalg.decompose import nearest_kronecker
    from tqcompressor.structures.kronecker.fit import fit_kronecker

    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    scale = torch.kron(
        torch.logspace(0, 2, 6, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    )
    weighted = fit_kronecker(w, None, (2, 4), rank=2, search=method == "tq", input_scale=scale)
    plain = decompose(w, method, b_shape=(2, 4), rank=2)
    assert weighted.a.shape == plain.a.shape and weighted.b.shape == plain.b.shape  # same layer, no extra buffer
    # the error that counts when input column j is ~scale[j] large: the weighted fit wins
    assert relative_error(w * scale, weighted.to_dense() * scale) < relative_error(w * scale, plain.to_dense() * scale)
    if method == "kronecker":  # exact: it is the Van Loan fit of W diag(s), unscaled
        a, b = nearest_kronecker(w * scale, (8, 6), (2, 4), 2)
        assert torch.allclose(weighted.to_dense() * scale, kronecker_sum(a, b), atol=1e-9)
    with pytest.raises(TQCError, match="positive numbers"):
        fit_kronecker(w, None, (2, 4), search=method == "tq", input_scale=-scale)
