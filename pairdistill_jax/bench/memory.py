"""`benchmark.what=memory`: XLA's planned memory of the train step per batch size, and the batch that fits a chip.

The train step of the config is compiled on one device for each per-device batch of benchmark.memory_batches
and each way of fitting a batch (MEMORY_VARIANTS: the plain step, gradient accumulation, cached gradients with
two chunk sizes, full rematerialisation). Its planned peak (arguments + outputs + temporaries - donated, from
the compiled memory analysis, which every backend gives) is fitted as fixed + batch x per-query bytes; the
largest batch per device that fits each budget of benchmark.memory_budget_gb follows. XLA plans memory per
backend (fusions and layouts differ), so figures compiled on a CPU estimate an accelerator's; compile on the
chip for its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pairdistill_jax.bench.measure import aligned
from pairdistill_jax.errors import ConfigError

_GiB = 2**30


def variants(chunks: Sequence[int]) -> list[tuple[str, dict[str, str]]]:
  """(name, config overrides) of each way of fitting a batch; grad cache with each of `chunks` queries a chunk."""
  return [("plain", {}), ("grad_accum=2", {"train.grad_accum": "2"}),
          *((f"grad_cache chunk={c}", {"train.grad_cache": "true", "train.grad_cache_chunk": str(c)}) for c in chunks),
          ("remat=full", {"model.remat": "full"})]


def parse_ints(field: str, text: str) -> list[int]:
  """'2,4,8' -> [2, 4, 8] (positive, ascending)."""
  try:
    values = sorted({int(item) for item in str(text).split(",") if item.strip()})
  except ValueError:
    raise ConfigError(f"{field}={text!r}: expected comma-separated positive integers such as '2,4,8'") from None
  if not values or values[0] < 1:
    raise ConfigError(f"{field}={text!r}: expected comma-separated positive integers such as '2,4,8'")
  return values


def parse_budgets(text: str) -> dict[str, float]:
  """'H100=80,TPU v4=32' -> {'H100': 80.0, 'TPU v4': 32.0} (GiB per device); a bare number is named 'budget'."""
  budgets = {}
  for item in filter(None, (part.strip() for part in str(text).split(","))):
    name, sep, size = item.rpartition("=") if "=" in item else ("budget", "=", item)
    try:
      budgets[name.strip() or "budget"] = float(size)
    except ValueError:
      raise ConfigError(f"benchmark.memory_budget_gb={text!r}: expected 'NAME=GiB,...' such as 'H100=80,TPU "
                        f"v4=32' or one number") from None
  if not budgets or min(budgets.values()) <= 0:
    raise ConfigError(f"benchmark.memory_budget_gb={text!r}: expected positive sizes in GiB")
  return budgets


def planned_peak_bytes(record: dict) -> int:
  """What one device holds at the program's peak: arguments + outputs + temporaries - donated (aliased) bytes."""
  return (record["compiled_argument_bytes"] + record["compiled_output_bytes"] + record["compiled_temp_bytes"]
          - record.get("compiled_alias_bytes", 0))


def fit(batches: Sequence[int], peaks: Sequence[int]) -> tuple[float, float]:
  """Least-squares (fixed bytes, bytes per query) of peak = fixed + batch x per_query."""
  if len(batches) < 2:
    return float(peaks[0]), float("nan")
  per_query, fixed = np.polyfit(np.asarray(batches, float), np.asarray(peaks, float), 1)
  return float(fixed), float(max(0, round(per_query)))  # whole bytes: a flat peak fits any batch


def fits(fixed: float, per_query: float, budget_bytes: float, multiple: int = 1) -> int:
  """The largest batch (a multiple of `multiple`) whose fitted peak stays within `budget_bytes` (0: none)."""
  if not per_query > 0:
    return 0 if fixed > budget_bytes else -1  # -1: no growth measured, any batch fits
  batch = math.floor((budget_bytes - fixed) / per_query)
  return max(0, batch - batch % multiple)


def summary(records: Sequence[dict], budgets: dict[str, float]) -> list[dict]:
  """One row per variant: its fit and the largest batch per device for each budget (records: `memory` ones)."""
  rows = []
  for name in dict.fromkeys(r["memory_variant"] for r in records):
    mine = sorted((r for r in records if r["memory_variant"] == name), key=lambda r: r["batch_size"])
    batches = [r["batch_size"] for r in mine]
    fixed, per_query = fit(batches, [planned_peak_bytes(r) for r in mine])
    multiple = mine[0]["grad_cache_chunk"] or mine[0]["grad_accum"]
    rows.append({"variant": name, "batches": batches, "fixed_bytes": fixed, "per_query_bytes": per_query,
                 "step_s": {b: r.get("step_s_median") for b, r in zip(batches, mine)},
                 "fits": {chip: fits(fixed, per_query, gib * _GiB, multiple) for chip, gib in budgets.items()}})
  return rows


def table(rows: Sequence[dict], records: Sequence[dict]) -> str:
  """The planned peak per batch and variant, the per-query fit, and the batch per device that fits each budget."""
  batches = sorted({b for row in rows for b in row["batches"]})
  chips = list(rows[0]["fits"]) if rows else []
  header = ["variant", *(f"peak MiB B={b}" for b in batches), *(f"s/step B={b}" for b in batches),
            "fixed MiB", "MiB/query", *(f"fits {chip}" for chip in chips)]
  peaks = {(r["memory_variant"], r["batch_size"]): planned_peak_bytes(r) for r in records}
  lines = [header]
  for row in rows:
    name = row["variant"]
    lines.append([name, *(f"{peaks[(name, b)] / 2**20:.0f}" if (name, b) in peaks else "-" for b in batches),
                  *(f"{row['step_s'][b]:.3f}" if row["step_s"].get(b) else "-" for b in batches),
                  f"{row['fixed_bytes'] / 2**20:.0f}", f"{row['per_query_bytes'] / 2**20:.1f}",
                  *("any" if row["fits"][c] < 0 else str(row["fits"][c]) for c in chips)])
  return aligned(lines)
