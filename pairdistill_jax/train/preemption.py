"""Preemption and Ctrl-C: stop at a step boundary, save, exit cleanly.

One process: SIGTERM, or a first Ctrl-C (SIGINT), sets a flag that the loop reads after each step; a second
Ctrl-C raises KeyboardInterrupt (stop at once, without saving). Several processes: JAX's preemption service
(which owns SIGTERM there) tells every host the same step to stop at.
"""

from __future__ import annotations

import signal
import sys
import types

import jax
from jax.experimental import multihost_utils


def stop_reason(signal_name: str | None) -> str:
  """How the log and the run summary name a stop at a step boundary: by Ctrl-C (SIGINT) or a preemption."""
  return "stopped by Ctrl-C" if signal_name == "SIGINT" else "preempted"


class PreemptionWatcher:
  """`should_stop(step)` is True once a preemption notice arrived (the same step on every host); `signal_name`
  names the signal that sent it (one process)."""

  def __init__(self):
    self._notice = False
    self.signal_name = "SIGTERM"
    self._previous = {}
    if jax.process_count() == 1:
      self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal)}
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (cmd &)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

  def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    self._notice = True
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:  # the next Ctrl-C stops at once
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
      print("\nCtrl-C: finishing the current step, saving a checkpoint and exiting; Ctrl-C again to stop at once "
            "without saving", file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._notice
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
