"""Seed statistics for ``relora compare``: mean, sample std, Welch's and the paired t-test, in plain math (no scipy).

Welch's test does not assume the two methods' seed-to-seed variances are
equal, which they are not in general (a warm-started run varies less than
one trained from scratch at a high LR). Its two-sided p-value is the Student
t tail 2 * P(T_df > |t|) = I_{df/(df+t^2)}(df/2, 1/2), the regularized
incomplete beta function, evaluated with the continued fraction of Numerical
Recipes (section 6.4).

The paired t-test is reported beside Welch's, not as the rule: seed k gives
every method the same init and data order, so a seed that is easy for one
method tends to be easy for all, and the per-seed differences can be far
less noisy than either method's spread. Welch's test ignores that pairing and
is the conservative rule the tables decide by.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

SIGNIFICANCE_LEVEL = 0.05


def format_p(p: float) -> str:
    """A p-value for a table, with its relation: ``=0.012``, or ``<0.001`` where three decimals would show 0.000."""
    return "<0.001" if p < 0.0005 else f"={p:.3f}"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1 in the denominator); std None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """(t, degrees of freedom, two-sided p) of Welch's test that a and b have equal means; None below 2 values each.

    Two samples without spread have p = 1 when their means are equal and p = 0 otherwise.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0:
        return (0.0, math.inf, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), math.inf, 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, student_t_two_sided_p(t, df)


def paired_t_test(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, float] | None:
    """(t, degrees of freedom, two-sided p) of the paired t-test over the seeds both ``a`` and ``b`` have
    (``{seed: value}``): the one-sample t-test that the mean of a[k] - b[k] is zero; None below 2 shared seeds.

    Differences without spread have p = 1 when they are all zero and p = 0 otherwise.
    """
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    mean, std = mean_std([a[k] - b[k] for k in shared])
    df = len(shared) - 1
    if std == 0:
        return (0.0, df, 1.0) if mean == 0 else (math.copysign(math.inf, mean), df, 0.0)
    t = mean / (std / math.sqrt(len(shared)))
    return t, df, student_t_two_sided_p(t, df)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0."""
    if not 0 <= x <= 1:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a+1)/(a+b+2); otherwise use I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, *, eps: float = 1e-15, max_terms: int = 1000) -> float:
    """The incomplete beta continued fraction by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    return h
