"""FAISS inner-product indexes (flat and IVF-PQ), on the GPUs when the installed faiss has GPU support.

Whether FAISS runs on GPU or CPU is decided once per process and said once in the log. (On a GPU host, JAX
preallocates most of the GPU memory: leave room for FAISS with XLA_PYTHON_CLIENT_MEM_FRACTION.)
"""

from __future__ import annotations

import functools
import logging
import math

import faiss
import numpy as np

_log = logging.getLogger(__name__)
_MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained
_SEARCH_BATCH = 16_384


@functools.cache
def use_gpu() -> bool:
  """Whether indexes go to the GPUs; logged the first time it is asked."""
  if not hasattr(faiss, "StandardGpuResources"):
    _log.info("FAISS on CPU (the installed faiss has no GPU support; pip install faiss-gpu-cu12 for it)")
    return False
  gpus = faiss.get_num_gpus()
  if gpus:
    _log.info("FAISS on %d GPU(s)", gpus)
  else:
    _log.info("FAISS on CPU (no GPU visible)")
  return gpus > 0


def to_device(index: faiss.Index) -> faiss.Index:
  """`index` cloned onto all GPUs when `use_gpu()`, else itself."""
  return faiss.index_cpu_to_all_gpus(index) if use_gpu() else index


def flat_ip(dim: int) -> faiss.Index:
  """Exact inner-product search."""
  return to_device(faiss.IndexFlatIP(dim))


def default_nlist(n: int) -> int:
  """ColBERTv1's partition count, 2^ceil(log2(8 sqrt(n))), capped so every list gets enough training points."""
  wanted = 1 << math.ceil(math.log2(max(8 * math.sqrt(n), 1)))
  affordable = 1 << max(int(math.log2(max(n // _MIN_POINTS_PER_CENTROID, 1))), 0)
  return min(wanted, affordable)


def pq_bits(n_train: int) -> int:
  """8-bit PQ codes when there are enough training points for 256 centroids per sub-quantizer, else fewer."""
  return int(min(8, max(1, math.floor(math.log2(max(n_train // _MIN_POINTS_PER_CENTROID, 2))))))


def ivfpq(dim: int, train_x: np.ndarray, *, nlist: int, m: int, nprobe: int) -> faiss.Index:
  """An inner-product IVF-PQ index (`nlist` lists, `m` sub-quantizers) trained on `train_x`, empty."""
  if dim % m:
    raise ValueError(f"PQ sub-quantizers m={m} must divide the vector dimension {dim}")
  # 'np': no polysemous training (only polysemous search would use it, and it dominates training time).
  spec = f"IVF{nlist},PQ{m}x{pq_bits(len(train_x))}np"
  index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
  index = to_device(index)
  index.train(np.ascontiguousarray(train_x, np.float32))
  space = faiss.GpuParameterSpace() if use_gpu() else faiss.ParameterSpace()
  space.set_index_parameter(index, "nprobe", nprobe)
  return index


def add(index: faiss.Index, x: np.ndarray) -> None:
  index.add(np.ascontiguousarray(x, np.float32))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores [Q, k] float32, ids [Q, k] int64, -1 where fewer than k exist), in query batches."""
  parts = [index.search(np.ascontiguousarray(queries[s:s + _SEARCH_BATCH], np.float32), k)
           for s in range(0, len(queries), _SEARCH_BATCH)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
