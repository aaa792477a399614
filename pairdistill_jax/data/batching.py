"""Training examples -> fixed-shape numpy batches (tokenised queries and passages, teacher targets).

`make_batch` is the one place a batch's layout is defined; `iterate_batches` is a simple deterministic
in-memory loader over it (shuffled by seed and epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from pairdistill_jax.data.formats import TrainingExample


def make_batch(examples: Sequence[TrainingExample], collection: Mapping[str, str],
               queries: Mapping[str, str], tokenizer, *, nway: int, max_pairs: int) -> dict[str, np.ndarray]:
  """Tokenises `examples` into arrays with leading dimension B = len(examples).

  Keys: q_ids/q_mask [B,Lq]; d_ids/d_mask (and d_score_mask for ColBERT) [B,nway,Ld]; teacher [B,nway];
  passage_mask [B,nway] (False where a line has fewer than nway passages); pair_i/pair_j/pair_logp/pair_mask
  [B,max_pairs] (the first max_pairs pairs whose both passages are among the first nway).
  """
  batch = len(examples)
  teacher = np.zeros((batch, nway), np.float32)
  passage_mask = np.zeros((batch, nway), bool)
  pair_i = np.zeros((batch, max_pairs), np.int32)
  pair_j = np.zeros((batch, max_pairs), np.int32)
  pair_logp = np.zeros((batch, max_pairs), np.float32)
  pair_mask = np.zeros((batch, max_pairs), bool)
  texts = []
  for b, ex in enumerate(examples):
    if ex.scores is None:
      raise ValueError(f"training line for query {ex.qid} has no pointwise teacher scores; "
                       "distillation needs [qid, [pid, score, ...], ...] lines")
    count = min(nway, len(ex.pids))
    teacher[b, :count] = ex.scores[:count]
    passage_mask[b, :count] = True
    texts.extend(collection[pid] for pid in ex.pids[:count])
    texts.extend([""] * (nway - count))
    kept = [(i, j, logp) for i, j, logp in ex.pairs if i < count and j < count][:max_pairs]
    for p, (i, j, logp) in enumerate(kept):
      pair_i[b, p], pair_j[b, p], pair_logp[b, p], pair_mask[b, p] = i, j, logp, True
  q = tokenizer.encode_queries([queries[ex.qid] for ex in examples])
  d = tokenizer.encode_docs(texts)
  out = {"q_ids": q["ids"], "q_mask": q["mask"]}
  out.update({f"d_{k}": v.reshape(batch, nway, -1) for k, v in d.items()})
  out.update(teacher=teacher, passage_mask=passage_mask, pair_i=pair_i, pair_j=pair_j, pair_logp=pair_logp,
             pair_mask=pair_mask)
  return out


def iterate_batches(examples: Sequence[TrainingExample], batch_size: int, *, seed: int,
                    start_step: int = 0) -> Iterator[list[TrainingExample]]:
  """Endless batches of examples: each epoch a fresh permutation seeded by (seed, epoch); the last
  incomplete batch of an epoch is dropped. `start_step` skips that many batches."""
  per_epoch = len(examples) // batch_size
  if per_epoch == 0:
    raise ValueError(f"{len(examples)} training examples are fewer than one batch of {batch_size}")
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    yield [examples[i] for i in order[index * batch_size:(index + 1) * batch_size]]
    step += 1
