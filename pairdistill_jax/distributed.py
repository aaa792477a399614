"""Multi-host set-up: `jax.distributed` initialisation, process-0 logging, cross-host agreement checks,
process 0's decisions shared with every process.

On TPU pods and SLURM clusters JAX finds the coordinator itself; elsewhere pass --coordinator_address,
--num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _cluster_detected() -> bool:
  """A SLURM job with several tasks, or a multi-worker TPU slice."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Starts `jax.distributed` when this run is one of several processes; a no-op for a single process."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    index = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"a coordinator address ({address}) needs --num_processes >= 1 and --process_id in "
                       f"[0, num_processes), got {count} and {index}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    jax.distributed.initialize(address, num_processes=count, process_id=index)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def assert_same_on_all_hosts(value: str | int, what: str) -> None:
  """Fails on every host unless all hosts hold the same `value` (a config text, a step)."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(str(value).encode()).digest()[:8], np.uint32)
  multihost_utils.assert_equal(digest, f"hosts disagree on the {what}")


def barrier(name: str) -> None:
  """Waits until every process has reached this point."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def from_process_0(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` (an array of the same shape everywhere) on every process."""
  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def process_0_decides(flag: bool) -> bool:
  """Process 0's `flag` on every process: decisions that read files stay the same everywhere."""
  return bool(from_process_0(np.int32(flag)))
