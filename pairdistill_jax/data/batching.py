"""The batch layout: training examples -> fixed-shape numpy arrays (tokenised text, teacher targets).

A batch of B queries, each with `nway` passage slots and `max_pairs` pair slots, holds
  q_ids, q_mask                        [B, Lq]        int32
  d_ids, d_mask (+ d_score_mask, ColBERT)  [B, nway, Ld]  int32
  teacher, passage_mask                [B, nway]      float32, bool
  pair_i, pair_j, pair_logp, pair_mask [B, max_pairs] int32, int32, float32, bool
A line's passages beyond `nway` are dropped, and so are the pairs that reference them; a line with fewer
passages has `passage_mask` False in the remaining slots, which hold the encoding of the empty text; a line
with more than `max_pairs` remaining pairs is refused (never silently cut). `pack_targets` computes the
teacher arrays and `assemble_batch` joins them with tokenised queries and passages (`data.pipeline` gathers
those from the pre-tokenised stores).

Ld is model.doc_maxlen, or a smaller width of data.doc_widths: `doc_width` picks the smallest width that
holds a batch's longest passage, and the passage arrays end there (only padding is cut: mask 0 positions,
which change no score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pairdistill_jax.data.formats import TrainingExample

TARGET_KEYS = ("teacher", "passage_mask", "pair_i", "pair_j", "pair_logp", "pair_mask")


def kept_pairs(example: TrainingExample, nway: int) -> list[tuple[int, int, float]]:
  """The pairs of `example` between its first `nway` passages (the others are not in the batch)."""
  count = min(nway, len(example.pids))
  return [(i, j, logp) for i, j, logp in example.pairs if i < count and j < count]


def pack_targets(examples: Sequence[TrainingExample], *, nway: int, max_pairs: int) -> dict[str, np.ndarray]:
  """The teacher arrays of `examples` (keys TARGET_KEYS); passage slot k holds `example.pids[k]`."""
  batch = len(examples)
  teacher_BxN = np.zeros((batch, nway), np.float32)
  passage_mask_BxN = np.zeros((batch, nway), bool)
  pair_i_BxP = np.zeros((batch, max_pairs), np.int32)
  pair_j_BxP = np.zeros((batch, max_pairs), np.int32)
  pair_logp_BxP = np.zeros((batch, max_pairs), np.float32)
  pair_mask_BxP = np.zeros((batch, max_pairs), bool)
  for b, ex in enumerate(examples):
    if ex.scores is None:
      raise ValueError(f"training line for query {ex.qid} has no pointwise teacher scores; "
                       "distillation needs [qid, [pid, score, ...], ...] lines")
    count = min(nway, len(ex.pids))
    teacher_BxN[b, :count] = ex.scores[:count]
    passage_mask_BxN[b, :count] = True
    kept = kept_pairs(ex, nway)
    if len(kept) > max_pairs:
      raise ValueError(f"training line for query {ex.qid} has {len(kept)} pairs, more than data.max_pairs="
                       f"{max_pairs}: raise --config.data.max_pairs to at least {len(kept)}")
    for p, (i, j, logp) in enumerate(kept):
      pair_i_BxP[b, p], pair_j_BxP[b, p], pair_logp_BxP[b, p], pair_mask_BxP[b, p] = i, j, logp, True
  return dict(zip(TARGET_KEYS, (teacher_BxN, passage_mask_BxN, pair_i_BxP, pair_j_BxP, pair_logp_BxP,
                                pair_mask_BxP)))


def doc_width(longest: int, widths: Sequence[int]) -> int:
  """The smallest of the ascending `widths` that holds a passage of `longest` tokens."""
  for width in widths:
    if longest <= width:
      return width
  raise ValueError(f"a passage of {longest} tokens is longer than the largest document width {widths[-1]}")


def assemble_batch(queries: Mapping[str, np.ndarray], docs: Mapping[str, np.ndarray],
                   targets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch from tokenised queries ({'ids', 'mask'}, one row per query), passages ({'ids', 'mask'
  [, 'score_mask']}, nway rows per query, query-major) and `pack_targets` arrays."""
  batch, nway = targets["teacher"].shape
  out = {"q_ids": queries["ids"], "q_mask": queries["mask"]}
  out.update({f"d_{k}": v.reshape(batch, nway, -1) for k, v in docs.items()})
  out.update({k: targets[k] for k in TARGET_KEYS})
  return out
