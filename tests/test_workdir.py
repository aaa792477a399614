"""The workdir lock (stale locks taken over, live ones refused) and read-only workdirs through the CLI."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pairdistill_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOBODY = 65534


def write_lock(workdir, age_s=0.0, **record):
  lock = workdir / workdir_lib.LOCK_FILE
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "mode": "train",
                              "since": "then", **record}))
  os.utime(lock, (time.time() - age_s, time.time() - age_s))
  return lock


def dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_lock_is_held_for_the_run_and_released(tmp_path):
  with workdir_lib.locked(tmp_path / "new", "train"):
    record = json.loads((tmp_path / "new" / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["mode"] == "train"
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by --mode=train \\(pid {os.getpid()} on "):
      with workdir_lib.locked(tmp_path / "new", "export"):
        pass
  assert not (tmp_path / "new" / ".lock").exists()


@pytest.mark.parametrize("record, age_s, taken_over", [
    ({"pid": "dead"}, 0, True),  # this host, its process gone
    ({}, 0, False),  # this host, this (live) process
    ({"host": "elsewhere", "pid": 1}, 10, False),  # another host, refreshed recently
    ({"host": "elsewhere", "pid": 1}, workdir_lib.STALE_AFTER_S + 60, True),  # another host, silent for long
])
def test_stale_locks_are_taken_over_live_ones_refused(tmp_path, caplog, record, age_s, taken_over):
  if record.get("pid") == "dead":
    record["pid"] = dead_pid()
  write_lock(tmp_path, age_s, **record)
  if not taken_over:
    with pytest.raises(workdir_lib.WorkdirError, match="in use by"):
      with workdir_lib.locked(tmp_path, "train"):
        pass
    return
  with workdir_lib.locked(tmp_path, "train"):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert "Taking over the lock" in caplog.text


def test_a_lock_taken_over_by_another_run_is_not_removed_on_exit(tmp_path):
  with workdir_lib.locked(tmp_path, "train"):
    lock = write_lock(tmp_path, pid=1, host="elsewhere")
  assert lock.exists()


def run_unprivileged(*args, workdir):
  """The CLI as a user who cannot write to `workdir` (root ignores permissions, so it runs as nobody)."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="", HOME=str(workdir))
  as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []
  return subprocess.run([*as_nobody, sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}",
                         "--config=configs/colbert.py:demo", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture
def read_only_workdir():
  """A trained demo workdir that everyone can read and nobody but root can write."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="pairdistill-ro-"))
  workdir = root / "workdir"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}",
                  "--config=configs/colbert.py:demo", "--config.train.steps=2", "--config.optim.warmup_steps=0"],
                 cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  for path in [workdir, *workdir.rglob("*")]:
    path.chmod(0o555 if path.is_dir() else 0o444)
  root.chmod(0o777)
  yield workdir
  for path in [workdir, *workdir.rglob("*")]:
    path.chmod(0o755)
  shutil.rmtree(root)


def test_read_only_workdir_gives_one_line_errors_and_export_elsewhere_works(read_only_workdir):
  before = sorted(str(p) for p in read_only_workdir.rglob("*"))
  for args in ([], ["--mode=export"], ["--mode=evaluate"]):
    result = run_unprivileged(*args, workdir=read_only_workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"the workdir {read_only_workdir} is not writable (Permission denied)" in result.stderr
    assert "Traceback" not in result.stderr
  assert sorted(str(p) for p in read_only_workdir.rglob("*")) == before
  elsewhere = read_only_workdir.parent / "export"
  result = run_unprivileged("--mode=export", f"--export_dir={elsewhere}", workdir=read_only_workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (elsewhere / "colbert" / "model.safetensors").exists() or any(elsewhere.rglob("*.safetensors"))
  result = run_unprivileged("--mode=export", "--export_dir=/proc/export", workdir=read_only_workdir)
  assert result.returncode == 2 and "--export_dir's parent /proc is not writable" in result.stderr, result.stderr


def test_a_stale_lock_replaced_meanwhile_by_a_live_run_is_put_back(tmp_path):
  """Two runs judged the same lock stale; the first took it over. The second must not remove the new lock."""
  stale = {"host": socket.gethostname(), "pid": dead_pid(), "mode": "train", "since": "then"}
  fresh = write_lock(tmp_path, pid=os.getpid(), host="elsewhere")
  workdir_lib._move_stale_aside(fresh, stale)
  assert json.loads(fresh.read_text())["host"] == "elsewhere" and sorted(p.name for p in tmp_path.iterdir()) == [
      ".lock"]
  lock = write_lock(tmp_path, **stale)
  workdir_lib._move_stale_aside(lock, stale)
  assert list(tmp_path.iterdir()) == []
