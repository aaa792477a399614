"""Top-k search over a corpus store: FAISS for bi-encoders, MaxSim for ColBERT.

  bi-encoder  'flat'   exact inner product (IndexFlatIP)
              'ivfpq'  IVF-PQ (approximate scores)
  ColBERT     'exact'  MaxSim against every document, on the local devices (small collections), in float32
                       whatever the store's vector dtype
              'ivfpq'  ColBERTv1: every query vector fetches its `faiss_depth` nearest document tokens from a
                       token-level IVF-PQ index; their documents are re-ranked by exact MaxSim on device
'auto' picks flat for bi-encoders, and exact for ColBERT up to `exact_max_tokens` document tokens.
Results are (scores [Q, k] float32, document indices [Q, k] int64), best first, index -1 past the corpus end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from pairdistill_jax import sharding
from pairdistill_jax.models import scoring
from pairdistill_jax.retrieval import devices, faiss_index
from pairdistill_jax.retrieval.corpus import DenseStore, EmbeddingStore, Store

Hits = tuple[np.ndarray, np.ndarray]
_SIM_BUDGET = 1 << 25  # query-token x doc-token similarities per device and step
_QUERY_BLOCK = 16
_RERANK_BLOCKS = (64, 256, 1024, 4096)

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """How to search (see the module docstring); 0 for nlist / pq_m picks them from the corpus size."""

  index: str = "auto"
  nlist: int = 0
  pq_m: int = 0
  nprobe: int = 32
  faiss_depth: int = 1024
  exact_max_tokens: int = 20_000_000
  train_size: int = 0  # IVF-PQ training vectors; 0: 64 per list (at least 5% of the corpus)

  def resolve(self, store: Store) -> str:
    """The concrete index type for `store`."""
    if isinstance(store, DenseStore):
      allowed, auto = ("flat", "ivfpq"), "flat"
    else:
      allowed = ("exact", "ivfpq")
      auto = "exact" if store.num_tokens <= self.exact_max_tokens else "ivfpq"
    index_type = auto if self.index == "auto" else self.index
    if index_type not in allowed:
      raise ValueError(f"index {self.index!r} does not apply to a {type(store).__name__}; use one of "
                       f"{('auto',) + allowed}")
    return index_type


class Searcher:
  """The index of a store, built once (FAISS flat / IVF-PQ); `search` then answers any number of query blocks."""

  def __init__(self, store: Store, options: SearchOptions = SearchOptions(), mesh: jax.sharding.Mesh | None = None):
    self.store, self.options = store, options
    self.index_type = options.resolve(store)
    self.mesh = mesh or devices.local_mesh()
    _log.info("Search: %s over %d documents", self.index_type, store.num_docs)
    self.index = None
    if isinstance(store, DenseStore):
      self.index = _ivfpq_index(store, store.num_docs, options) if self.index_type == "ivfpq" else _flat_index(store)
    elif self.index_type == "ivfpq":
      self.index = _ivfpq_index(store, store.num_tokens, options)

  def settings(self) -> dict[str, Any]:
    """What changes the results besides the vectors: the index type and parameters, the stored vector dtype."""
    settings = {"index": self.index_type, "vector_dtype": str(self.store.chunks[0].dtype)}
    if self.index_type != "ivfpq":
      return settings
    if isinstance(self.store, DenseStore):
      return {**settings, **_ivfpq_params(self.options, self.store.num_docs, self.store.dim)}
    return {**settings, **_ivfpq_params(self.options, self.store.num_tokens, self.store.dim),
            "faiss_depth": self.options.faiss_depth}

  def search(self, queries: np.ndarray, k: int) -> Hits:
    """The top-k documents of each query: DPR queries [Q, dim], ColBERT queries [Q, Lq, dim]."""
    if isinstance(self.store, DenseStore):
      return faiss_index.search(self.index, queries, k)
    if self.index_type == "exact":
      return maxsim_exact(queries, self.store, k, self.mesh)
    return maxsim_ivfpq(queries, self.store, k, self.mesh, self.options, self.index)


def search(queries: np.ndarray, store: Store, k: int, options: SearchOptions = SearchOptions(),
           mesh: jax.sharding.Mesh | None = None) -> Hits:
  """The top-k documents of each query (one block of queries; `Searcher` keeps the index for more)."""
  return Searcher(store, options, mesh).search(queries, k)


def _flat_index(store: DenseStore):
  index = faiss_index.flat_ip(store.dim)
  for chunk in store.chunks:
    faiss_index.add(index, chunk)
  return index


def _ivfpq_params(options: SearchOptions, n_vectors: int, dim: int) -> dict[str, int]:
  """The IVF-PQ lists, sub-quantizers, training vectors and probes for `n_vectors` vectors of `dim`."""
  nlist = options.nlist or faiss_index.default_nlist(n_vectors)
  train_size = min(options.train_size or max(64 * nlist, n_vectors // 20), n_vectors)
  return {"nlist": nlist, "pq_m": options.pq_m or max(dim // 8, 1), "train_size": train_size,
          "nprobe": options.nprobe}


def _ivfpq_index(store: Store, n_vectors: int, options: SearchOptions):
  p = _ivfpq_params(options, n_vectors, store.dim)
  _log.info("IVF-PQ: %d lists, %d sub-quantizers, trained on %d of %d vectors, nprobe %d", p["nlist"], p["pq_m"],
            p["train_size"], n_vectors, p["nprobe"])
  index = faiss_index.ivfpq(store.dim, store.sample(p["train_size"]), nlist=p["nlist"], m=p["pq_m"],
                            nprobe=p["nprobe"])
  for chunk in store.chunks:
    faiss_index.add(index, chunk)
  return index


def _merge_top_k(top_QxK, top_ids_QxK, scores_QxM, ids_M, k: int):
  all_QxKM = jnp.concatenate([top_QxK, scores_QxM], axis=1)
  all_ids_QxKM = jnp.concatenate([top_ids_QxK, jnp.broadcast_to(ids_M, scores_QxM.shape)], axis=1)
  top_QxK, position_QxK = jax.lax.top_k(all_QxKM, k)
  return top_QxK, jnp.take_along_axis(all_ids_QxKM, position_QxK, axis=1)


def maxsim_float32(q_QxLxD: jax.Array, d_MxWxD: jax.Array, d_mask_MxW: jax.Array) -> jax.Array:
  """MaxSim [Q, M] with float32 products on every platform (by default GPUs multiply float32 in TF32 and
  TPUs in bfloat16 passes)."""
  with jax.default_matmul_precision("float32"):
    return scoring.maxsim(q_QxLxD.astype(jnp.float32), d_MxWxD.astype(jnp.float32), d_mask_MxW)


@functools.partial(jax.jit, static_argnames="k")
def _exact_step(q_QxLxD, d_MxWxD, d_mask_MxW, ids_M, top_QxK, top_ids_QxK, *, k: int):
  """Scores a document block and merges it into the running top-k (documents with id -1 never enter)."""
  scores_QxM = maxsim_float32(q_QxLxD, d_MxWxD, d_mask_MxW)
  scores_QxM = jnp.where(ids_M[None] >= 0, scores_QxM, -jnp.inf)
  return _merge_top_k(top_QxK, top_ids_QxK, scores_QxM, ids_M, k)


def _doc_block(n_queries: int, query_len: int, width: int, n_docs: int, mesh_size: int) -> int:
  """Documents per step: the similarity tensor stays within _SIM_BUDGET per device."""
  per_device = max(_SIM_BUDGET // (n_queries * query_len * width), 1)
  return min(per_device * mesh_size, devices.round_up(n_docs, mesh_size))


def maxsim_exact(q_QxLxD: np.ndarray, store: EmbeddingStore, k: int, mesh: jax.sharding.Mesh) -> Hits:
  """Exact MaxSim of every query against every document; document blocks split over the devices."""
  n_queries, query_len, _ = q_QxLxD.shape
  k = min(k, store.num_docs)
  width = devices.round_up(store.max_length, 8)
  n_block = _doc_block(_QUERY_BLOCK, query_len, width, store.num_docs, mesh.size)
  padded_q = devices.pad_rows(q_QxLxD.astype(np.float32), devices.round_up(n_queries, _QUERY_BLOCK))
  q_blocks = [jax.device_put(padded_q[s:s + _QUERY_BLOCK], sharding.replicated(mesh))
              for s in range(0, len(padded_q), _QUERY_BLOCK)]
  tops = [(jnp.full((_QUERY_BLOCK, k), -jnp.inf), jnp.full((_QUERY_BLOCK, k), -1, jnp.int32))
          for _ in q_blocks]
  sharded = devices.row_sharded(mesh)
  for start in tqdm.trange(0, store.num_docs, n_block, desc="maxsim", unit="block", dynamic_ncols=True,
                           disable=jax.process_index() != 0):
    ids_M = np.arange(start, start + n_block)
    ids_M[ids_M >= store.num_docs] = -1
    vectors_MxWxD, mask_MxW = store.gather(np.maximum(ids_M, 0), width)
    d_block = jax.device_put((vectors_MxWxD, mask_MxW, ids_M.astype(np.int32)), sharded)
    tops = [_exact_step(q, *d_block, *top, k=k) for q, top in zip(q_blocks, tops)]
  scores = np.concatenate([np.asarray(t[0]) for t in tops])[:n_queries]
  ids = np.concatenate([np.asarray(t[1]) for t in tops])[:n_queries].astype(np.int64)
  return scores, ids


@jax.jit
def _rerank_step(q_1xLxD, d_MxWxD, d_mask_MxW):
  return maxsim_float32(q_1xLxD, d_MxWxD, d_mask_MxW)[0]


def _rerank(q_LxD: np.ndarray, candidates: np.ndarray, store: EmbeddingStore, width: int,
            mesh: jax.sharding.Mesh) -> np.ndarray:
  """Exact MaxSim of one query against its candidate documents, in fixed-size blocks on the devices."""
  block = devices.round_up(next((b for b in _RERANK_BLOCKS if b >= len(candidates)), _RERANK_BLOCKS[-1]),
                           mesh.size)
  q = jax.device_put(q_LxD[None].astype(np.float32), sharding.replicated(mesh))
  scores = []
  for start in range(0, len(candidates), block):
    ids = candidates[start:start + block]
    vectors_MxWxD, mask_MxW = store.gather(devices.pad_rows(ids, block), width)
    d = jax.device_put((vectors_MxWxD, mask_MxW), devices.row_sharded(mesh))
    scores.append(np.asarray(_rerank_step(q, *d))[:len(ids)])
  return np.concatenate(scores)


def maxsim_ivfpq(q_QxLxD: np.ndarray, store: EmbeddingStore, k: int, mesh: jax.sharding.Mesh,
                 options: SearchOptions, index=None) -> Hits:
  """ColBERTv1 end-to-end retrieval: token-level IVF-PQ candidates, then exact MaxSim re-ranking.

  `index`: the store's token index (built here when None).
  """
  n_queries, query_len, dim = q_QxLxD.shape
  index = index if index is not None else _ivfpq_index(store, store.num_tokens, options)
  _, tokens = faiss_index.search(index, q_QxLxD.reshape(-1, dim), options.faiss_depth)
  tokens_QxT = tokens.reshape(n_queries, query_len * options.faiss_depth)
  doc_of_token = store.doc_of_token()
  width = devices.round_up(store.max_length, 8)
  scores_QxK = np.full((n_queries, k), -np.inf, np.float32)
  ids_QxK = np.full((n_queries, k), -1, np.int64)
  for q in tqdm.trange(n_queries, desc="re-rank", unit="query", dynamic_ncols=True,
                       disable=jax.process_index() != 0):
    candidates = np.unique(doc_of_token[tokens_QxT[q][tokens_QxT[q] >= 0]])
    if not len(candidates):
      continue
    scores = _rerank(q_QxLxD[q], candidates, store, width, mesh)
    best = np.lexsort((candidates, -scores))[:k]
    scores_QxK[q, :len(best)], ids_QxK[q, :len(best)] = scores[best], candidates[best]
  return scores_QxK, ids_QxK
