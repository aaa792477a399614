"""Pair selection (docs/design.md §2.6) on crafted lists: the rules checked against hand enumerations."""

import itertools

import pytest

from pairdistill_jax.teachers import pairs


def test_candidates_match_hand_enumeration():
  # 7 entries, top 5, distance 2: i < j <= i + 2 and j < 5.
  assert pairs.candidate_pairs(7, topk=5, max_distance=2) == [
      (0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]
  # fewer entries than topk: only existing entries pair up.
  assert pairs.candidate_pairs(3, topk=20, max_distance=5) == [(0, 1), (0, 2), (1, 2)]
  assert pairs.candidate_pairs(1, topk=20, max_distance=5) == []
  assert pairs.candidate_pairs(0, topk=20, max_distance=5) == []


def test_paper_setting_has_the_expected_number_of_candidates():
  # top 20, distance 5: i = 0..14 have 5 partners each, i = 15..19 have 4, 3, 2, 1, 0.
  candidates = pairs.candidate_pairs(64, topk=20, max_distance=5)
  assert len(candidates) == 15 * 5 + 4 + 3 + 2 + 1
  brute = [(i, j) for i, j in itertools.combinations(range(20), 2) if j - i <= 5]
  assert candidates == brute


@pytest.mark.parametrize("n_entries,n_pairs", [(64, 16), (64, 8), (8, 4), (30, 1)])
def test_sampled_pairs_follow_the_rules(n_entries, n_pairs):
  for qid in ("1", "2", "q77", "1185869"):
    chosen = pairs.select_pairs(qid, n_entries, topk=20, max_distance=5, n_pairs=n_pairs, seed=0)
    assert len(chosen) == n_pairs
    assert len(set(chosen)) == n_pairs  # without replacement
    assert chosen == sorted(chosen)
    for i, j in chosen:
      assert 0 <= i < j <= i + 5 and j < min(20, n_entries)


def test_all_candidates_when_fewer_than_n_pairs():
  assert pairs.select_pairs("q", 3, topk=20, max_distance=5, n_pairs=16, seed=0) == [(0, 1), (0, 2), (1, 2)]


def test_selection_depends_only_on_seed_and_qid():
  a = pairs.select_pairs("q1", 64, topk=20, max_distance=5, n_pairs=8, seed=0)
  assert a == pairs.select_pairs("q1", 64, topk=20, max_distance=5, n_pairs=8, seed=0)
  others = {tuple(pairs.select_pairs(q, 64, topk=20, max_distance=5, n_pairs=8, seed=0)) for q in map(str, range(20))}
  assert len(others) > 15  # different queries draw different pairs
  seeds = {tuple(pairs.select_pairs("q1", 64, topk=20, max_distance=5, n_pairs=8, seed=s)) for s in range(10)}
  assert len(seeds) > 5


def test_sampling_covers_every_candidate_uniformly_enough():
  counts = dict.fromkeys(pairs.candidate_pairs(64, topk=20, max_distance=5), 0)
  trials = 2000
  for q in range(trials):
    for pair in pairs.select_pairs(str(q), 64, topk=20, max_distance=5, n_pairs=16, seed=1):
      counts[pair] += 1
  expected = trials * 16 / len(counts)  # each of the 85 candidates: 16/85 of the queries
  assert all(0.7 * expected < c < 1.3 * expected for c in counts.values())
