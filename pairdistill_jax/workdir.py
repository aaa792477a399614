"""The workdir's lock: one run at a time writes to a workdir.

`locked(workdir, mode)` creates WORKDIR/.lock exclusively (O_CREAT | O_EXCL, atomic on local disks and on
NFS) holding the owner's host, pid, mode and start time, refreshes its mtime every `HEARTBEAT_S` seconds
while it runs, and removes it on exit. A lock left by a dead process is taken over with a warning: on the same
host when its pid is gone, on another host (a multi-host run's process 0) when it has not been refreshed for
`STALE_AFTER_S` seconds (a stale lock is renamed aside before it is checked, so two runs taking it over at once
do not both win). Only process 0 of a multi-process run takes the lock; the others follow its outcome.
Creating the lock is also the check, before any work, that the workdir is writable.

A bucket workdir (gs://…) has no exclusive create: its lock is written, then read back a second later (of two
runs starting together, the later writer wins and the other stops); its record carries a heartbeat time, which
the owner rewrites every `HEARTBEAT_S` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import jax
from etils import epath

from pairdistill_jax import distributed, remote

LOCK_FILE = remote.LOCK_FILE
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirError(OSError):
  """The workdir cannot be written, or another live run holds its lock."""


def _holder(lock: pathlib.Path | epath.Path) -> dict:
  """The lock file's owner record (empty when unreadable, e.g. half-written by a killed process)."""
  try:
    return json.loads(lock.read_text())
  except (OSError, ValueError):
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _stale_reason(lock: pathlib.Path | epath.Path, holder: dict) -> str:
  """Why the lock's owner is known to be gone ('' when it may still run)."""
  try:
    age = time.time() - (holder["beat"] if "beat" in holder else lock.stat().st_mtime)
  except FileNotFoundError:
    return "released meanwhile"
  if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
    return "" if _pid_alive(holder["pid"]) else f"its process {holder['pid']} is gone"
  if age > STALE_AFTER_S:
    return f"not refreshed for {age:.0f} s"
  return ""


def _describe(holder: dict) -> str:
  if not holder:
    return "a run whose lock record is unreadable"
  return (f"--mode={holder.get('mode', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
          f"{holder.get('since', '?')})")


def _acquire(workdir: pathlib.Path, mode: str) -> dict:
  """Creates the lock file; returns the record written. Raises WorkdirError."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
  lock = workdir / LOCK_FILE
  record = {"host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  for _ in range(3):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(lock)
      reason = _stale_reason(lock, holder)
      if not reason:
        raise WorkdirError(
            f"the workdir {workdir} is in use by {_describe(holder)}: wait for it to finish, or use another "
            f"--workdir (if that run is dead, delete {lock})") from None
      logging.warning("Taking over the lock of %s from %s: %s", workdir, _describe(holder), reason)
      _move_stale_aside(lock, holder)
      continue
    except OSError as e:
      raise WorkdirError(f"the workdir {workdir} is not writable ({e.strerror or e}): give a writable "
                         f"--workdir") from None
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    except OSError as e:
      lock.unlink(missing_ok=True)
      raise WorkdirError(f"cannot write the lock {lock} ({e.strerror or e})") from None
    return record
  raise WorkdirError(f"could not take the lock {lock}: other runs keep taking it")


def _move_stale_aside(lock: pathlib.Path, stale: dict) -> None:
  """Removes the lock file holding the `stale` record. It is first renamed (atomic: of two runs taking over
  the same stale lock, one moves it), then checked: a record that is not `stale` is another run's fresh lock,
  taken between reading and renaming, and goes back."""
  aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}")
  try:
    os.rename(lock, aside)
  except FileNotFoundError:  # released or moved meanwhile
    return
  if _holder(aside) != stale:
    with contextlib.suppress(FileExistsError):
      os.link(aside, lock)
  aside.unlink(missing_ok=True)


def _release(lock: pathlib.Path | epath.Path, record: dict) -> None:
  """Removes the lock file if it is still ours."""
  if _ours(lock, record):
    with contextlib.suppress(FileNotFoundError):
      lock.unlink()


def _heartbeat(lock: pathlib.Path, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_S):
    with contextlib.suppress(OSError):
      os.utime(lock)


def _acquire_in_bucket(workdir: epath.Path, mode: str) -> dict:
  """Writes the lock of a bucket workdir and checks, a second later, that it is still ours."""
  lock = workdir / LOCK_FILE
  record = {"host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
  try:
    if lock.exists():
      holder = _holder(lock)
      reason = _stale_reason(lock, holder)
      if not reason:
        raise WorkdirError(f"the workdir {workdir} is in use by {_describe(holder)}: wait for it to finish, or "
                           f"use another --workdir (if that run is dead, delete {lock})")
      logging.warning("Taking over the lock of %s from %s: %s", workdir, _describe(holder), reason)
    lock.write_text(json.dumps({**record, "beat": time.time()}))
    time.sleep(1.0)
    holder = _holder(lock)
  except WorkdirError:
    raise
  except Exception as e:  # noqa: BLE001 (bucket clients raise their own errors: permissions, credentials)
    raise WorkdirError(f"the workdir {workdir} is not writable ({type(e).__name__}: {e})") from None
  if holder.get("token") != record["token"]:
    raise WorkdirError(f"the workdir {workdir} was locked meanwhile by {_describe(holder)}")
  return record


def _ours(lock: pathlib.Path | epath.Path, record: dict) -> bool:
  holder = _holder(lock)
  return holder.get("token", holder) == record.get("token", record)


def _beat_in_bucket(lock: epath.Path, record: dict, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_S):
    with contextlib.suppress(Exception):  # a failed beat is retried; the lock ages only after STALE_AFTER_S
      if _ours(lock, record):
        lock.write_text(json.dumps({**record, "beat": time.time()}))


@contextlib.contextmanager
def locked(workdir: str | os.PathLike, mode: str) -> Iterator[None]:
  """Holds WORKDIR/.lock (process 0) for the duration; raises WorkdirError on every process when another
  live run holds it or the workdir is not writable."""
  in_bucket = remote.is_url(workdir)
  workdir = epath.Path(workdir) if in_bucket else pathlib.Path(workdir)
  record, error = None, None
  if jax.process_index() == 0:
    try:
      record = (_acquire_in_bucket if in_bucket else _acquire)(workdir, mode)
    except OSError as e:  # WorkdirError, or a file operation on a stale lock that failed
      error = e if isinstance(e, WorkdirError) else WorkdirError(f"cannot lock the workdir {workdir}: {e}")
  if not distributed.process_0_decides(error is None):
    raise error or WorkdirError(f"process 0 could not lock the workdir {workdir}")
  if record is None:  # a process other than 0
    yield
    return
  lock, stop = workdir / LOCK_FILE, threading.Event()
  beat = threading.Thread(target=_beat_in_bucket if in_bucket else _heartbeat,
                          args=(lock, record, stop) if in_bucket else (lock, stop), name="workdir-lock", daemon=True)
  beat.start()
  try:
    yield
  finally:
    stop.set()
    beat.join()
    _release(lock, record)


def check_writable(directory: pathlib.Path, what: str) -> None:
  """Creates `directory` if needed and writes a scratch file there; raises WorkdirError if it cannot."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise WorkdirError(f"{what} {directory} is not writable ({e.strerror or e})") from None
