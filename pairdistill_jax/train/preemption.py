"""Preemption: stop at a step boundary, save, exit cleanly.

One process: SIGTERM sets a flag that the loop reads after each step. Several processes: JAX's preemption
service (which owns SIGTERM there) tells every host the same step to stop at.
"""

from __future__ import annotations

import signal
import types

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`should_stop(step)` is True once a preemption notice arrived (the same step on every host)."""

  def __init__(self):
    self._notice = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    self._notice = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._notice
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
