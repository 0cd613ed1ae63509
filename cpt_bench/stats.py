"""Uncertainty for tables: mean, sample std and a 95% confidence interval over runs, and a paired bootstrap
comparison of two methods over matched (order, seed) runs."""

from __future__ import annotations

import dataclasses
import math
import random

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


@dataclasses.dataclass
class PairedComparison:
    """Method A minus method B over matched runs: mean difference and a 95% percentile-bootstrap interval.
    `significant` when the interval excludes 0 (with n matched pairs the smallest reachable confidence is
    limited: 3 pairs can at best say that every difference has the same sign)."""

    mean_difference: float
    ci_low: float
    ci_high: float
    pairs: int

    @property
    def significant(self) -> bool:
        return self.pairs >= 2 and (self.ci_low > 0 or self.ci_high < 0)


def paired_bootstrap(differences: list[float], resamples: int = 10000, seed: int = 0) -> PairedComparison:
    """Resample the matched differences with replacement; percentile interval of the resampled means."""
    if not differences:
        raise ValueError("no matched pairs")
    n = len(differences)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(differences, k=n)) / n for _ in range(resamples))
    low = means[int(0.025 * (resamples - 1))]
    high = means[math.ceil(0.975 * (resamples - 1))]
    return PairedComparison(sum(differences) / n, low, high, n)
