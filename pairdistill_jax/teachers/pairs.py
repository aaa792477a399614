"""Pair selection (docs/design.md §2.6): which passages of a pointwise-sorted list the pairwise teacher compares.

Candidates are the pairs (i, j) of the top `topk` with i < j <= i + max_distance; `n_pairs` of them are
sampled without replacement. The random stream of a query depends only on (seed, qid), so the selection is
the same however the queries are chunked or spread over devices and hosts.
"""

from __future__ import annotations

import zlib

import numpy as np


def candidate_pairs(n_entries: int, topk: int, max_distance: int) -> list[tuple[int, int]]:
  """(i, j) with i < j <= i + max_distance among the first min(topk, n_entries) entries, in order."""
  top = min(topk, n_entries)
  return [(i, j) for i in range(top) for j in range(i + 1, min(i + max_distance, top - 1) + 1)]


def query_rng(seed: int, qid: str) -> np.random.Generator:
  """The random stream of one query: a function of the seed and the query id only."""
  return np.random.default_rng([seed, zlib.crc32(qid.encode("utf-8"))])


def select_pairs(qid: str, n_entries: int, *, topk: int, max_distance: int, n_pairs: int,
                 seed: int) -> list[tuple[int, int]]:
  """`n_pairs` candidate pairs (all of them when there are fewer), sorted by (i, j)."""
  candidates = candidate_pairs(n_entries, topk, max_distance)
  if len(candidates) <= n_pairs:
    return candidates
  chosen = query_rng(seed, qid).choice(len(candidates), size=n_pairs, replace=False)
  return [candidates[c] for c in sorted(chosen)]
