"""Training lines compiled against the token stores: one row of store rows and teacher targets per line.

`compile_training_set` resolves each line's qid and pids to rows of the query and passage stores and packs
its teacher targets (`batching.pack_targets`) into memory-mapped arrays, cached under the store directory
(`array_cache.ensure_built`) while the file, the stores and the settings are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from pairdistill_jax import io
from pairdistill_jax.data import array_cache, batching, formats, store
from pairdistill_jax.data.formats import TrainingExample

PathLike = str | os.PathLike[str]

COMPILE_FORMAT_VERSION = 2

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingSet:
  """Training lines compiled against the stores (memory-mapped, one row per line).

  `query_row` [N] and `passage_row` [N, nway] are rows of the query and passage stores (padding slots
  point at the passage store's `pad_row`); `targets` are the `batching.pack_targets` arrays.
  """

  query_row: np.ndarray
  passage_row: np.ndarray
  targets: dict[str, np.ndarray]
  digest: str

  def __len__(self) -> int:
    return len(self.query_row)


def _resolve_chunk(path: PathLike, numbers: Sequence[int], examples: Sequence[TrainingExample],
                   docs: store.TokenStore, queries: store.TokenStore,
                   skipped: io.BadLines) -> list[tuple[TrainingExample, int, np.ndarray]]:
  """(example, query row, passage rows) of the examples whose qid and pids are all in the stores."""
  query_rows = queries.index.find([ex.qid for ex in examples])
  passage_rows = docs.index.find([pid for ex in examples for pid in ex.pids])
  starts = np.cumsum([0] + [len(ex.pids) for ex in examples])
  resolved = []
  for k, (number, ex) in enumerate(zip(numbers, examples)):
    rows = passage_rows[starts[k]:starts[k + 1]]
    if query_rows[k] < 0:
      skipped.handle(formats.FormatError(path, number, f"qid {ex.qid!r} is not in the queries"))
    elif (rows < 0).any():
      missing = ex.pids[int(np.argmax(rows < 0))]
      skipped.handle(formats.FormatError(path, number, f"pid {missing!r} is not in the collection"))
    else:
      resolved.append((ex, int(query_rows[k]), rows))
  return resolved


def _check_pair_counts(path: PathLike, numbers: Sequence[int], examples: Sequence[TrainingExample], nway: int,
                       max_pairs: int) -> None:
  """Refuses (whatever skip_bad_lines says) a line with more pairs than the batch has slots for."""
  for number, ex in zip(numbers, examples):
    count = len(batching.kept_pairs(ex, nway))
    if count > max_pairs:
      raise formats.FormatError(path, number, f"{count} pairs among its first {nway} passages, more than "
                                f"data.max_pairs={max_pairs}: set --config.data.max_pairs={count} or more "
                                f"(pairs are never dropped silently)")


def _compile(tmp: pathlib.Path, path: PathLike, docs: store.TokenStore, queries: store.TokenStore,
             settings: dict[str, Any], *, skip_bad_lines: bool, on_skip: formats.SkipCallback | None,
             progress: bool, chunk_size: int) -> dict[str, Any]:
  """Writes the TrainingSet arrays of training file `path` into `tmp`; returns their meta (with the largest and
  the mean passage count of its lines)."""
  nway, max_pairs = settings["nway"], settings["max_pairs"]
  identity = array_cache.file_identity(path)
  lines = formats.iter_training_lines(path, skip_bad_lines=skip_bad_lines, on_skip=on_skip, require_scores=True)
  skipped = io.BadLines(path, skip_bad_lines, on_skip)
  writer = array_cache.ArrayWriter(tmp)
  number, max_passages, total_passages = 1, 0, 0
  try:
    with tqdm.tqdm(desc=f"compiling {pathlib.Path(path).name}", unit="line", disable=not progress,
                   dynamic_ncols=True) as bar:
      while chunk := list(itertools.islice(lines, chunk_size)):
        numbers, examples = zip(*chunk)
        number = numbers[-1]
        _check_pair_counts(path, numbers, examples, nway, max_pairs)
        resolved = _resolve_chunk(path, numbers, examples, docs, queries, skipped)
        bar.update(len(chunk))
        if not resolved:
          continue
        counts = [len(ex.pids) for ex, _, _ in resolved]
        max_passages, total_passages = max(max_passages, *counts), total_passages + sum(counts)
        targets = batching.pack_targets([ex for ex, _, _ in resolved], nway=nway, max_pairs=max_pairs)
        passage_row_CxN = np.full((len(resolved), nway), docs.pad_row, np.int64)
        for c, (ex, _, rows) in enumerate(resolved):
          passage_row_CxN[c, :min(nway, len(rows))] = rows[:nway]
        writer.append(query_row=np.array([q for _, q, _ in resolved], np.int64),
                      passage_row=passage_row_CxN, **targets)
    arrays = writer.finish()
  finally:
    writer.close()
  if skipped.count:
    _log.warning("skipped %d training lines of %s with ids missing from the stores", skipped.count, path)
  if "query_row" not in arrays:
    raise formats.FormatError(path, number, f"no usable training lines (all {skipped.count} reference ids "
                              "missing from the collection or queries)")
  passages = {"max": max_passages, "mean": total_passages / arrays["query_row"]["shape"][0]}
  return {"settings": settings, "source": identity, "arrays": arrays, "passages": passages,
          "digest": array_cache.digest_of([settings, identity["sha256"]])}


def _warn_of_padding(passages: dict[str, float], nway: int) -> None:
  """Warns when every line has fewer passages than `nway`: the slots beyond them are only padding."""
  if passages["max"] < nway:
    _log.warning("data.nway=%d but the training lines have at most %d passages (mean %.1f): %.0f%% of the slots "
                 "are padding (--config.data.nway=%d would hold every passage)", nway, passages["max"],
                 passages["mean"], 100 * (1 - passages["mean"] / nway), passages["max"])


def compile_training_set(path: PathLike, docs: store.TokenStore, queries: store.TokenStore,
                         store_dir: PathLike, *, nway: int, max_pairs: int, skip_bad_lines: bool = False,
                         on_skip: formats.SkipCallback | None = None, progress: bool = True,
                         chunk_size: int = 4096) -> TrainingSet:
  """The training lines of `path` resolved against the stores, cached under `store_dir`.

  Reused while the file, the stores and the settings are unchanged. A line whose qid or a pid is missing
  from the stores, or without teacher scores, is a FormatError naming its line (or, with `skip_bad_lines`,
  skipped and reported). Warns when `nway` exceeds every line's passage count (the extra slots are padding).
  """
  settings = {"format": COMPILE_FORMAT_VERSION, "nway": nway, "max_pairs": max_pairs,
              "skip_bad_lines": skip_bad_lines, "docs": docs.digest, "queries": queries.digest}
  target = pathlib.Path(store_dir) / f"{pathlib.Path(path).name}.nway{nway}.pairs{max_pairs}"

  def is_current(meta: dict[str, Any]) -> bool:
    return meta.get("settings") == settings and array_cache.same_file(meta["source"], path)

  build = functools.partial(_compile, path=path, docs=docs, queries=queries, settings=settings,
                            skip_bad_lines=skip_bad_lines, on_skip=on_skip, progress=progress,
                            chunk_size=chunk_size)
  meta = array_cache.ensure_built(target, is_current, build)
  _warn_of_padding(meta["passages"], nway)
  arrays = array_cache.open_arrays(target, meta["arrays"])
  return TrainingSet(arrays["query_row"], arrays["passage_row"], {k: arrays[k] for k in batching.TARGET_KEYS},
                     meta["digest"])
