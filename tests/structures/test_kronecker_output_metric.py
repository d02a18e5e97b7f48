"""The exact output-metric Kronecker fit (alternating least squares in tr(D C D^T))."""

import pytest
import torch

import tqcompressor as tqc
from tqcompressor.linalg.decompose import (
    WHITENING_DAMPING,
    damped_eigen,
    kronecker_sum,
    nearest_kronecker,
    output_error,
    output_metric_kronecker,
)
from tqcompressor.structures.kronecker.fit import input_rms, scaled_kronecker


def problem(m1=3, n1=2, m2=2, n2=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    x = torch.randn(200, n1 * n2, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1, n1 * n2, dtype=torch.float64
    )
    return w, x.T @ x / len(x), g


def damped(cov):
    values, vectors = damped_eigen(cov, WHITENING_DAMPING)
    return (vectors * values) @ vectors.T


def brute_force_a(w, cov, b, a_shape):
    """min_A tr(D C D^T) for fixed B, by least squares on an explicit design matrix."""
    c_root = torch.linalg.cholesky(damped(cov))
    rank = b.shape[0]
    columns = []
    for index in range(rank * a_shape[0] * a_shape[1]):
        basis = torch.zeros(rank * a_shape[0] * a_shape[1], dtype=torch.float64)
        basis[index] = 1
        columns.append((kronecker_sum(basis.reshape(rank, *a_shape), b) @ c_root).flatten())
    design = torch.stack(columns, 1)
    solution = torch.linalg.lstsq(design, (w @ c_root).flatten()[:, None]).solution
    return solution.reshape(rank, *a_shape)


def test_first_step_is_at_least_the_brute_force_optimum_for_the_start_b():
    w, cov, g = problem()
    a0, b0 = (
        torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 3, generator=g, dtype=torch.float64),
    )
    a_star = brute_force_a(w, cov, b0, (3, 2))
    best_for_b0 = output_error(w, kronecker_sum(a_star, b0), damped(cov))
    _, _, history = output_metric_kronecker(w, cov, a0, b0, max_iterations=1)
    assert history[1] <= best_for_b0 + 1e-12 and history[1] < history[0]


def test_converged_factors_are_each_optimal_given_the_other():
    w, cov, g = problem(m1=4, n1=3, m2=2, n2=2, seed=1)
    a0, b0 = nearest_kronecker(w, (4, 3), (2, 2), 2)
    a, b, history = output_metric_kronecker(w, cov, a0, b0, max_iterations=500, tolerance=0.0)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(history, history[1:]))
    a_star = brute_force_a(w, cov, b, (4, 3))
    reached, optimal = (
        output_error(w, kronecker_sum(a, b), damped(cov)),
        output_error(w, kronecker_sum(a_star, b), damped(cov)),
    )
    assert reached <= optimal * (1 + 1e-6)
    assert history[-1] < output_error(w, kronecker_sum(a0, b0), damped(cov))  # beats the weight-space fit


def test_identity_covariance_reaches_the_van_loan_optimum_from_a_random_start():
    w, _, g = problem(m1=4, n1=3, m2=3, n2=2, seed=2)
    identity = torch.eye(6, dtype=torch.float64)
    a_vl, b_vl = nearest_kronecker(w, (4, 3), (3, 2), 2)
    optimum = output_error(w, kronecker_sum(a_vl, b_vl), identity)
    a0, b0 = (
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
    )
    _, _, history = output_metric_kronecker(w, identity, a0, b0, max_iterations=2000, tolerance=0.0)
    assert abs(history[-1] - optimum) < 1e-6


def test_single_precision_solves_reach_the_same_error_and_are_exact_about_it():
    """auto's candidates factor the systems in float32: the fit moves only at second order in the
    solve's error, and the error it reports is still the exact float64 one of the factors it returns."""
    w, cov, _ = problem(m1=8, n1=12, m2=2, n2=4, seed=5)
    a0, b0 = nearest_kronecker(w, (8, 12), (2, 4), 3)
    a64, b64, h64 = output_metric_kronecker(w, cov, a0, b0, max_iterations=5, tolerance=0.0)
    a32, b32, h32 = output_metric_kronecker(w, cov, a0, b0, max_iterations=5, tolerance=0.0, solve_dtype=torch.float32)
    assert a32.dtype == b32.dtype == torch.float64
    assert abs(h32[-1] - h64[-1]) <= 1e-4 * h64[-1] and h32[-1] < h32[0]
    assert abs(output_error(w, kronecker_sum(a32, b32), damped(cov)) - h32[-1]) < 1e-9


def test_stops_on_relative_improvement():
    w, cov, _ = problem(seed=3)
    a0, b0 = nearest_kronecker(w, (3, 2), (2, 3), 1)
    _, _, history = output_metric_kronecker(w, cov, a0, b0, max_iterations=1000, tolerance=1e-2)
    assert len(history) < 1000 and history[-1] > history[-2] * (1 - 1e-2)


def test_calibrated_tq_and_kronecker_fit_the_outputs_better_than_rms_weighting():
    """With calibration, ``kronecker`` is fitted by least squares in the output metric and ``tq``
    also searches its permutations there: tq <= kronecker, and each well below its RMS-weighted
    weight-space fit."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 48, dtype=torch.float64)
    x = torch.randn(600, 48, generator=g, dtype=torch.float64) @ mix  # correlated, unequal channels
    cov = x.T @ x / len(x)
    stats = type("Stats", (), {"input_cov": cov})()
    errors = {}
    for method in ("tq", "kronecker"):
        structure = tqc.get_structure(method)
        fitted = structure.fit(w, structure.make_settings({"rank": 2, "b_shape": (2, 4)}), stats)
        errors[method] = output_error(w, fitted.to_dense(), damped(cov))
        assert fitted.history[-1] == pytest.approx(errors[method], rel=1e-9)
    assert errors["tq"] <= errors["kronecker"] + 1e-12
    for method, search in (("tq", True), ("kronecker", False)):
        rms = scaled_kronecker(w, input_rms(cov), (16, 12), (2, 4), 2, search=search)
        assert errors[method] < 0.9 * output_error(w, rms.to_dense(), damped(cov))


def test_calibrated_auto_candidates_are_fitted_in_the_output_metric():
    """With calibration, auto's tq candidates are least-squares fits in the output metric: never
    worse than Van Loan's factors at the same permutations measured in that metric, and what auto
    installs."""
    from tqcompressor.linalg.decompose import OutputSketch
    from tqcompressor.structures.kronecker.fit import kronecker_errors

    g = torch.Generator().manual_seed(8)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 48, dtype=torch.float64)
    x = torch.randn(600, 48, generator=g, dtype=torch.float64) @ mix
    cov = x.T @ x / len(x)
    sketch = OutputSketch(cov, k=48)  # k covers C: the sketch is exact
    structure = tqc.get_structure("tq")
    menu, state = structure.candidates(w, sketch)
    assert menu

    def van_loan(c):  # the weight-space factors at the candidate's permutations, in the output metric
        s = c.settings
        return kronecker_errors(
            w, tuple(s["a_shape"]), tuple(s["b_shape"]), [s["rank"]], *state[(tuple(s["b_shape"]), s["rank"])], sketch
        )[s["rank"]]

    for candidate in menu:
        assert candidate.error <= van_loan(candidate) + 1e-9
        installed = structure.fit_candidate(w, candidate, state, cov)
        assert output_error(w, installed.to_dense(), damped(cov)) == pytest.approx(candidate.error, rel=1e-9)
    assert any(c.error < 0.95 * van_loan(c) for c in menu)
