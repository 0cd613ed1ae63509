"""Uncertainty for tables: mean, sample std and a 95% confidence interval over runs, and the paired comparison
of two methods over matched (order, seed) runs by a sign-flip permutation test."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# two-sided 95% Student-t quantiles by degrees of freedom (1..30); beyond 30 the normal quantile is close
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t_quantile_95(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError("needs at least one degree of freedom")
    return _T95[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T95) else 1.960


@dataclasses.dataclass
class Summary:
    mean: float | None
    std: float | None  # sample std (ddof 1); None for fewer than two values
    ci_low: float | None  # 95% t-interval of the mean; None for fewer than two values
    ci_high: float | None
    n: int


def summarise_values(values: list[float]) -> Summary:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(values)
    if n == 0:
        return Summary(None, None, None, None, 0)
    mean = sum(values) / n
    if n < 2:
        return Summary(mean, None, None, None, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_95(n - 1) * std / math.sqrt(n)
    return Summary(mean, std, mean - half, mean + half, n)


SIGNIFICANCE_LEVEL = 0.05
EXACT_UP_TO = 16  # pairs: up to this many, all 2^n sign patterns are enumerated (65,536)
SAMPLED_PATTERNS = 100_000  # beyond it, random patterns from a fixed seed


@dataclasses.dataclass
class PairedComparison:
    """Method A minus method B over n matched runs: the mean difference, its 95% t-interval, and the two-sided p
    of a sign-flip permutation test. The test's null hypothesis: within a pair, A and B are exchangeable, so each
    difference is as likely to carry either sign. With n pairs the smallest p it can give is 2 / 2^n: 0.25 for 3
    pairs, 0.0625 for 5, 0.03125 for 6, so fewer than 6 pairs never reach p < 0.05."""

    mean_difference: float
    ci_low: float | None  # 95% Student-t interval of the mean difference; None for one pair
    ci_high: float | None
    p: float
    pairs: int
    exact: bool  # every sign pattern enumerated (else SAMPLED_PATTERNS random ones)

    @property
    def significant(self) -> bool:
        return self.p < SIGNIFICANCE_LEVEL


def sign_flip_test(differences: list[float], seed: int = 0) -> PairedComparison:
    """Two-sided sign-flip permutation test of the mean of paired differences (Fisher 1935, Sec. 21; Good,
    "Permutation, Parametric and Bootstrap Tests of Hypotheses", 2005, Sec. 3.6.1): p is the fraction of sign
    patterns s whose |sum_i s_i d_i| is at least the observed |sum_i d_i|. Exact for up to EXACT_UP_TO pairs;
    beyond, (1 + hits) / (1 + draws) over SAMPLED_PATTERNS random patterns (a valid p). A zero difference is the
    same under either sign, so ties and zeros need no special case."""
    if not differences:
        raise ValueError("no matched pairs")
    values = np.asarray(differences, dtype=np.float64)
    n = len(values)
    observed = abs(values.sum())
    threshold = observed - 1e-12 * max(1.0, observed)  # the observed pattern counts despite rounding
    if n <= EXACT_UP_TO:
        patterns = np.arange(2 ** n)[:, None] >> np.arange(n) & 1
        hits = int((np.abs((1 - 2 * patterns) @ values) >= threshold).sum())
        p, exact = hits / 2 ** n, True
    else:
        signs = 1 - 2 * np.random.default_rng(seed).integers(0, 2, size=(SAMPLED_PATTERNS, n))
        hits = int((np.abs(signs @ values) >= threshold).sum())
        p, exact = (1 + hits) / (1 + SAMPLED_PATTERNS), False
    interval = summarise_values([float(v) for v in values])
    return PairedComparison(float(values.mean()), interval.ci_low, interval.ci_high, p, n, exact)
