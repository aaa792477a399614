"""The paired randomisation test against a hand enumeration of every sign flip, and a hand Monte Carlo."""

import itertools

import numpy as np
import pytest

from pairdistill_jax.retrieval import significance


def _runs(rng, n_queries, n_runs, shift=0.0):
  return [{f"q{i}": float(v) for i, v in enumerate(np.clip(rng.random(n_queries) + shift, 0, 1))}
          for _ in range(n_runs)]


def _hand_exact(diff: np.ndarray) -> float:
  """Two-sided p: the share of the 2^n sign flips whose mean difference is at least as far from 0."""
  observed = abs(diff.mean())
  signs = np.array(list(itertools.product((1, -1), repeat=len(diff))), np.float64)
  return float(np.mean(np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12))


def test_exact_p_value_equals_every_sign_flip_enumerated_with_seeds_averaged_per_query():
  rng = np.random.default_rng(1)
  a, b = _runs(rng, 12, 3), _runs(rng, 12, 2, shift=-0.1)
  got = significance.compare(a, b)
  diff = np.array([np.mean([r[q] for r in a]) - np.mean([r[q] for r in b]) for q in sorted(a[0])])
  assert got.p_value == pytest.approx(_hand_exact(diff), abs=1e-12)
  assert got.delta == pytest.approx(diff.mean())
  assert (got.queries, got.runs, got.wins) == (12, (3, 2), (int((diff > 0).sum()), int((diff < 0).sum())))


def test_sampled_p_value_agrees_with_a_hand_monte_carlo_on_300_queries():
  rng = np.random.default_rng(2)
  a, b = _runs(rng, 300, 1), _runs(rng, 300, 1, shift=-0.03)
  got = significance.compare(a, b, resamples=50_000)
  diff = np.array([a[0][q] - b[0][q] for q in sorted(a[0])])
  signs = np.random.default_rng(7).choice((-1.0, 1.0), size=(50_000, 300))
  hand = (np.sum(np.abs((signs * diff).mean(axis=1)) >= abs(diff.mean())) + 1) / (50_000 + 1)
  assert got.p_value == pytest.approx(hand, abs=0.01)
  clear = significance.compare(_runs(rng, 300, 1, shift=0.15), b, resamples=50_000)
  assert clear.p_value < 1e-3 and clear.delta > 0.1


def test_identical_systems_give_p_one_and_mismatched_queries_are_refused():
  rng = np.random.default_rng(3)
  a = _runs(rng, 20, 2)
  assert significance.compare(a, a).p_value == 1.0
  with pytest.raises(ValueError, match="different queries"):
    significance.compare(a, [{"other": 0.5}])
  with pytest.raises(ValueError, match="runs differ"):
    significance.compare([a[0], {"q0": 1.0}], a)
