"""Is system A better than system B on the same queries? A paired test on per-query metric values.

Each system may have several runs (seeds): a query's value is its mean over the system's runs, so seed noise
shrinks instead of counting as more queries. The test is a paired randomisation (sign-flip) test on the
per-query differences, two-sided, statistic the mean difference (`scipy.stats.permutation_test`; exact when
2^queries <= resamples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Comparison:
  delta: float  # mean over queries of (A − B), each query averaged over its runs
  p_value: float  # two-sided paired randomisation test
  queries: int
  runs: tuple[int, int]  # runs (seeds) averaged per system
  wins: tuple[int, int]  # queries where A > B, and where B > A


def seed_means(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """{query: mean of its values over `runs`}; every run must hold the same queries."""
  if not runs:
    raise ValueError("no runs to average")
  queries = set(runs[0])
  for run in runs[1:]:
    if set(run) != queries:
      raise ValueError(f"runs differ in their queries ({len(set(run) ^ queries)} not in both)")
  return {q: float(np.mean([run[q] for run in runs])) for q in sorted(queries)}


def compare(a_runs: Sequence[Mapping[str, float]], b_runs: Sequence[Mapping[str, float]], *,
            resamples: int = 100_000, seed: int = 0) -> Comparison:
  """A against B on per-query values ({query: value} per run); see the module docstring."""
  a, b = seed_means(a_runs), seed_means(b_runs)
  if set(a) != set(b):
    raise ValueError(f"the systems were evaluated on different queries ({len(set(a) ^ set(b))} not in both)")
  diff = np.array([a[q] - b[q] for q in a], np.float64)
  result = scipy.stats.permutation_test(
      (diff,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples", vectorized=True,
      n_resamples=resamples, alternative="two-sided", random_state=np.random.default_rng(seed))
  p_value = 1.0 if not diff.any() else float(result.pvalue)
  return Comparison(float(diff.mean()), p_value, len(diff), (len(a_runs), len(b_runs)),
                    (int((diff > 0).sum()), int((diff < 0).sum())))
