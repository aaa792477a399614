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
progress bar into a temporary directory that replaces the old store only once complete. The directory
helpers (`ensure_built`, `ArrayWriter`, `open_arrays`, `file_identity`) serve other cached arrays too.

A damaged cache is rebuilt, not used: `ArrayWriter` records each array file's `fingerprint` and
`read_meta` checks it (and the exact size) whenever a cached directory is opened, logging a warning naming
the file that differs. The fingerprint is sampled, so that opening stays cheap for a multi-GB store: a
BLAKE2b hash of the file's size, its first, middle and last MiB and 64 evenly spaced 4 KiB blocks (about
3.3 MB read per file; files up to 3 MiB are hashed whole). Damage outside the sampled bytes goes unnoticed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
import transformers

from pairdistill_jax import remote
from pairdistill_jax.data import formats
from pairdistill_jax.data.tokenization import ColBERTTokenizer, DPRTokenizer

PathLike = str | os.PathLike[str]
Tokenizer = ColBERTTokenizer | DPRTokenizer

FORMAT_VERSION = 2
META = "meta.json"
FIELDS = formats.FIELDS
# The tokenizer attributes a field's encoding depends on (besides the vocabulary).
_FIELD_SETTINGS = {"docs": ("doc_maxlen", "doc_token"),
                   "queries": ("query_maxlen", "query_token", "attend_to_mask_tokens")}
_ID_NAMES = {"docs": "pid", "queries": "qid"}
_UNITS = {"docs": "passage", "queries": "query"}
_MAX_INT_DIGITS = 18  # canonical integer ids up to this many digits fit int64
_HASH_BLOCK = 1 << 20
_SAMPLED_SPAN = 1 << 20  # the first, middle and last MiB of a file are fingerprinted
_SAMPLED_BLOCK, _SAMPLED_BLOCKS = 4096, 64  # and as many blocks of this size, evenly spaced

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- cached directories


def file_identity(path: PathLike) -> dict[str, Any]:
  """{'path', 'size', 'mtime_ns', 'sha256'} of a file (the SHA-256 of its bytes as stored)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_HASH_BLOCK):
      digest.update(block)
  stat = os.stat(path)
  return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
          "sha256": digest.hexdigest()}


def same_file(recorded: dict[str, Any], path: PathLike) -> bool:
  """Whether `path` still has the content `recorded` by `file_identity` (hashing only when the size
  matches and the modification time does not)."""
  stat = os.stat(path)
  if stat.st_size != recorded["size"]:
    return False
  if stat.st_mtime_ns == recorded["mtime_ns"]:
    return True
  return file_identity(path)["sha256"] == recorded["sha256"]


def same_files(recorded: Any, paths: Sequence[PathLike]) -> bool:
  """Whether `paths` still have the contents of the identities `recorded` (a list, one per path)."""
  return (isinstance(recorded, list) and len(recorded) == len(paths)
          and all(same_file(identity, path) for identity, path in zip(recorded, paths)))


def digest_of(value: Any) -> str:
  """SHA-256 hex digest of a JSON-serialisable value (key order ignored)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _sampled_spans(size: int) -> list[tuple[int, int]]:
  """(offset, length) of the bytes a fingerprint hashes: the whole file, or for one above 3 MiB its first,
  middle and last MiB and evenly spaced blocks."""
  if size <= 3 * _SAMPLED_SPAN:
    return [(0, size)]
  spans = [(0, _SAMPLED_SPAN), ((size - _SAMPLED_SPAN) // 2, _SAMPLED_SPAN), (size - _SAMPLED_SPAN, _SAMPLED_SPAN)]
  step = (size - _SAMPLED_BLOCK) // (_SAMPLED_BLOCKS - 1)
  return spans + [(k * step, _SAMPLED_BLOCK) for k in range(_SAMPLED_BLOCKS)]


def fingerprint(path: PathLike) -> str:
  """BLAKE2b hex digest of a file's size and sampled bytes (see the module docstring)."""
  size = os.path.getsize(path)
  digest = hashlib.blake2b(str(size).encode(), digest_size=16)
  with open(path, "rb") as f:
    for offset, length in _sampled_spans(size):
      f.seek(offset)
      digest.update(f.read(length))
  return digest.hexdigest()


class ArrayWriter:
  """Appends row chunks of named arrays to `NAME.bin` files of a directory.

  `finish` flushes and fsyncs the files and returns their specs ({name: {'dtype', 'shape', 'fingerprint'}})
  for `open_arrays`.
  """

  def __init__(self, directory: PathLike):
    self._directory = pathlib.Path(directory)
    self._files: dict[str, Any] = {}
    self._specs: dict[str, dict[str, Any]] = {}

  def append(self, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
      spec = self._specs.get(name)
      if spec is None:
        spec = self._specs[name] = {"dtype": array.dtype.str, "shape": [0, *array.shape[1:]]}
        self._files[name] = open(self._directory / f"{name}.bin", "wb")
      if array.dtype.str != spec["dtype"] or list(array.shape[1:]) != spec["shape"][1:]:
        raise ValueError(f"array {name!r}: got {array.dtype.str} rows of shape {array.shape[1:]}, but earlier "
                         f"chunks were {spec['dtype']} of shape {tuple(spec['shape'][1:])}")
      self._files[name].write(np.ascontiguousarray(array).tobytes())
      spec["shape"][0] += len(array)

  def finish(self) -> dict[str, dict[str, Any]]:
    for f in self._files.values():
      f.flush()
      os.fsync(f.fileno())
    self.close()
    for name, spec in self._specs.items():
      spec["fingerprint"] = fingerprint(self._directory / f"{name}.bin")
    return self._specs

  def close(self) -> None:
    for f in self._files.values():
      f.close()


def _expected_bytes(spec: dict[str, Any]) -> int:
  return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


def open_arrays(directory: PathLike, specs: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
  """Read-only memory maps of the arrays an `ArrayWriter` wrote."""
  arrays = {}
  for name, spec in specs.items():
    shape = tuple(spec["shape"])
    if not shape[0]:
      arrays[name] = np.zeros(shape, spec["dtype"])
      continue
    arrays[name] = np.memmap(pathlib.Path(directory) / f"{name}.bin", dtype=spec["dtype"], mode="r",
                             shape=shape)
  return arrays


def read_meta(directory: PathLike, *, warn: bool = True) -> dict[str, Any] | None:
  """The meta.json of a complete cached directory (its arrays all present, whole and matching their
  fingerprints), else None; a fingerprint that differs is logged (when `warn`). Arrays written without a
  fingerprint (by an older version) count as missing."""
  directory = pathlib.Path(directory)
  try:
    meta = json.loads((directory / META).read_text())
  except (OSError, ValueError):
    return None
  for name, spec in meta.get("arrays", {}).items():
    path = directory / f"{name}.bin"
    if not path.is_file() or path.stat().st_size != _expected_bytes(spec) or "fingerprint" not in spec:
      return None
    if fingerprint(path) != spec["fingerprint"]:
      if warn:
        _log.warning("%s does not match the checksum recorded when it was built (a damaged file); treating %s "
                     "as stale, to be rebuilt", path, directory)
      return None
  return meta


def _current_meta(target: pathlib.Path, is_current: Callable[[dict], bool], *,
                  warn: bool = True) -> dict[str, Any] | None:
  meta = read_meta(target, warn=warn)
  return meta if meta is not None and is_current(meta) else None


def _install(tmp: pathlib.Path, target: pathlib.Path, is_current: Callable[[dict], bool]) -> None:
  """Moves the finished directory `tmp` to `target`, replacing a stale one; keeps (and discards `tmp`)
  a current one that another process installed meanwhile (not warning again of damage `ensure_built` saw)."""
  if _current_meta(target, is_current, warn=False) is not None:
    shutil.rmtree(tmp, ignore_errors=True)
    return
  old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
  try:
    os.rename(target, old)
  except FileNotFoundError:
    old = None
  try:
    os.rename(tmp, target)
  except OSError:
    if _current_meta(target, is_current, warn=False) is None:
      raise
    shutil.rmtree(tmp, ignore_errors=True)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def ensure_built(target: PathLike, is_current: Callable[[dict], bool],
                 build: Callable[[pathlib.Path], dict]) -> dict[str, Any]:
  """The meta of directory `target`, (re)built first when missing, incomplete or not `is_current`.

  `build(tmp)` writes the arrays into a fresh temporary directory beside `target` and returns the meta
  (with the `arrays` specs); meta.json is written last and the directory then renamed into place, so
  `target` is never seen half-written. On failure the temporary directory is removed and an existing
  `target` is left as it was.
  """
  target = pathlib.Path(target)
  meta = _current_meta(target, is_current)
  if meta is not None:
    return meta
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
  try:
    remote.mark_not_mirrored(tmp)  # a cache: never pushed to a bucket workdir
    meta = build(tmp)
    with formats.atomic_write(tmp / META) as f:
      json.dump(meta, f, indent=1)
    _install(tmp, target, is_current)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return read_meta(target)


# ------------------------------------------------------------------------------------- id -> row


def _canonical_ints(keys_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(is a canonical non-negative integer, its value or 0) for UTF-8 byte-string ids."""
  lengths_K = np.char.str_len(keys_K)
  ok_K = (np.char.isdigit(keys_K) & (lengths_K <= _MAX_INT_DIGITS)
          & ((lengths_K == 1) | ~np.char.startswith(keys_K, b"0")))
  values_K = np.where(ok_K, keys_K, b"0").astype(np.int64)
  return ok_K, values_K


def _encode_keys(keys: Sequence[str]) -> np.ndarray:
  """The UTF-8 bytes of each id, as an 'S' array as wide as the longest (ids encoded one at a time: a
  unicode array would take 4 bytes per character of the longest id, for every id)."""
  if isinstance(keys, str):
    raise TypeError("expected a sequence of ids, got a single string; wrap it in a list")
  encoded = [key.encode("utf-8") for key in keys]
  return np.array(encoded, dtype="S") if encoded else np.zeros(0, "S1")


class RowIndex:
  """Maps ids to store rows: 'dense' (ids 0..size-1 in row order), or sorted 'int' / 'str' ids with rows."""

  def __init__(self, kind: str, size: int, keys: np.ndarray | None = None, rows: np.ndarray | None = None):
    if kind not in ("dense", "int", "str"):
      raise ValueError(f"unknown index kind {kind!r}")
    self.kind, self.size, self._keys, self._rows = kind, size, keys, rows

  def __len__(self) -> int:
    return self.size

  def __contains__(self, key: object) -> bool:
    return isinstance(key, str) and self.find([key])[0] >= 0

  def find(self, keys: Sequence[str]) -> np.ndarray:
    """The row of each id, or -1 where an id is not in the store."""
    keys_K = _encode_keys(keys)
    if self.kind == "str":
      pos_K = np.minimum(np.searchsorted(self._keys, keys_K), self.size - 1)
      return np.where(self._keys[pos_K] == keys_K, self._rows[pos_K], -1)
    ok_K, values_K = _canonical_ints(keys_K)
    if self.kind == "dense":
      return np.where(ok_K & (values_K < self.size), values_K, -1)
    pos_K = np.minimum(np.searchsorted(self._keys, values_K), self.size - 1)
    return np.where(ok_K & (self._keys[pos_K] == values_K), self._rows[pos_K], -1)


def _duplicates(keys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(positions i of a sorted array with keys[i] == keys[i - 1], the first position of each one's key)."""
  repeated = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1]) + 1
  starts = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
  return repeated, starts[np.searchsorted(starts, repeated, side="right") - 1]


def _index(keys_N: np.ndarray, lines_N: np.ndarray, source: PathLike, what: str, skip_bad_lines: bool,
           on_skip: formats.SkipCallback | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(meta, arrays) of the id -> row index of records with ids `keys_N` read from lines `lines_N`.

  A repeated id is a FormatError naming its line (or, with `skip_bad_lines`, skipped: the first wins).
  """
  order_N = np.argsort(keys_N, kind="stable")
  keys_sorted_N = keys_N[order_N]
  repeated, firsts = _duplicates(keys_sorted_N)
  for i, first in sorted(zip(repeated, firsts), key=lambda pair: order_N[pair[0]]):
    error = formats.FormatError(source, int(lines_N[order_N[i]]), f"duplicate {what} "
                                f"{keys_sorted_N[i].decode()!r} (first on line {lines_N[order_N[first]]})")
    if not skip_bad_lines:
      raise error
    _log.warning("skipping bad line: %s", error)
    if on_skip is not None:
      on_skip(error)
  keep = np.ones(len(keys_N), bool)
  keep[repeated] = False
  keys_sorted_N, order_N = keys_sorted_N[keep], order_N[keep]
  ok_N, values_N = _canonical_ints(keys_sorted_N)
  if ok_N.all():
    if not len(repeated) and np.array_equal(values_N, order_N):  # the id of row r is r
      return {"kind": "dense", "size": len(keys_N)}, {}
    by_value = np.argsort(values_N)
    keys_sorted_N, order_N = values_N[by_value], order_N[by_value]
    kind = "int"
  else:
    kind = "str"
  return {"kind": kind, "size": len(keys_sorted_N)}, {"keys": keys_sorted_N, "key_rows": order_N}


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
  meta = meta or read_meta(directory)
  if meta is None:
    raise FileNotFoundError(f"{directory} is not a complete token store (no valid {META}); build it with "
                            f"open_store")
  arrays = open_arrays(directory, meta["arrays"])
  index = RowIndex(meta["index"]["kind"], meta["index"]["size"], arrays.get("keys"), arrays.get("key_rows"))
  return TokenStore(directory, arrays["ids"], arrays["lengths"], index, meta["digest"],
                    _ID_NAMES[meta["settings"]["field"]])


def _vocab_digest(hf_tokenizer: transformers.PreTrainedTokenizerFast) -> str:
  """Digest of the fast tokenizer's definition (vocabulary, normaliser, …) without its call state."""
  spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
  spec.pop("truncation", None)
  spec.pop("padding", None)
  return digest_of(spec)


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
    while block := f.read(_HASH_BLOCK):
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
  identities = [file_identity(path) for path in source.files]
  lines = _count_lines(source.records)
  workers = _resolve_workers(num_workers, lines, chunk_size)
  encode = getattr(tokenizer, f"encode_{field}")
  dtype = _ids_dtype(tokenizer)
  records = source.iter(skip_bad_lines=skip_bad_lines, on_skip=on_skip)
  chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (UTF-8 ids, line numbers) per chunk

  def texts_of_chunks() -> Iterator[list[str]]:
    while chunk := list(itertools.islice(records, chunk_size)):
      lines_C, keys, texts = zip(*chunk)
      chunks.append((_encode_keys(keys), np.array(lines_C, np.int64)))
      yield list(texts)

  writer = ArrayWriter(tmp)
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
    index, index_arrays = _index(keys_N, lines_N, source.records, _ID_NAMES[field], skip_bad_lines, on_skip)
    writer.append(**index_arrays)
    arrays = writer.finish()
  finally:
    writer.close()
  sha256s = [identity["sha256"] for identity in identities]
  return {"settings": settings, "skip_bad_lines": skip_bad_lines, "source": identities, "arrays": arrays,
          "index": index, "digest": digest_of([settings, sha256s, skip_bad_lines])}


def store_settings(source: formats.TextSource, tokenizer: Tokenizer) -> dict[str, Any]:
  """What a store of `source` depends on besides its files' bytes: the encoder and reader settings."""
  return {**encoder_settings(tokenizer, source.field), "reader": source.settings()}


def store_path(source: formats.TextSource, store_dir: PathLike, tokenizer: Tokenizer) -> pathlib.Path:
  """Where `open_store` keeps the store of `source`: one directory per source name and settings."""
  settings = store_settings(source, tokenizer)
  return pathlib.Path(store_dir) / f"{source.path.name}.{source.field}.{digest_of(settings)[:12]}"


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
            and same_files(meta["source"], source.files))

  build = functools.partial(_build, source=source, tokenizer=tokenizer, settings=settings,
                            num_workers=num_workers, skip_bad_lines=skip_bad_lines, on_skip=on_skip,
                            progress=progress, chunk_size=chunk_size)
  store = load_store(target, ensure_built(target, is_current, build))  # the meta ensure_built checked
  _log.info("Token store %s: %d %s rows of %d tokens (%s)", target, len(store), _UNITS[field],
            store.ids.shape[1], store.ids.dtype)
  return store
