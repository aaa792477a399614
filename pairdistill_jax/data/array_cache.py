"""Cached array directories: arrays built once into a directory, reused while their inputs are unchanged.

A cached directory holds NAME.bin files (raw rows, written by `ArrayWriter`) and meta.json (their shapes,
dtypes and fingerprints, and whatever the builder records about its inputs), written last. `ensure_built`
builds one into a temporary directory beside the target and renames it into place, so the target is never
seen half-written; the directory is marked not to be mirrored to a bucket workdir (a cache, rebuilt from the
data). `file_identity` / `same_file(s)` record and compare the source files a cache depends on.

A damaged cache is rebuilt, not used: `ArrayWriter` records each array file's `fingerprint` and `read_meta`
checks it (and the exact size) whenever a cached directory is opened, logging a warning naming the file that
differs. The fingerprint is sampled, so that opening stays cheap for a multi-GB store: a BLAKE2b hash of the
file's size, its first, middle and last MiB and 64 evenly spaced 4 KiB blocks (about 3.3 MB read per file;
files up to 3 MiB are hashed whole). Damage outside the sampled bytes goes unnoticed. A meta.json of another
version is not current (each builder's settings hold its format version), so it is rebuilt like a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pairdistill_jax import io, remote

PathLike = str | os.PathLike[str]

META = "meta.json"
HASH_BLOCK = 1 << 20
_SAMPLED_SPAN = 1 << 20  # the first, middle and last MiB of a file are fingerprinted
_SAMPLED_BLOCK, _SAMPLED_BLOCKS = 4096, 64  # and as many blocks of this size, evenly spaced

_log = logging.getLogger(__name__)


def file_identity(path: PathLike) -> dict[str, Any]:
  """{'path', 'size', 'mtime_ns', 'sha256'} of a file (the SHA-256 of its bytes as stored)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(HASH_BLOCK):
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


def _intact(directory: pathlib.Path, meta: dict[str, Any], warn: bool) -> bool:
  """Whether the arrays of `meta` are all present, whole and match their fingerprints; a fingerprint that
  differs is logged (when `warn`)."""
  for name, spec in meta.get("arrays", {}).items():
    path = directory / f"{name}.bin"
    if not path.is_file() or path.stat().st_size != _expected_bytes(spec):
      return False
    if fingerprint(path) != spec.get("fingerprint"):
      if warn:
        _log.warning("%s does not match the checksum recorded when it was built (a damaged file); treating %s "
                     "as stale, to be rebuilt", path, directory)
      return False
  return True


def read_meta(directory: PathLike, is_current: Callable[[dict], bool] | None = None, *,
              warn: bool = True) -> dict[str, Any] | None:
  """The meta.json of a complete cached directory (its arrays all present, whole and matching their
  fingerprints) that `is_current` (when given) accepts, else None."""
  directory = pathlib.Path(directory)
  meta = io.read_json(directory / META)
  if not isinstance(meta, dict) or (is_current is not None and not is_current(meta)):
    return None
  return meta if _intact(directory, meta, warn) else None


def _install(tmp: pathlib.Path, target: pathlib.Path, is_current: Callable[[dict], bool]) -> None:
  """Moves the finished directory `tmp` to `target`, replacing a stale one; keeps (and discards `tmp`)
  a current one that another process installed meanwhile (not warning again of damage `ensure_built` saw)."""
  if read_meta(target, is_current, warn=False) is not None:
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
    if read_meta(target, is_current, warn=False) is None:
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
  meta = read_meta(target, is_current)
  if meta is not None:
    return meta
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
  try:
    remote.mark_not_mirrored(tmp)  # a cache: never pushed to a bucket workdir
    meta = build(tmp)
    io.write_json(tmp / META, meta, indent=1)
    _install(tmp, target, is_current)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return read_meta(target)
