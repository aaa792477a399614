"""The one I/O layer: atomic writes, JSON records, resumable chunk directories, bad-line accounting.

* `atomic_write(path, mode)` writes a temporary file beside `path`, flushes and fsyncs it, then `os.replace`s it
  over `path`: on any error nothing is left behind and an existing file is untouched. `write_json` / `read_json`
  are the small JSON records (manifests, sidecars) written that way; `atomic_directory` does the same for a
  directory (exports, WORKDIR/model).
* `ChunkDir`: a directory of numbered chunk files computed from one manifest. A rerun with the same manifest
  resumes at the missing chunks; chunks of another manifest are refused with a one-line error naming the
  fields that differ, unless the caller passes `rebuild=True` (the chunks are then deleted, and that logged).
* `BadLines`: a reader's bad lines raised as `FormatError`s, or (skip_bad_lines) counted, the first
  `MAX_WARNINGS` logged, each reported to `on_skip`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import jax
import numpy as np

from pairdistill_jax import distributed

PathLike = str | os.PathLike[str]
SkipCallback = Callable[["FormatError"], None]

MAX_WARNINGS = 5  # bad lines logged one by one; the rest only counted
MANIFEST = "manifest.json"

_log = logging.getLogger(__name__)


class FormatError(ValueError):
  """A data file that does not follow its format; the message is `file:line: reason`."""

  def __init__(self, path: PathLike, line: int, reason: str):
    super().__init__(f"{os.fspath(path)}:{line}: {reason}")
    self.path = os.fspath(path)
    self.line = line
    self.reason = reason


# ------------------------------------------------------------------------------------- atomic writes


def _current_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w") -> Iterator[IO]:
  """Opens a stream that replaces `path` only when the block finishes without error.

  `mode` 'w': UTF-8 text with '\\n' line endings, gzip-compressed (zero timestamp, so output is reproducible)
  when `path` ends in `.gz`; 'wb': raw bytes. The data goes to a temporary file `.NAME.*.tmp` in the same
  directory, which is flushed, fsynced, given the umask's permissions and `os.replace`d over `path`. On any
  error the temporary file is removed and `path` is left as it was.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
  target = pathlib.Path(path)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  raw = os.fdopen(fd, "wb")
  try:
    if mode == "wb":
      yield raw
    else:
      with _text_stream(raw, target.name) as text:
        yield text
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()
    os.chmod(tmp_name, 0o666 & ~_current_umask())
    os.replace(tmp_name, target)
  except BaseException:
    raw.close()
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
    raise


@contextlib.contextmanager
def _text_stream(raw: IO[bytes], name: str) -> Iterator[IO[str]]:
  """A UTF-8 text stream over `raw` (through gzip for a `.gz` name), detached from `raw` when done."""
  compressed = gzip.GzipFile(filename=name, mode="wb", fileobj=raw, mtime=0) if name.endswith(".gz") else None
  text = io.TextIOWrapper(raw if compressed is None else compressed, encoding="utf-8", newline="\n")
  try:
    yield text
  finally:
    text.detach()
    if compressed is not None:
      compressed.close()


def write_json(path: PathLike, value: Any, *, indent: int | None = 2) -> None:
  """Writes a JSON record (a manifest, a sidecar) atomically; `indent` None: on one line."""
  with atomic_write(path) as f:
    json.dump(value, f, indent=indent)


def read_json(path: PathLike) -> Any:
  """A small JSON record, or None when it is missing or unreadable."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):  # (a JSONDecodeError or UnicodeDecodeError is a ValueError)
    return None


def save_npy(path: PathLike, array: np.ndarray) -> None:
  """Writes a .npy file atomically."""
  with atomic_write(path, "wb") as f:
    np.save(f, array)


def sidecar(path: PathLike) -> pathlib.Path:
  """The JSON record written beside an output file (`run.trec` -> `run.trec.json`)."""
  path = pathlib.Path(path)
  return path.with_name(path.name + ".json")


@contextlib.contextmanager
def atomic_directory(target: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling `.NAME.*.tmp` of `target` that replaces `target` only if the body succeeds (an
  existing `target` is restored if the swap fails)."""
  if target.exists() and not target.is_dir():
    raise FileExistsError(f"{target} exists and is not a directory; choose another path.")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
  try:
    os.chmod(tmp, 0o755)
    yield tmp
    _swap_in(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _swap_in(new: pathlib.Path, target: pathlib.Path) -> None:
  """Renames `new` onto `target`; an existing `target` is restored if that fails."""
  if not target.exists():
    os.replace(new, target)
    return
  old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
  os.replace(target, old)
  try:
    os.replace(new, target)
  except BaseException:
    os.replace(old, target)
    raise
  shutil.rmtree(old)



# ---------------------------------------------------------------------------------- chunk directories


def differing_fields(old: dict, new: dict) -> list[str]:
  """The keys whose values differ between two records (a key missing from one counts), sorted."""
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class ChunkDir:
  """A directory of chunk files computed from one manifest (see the module docstring).

  `chunk_glob` matches every chunk file (what a rebuild deletes); `done_name` (formatted with the chunk index)
  is the file written last for a chunk, whose presence means the chunk is done; `remedy` completes the
  mismatch error ("delete DIR to start over, or REMEDY"). Every process calls `open` and `done` together.
  """

  def __init__(self, directory: PathLike, manifest: dict, *, chunk_glob: str, done_name: str, remedy: str):
    self.directory = pathlib.Path(directory)
    self.manifest, self.chunk_glob, self.done_name, self.remedy = manifest, chunk_glob, done_name, remedy

  def path(self, name: str, index: int) -> pathlib.Path:
    """The file `name` (a pattern formatted with the chunk index) of chunk `index`."""
    return self.directory / name.format(index)

  def open(self, *, rebuild: bool = False) -> None:
    """Makes the directory hold chunks of this manifest only, as process 0 finds it (the same on every process).

    Chunks without a manifest (a clean-up cut short) are stale and deleted. Chunks of another manifest raise
    a ValueError naming the differing fields, or with `rebuild` are deleted (logged, with the reason).
    """
    process_0 = jax.process_index() == 0
    old = read_json(self.directory / MANIFEST) if process_0 else None
    differing = differing_fields(old, self.manifest) if isinstance(old, dict) else []
    if distributed.process_0_decides(bool(differing) and not rebuild):
      raise ValueError(f"{self.directory} holds chunks computed with other settings (differing: "
                       f"{', '.join(differing) or 'see its ' + MANIFEST}); delete it to start over, or "
                       f"{self.remedy}")
    if process_0 and old != self.manifest:
      if differing:
        _log.info("Rebuilding %s because its chunks were computed with other settings (differing: %s)",
                  self.directory, ", ".join(differing))
      self._clear()
      write_json(self.directory / MANIFEST, self.manifest)
    distributed.barrier(f"chunk directory {self.directory.name} opened")

  def _clear(self) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    for path in (*self.directory.glob(self.chunk_glob), *self.directory.glob(".*.tmp")):
      path.unlink(missing_ok=True)

  def done(self, count: int) -> np.ndarray:
    """[count] bool: which chunks are on disk, as process 0 sees them (the same answer on every process)."""
    found = np.array([self.path(self.done_name, i).exists() for i in range(count)], dtype=np.int32)
    return distributed.from_process_0(found).astype(bool)

  def remove(self) -> None:
    """Deletes the directory (process 0), renaming it first so that no half-deleted one is ever seen again."""
    trash = self.directory.with_name(f".{self.directory.name}.{uuid.uuid4().hex}.deleted")
    self.directory.rename(trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------- bad lines


class BadLines:
  """Raises a reader's errors, or (skip) counts them, logs the first MAX_WARNINGS and reports each to `on_skip`."""

  def __init__(self, path: PathLike, skip: bool, on_skip: SkipCallback | None = None):
    self.path, self.skip, self.on_skip = path, skip, on_skip
    self.count = 0
    self.last_line = 1

  def handle(self, error: FormatError) -> None:
    if not self.skip:
      raise error
    self.count += 1
    self.last_line = error.line
    if self.count <= MAX_WARNINGS:
      _log.warning("skipping bad line: %s", error)
    if self.on_skip is not None:
      self.on_skip(error)

  def finish(self, n_good: int, what: str = "bad lines") -> None:
    """Logs the count of skipped `what`; raises when there were some and every line was bad (`n_good` 0)."""
    if not self.count:
      return
    _log.warning("skipped %d %s of %s", self.count, what, os.fspath(self.path))
    if n_good == 0:
      raise FormatError(self.path, self.last_line, f"no valid lines (all {self.count} lines were bad)")
