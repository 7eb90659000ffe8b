"""The one Fréchet distance (digits fd and pix_fd, FID) against its closed forms."""

import numpy as np
import pytest

from hypersd.eval.frechet import frechet_distance, frechet_from_moments, moments


def test_diagonal_gaussians_match_the_closed_form():
    # with diagonal covariances (Σ_a Σ_b)^½ is diagonal too: ‖Δμ‖² + Σ_i (√a_i − √b_i)²
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 2.0])
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    got = frechet_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(want, rel=1e-9) and want > 1


def test_the_distance_does_not_depend_on_the_axes():
    # one rotation of both Gaussians: their covariances stop being diagonal, the distance stays
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = np.diag([1.0, 4.0, 0.25, 9.0]), np.diag([4.0, 1.0, 0.25, 2.0])
    plain = frechet_from_moments(mu_a, var_a, mu_b, var_b)
    rotated = frechet_from_moments(q @ mu_a, q @ var_a @ q.T, q @ mu_b, q @ var_b @ q.T)
    assert rotated == pytest.approx(plain, rel=1e-8)


def test_one_dimension_is_the_gap_in_means_and_in_spreads():
    assert frechet_from_moments([2.0], [[9.0]], [-1.0], [[1.0]]) == pytest.approx(3.0 ** 2 + (3.0 - 1.0) ** 2)


def test_feature_sets_give_their_gaussians_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(1, 2, (20000, 3))
    # ‖Δμ‖² + Σ (1 + 4 − 2·2) = 3 + 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_from_moments(*moments(a), *moments(b)), rel=1e-12)
