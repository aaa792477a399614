"""WORKDIR/metrics.jsonl and TensorBoard: one record per logging window, exactly once per step across resumes
(`MetricsLog`), and the window in progress (`MetricWindow`).

Each train record holds the window means of the step metrics, `window_steps` (how many steps it averages) and,
when it holds fewer than `train.log_every` steps (cut by a checkpoint, a preemption or the last step),
`"partial": true`. Eval records carry "eval_"-prefixed keys. A run that resumes from step S first drops the
records of steps after S (written before the run died, and about to be recomputed) from metrics.jsonl, and
has TensorBoard purge its events after S.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import tensorboardX

from pairdistill_jax import io
from pairdistill_jax.paths import METRICS_FILE, TENSORBOARD_DIR


def _kept_records(path: pathlib.Path, up_to_step: int) -> list[dict]:
  """The records of metrics.jsonl for steps <= `up_to_step` (an unreadable, half-written line ends it)."""
  records = []
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      break
    if record.get("step", up_to_step + 1) <= up_to_step:
      records.append(record)
  return records


def _is_train(record: dict) -> bool:
  return not any(key.startswith("eval_") for key in record)


class MetricsLog:
  """Writes window records from `start_step` on when `enabled` (process 0; the others only keep this run's
  history). `history` holds the train records of the whole run, earlier runs in this workdir included."""

  def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool):
    self.enabled = enabled
    self.history: list[dict] = []
    if not enabled:
      return
    path = workdir / METRICS_FILE
    kept = _kept_records(path, start_step)
    self.history = [r for r in kept if _is_train(r)]
    with io.atomic_write(path) as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._jsonl = open(path, "a")
    self._tb = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=start_step + 1)

  def write(self, step: int, record: dict, section: str = "train", *, partial: bool = False) -> None:
    """Appends `record` (metric name -> value) for `step`; `partial` marks a window shorter than log_every."""
    if section == "train":
      self.history.append(dict(record, step=step))
    if not self.enabled:
      return
    prefix = "" if section == "train" else f"{section}_"
    line = {**{prefix + k: v for k, v in record.items()}, "step": step, **({"partial": True} if partial else {})}
    self._jsonl.write(json.dumps(line) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      self._tb.add_scalar(f"{section}/{name}", value, step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class MetricWindow:
  """The step metrics of the logging window in progress and when it began."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.steps: list[dict[str, float]] = []
    self.started = time.perf_counter()

  def add(self, metrics: dict[str, float], tokens: int) -> None:
    """One step's metrics (host floats) and the number of real tokens in its batch."""
    self.steps.append(dict(metrics, tokens=tokens))

  def __len__(self) -> int:
    return len(self.steps)

  def record(self) -> dict[str, float]:
    """The window's record: the mean of each metric, step time, queries/s, tokens/s and `window_steps`."""
    elapsed = time.perf_counter() - self.started
    record = {k: float(np.mean([s[k] for s in self.steps])) for k in self.steps[0] if k != "tokens"}
    record.update(step_time=elapsed / len(self.steps), queries_per_s=len(self.steps) * self.batch_size / elapsed,
                  tokens_per_s=sum(s["tokens"] for s in self.steps) / elapsed, window_steps=len(self.steps))
    return record

  def restart(self) -> None:
    """Starts the next window, now."""
    self.steps, self.started = [], time.perf_counter()
