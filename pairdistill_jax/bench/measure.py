"""Timing statistics, chip peaks and MFU, device memory, and the benchmark's JSON record."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind` (first match wins: 'TPU v5
# lite' is v5e, plain 'TPU v5' is v5p).
PEAK_FLOPS = (
    ("H100", 989e12), ("H200", 989e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)
RECORD_PREFIX = "BENCHMARK "
RECORD_FILE = "benchmark.jsonl"


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
  """One device's peak FLOP/s: `override` when positive, else the known chip's, else None."""
  if override > 0:
    return float(override)
  return next((peak for name, peak in PEAK_FLOPS if name in device.device_kind), None)


def timed_calls(call: Callable[[], Any], warmup: int, steps: int) -> np.ndarray:
  """Seconds of each of `steps` calls after `warmup` untimed ones, each waited for to completion."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return np.asarray(times)


def time_stats(seconds: np.ndarray) -> dict[str, float]:
  return {"step_s_median": float(np.median(seconds)), "step_s_p90": float(np.percentile(seconds, 90)),
          "step_s_min": float(seconds.min())}


def throughput(model_flops: float, seconds: float, devices: Sequence[jax.Device], override: float) -> dict:
  """Achieved FLOP/s and MFU (against the summed peak of `devices`; None where the peak is unknown)."""
  achieved = model_flops / seconds
  peak = peak_flops(devices[0], override)
  return {"achieved_flops_per_s": achieved, "peak_flops_per_device": peak,
          "mfu": achieved / (peak * len(devices)) if peak else None}


def runtime_peak_memory(devices: Sequence[jax.Device]) -> int | None:
  """The largest `peak_bytes_in_use` of `devices` (a high-water mark since the process started), or None
  where the backend keeps no statistics (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return max(peaks) if all(p is not None for p in peaks) else None


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device buffer sizes XLA planned for the program (any backend): temporaries, arguments, outputs."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {"compiled_temp_bytes": int(analysis.temp_size_in_bytes),
          "compiled_argument_bytes": int(analysis.argument_size_in_bytes),
          "compiled_output_bytes": int(analysis.output_size_in_bytes),
          "compiled_alias_bytes": int(analysis.alias_size_in_bytes)}


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
  """XLA's FLOP count of the program for one device (cost_analysis), or None where it gives none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def aligned(rows: Sequence[Sequence[str]]) -> str:
  """Text rows as a table: the first column left-aligned, the others right-aligned."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                   for row in rows)


def emit(record: dict, workdir: str | pathlib.Path | None) -> None:
  """Prints the record as one `BENCHMARK {json}` line and appends it to WORKDIR/benchmark.jsonl."""
  line = json.dumps(record)
  print(RECORD_PREFIX + line, flush=True)
  if workdir is not None:
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / RECORD_FILE, "a", encoding="utf-8") as f:
      f.write(line + "\n")
