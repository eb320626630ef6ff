"""How sure is a headline figure? Percentile bootstrap intervals over the prompts or documents it was measured on.

A faithfulness ratio, a loss change or an F1 score is computed from per-prompt (or per-document) values. Drawing the
prompts again with replacement and recomputing the figure shows how much it depends on which prompts were drawn:

    interval = bootstrap_interval(faithfulness_statistic, circuit, full, empty)   # three [n_prompts] arrays
    print(f"faithfulness {interval}")                                             # 0.94 [0.91, 0.96]

`bootstrap_interval` is `scipy.stats.bootstrap` with paired resampling (one draw of prompt indices indexes every
array, so a prompt's circuit, full and empty values stay together) and a fixed seed, so a notebook's checked output
is reproducible. The statistics below are the figures the notebooks report, written over an `axis` so that scipy
evaluates all resamples at once. The interval covers the sampling of prompts only, not of training seeds: for that,
sweep the notebook (`python -m helpers.notebook.run_notebooks --sweep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

Statistic = Callable[..., np.ndarray]
"""`statistic(*samples, axis=-1)`: the figure, computed along `axis` of each sample array."""


@dataclass(frozen=True)
class Interval:
    """A figure and its bootstrap interval: `estimate` on all prompts, `[low, high]` at `confidence`."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def format(self, spec: str = ".2f") -> str:
        """`0.94 [0.91, 0.96]` with every number in format `spec`."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return self.format()

    def __format__(self, spec: str) -> str:
        return self.format(spec or ".2f")


def _as_array(sample) -> np.ndarray:
    if isinstance(sample, torch.Tensor):
        sample = sample.detach().cpu().double().numpy()
    return np.asarray(sample, dtype=np.float64)


def bootstrap_interval(statistic: Statistic, *samples, confidence: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0) -> Interval:
    """The percentile bootstrap interval of `statistic(*samples)` over the shared first axis of `samples`.

    Args:
        statistic: the figure as a function of the samples, vectorised along `axis` (see `mean_statistic`).
        samples: one or more arrays or tensors `[n]`, paired: entry i of each belongs to prompt (document) i.
        confidence: the interval's coverage.
        n_resamples: bootstrap draws.
        seed: the draws' seed (the same seed, the same interval).
    """
    arrays = [_as_array(sample) for sample in samples]
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one sample")
    lengths = {len(array) for array in arrays}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(f"samples must be paired arrays of one length >= 2, got lengths {[len(a) for a in arrays]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    estimate = float(statistic(*arrays, axis=-1))
    result = stats.bootstrap(arrays, statistic, paired=True, vectorized=True, axis=-1, n_resamples=n_resamples,
                             confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return Interval(estimate, float(interval.low), float(interval.high), confidence)


def mean_statistic(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean."""
    return np.mean(values, axis=axis)


def faithfulness_statistic(circuit: np.ndarray, full: np.ndarray, empty: np.ndarray, axis: int = -1) -> np.ndarray:
    """Ratio-of-means faithfulness `(mean circuit - mean empty) / (mean full - mean empty)` of per-prompt metrics."""
    empty_mean = np.mean(empty, axis=axis)
    return (np.mean(circuit, axis=axis) - empty_mean) / (np.mean(full, axis=axis) - empty_mean)


def percent_change_statistic(changed_sums: np.ndarray, clean_sums: np.ndarray, axis: int = -1) -> np.ndarray:
    """`100 * (sum changed / sum clean - 1)`: the percent change of a token-weighted mean loss, from per-document
    loss sums over the same tokens (the counts cancel)."""
    return 100 * (np.sum(changed_sums, axis=axis) / np.sum(clean_sums, axis=axis) - 1)


def f1_statistic(true_positives: np.ndarray, false_positives: np.ndarray, false_negatives: np.ndarray,
                 axis: int = -1) -> np.ndarray:
    """F1 `2 tp / (2 tp + fp + fn)` from per-document token counts."""
    tp = np.sum(true_positives, axis=axis)
    return 2 * tp / (2 * tp + np.sum(false_positives, axis=axis) + np.sum(false_negatives, axis=axis))


def recovered_statistic(spliced: np.ndarray, clean: np.ndarray, ablated: np.ndarray, axis: int = -1) -> np.ndarray:
    """Share of the loss recovered by a replacement, `(mean ablated - mean spliced) / (mean ablated - mean clean)`
    (1: as good as the model, 0: as bad as ablating)."""
    ablated_mean = np.mean(ablated, axis=axis)
    return (ablated_mean - np.mean(spliced, axis=axis)) / (ablated_mean - np.mean(clean, axis=axis))


def fraction_lost_statistic(changed: np.ndarray, clean: np.ndarray, axis: int = -1) -> np.ndarray:
    """`1 - mean changed / mean clean`: the share of a clean metric (e.g. the logit difference) an intervention
    removes."""
    return 1 - np.mean(changed, axis=axis) / np.mean(clean, axis=axis)
