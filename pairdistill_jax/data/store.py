"""The pre-tokenised store: a collection (or a query set) tokenised once into memory-mapped arrays.

A store directory holds
  ids.bin       token ids, one row per record, exactly as the tokenizer's `encode_docs` (or
                `encode_queries`) gives them: uint16 when the vocabulary fits, else int32;
  lengths.bin   int32, the attended prefix of each row (its mask is `position < length`);
  keys.bin, key_rows.bin   the id -> row index: sorted ids (int64, or UTF-8 bytes) and their rows; absent
                when the ids are 0, 1, 2, … in row order (MS MARCO), which index themselves;
  meta.json     shapes, dtypes and fingerprints of the arrays, the tokenizer and reader settings and the
                source files' identities; written last.
The last row is the encoding of the empty text, which batches use for padding passages (`pad_row`).
Opening maps the files without reading them, so 8.8M passages × 180 tokens open at once and only the rows
a batch touches are paged in.

The source is a `formats.TextSource` (a TSV file or BEIR; its format, split and title separator are part
of the settings). `open_store` reuses a store whose settings and source files are unchanged (same size and
modification time, or else same SHA-256), and otherwise tokenises the source in worker processes with a
progress bar into a temporary directory that replaces the old store only once complete
(`array_cache.ensure_built`, which also rebuilds a damaged store). The id index is `row_index.RowIndex`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import logging
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
import transformers

from pairdistill_jax.data import array_cache, formats
from pairdistill_jax.data.row_index import RowIndex, build_index, encode_keys
from pairdistill_jax.students.registry import StudentTokenizer

PathLike = str | os.PathLike[str]
Tokenizer = StudentTokenizer

FORMAT_VERSION = 3
FIELDS = formats.FIELDS
# The tokenizer attributes a field's encoding depends on (besides the vocabulary).
_FIELD_SETTINGS = {"docs": ("doc_maxlen", "doc_token"),
                   "queries": ("query_maxlen", "query_token", "attend_to_mask_tokens")}
_ID_NAMES = {"docs": "pid", "queries": "qid"}
_UNITS = {"docs": "passage", "queries": "query"}

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- the store


@dataclasses.dataclass(frozen=True)
class TokenStore:
  """A read-only, memory-mapped tokenised collection or query set (see the module docstring)."""

  directory: pathlib.Path
  ids: np.ndarray
  lengths: np.ndarray
  index: RowIndex
  digest: str
  what: str

  def __len__(self) -> int:
    return self.ids.shape[0] - 1

  @property
  def pad_row(self) -> int:
    """The row holding the encoding of the empty text."""
    return self.ids.shape[0] - 1

  def rows(self, keys: Sequence[str]) -> np.ndarray:
    """The row of each id; a KeyError names the first id that is not in the store."""
    rows_K = self.index.find(keys)
    missing = np.flatnonzero(rows_K < 0)
    if len(missing):
      raise KeyError(f"{self.what} {keys[missing[0]]!r} is not in the store {self.directory} "
                     f"({len(missing)} of {len(rows_K)} ids missing)")
    return rows_K

  def gather(self, rows: np.ndarray, width: int | None = None) -> dict[str, np.ndarray]:
    """{'ids', 'mask'} of the given rows as int32 arrays, as the tokenizer's encode_* returns them; with
    `width`, only their first `width` positions (the rows' lengths must not exceed it)."""
    width = self.ids.shape[1] if width is None else width
    ids = self.ids[rows, :width].astype(np.int32)
    positions_L = np.arange(width, dtype=np.int32)
    mask = (positions_L < self.lengths[rows][..., None]).astype(np.int32)
    return {"ids": ids, "mask": mask}


def load_store(directory: PathLike, meta: dict[str, Any] | None = None) -> TokenStore:
  """Opens a built store (no reuse checks: `open_store` does those) with its `meta`, read and checked here
  when not given."""
  directory = pathlib.Path(directory)
  meta = meta or array_cache.read_meta(directory)
  if meta is None:
    raise FileNotFoundError(f"{directory} is not a complete token store (no valid {array_cache.META}); build "
                            f"it with open_store")
  arrays = array_cache.open_arrays(directory, meta["arrays"])
  index = RowIndex(meta["index"]["layout"], meta["index"]["size"], arrays.get("keys"), arrays.get("key_rows"))
  return TokenStore(directory, arrays["ids"], arrays["lengths"], index, meta["digest"],
                    _ID_NAMES[meta["settings"]["field"]])


def _vocab_digest(hf_tokenizer: transformers.PreTrainedTokenizerFast) -> str:
  """Digest of the fast tokenizer's definition (vocabulary, normaliser, …) without its call state."""
  spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
  spec.pop("truncation", None)
  spec.pop("padding", None)
  return array_cache.digest_of(spec)


def encoder_settings(tokenizer: Tokenizer, field: str) -> dict[str, Any]:
  """What a store of `field` ('docs' or 'queries') encoded with `tokenizer` depends on."""
  if field not in FIELDS:
    raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
  settings = {"format": FORMAT_VERSION, "field": field, "encoder": type(tokenizer).__name__,
              "tokenizer": _vocab_digest(tokenizer.tokenizer)}
  settings.update({name: getattr(tokenizer, name) for name in _FIELD_SETTINGS[field]
                   if hasattr(tokenizer, name)})
  return settings


def _ids_dtype(tokenizer: Tokenizer) -> np.dtype:
  return np.dtype(np.uint16 if len(tokenizer.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32)


def _rows_of(encoded: dict[str, np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
  """(ids as `dtype`, lengths) of an encode_* result; its mask must be a prefix of each row."""
  ids_BxL, mask_BxL = encoded["ids"], encoded["mask"]
  lengths_B = mask_BxL.sum(axis=1, dtype=np.int32)
  if not np.array_equal(np.arange(ids_BxL.shape[1]) < lengths_B[:, None], mask_BxL.astype(bool)):
    raise ValueError("the tokenizer's attention mask is not a prefix of each row; a token store keeps only "
                     "lengths, so it cannot hold this encoding")
  return ids_BxL.astype(dtype), lengths_B


_worker: dict[str, Any] = {}  # a tokenising worker process's encode function and dtype


def _init_worker(encode: Callable[[list[str]], dict], dtype: np.dtype) -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
  _worker.update(encode=encode, dtype=dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  return _rows_of(_worker["encode"](texts), _worker["dtype"])


def _encoded(chunks: Iterable[list[str]], encode: Callable[[list[str]], dict], dtype: np.dtype,
             num_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(ids, lengths) of each chunk of texts, in order; with workers, at most 2 chunks per worker in flight."""
  if num_workers == 0:
    for texts in chunks:
      yield _rows_of(encode(texts), dtype)
    return
  pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(encode, dtype))
  pending: collections.deque[concurrent.futures.Future] = collections.deque()
  try:
    for texts in chunks:
      pending.append(pool.submit(_encode_in_worker, texts))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(cancel_futures=True)


def _count_lines(path: PathLike) -> int | None:
  """Newlines in a plain file (None for .gz), for the progress bar."""
  if os.fspath(path).endswith(".gz"):
    return None
  count = 0
  with open(path, "rb") as f:
    while block := f.read(array_cache.HASH_BLOCK):
      count += block.count(b"\n")
  return count


def _resolve_workers(num_workers: int, lines: int | None, chunk_size: int) -> int:
  """-1 -> one per CPU; no worker processes when the source fits in one chunk."""
  if num_workers < -1:
    raise ValueError(f"num_workers must be -1 (one per CPU), 0 (this process) or positive, got {num_workers}")
  if lines is not None and lines <= chunk_size:
    return 0
  return (os.cpu_count() or 1) if num_workers == -1 else num_workers


def _build(tmp: pathlib.Path, source: formats.TextSource, tokenizer: Tokenizer, settings: dict[str, Any], *,
           num_workers: int, skip_bad_lines: bool, on_skip: formats.SkipCallback | None, progress: bool,
           chunk_size: int) -> dict[str, Any]:
  """Tokenises `source` into the arrays of directory `tmp`; returns the store's meta."""
  field = settings["field"]
  identities = [array_cache.file_identity(path) for path in source.files]
  lines = _count_lines(source.records)
  workers = _resolve_workers(num_workers, lines, chunk_size)
  encode = getattr(tokenizer, f"encode_{field}")
  dtype = _ids_dtype(tokenizer)
  records = source.iter(skip_bad_lines=skip_bad_lines, on_skip=on_skip)
  chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (UTF-8 ids, line numbers) per chunk

  def texts_of_chunks() -> Iterator[list[str]]:
    while chunk := list(itertools.islice(records, chunk_size)):
      lines_C, keys, texts = zip(*chunk)
      chunks.append((encode_keys(keys), np.array(lines_C, np.int64)))
      yield list(texts)

  writer = array_cache.ArrayWriter(tmp)
  desc = f"tokenising {source.path.name}"
  try:
    with tqdm.tqdm(total=lines, desc=desc, unit=_UNITS[field], disable=not progress,
                   dynamic_ncols=True) as bar:
      for ids_CxL, lengths_C in _encoded(texts_of_chunks(), encode, dtype, workers):
        writer.append(ids=ids_CxL, lengths=lengths_C)
        bar.update(len(ids_CxL))
    ids_1xL, lengths_1 = _rows_of(encode([""]), dtype)
    writer.append(ids=ids_1xL, lengths=lengths_1)
    keys_N = np.concatenate([keys for keys, _ in chunks])
    lines_N = np.concatenate([numbers for _, numbers in chunks])
    index, index_arrays = build_index(keys_N, lines_N, source.records, _ID_NAMES[field], skip_bad_lines, on_skip)
    writer.append(**index_arrays)
    arrays = writer.finish()
  finally:
    writer.close()
  sha256s = [identity["sha256"] for identity in identities]
  return {"settings": settings, "skip_bad_lines": skip_bad_lines, "source": identities, "arrays": arrays,
          "index": index, "digest": array_cache.digest_of([settings, sha256s, skip_bad_lines])}


def store_settings(source: formats.TextSource, tokenizer: Tokenizer) -> dict[str, Any]:
  """What a store of `source` depends on besides its files' bytes: the encoder and reader settings."""
  return {**encoder_settings(tokenizer, source.field), "reader": source.settings()}


def store_path(source: formats.TextSource, store_dir: PathLike, tokenizer: Tokenizer) -> pathlib.Path:
  """Where `open_store` keeps the store of `source`: one directory per source name and settings."""
  settings = store_settings(source, tokenizer)
  return pathlib.Path(store_dir) / f"{source.path.name}.{source.field}.{array_cache.digest_of(settings)[:12]}"


def open_store(source: PathLike | formats.TextSource, store_dir: PathLike, tokenizer: Tokenizer,
               field: str = "docs", *, num_workers: int = -1, skip_bad_lines: bool = False,
               on_skip: formats.SkipCallback | None = None, progress: bool = True,
               chunk_size: int = 4096) -> TokenStore:
  """The token store of `source` under `store_dir`: a `formats.TextSource`, or a path read as
  `formats.text_source(source, field)` reads it (a TSV file or BEIR, default split and title separator).

  Reused when the settings and the source files are unchanged; otherwise (re)built by `num_workers`
  processes (-1: one per CPU; 0: in this process), reading `chunk_size` records at a time (a source of
  one chunk is tokenised in this process). The workers are started with 'spawn', which imports the main
  module again: a script that builds a store must guard its entry point with `if __name__ == "__main__":`.
  Bad lines and duplicate ids raise a FormatError naming file and line, or with `skip_bad_lines` are
  skipped and reported to `on_skip`.
  """
  if not isinstance(source, formats.TextSource):
    source = formats.text_source(source, field)
  elif source.field != field:
    raise ValueError(f"a {source.field} source cannot make a {field} store")
  settings = store_settings(source, tokenizer)
  target = store_path(source, store_dir, tokenizer)

  def is_current(meta: dict[str, Any]) -> bool:
    return (meta.get("settings") == settings and meta.get("skip_bad_lines") == skip_bad_lines
            and array_cache.same_files(meta["source"], source.files))

  build = functools.partial(_build, source=source, tokenizer=tokenizer, settings=settings,
                            num_workers=num_workers, skip_bad_lines=skip_bad_lines, on_skip=on_skip,
                            progress=progress, chunk_size=chunk_size)
  store = load_store(target, array_cache.ensure_built(target, is_current, build))  # the meta ensure_built checked
  _log.info("Token store %s: %d %s rows of %d tokens (%s)", target, len(store), _UNITS[field],
            store.ids.shape[1], store.ids.dtype)
  return store
