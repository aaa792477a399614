"""Killed and preempted runs resume to exactly the parameters of an uninterrupted run (real processes)."""

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

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
ARGS = ["--config=configs/colbert.py:demo", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4",
        "--config.train.log_every=1"]


def start(workdir):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}", *ARGS],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output[-3000:]
  return output


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
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  finish(start(workdir))
  return params(workdir)


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, uninterrupted):
  process = start(tmp_path)
  wait_for_checkpoint(tmp_path, 9)
  process.kill()
  process.wait()
  output = finish(start(tmp_path))
  assert "Resuming from" in output
  assert checkpoint.load_trained(tmp_path).step == STEPS
  for got, want in zip(params(tmp_path), uninterrupted):
    np.testing.assert_array_equal(got, want)


def test_sigterm_saves_within_one_step_exits_zero_and_resumes(tmp_path, uninterrupted):
  process = start(tmp_path)
  wait_for_checkpoint(tmp_path, 6)
  process.send_signal(signal.SIGTERM)
  output = finish(process)
  assert "Preempted: saved the checkpoint of step" in output
  preempted_at = int(output.split("Preempted: saved the checkpoint of step ")[1].split(";")[0])
  logged = [int(line.split('"step": ')[1].split("}")[0].split(",")[0])
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # The checkpoint is the state after the last step that ran: nothing trained was lost.
  assert preempted_at == max(logged) and preempted_at < STEPS
  assert checkpoint.Checkpointer(tmp_path, every=1, keep=100).latest_step() == preempted_at
  output = finish(start(tmp_path))
  assert f"Resuming from {tmp_path}/checkpoints/{preempted_at}" in output
  for got, want in zip(params(tmp_path), uninterrupted):
    np.testing.assert_array_equal(got, want)
