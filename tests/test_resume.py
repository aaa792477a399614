"""A workdir through the CLI (real processes): killed and preempted runs resume to exactly the parameters of an
uninterrupted run, with every step in metrics.jsonl once; one run at a time; checkpoints of another model are
refused."""

import json
import shutil

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pairdistill_jax import checkpoint
from pairdistill_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
LOG_EVERY = 3  # windows are also cut at the checkpoints (every 4 steps): some are partial
ARGS = ["--config=configs/colbert.py:demo", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4",
        f"--config.train.log_every={LOG_EVERY}"]


def start(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}", *ARGS, *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, returncode=0):
  output, _ = process.communicate(timeout=600)
  assert process.returncode == returncode, output[-3000:]
  return output


def assert_each_step_logged_once(workdir, steps=STEPS):
  """The train records' windows tile steps 1..steps: none twice, none missing, short ones marked partial."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  covered = []
  for r in records:
    covered += range(r["step"] - r["window_steps"] + 1, r["step"] + 1)
    assert r.get("partial", False) == (r["window_steps"] < LOG_EVERY), r
  assert covered == list(range(1, steps + 1))


def wait_for_checkpoint(workdir, at_least):
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    if steps and max(steps) >= at_least:
      return
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint >= {at_least} in {workdir}")


def params(workdir):
  return jax.tree.leaves(checkpoint.load_trained(workdir).params)


@pytest.fixture(scope="module")
def uninterrupted_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  finish(start(workdir))
  assert_each_step_logged_once(workdir)
  return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
  return params(uninterrupted_workdir)


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, uninterrupted):
  process = start(tmp_path)
  wait_for_checkpoint(tmp_path, 9)
  process.kill()
  process.wait()
  output = finish(start(tmp_path))
  assert "Resuming from" in output and "Taking over the lock" in output  # the killed run's lock
  assert checkpoint.load_trained(tmp_path).step == STEPS
  for got, want in zip(params(tmp_path), uninterrupted):
    np.testing.assert_array_equal(got, want)
  assert_each_step_logged_once(tmp_path)


@pytest.mark.parametrize("signum, said, summary", [
    (signal.SIGTERM, "Preempted: saved the checkpoint of step ", "preempted"),
    (signal.SIGINT, "Stopped by Ctrl-C: saved the checkpoint of step ", "stopped by Ctrl-C")])
def test_sigterm_or_ctrl_c_saves_within_one_step_exits_zero_and_resumes(tmp_path, uninterrupted, signum, said,
                                                                        summary):
  process = start(tmp_path)
  wait_for_checkpoint(tmp_path, 6)
  process.send_signal(signum)
  output = finish(process)
  assert said in output and "Traceback" not in output
  preempted_at = int(output.split(said)[1].split(";")[0])
  assert f"trained up to step {preempted_at}\n  {summary}: checkpoint saved at step {preempted_at}; rerun" in output
  # The checkpoint is the state after the last step that ran: nothing trained was lost, and logged.
  assert preempted_at < STEPS
  assert_each_step_logged_once(tmp_path, steps=preempted_at)
  assert checkpoint.Checkpointer(tmp_path, every=1, keep=100).latest_step() == preempted_at
  output = finish(start(tmp_path))
  assert f"Resuming from {tmp_path}/checkpoints/{preempted_at}" in output
  assert f"trained up to step {STEPS} (resumed at step {preempted_at})" in output
  for got, want in zip(params(tmp_path), uninterrupted):
    np.testing.assert_array_equal(got, want)
  assert_each_step_logged_once(tmp_path)
  assert f"trained up to step {STEPS} (finished earlier" in finish(start(tmp_path))


def test_steps_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, uninterrupted_workdir, uninterrupted):
  """A run killed after writing the step-24 record but before checkpoint 24 was committed."""
  shutil.copytree(uninterrupted_workdir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))
  output = finish(start(tmp_path))
  assert f"trained up to step {STEPS} (resumed at step {STEPS - 4})" in output
  assert_each_step_logged_once(tmp_path)
  for got, want in zip(params(tmp_path), uninterrupted):
    np.testing.assert_array_equal(got, want)


def test_a_second_run_in_a_locked_workdir_is_refused(tmp_path):
  first = start(tmp_path, "--config.train.steps=100000")
  wait_for_checkpoint(tmp_path, 4)
  second = start(tmp_path, "--mode=export")
  output = finish(second, returncode=2)
  assert f"error: --mode=export: the workdir {tmp_path} is in use by --mode=train (pid {first.pid} on" in output
  assert not (tmp_path / "export").exists()
  first.kill()
  first.wait()


def test_checkpoints_of_another_model_are_refused_unless_overwrite(tmp_path, uninterrupted_workdir):
  shutil.copytree(uninterrupted_workdir, tmp_path, dirs_exist_ok=True)
  model_info = (tmp_path / "model" / "config.json").read_text()
  output = finish(start(tmp_path, "--config.model.dim=48"), returncode=2)
  assert ("error: invalid config: the checkpoints in" in output and "(model.dim: 32 there, 48 here)" in output
          and "params.linear.kernel: (64, 32) there, (64, 48) here" in output
          and "--config.train.overwrite=True" in output), output[-2000:]
  assert (tmp_path / "model" / "config.json").read_text() == model_info
  assert checkpoint.Checkpointer(tmp_path, every=1, keep=100).all_steps() == [16, 20, 24]
  output = finish(start(tmp_path, "--config.model.dim=48", "--config.train.overwrite=True",
                        "--config.train.steps=4", "--config.optim.warmup_steps=0"))
  assert "deleting the checkpoints of another model" in output
  assert checkpoint.load_trained(tmp_path).params["linear"]["kernel"].shape == (64, 48)
  assert_each_step_logged_once(tmp_path, steps=4)


def test_evaluating_a_trained_workdir_on_qrels_of_another_collection_is_one_line(tmp_path, uninterrupted_workdir):
  shutil.copytree(uninterrupted_workdir, tmp_path / "workdir")
  (tmp_path / "collection.tsv").write_text("0\tfirst\n1\tsecond\n")
  (tmp_path / "queries.tsv").write_text("q1\tfirst query\n")
  (tmp_path / "qrels.tsv").write_text("q1 0 8 1\n")
  process = start(tmp_path / "workdir", "--mode=evaluate", *(f"--config.eval.{f}={tmp_path / f}.tsv"
                                                             for f in ("collection", "queries", "qrels")))
  output = finish(process, returncode=2)
  assert "error: --mode=evaluate: none of the 1 relevant documents of" in output and "Traceback" not in output


def test_ctrl_c_before_training_stops_at_once_without_a_traceback(tmp_path):
  """Ctrl-C outside the training loop (here while the demo data and the model are prepared, after the mesh is
  logged): one line, status 130, no traceback or crash of XLA's threads at exit, the lock released."""
  process = start(tmp_path)
  for line in process.stdout:
    if "Mesh: " in line:
      break
  process.send_signal(signal.SIGINT)
  output = finish(process, returncode=130)
  assert "interrupted (Ctrl-C): stopped without saving the work in progress" in output
  assert "Traceback" not in output and "Fatal Python error" not in output
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists() and not (tmp_path / "checkpoints").exists()
