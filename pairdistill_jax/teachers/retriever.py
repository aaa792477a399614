"""A student retriever as the pointwise teacher: the collection encoded once, each query once per chunk.

Scoring (query, passage) pairs one by one would encode a passage once per query that retrieved it (about 100
times for a top-100 run). Instead the collection is encoded once into a corpus store (`retrieval.corpus`,
resumable) — the mining run's own store when it holds this teacher's vectors (same weights, settings and
collection), so scoring then encodes only the queries — and each query's candidates are scored against
their stored vectors with the retriever's own similarity: MaxSim (ColBERT) or the dot product (DPR; cosine
for a sentence-transformers model with a Normalize module).
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pairdistill_jax import io
from pairdistill_jax.retrieval import corpus, devices, search
from pairdistill_jax.retrieval.encoders import Encoder

_QUERY_BLOCK = 8  # queries scored per jitted call (padded), so few shapes are compiled

_log = logging.getLogger(__name__)


@jax.jit
def _own_maxsim(q_QxLxD: jax.Array, d_QxNxWxD: jax.Array, d_mask_QxNxW: jax.Array) -> jax.Array:
  """scores[q, n] = MaxSim(query q, its candidate n)."""
  return jax.vmap(lambda q, d, m: search.maxsim_float32(q[None], d, m)[0])(q_QxLxD, d_QxNxWxD, d_mask_QxNxW)


def reusable_store(directory: pathlib.Path, encoder: Encoder, texts_hash: str) -> dict | None:
  """The manifest of `directory` when it holds this encoder's vectors of this collection, else None."""
  manifest = io.read_json(directory / io.MANIFEST)
  if not isinstance(manifest, dict):  # none there, or unreadable: encode into the teacher's own directory
    return None
  if manifest.get("fingerprint") == encoder.fingerprint and manifest.get("corpus") == texts_hash:
    return manifest
  return None


class RetrieverScorer:
  """Scores each query's candidate passages with a retriever whose collection vectors are stored on disk."""

  def __init__(self, encoder: Encoder, collection: Mapping[str, str], *, reuse_dir: pathlib.Path,
               own_dir: pathlib.Path, batch_size: int):
    self.encoder, self.batch_size = encoder, batch_size
    doc_ids = list(collection)
    texts = [collection[d] for d in doc_ids]
    self._row = {pid: row for row, pid in enumerate(doc_ids)}
    manifest = reusable_store(reuse_dir, encoder, corpus.corpus_hash(texts))
    if manifest is not None:
      _log.info("Teacher %s: reusing the collection vectors in %s", encoder.name, reuse_dir)
      self.corpus_dir = reuse_dir
      settings = dict(chunk_size=manifest["chunk_size"], vector_dtype=manifest.get("vector_dtype", "float32"))
    else:
      _log.info("Teacher %s: encoding the collection once into %s", encoder.name, own_dir)
      self.corpus_dir = own_dir
      settings = dict(chunk_size=16_384, vector_dtype="float32")
    # rebuild: the teacher's own directory may hold an earlier teacher's vectors
    self.store = corpus.encode_corpus(encoder, texts, self.corpus_dir, batch_size=batch_size, rebuild=True,
                                      **settings)
    self.items_scored, self.seconds = 0, 0.0

  def score(self, query_texts: Sequence[str], candidates: Sequence[Sequence[str]],
            on_batch: Callable[[int], object] = lambda n: None) -> list[np.ndarray]:
    """float32 scores of each query's candidate pids, in order; `on_batch(passages)` as they are scored."""
    start = time.perf_counter()
    q = self.encoder.encode_queries(list(query_texts), self.batch_size)
    rows = [np.array([self._row[p] for p in pids], np.int64) for pids in candidates]
    if not self.encoder.multi_vector:
      scores = [self._dense(q[i], r) for i, r in enumerate(rows)]
      on_batch(sum(len(r) for r in rows))
    else:
      scores = self._maxsim(q, rows, on_batch)
    self.items_scored += sum(len(r) for r in rows)
    self.seconds += time.perf_counter() - start
    return scores

  def _dense(self, q_D: np.ndarray, rows_N: np.ndarray) -> np.ndarray:
    d_NxD = self.store.gather(rows_N)
    return (d_NxD.astype(np.float64) @ q_D.astype(np.float64)).astype(np.float32)

  def _maxsim(self, q_QxLxD: np.ndarray, rows: Sequence[np.ndarray],
              on_batch: Callable[[int], object]) -> list[np.ndarray]:
    scores = []
    for begin in range(0, len(rows), _QUERY_BLOCK):
      block = rows[begin:begin + _QUERY_BLOCK]
      n = max(len(r) for r in block)
      width = devices.width_bucket(int(max(self.store.lengths[r].max() for r in block)), self.store.max_length)
      padded = [devices.pad_rows(r, n) for r in block]
      padded += [padded[-1]] * (_QUERY_BLOCK - len(block))
      d_QNxWxD, mask_QNxW = self.store.gather(np.concatenate(padded), width)
      q_block = devices.pad_rows(q_QxLxD[begin:begin + len(block)], _QUERY_BLOCK)
      out_QxN = np.asarray(_own_maxsim(jnp.asarray(q_block, jnp.float32),
                                       jnp.asarray(d_QNxWxD, jnp.float32).reshape(_QUERY_BLOCK, n, width, -1),
                                       jnp.asarray(mask_QNxW).reshape(_QUERY_BLOCK, n, width)))
      scores.extend(out_QxN[i, :len(r)] for i, r in enumerate(block))
      on_batch(sum(len(r) for r in block))
    return scores
