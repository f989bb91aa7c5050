"""Bootstrap confidence intervals over seeds and held-out problems (``renio-train`` experiments).

An arm's outcome is a 0/1 matrix ``(seeds, problems)``: whether the run of that seed solved that
held-out problem (greedy). Two sources of noise make an arm's mean accuracy uncertain: which
problems happen to be held out, and which seed (sampled completions, and so the whole training
trajectory) a run had. The two-way bootstrap resamples both, seeds and problems independently
with replacement, and takes the mean of the resampled cells.

Paired: two arms run with the same seeds on the same problems share both draws, so the
difference ``arm - reference`` is resampled as one matrix: a problem that is easy for both arms
then cancels out of the difference, which is why the paired interval is narrower than the one
of two independent resamplings when the arms' outcomes are correlated (they are: the same
start, the same problems).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "unpaired_difference"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval (``level``, e.g. 0.95)."""

    estimate: float
    low: float
    high: float
    level: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _matrix(x, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(
            f"{name} must be a (seeds, problems) matrix with at least one of each, got shape "
            f"{np.shape(x)}"
        )
    if not np.isfinite(m).all():
        raise ValueError(f"{name} holds a non-finite value: pass 0/1 (or real) outcomes")
    return m


def _two_way_means(m: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Means of ``n_boot`` resamplings of ``m``'s rows and columns (with replacement): the
    resampled mean is ``w_s @ m @ w_p / (S * P)`` with multinomial counts ``w_s``, ``w_p``."""
    s, p = m.shape
    w_s = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)
    w_p = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot).astype(np.float64)
    return np.einsum("bp,bp->b", w_s @ m, w_p) / (s * p)


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    tail = (1.0 - level) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def bootstrap_mean(outcomes, *, n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> Interval:
    """An arm's mean outcome with its two-way (seeds x problems) bootstrap interval."""
    m = _matrix(outcomes, "outcomes")
    rng = np.random.default_rng(seed)
    return _interval(m.mean(), _two_way_means(m, rng, n_boot), level)


def paired_difference(
    arm, reference, *, n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> Interval:
    """``mean(arm) - mean(reference)``, both ``(seeds, problems)`` in the same order (row i: the
    same seed, column j: the same problem); the seeds and problems are resampled jointly."""
    a, b = _matrix(arm, "arm"), _matrix(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(
            f"a paired difference needs the same seeds and problems in both arms: shapes "
            f"{a.shape} and {b.shape}; select the common seeds first"
        )
    rng = np.random.default_rng(seed)
    d = a - b
    return _interval(d.mean(), _two_way_means(d, rng, n_boot), level)


def unpaired_difference(
    arm, reference, *, n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> Interval:
    """The same difference with each arm resampled on its own (as if the arms shared neither
    seeds nor problems): the baseline the paired interval is compared with."""
    a, b = _matrix(arm, "arm"), _matrix(reference, "reference")
    rng = np.random.default_rng(seed)
    draws = _two_way_means(a, rng, n_boot) - _two_way_means(b, rng, n_boot)
    return _interval(a.mean() - b.mean(), draws, level)
