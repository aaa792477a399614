"""The training input pipeline: grain datasets of fixed-shape batches read from the pre-tokenised stores.

  training lines --compile_training_set--> TrainingSet: store rows + teacher targets, memory-mapped, cached
                                           (data.training_set)
  global step k --global_batches--> the example indices of global batch k (shuffled by seed and epoch)
                --BatchAssembler--> this process's rows of it as numpy arrays in the data.batching layout,
                                    gathered from the stores, passages cut to the batch's document width
                --TrainIterator--> background threads assemble `prefetch` batches ahead (grain)

Global batch k is the k-th block of `batch_size` examples of epoch k // (N // batch_size)'s permutation
(the last incomplete block of each epoch is dropped); it does not depend on the number of processes.
Process p of P takes rows [p·B/P, (p+1)·B/P) of it, which is the part of the global array its devices hold
when `sharding.shard_batch` assembles it with `jax.make_array_from_process_local_data`. So the processes read
disjoint examples that together cover the epoch. The iterator's state is the global step (JSON), saved
with checkpoints: restoring it gives exactly the batches an uninterrupted run would have seen.

Document widths (data.doc_widths): each batch's passage arrays are cut to the smallest width of the set that
holds the longest passage of the *global* batch. Every process computes the global batch's indices (the
permutation depends only on the seed and the epoch) and has the compiled lines and the store's lengths
memory-mapped, so all processes pick the same width for the same step without communicating, as
`jax.make_array_from_process_local_data` needs; the width is a function of the step and the config only, so a
resumed run sees the widths (and batches) of an uninterrupted one, and the iterator's state does not hold it.

`data.same_order_on_every_shard` (off by default) reproduces the data order of the original training code,
whose loader ignored the data-parallel rank (stanford ColBERT's `Examples.tolist(rank, nranks)` kept lines
0, D, 2D, … on every rank, fixed upstream in 2025): each of the D data-parallel shards reads the same B/D
examples, drawn from lines 0, D, 2D, …; with `data.shuffle=False` they come in file order, as there.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from pairdistill_jax import config_lib, sharding
from pairdistill_jax.data import batching, store
from pairdistill_jax.data.training_set import TrainingSet, compile_training_set
from pairdistill_jax.paths import DataPaths

PathLike = str | os.PathLike[str]


DEFAULT_STORE_DIR = "pairdistill_store"  # beside the collection when data.store_dir is empty

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- the order


def _grain_seed(seed: int) -> int:
  """A well-mixed 32-bit seed (grain reshuffles epoch e with seed + e, so nearby seeds would overlap)."""
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _epoch_batches(ds: grain.MapDataset, batch_size: int, seed: int, shuffle: bool) -> grain.MapDataset:
  """Endless batches of `ds`'s elements, reshuffled every epoch; each epoch's remainder dropped."""
  if shuffle:
    ds = ds.shuffle(seed=_grain_seed(seed))
  return ds.batch(batch_size, drop_remainder=True, batch_fn=np.asarray).repeat()


def rows_of_process(indices_B: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process p's rows [p·B/P, (p+1)·B/P) of a global batch."""
  local = len(indices_B) // process_count
  return indices_B[process_index * local:(process_index + 1) * local]


def _copies(indices_S: np.ndarray, copies: int) -> np.ndarray:
  return np.tile(indices_S, copies)


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")


def global_batches(num_examples: int, *, batch_size: int, seed: int, shuffle: bool = True,
                   same_order_on_every_shard: bool = False, num_shards: int = 1,
                   process_count: int = 1) -> grain.MapDataset:
  """Global step -> the example indices of the whole global batch (an endless grain MapDataset, the same on
  every process; see the module docstring).

  With `same_order_on_every_shard`, each of the `num_shards` shards gets the same `batch_size / num_shards`
  examples, drawn from examples 0, num_shards, 2·num_shards, ….
  """
  if same_order_on_every_shard:
    if batch_size % num_shards or num_shards % process_count:
      raise ValueError(f"data.same_order_on_every_shard needs train.batch_size={batch_size} divisible by the "
                       f"{num_shards} data-parallel shards, and those by the {process_count} processes")
    subset = grain.MapDataset.range(0, num_examples, num_shards)
    _check_enough(len(subset), batch_size // num_shards)
    shard_batches = _epoch_batches(subset, batch_size // num_shards, seed, shuffle)
    return shard_batches.map(functools.partial(_copies, copies=num_shards))
  _check_enough(num_examples, batch_size)
  return _epoch_batches(grain.MapDataset.range(num_examples), batch_size, seed, shuffle)


def example_indices(num_examples: int, *, batch_size: int, seed: int, shuffle: bool = True,
                    process_index: int = 0, process_count: int = 1, same_order_on_every_shard: bool = False,
                    num_shards: int = 1) -> grain.MapDataset:
  """Global step -> this process's example indices: its rows of `global_batches`."""
  _check_processes(batch_size, process_index, process_count)
  batches = global_batches(num_examples, batch_size=batch_size, seed=seed, shuffle=shuffle,
                           same_order_on_every_shard=same_order_on_every_shard, num_shards=num_shards,
                           process_count=process_count)
  return batches.map(functools.partial(rows_of_process, process_index=process_index, process_count=process_count))


def _check_enough(available: int, needed: int) -> None:
  if available < needed:
    raise ValueError(f"{available} training examples are fewer than one batch of {needed}; lower "
                     "train.batch_size or add training lines")


# ----------------------------------------------------------------------------------- the batches


class BatchAssembler:
  """The example indices of a global batch -> this process's rows of it in the `data.batching` layout,
  gathered from the stores, the passages cut to the batch's document width.

  `doc_widths` (ascending; default: the store's full width only): the passage arrays end at the smallest width
  that holds the longest passage of the whole global batch, which every process sees alike. With the default
  process (0 of 1) the indices are the batch itself.
  """

  def __init__(self, training_set: TrainingSet, docs: store.TokenStore, queries: store.TokenStore,
               tokenizer: store.Tokenizer, *, doc_widths: Sequence[int] = (), process_index: int = 0,
               process_count: int = 1):
    self._set, self._docs, self._queries = training_set, docs, queries
    self._skip = tokenizer.score_skip_table()  # ids excluded from MaxSim (None: no score mask)
    self.doc_widths = tuple(doc_widths) or (docs.ids.shape[1],)
    if self.doc_widths[-1] != docs.ids.shape[1]:
      raise ValueError(f"the largest document width {self.doc_widths[-1]} is not the store's width "
                       f"{docs.ids.shape[1]} (model.doc_maxlen)")
    self._process = (process_index, process_count)

  def doc_width(self, global_B: np.ndarray) -> int:
    """The document width of the global batch `global_B` (example indices)."""
    if len(self.doc_widths) == 1:
      return self.doc_widths[0]
    longest = int(self._docs.lengths[self._set.passage_row[global_B]].max())
    return batching.doc_width(longest, self.doc_widths)

  def __call__(self, global_B: np.ndarray) -> dict[str, np.ndarray]:
    width = self.doc_width(global_B)
    indices_B = rows_of_process(global_B, *self._process)
    queries = self._queries.gather(self._set.query_row[indices_B])
    docs = self._docs.gather(self._set.passage_row[indices_B].reshape(-1), width)
    if self._skip is not None:
      docs["score_mask"] = docs["mask"] * ~self._skip[docs["ids"]]
    targets = {k: np.asarray(v[indices_B]) for k, v in self._set.targets.items()}
    return batching.assemble_batch(queries, docs, targets)


class TrainIterator:
  """Endless host-local training batches, prefetched in background threads, with a JSON state.

  `get_state()` after k batches, given to `set_state` of a fresh iterator over the same data and settings,
  makes it continue with batch k exactly; a state from other data or settings is refused.
  """

  def __init__(self, batches: grain.MapDataset, spec: dict[str, Any], *, num_threads: int, prefetch: int,
               start_step: int = 0):
    self.spec = spec
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._iterator = batches.to_iter_dataset(options).__iter__()
    if start_step:
      self._iterator.set_state({"next_index": start_step})

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._iterator.get_state()["next_index"]

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "spec": dict(self.spec)}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state["spec"]
    differing = sorted(k for k in self.spec.keys() | saved.keys() if self.spec.get(k) != saved.get(k))
    if differing:
      changes = ", ".join(f"{k}: saved {saved.get(k)!r}, now {self.spec.get(k)!r}" for k in differing)
      raise ValueError(f"the data iterator state was saved for other data or settings ({changes}); resuming "
                       "from it would not give the batches of the interrupted run. Restore the same training "
                       "file, collection, queries and data/train settings")
    self._iterator.set_state({"next_index": int(state["step"])})

  def close(self) -> None:
    self._iterator.close()


def data_parallel_shards(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways the mesh of `config` splits the batch (the mesh axes 'batch' maps to)."""
  axes = config_lib.mesh_shape(config, num_devices)
  mapped = dict(sharding.rules(config)).get("batch") or ()
  names = (mapped,) if isinstance(mapped, str) else mapped
  return int(np.prod([axes[name] for name in names]))


def train_iterator(config: ml_collections.ConfigDict, paths: DataPaths, tokenizer: store.Tokenizer, *,
                   start_step: int = 0, process_index: int | None = None, process_count: int | None = None,
                   num_shards: int | None = None) -> TrainIterator:
  """This process's batches of `config`'s training data.

  Opens (building when needed) the passage and query stores (TSV files or BEIR, read with data.split and
  data.title_separator) and the compiled training lines under `data.store_dir` (default: `pairdistill_store`
  beside the collection). Process index and count default to JAX's, and `num_shards` (used by
  `data.same_order_on_every_shard`) to the mesh's batch shards.
  """
  data_cfg, train_cfg = config.data, config.train
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if data_cfg.same_order_on_every_shard and num_shards is None:
    num_shards = data_parallel_shards(config, jax.device_count())
  store_dir = data_cfg.store_dir or os.path.join(os.path.dirname(os.path.abspath(paths.collection)), DEFAULT_STORE_DIR)
  progress = process_index == 0
  opened = {field: store.open_store(config_lib.data_source(config, path, field), store_dir, tokenizer, field,
                                    num_workers=data_cfg.tokenize_workers, skip_bad_lines=data_cfg.skip_bad_lines,
                                    progress=progress)
            for field, path in (("docs", paths.collection), ("queries", paths.queries))}
  training_set = compile_training_set(paths.train, opened["docs"], opened["queries"], store_dir, nway=data_cfg.nway,
                                      max_pairs=data_cfg.max_pairs, skip_bad_lines=data_cfg.skip_bad_lines,
                                      progress=progress)
  same_order = bool(data_cfg.same_order_on_every_shard)
  _check_processes(train_cfg.batch_size, process_index, process_count)
  indices = global_batches(len(training_set), batch_size=train_cfg.batch_size, seed=train_cfg.seed,
                           shuffle=data_cfg.shuffle, same_order_on_every_shard=same_order,
                           num_shards=num_shards or 1, process_count=process_count)
  # The document widths are not in the spec: they change the batches' padding, not their contents.
  spec = {"examples": training_set.digest, "batch_size": train_cfg.batch_size, "seed": train_cfg.seed,
          "shuffle": data_cfg.shuffle, "same_order_on_every_shard": same_order,
          "num_shards": num_shards if same_order else None}
  widths = config_lib.parse_doc_widths(data_cfg.doc_widths, opened["docs"].ids.shape[1])  # (the tokenizer's doc_maxlen)
  _log.info("Training data: %d lines of %s, %d passages, %d queries (stores in %s); document widths %s",
            len(training_set), paths.train, len(opened["docs"]), len(opened["queries"]), store_dir,
            "/".join(map(str, widths)))
  batches = indices.map(BatchAssembler(training_set, opened["docs"], opened["queries"], tokenizer,
                                       doc_widths=widths, process_index=process_index, process_count=process_count))
  return TrainIterator(batches, spec, num_threads=data_cfg.num_workers, prefetch=data_cfg.prefetch,
                       start_step=start_step)
