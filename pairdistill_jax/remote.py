"""Workdirs and inputs in buckets (`gs://…`, or any URL etils.epath opens).

A bucket workdir's checkpoints are written straight to the bucket by Orbax. Every other file of it is written
to a local mirror (the libraries writing them — tokenizers, TensorBoard, torch, numpy memory maps — need local
files) and pushed to the bucket after each checkpoint save, every `PUSH_EVERY_S` seconds and when the command
ends; a command starts by pulling the bucket's files into its mirror, so a run resumes anywhere from the bucket
alone. Only process 0 pushes. Never pushed: directories holding a `NOT_MIRRORED` file (the corpus embeddings
and token stores: large caches, rebuilt from the data), the directories the bucket holds alone (checkpoints/)
and the lock (written to the bucket directly, workdir.py).

MIRROR/ (default ~/.cache/pairdistill_jax/mirrors/<bucket>/<path>; --mirror_dir)
  .mirror.json   the bucket URL, the directories the bucket holds alone, each file's versions when last in sync

Input files given as URLs (training data, evaluation collections, model directories) are staged: copied once to
~/.cache/pairdistill_jax/staged/ with a progress bar, since they are memory-mapped or read by libraries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
from collections.abc import Iterator
from typing import IO

import tqdm
from etils import epath

from pairdistill_jax import io

MANIFEST = ".mirror.json"
LOCK_FILE = ".lock"  # workdir.py's lock, kept in the bucket
NOT_MIRRORED = ".not_mirrored"  # marks a cache directory: kept local
PUSH_EVERY_S = 60.0
_OPEN: dict[pathlib.Path, "Mirror"] = {}  # this process's mirrors by local directory: one state each
CACHE = pathlib.Path(os.environ.get("PAIRDISTILL_CACHE", "~/.cache/pairdistill_jax")).expanduser()


def is_url(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def _bucket_path(url: str) -> epath.Path:
  try:
    return epath.Path(url)
  except NotImplementedError as e:  # an unknown scheme
    raise ValueError(f"{url}: {e}") from None


def check_client(url: str) -> None:
  """Raises ValueError naming the packages to install when `url`'s filesystem client is missing."""
  try:
    _bucket_path(url).exists()
  except ImportError as e:
    raise ValueError(f"{url}: the bucket client is not installed ({e}); for gs:// buckets: "
                     f"pip install -r requirements-gcs.txt (gcsfs, google-cloud-storage)") from None


def mark_not_mirrored(directory: str | os.PathLike) -> None:
  """Keeps `directory` (a cache) out of the bucket when it lies in a mirror."""
  (pathlib.Path(directory) / NOT_MIRRORED).touch()


def _synced(relative: pathlib.PurePosixPath, bucket_only: tuple[str, ...] = ()) -> bool:
  """Whether the workdir file at `relative` is mirrored (not in a directory the bucket holds alone, not the
  lock, a mirror manifest or a temporary file)."""
  parts = relative.parts
  return not (set(parts[:-1]) & set(bucket_only) or parts[-1] in (MANIFEST, LOCK_FILE, NOT_MIRRORED)
              or any(part.endswith(".tmp") for part in parts))


def _copy_into(source, g: IO[bytes], bar: tqdm.tqdm | None = None) -> None:
  """Streams the file `source` (a local or bucket path) into the binary stream `g`."""
  with source.open("rb") as f:
    while chunk := f.read(8 << 20):
      g.write(chunk)
      if bar is not None:
        bar.update(len(chunk))


def _copy(source, target, bar: tqdm.tqdm | None = None) -> None:
  """Copies one file between any two paths (local or bucket), streaming."""
  with target.open("wb") as g:
    _copy_into(source, g, bar)


def _version(path: epath.Path) -> list:
  """[size, modification time] of a bucket file."""
  stat = path.stat()
  return [stat.length, stat.mtime]


def _remote_files(root: epath.Path, bucket_only: tuple[str, ...] = ()) -> dict[str, list]:
  """{relative path: version} of the mirrored files under `root`."""
  files = {}
  if not root.exists():
    return files
  unschemed = os.fspath(root).split("://")[-1]
  for directory, _, names in root.walk():  # fsspec names directories without the scheme
    subdir = os.path.relpath(os.fspath(directory).split("://")[-1], unschemed)
    for name in names:
      relative = pathlib.PurePosixPath(subdir, name)
      if _synced(relative, bucket_only):
        files[str(relative)] = _version(root / relative)
  return files


def _local_files(root: pathlib.Path) -> dict[str, list[int]]:
  """{relative path: [size, mtime_ns]} of the mirrored files under `root`."""
  files = {}
  for directory, dirs, names in os.walk(root):
    if NOT_MIRRORED in names:
      dirs.clear()
      continue
    for name in names:
      path = pathlib.Path(directory, name)
      relative = pathlib.PurePosixPath(path.relative_to(root).as_posix())
      if _synced(relative):
        with contextlib.suppress(FileNotFoundError):  # removed while listing
          stat = path.stat()
          files[str(relative)] = [stat.st_size, stat.st_mtime_ns]
  return files


class Mirror:
  """The local mirror `local` of the bucket workdir `url`; directories named in `bucket_only` stay in the
  bucket (checkpoints: Orbax writes them there)."""

  def __init__(self, url: str, local: pathlib.Path, bucket_only: tuple[str, ...] = ()):
    self.url, self.local, self.bucket_only = url.rstrip("/"), pathlib.Path(local).absolute(), tuple(bucket_only)
    self.remote = _bucket_path(self.url)
    self._lock = threading.Lock()
    manifest = self.local / MANIFEST
    saved = json.loads(manifest.read_text()) if manifest.exists() else {}
    if saved.get("url", self.url) != self.url:
      raise ValueError(f"the mirror directory {self.local} mirrors {saved['url']}, not {self.url}: give "
                       f"another --mirror_dir")
    self._state: dict[str, dict] = saved.get("files", {})  # path -> {"local": version, "bucket": version}
    _OPEN[self.local] = self

  def _save_state(self) -> None:
    io.write_json(self.local / MANIFEST, {"url": self.url, "bucket_only": self.bucket_only, "files": self._state},
                  indent=None)

  def pull(self, under: str = "") -> None:
    """Makes the mirror hold the bucket's files (those in its subdirectory `under`, if given): downloads those
    that differ, deletes local ones the bucket lacks (e.g. written by a run that died before pushing them)."""
    with self._lock:
      self.local.mkdir(parents=True, exist_ok=True)
      remote = {str(pathlib.PurePosixPath(under, name)): version
                for name, version in _remote_files(self.remote / under, self.bucket_only).items()}
      local = {name: version for name, version in _local_files(self.local).items()
               if not under or name.startswith(f"{under}/")}
      for name in local.keys() - remote.keys():
        with contextlib.suppress(FileNotFoundError):  # the processes of one host may share a mirror
          (self.local / name).unlink()
        self._state.pop(name, None)
      stale = [name for name, version in remote.items()
               if self._state.get(name) != {"local": local.get(name), "bucket": version}]
      with tqdm.tqdm(total=sum(remote[name][0] for name in stale), desc=f"pull {self.url}", unit="B",
                     unit_scale=True, disable=not stale) as bar:
        for name in sorted(stale):
          target = self.local / name
          target.parent.mkdir(parents=True, exist_ok=True)
          with io.atomic_write(target, "wb") as f:
            _copy_into(self.remote / name, f, bar)
          stat = target.stat()
          self._state[name] = {"local": [stat.st_size, stat.st_mtime_ns], "bucket": remote[name]}
      self._save_state()

  def push(self) -> None:
    """Uploads the files changed since the last pull or push (oldest first) and deletes, in the bucket, the
    files removed locally since then."""
    with self._lock:
      local = _local_files(self.local)
      for name in self._state.keys() - local.keys():
        with contextlib.suppress(FileNotFoundError):
          (self.remote / name).unlink()
        del self._state[name]
      changed = [n for n in local if self._state.get(n, {}).get("local") != local[n]]
      for name in sorted(changed, key=lambda n: local[n][1]):
        target = self.remote / name
        try:
          target.parent.mkdir(parents=True, exist_ok=True)
          _copy(self.local / name, target)
        except FileNotFoundError:  # removed (or renamed) while pushing: the next push sees it
          continue
        self._state[name] = {"local": local[name], "bucket": _version(target)}
      self._save_state()

  @contextlib.contextmanager
  def pushing(self, enabled: bool) -> Iterator[None]:
    """Pushes every PUSH_EVERY_S seconds in the background and once at the end (when `enabled`)."""
    if not enabled:
      yield
      return
    stop = threading.Event()

    def loop():
      while not stop.wait(PUSH_EVERY_S):
        try:
          self.push()
        except Exception as e:  # noqa: BLE001 (bucket clients raise their own errors); retried next time
          logging.warning("Pushing %s to %s failed (%s: %s); retrying later", self.local, self.url,
                          type(e).__name__, e)

    thread = threading.Thread(target=loop, name="mirror-push", daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      try:
        self.push()
      except Exception as e:  # noqa: BLE001
        raise OSError(f"could not push {self.local} to {self.url} ({type(e).__name__}: {e}); the files are in "
                      f"the mirror until the next command pulls: copy them to the bucket first") from None


def default_mirror_dir(url: str) -> pathlib.Path:
  """~/.cache/pairdistill_jax/mirrors/<bucket>/<path> for gs://bucket/path."""
  scheme, rest = url.rstrip("/").split("://", 1)
  return CACHE / "mirrors" / scheme / rest


def find(path: str | os.PathLike) -> Mirror | None:
  """The mirror that `path` (a local path) lies in, if any (this process's instance of it)."""
  path = pathlib.Path(path).absolute()
  for directory in (path, *path.parents):
    if directory in _OPEN:
      return _OPEN[directory]
    manifest = directory / MANIFEST
    if manifest.is_file():
      saved = json.loads(manifest.read_text())
      return Mirror(saved["url"], directory, tuple(saved.get("bucket_only", ())))
  return None


def in_bucket(path: str | os.PathLike) -> epath.Path:
  """Where `path` lives: in the bucket when it is a URL or lies in a mirror, else itself."""
  if is_url(path):
    return _bucket_path(str(path))
  mirror = find(path)
  if mirror is None:
    return epath.Path(path).absolute()
  relative = pathlib.Path(path).absolute().relative_to(mirror.local).as_posix()
  return mirror.remote / relative if relative != "." else mirror.remote


def pulled(url: str, bucket_only: tuple[str, ...]) -> str:
  """A read-only mirror of the bucket workdir `url`, pulled now (apart from the mirrors runs write to): a run
  that starts from it reads its checkpoints from the bucket."""
  local = default_mirror_dir(url).with_name(f"{default_mirror_dir(url).name}.read")
  mirror = _OPEN.get(local) or Mirror(url, local, bucket_only)
  mirror.pull()
  return str(mirror.local)


def push(workdir: str | os.PathLike) -> None:
  """Pushes the mirror `workdir` lies in (no-op for a local workdir)."""
  mirror = find(workdir)
  if mirror is not None:
    mirror.push()


def staged(path: str) -> str:
  """A local path holding the file or directory `path`: itself when local, else a copy (made once, atomically,
  so that processes of one host may stage together; a file changed in the bucket makes a new copy)."""
  if not is_url(path):
    return path
  source = _bucket_path(path)
  if not source.exists():
    raise FileNotFoundError(f"{path} does not exist")
  files = {"": _version(source)} if not source.is_dir() else _remote_files(source)
  key = hashlib.blake2b(json.dumps([path, sorted(files.items())]).encode(), digest_size=8).hexdigest()
  done = CACHE / "staged" / key
  relative = pathlib.Path(source.parent.name or "_", source.name)  # keeps the name and its parent's
  if not done.exists():
    building = done.with_name(f"{key}.{os.getpid()}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    with tqdm.tqdm(total=sum(size for size, _ in files.values()), desc=f"stage {path}", unit="B",
                   unit_scale=True) as bar:
      for name in sorted(files):
        local = building / relative / name if name else building / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        _copy(source / name if name else source, local, bar)
    try:
      os.rename(building, done)
    except OSError:  # another process staged it meanwhile
      shutil.rmtree(building, ignore_errors=True)
  return str(done / relative)
