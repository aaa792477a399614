"""Retrieval over a collection: encode it (resumable, every process helps), index it, and stream the best `k`
documents of each query; evaluation and mining share it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from pairdistill_jax.retrieval import corpus, metrics, search
from pairdistill_jax.retrieval.encoders import Encoder


def _search_options(search_cfg: ml_collections.ConfigDict) -> search.SearchOptions:
  return search.SearchOptions(index=search_cfg.index, nprobe=search_cfg.nprobe, faiss_depth=search_cfg.faiss_depth,
                              exact_max_tokens=search_cfg.exact_max_tokens)


def hits_to_run(qids: list[str], doc_ids: list[str], scores_QxK: np.ndarray, ids_QxK: np.ndarray, k: int,
                drop_self: bool) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}} of each query's best `k` hits (without the query's own id when `drop_self`)."""
  run = {}
  for qid, scores, ids in zip(qids, scores_QxK, ids_QxK):
    scored = {doc_ids[i]: float(s) for s, i in zip(scores, ids) if i >= 0}
    if drop_self:
      scored.pop(qid, None)
    run[qid] = dict(metrics.ranked(scored)[:k])
  return run


@dataclasses.dataclass
class Retrieved:
  """The run as a stream of (qid, {docid: score}) (empty off process 0), the search settings
  (`Searcher.settings`; off process 0 only the index type), seconds per stage.

  Iterating `run` encodes and searches the queries block by block; `seconds` fills in as it goes.
  """

  run: Iterator[tuple[str, dict[str, float]]]
  search: dict[str, Any]
  seconds: dict[str, float]


def retrieve(encoder: Encoder, collection: Mapping[str, str], queries: Mapping[str, str],
             search_cfg: ml_collections.ConfigDict, corpus_dir: str | pathlib.Path, *, drop_self: bool = False,
             query_block: int = 16_384) -> Retrieved:
  """Encodes the collection (every process helps; resumable in corpus_dir) and builds its index; the run
  then streams from process 0, `query_block` queries encoded and searched at a time (the best `search_cfg.k` each),
  so 800k training queries never sit in memory at once."""
  start = time.perf_counter()
  doc_ids = list(collection)
  # rebuild: the corpus directory of a workdir holds the last evaluated (or mining) model's vectors
  store = corpus.encode_corpus(encoder, [collection[d] for d in doc_ids], corpus_dir,
                               batch_size=search_cfg.batch_size, chunk_size=search_cfg.chunk_size,
                               vector_dtype=search_cfg.vector_dtype, rebuild=True)
  options = _search_options(search_cfg)
  seconds = {"encode_corpus": time.perf_counter() - start}
  if jax.process_index() != 0:
    return Retrieved(iter(()), {"index": options.resolve(store)}, seconds)
  started = time.perf_counter()
  searcher = search.Searcher(store, options, encoder.mesh)
  seconds.update(index=time.perf_counter() - started, encode_queries=0.0, search=0.0)

  def stream() -> Iterator[tuple[str, dict[str, float]]]:
    qids = list(queries)
    for begin in range(0, len(qids), query_block):
      block = qids[begin:begin + query_block]
      started = time.perf_counter()
      encoded = encoder.encode_queries([queries[q] for q in block], search_cfg.batch_size)
      searched = time.perf_counter()
      scores, ids = searcher.search(encoded, search_cfg.k + int(drop_self))
      seconds["encode_queries"] += searched - started
      seconds["search"] += time.perf_counter() - searched
      yield from hits_to_run(block, doc_ids, scores, ids, search_cfg.k, drop_self).items()

  return Retrieved(stream(), searcher.settings(), seconds)
