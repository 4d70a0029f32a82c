"""Seed statistics of relora compare against independent computations (numeric integration, closed forms)."""

import math
import random

import numpy as np
import pytest

from relora.analysis.stats import (
    mean_std,
    paired_t_test,
    regularized_incomplete_beta,
    student_t_two_sided_p,
    welch_t_test,
)


def t_tail_by_integration(t: float, df: float) -> float:
    """2 * integral of Student's t density from |t| to infinity, by the trapezoid rule after u = 1/(1+x^2/df)."""
    # Substituting x = |t| + y / (1 - y) maps [|t|, inf) to [0, 1); the density decays polynomially, so use many nodes.
    y = np.linspace(0.0, 1.0, 400_001)[:-1]
    x = abs(t) + y / (1 - y)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df)) / (1 - y) ** 2
    return float(2 * np.trapezoid(density, y))


def test_mean_and_sample_std_match_numpy():
    rng = random.Random(0)
    for n in (2, 3, 7):
        values = [rng.uniform(50, 150) for _ in range(n)]
        mean, std = mean_std(values)
        assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([4.0]) == (4.0, None)


def test_incomplete_beta_matches_closed_forms():
    rng = random.Random(1)
    for _ in range(20):
        x, a = rng.random(), rng.uniform(0.2, 20)
        assert regularized_incomplete_beta(x, a, 1.0) == pytest.approx(x**a, rel=1e-10)  # I_x(a, 1) = x^a
        assert regularized_incomplete_beta(x, 1.0, a) == pytest.approx(1 - (1 - x) ** a, rel=1e-10)
    assert regularized_incomplete_beta(0.3, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)))


def test_t_tail_matches_numeric_integration():
    rng = random.Random(2)
    for _ in range(12):
        t, df = rng.uniform(-6, 6), rng.uniform(1.0, 30.0)
        assert student_t_two_sided_p(t, df) == pytest.approx(t_tail_by_integration(t, df), abs=1e-6)
    assert student_t_two_sided_p(1.0, 1.0) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert student_t_two_sided_p(0.0, 5.0) == pytest.approx(1.0)


def test_welch_matches_its_definition_on_random_samples():
    rng = np.random.default_rng(3)
    for _ in range(10):
        a, b = rng.normal(100, rng.uniform(1, 5), rng.integers(2, 6)), rng.normal(103, rng.uniform(1, 5), rng.integers(2, 6))
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        t = (a.mean() - b.mean()) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        got = welch_t_test(list(a), list(b))
        assert got[0] == pytest.approx(t) and got[1] == pytest.approx(df)
        assert got[2] == pytest.approx(t_tail_by_integration(t, df), abs=1e-6)


def test_welch_edge_cases():
    assert welch_t_test([1.0], [2.0, 3.0]) is None
    assert welch_t_test([2.0, 2.0], [2.0, 2.0])[2] == 1.0
    assert welch_t_test([2.0, 2.0], [3.0, 3.0])[2] == 0.0


def test_paired_t_test_matches_its_definition_on_random_samples():
    rng = np.random.default_rng(4)
    for n in (2, 2, 3, 3, 4, 5, 6, 6):
        shared = rng.normal(100, 5, n)  # a seed effect common to both methods
        a, b = shared + rng.normal(0, 1, n), shared + rng.normal(1, 1, n)
        d = a - b
        t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
        got = paired_t_test(dict(enumerate(a)), dict(reversed(list(enumerate(b)))))  # pairing by seed, not order
        assert got[0] == pytest.approx(t) and got[1] == n - 1
        # one degree of freedom is Cauchy, whose tail has a closed form (the integration is too coarse there)
        tail = 1 - 2 / math.pi * math.atan(abs(t)) if n == 2 else t_tail_by_integration(t, n - 1)
        assert got[2] == pytest.approx(tail, abs=1e-6)


def test_paired_t_test_uses_only_shared_seeds_and_edge_cases():
    a, b = {0: 10.0, 1: 12.0, 2: 11.5, 7: 99.0}, {0: 9.0, 1: 10.5, 2: 11.0, 8: -5.0}
    assert paired_t_test(a, b) == paired_t_test({k: a[k] for k in (0, 1, 2)}, {k: b[k] for k in (0, 1, 2)})
    assert paired_t_test({0: 1.0, 1: 2.0}, {1: 2.0, 2: 3.0}) is None  # one shared seed
    assert paired_t_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})[2] == 1.0
    assert paired_t_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})[2] == 0.0


def test_format_p_never_shows_a_p_of_zero():
    from relora.analysis.stats import format_p

    assert format_p(0.012) == "=0.012" and format_p(0.0006) == "=0.001" and format_p(0.97449) == "=0.974"
    assert format_p(0.00049) == "<0.001" and format_p(1e-12) == "<0.001" and format_p(0.0) == "<0.001"
