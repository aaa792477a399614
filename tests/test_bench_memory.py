"""benchmark.what=memory (bench/memory.py) and the machine line (bench/machine.py): hand-computed fits, config
errors, and the CLI on the demo."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pairdistill_jax import malloc
from pairdistill_jax.bench import machine, memory
from pairdistill_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def record(variant, batch, temp_mib, *, argument_mib=10, output_mib=10, alias_mib=9, chunk=0, accum=1):
  return {"memory_variant": variant, "batch_size": batch, "grad_cache_chunk": chunk, "grad_accum": accum,
          "compiled_argument_bytes": argument_mib * MiB, "compiled_output_bytes": output_mib * MiB,
          "compiled_temp_bytes": temp_mib * MiB, "compiled_alias_bytes": alias_mib * MiB, "step_s_median": 0.5}


def test_fit_and_fits_by_hand():
  # peak = 11 + temp: temps 100 + 30 b  ->  fixed 111 MiB, 30 MiB a query.
  rows = memory.summary([record("plain", b, 100 + 30 * b) for b in (2, 4, 8)], {"chip": 1.0, "small": 0.1})
  (row,) = rows
  assert row["fixed_bytes"] == pytest.approx(111 * MiB) and row["per_query_bytes"] == pytest.approx(30 * MiB)
  assert row["fits"] == {"chip": (1024 - 111) // 30, "small": 0}  # 30 (913 / 30 = 30.4); 102.4 MiB < 111 fixed
  accum = memory.summary([record("accum", b, 100 + 30 * b, accum=4) for b in (4, 8)], {"chip": 1.0})[0]
  assert accum["fits"]["chip"] == 28  # 30 rounded down to a multiple of grad_accum
  flat = memory.summary([record("cache", b, 500, chunk=2) for b in (2, 4)], {"chip": 1.0})[0]
  assert flat["per_query_bytes"] == 0 and flat["fits"]["chip"] == -1  # no growth measured: any batch fits
  assert memory.summary([record("cache", b, 2000, chunk=2) for b in (2, 4)], {"chip": 1.0})[0]["fits"] == {"chip": 0}


def test_parse_errors():
  assert memory.parse_budgets("H100=80,TPU v4=32") == {"H100": 80.0, "TPU v4": 32.0}
  assert memory.parse_budgets("24") == {"budget": 24.0}
  for bad in ("H100=lots", "", "x=0"):
    with pytest.raises(ConfigError, match="memory_budget_gb"):
      memory.parse_budgets(bad)
  assert memory.parse_ints("benchmark.memory_batches", "8, 2,4") == [2, 4, 8]
  with pytest.raises(ConfigError, match="memory_batches"):
    memory.parse_ints("benchmark.memory_batches", "8,0")


def test_machine_info_reads_the_cpu_flags():
  info = machine.machine_info()
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
  assert ("AVX2" in info["isa"]) == ("avx2" in flags)
  assert ("AVX-512F" in info["isa"]) == ("avx512f" in flags)
  assert ("AMX" in info["isa"]) == ("amx_tile" in flags)
  assert info["cores"] == os.cpu_count()
  assert info["virtual_machine"] == ("hypervisor" in flags)
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      thp = f.read().split("[")[1].split("]")[0]  # e.g. "always [madvise] never"
  except OSError:
    thp = "unknown"
  assert info["transparent_huge_pages"] == thp
  line = machine.machine_line(info)
  assert line.startswith("machine: ") and f"{info['usable_cores']}/{info['cores']} cores" in line
  assert f"transparent huge pages {thp}" in line


def test_machine_info_records_the_allocator_and_isa_variables(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
  monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
  monkeypatch.setenv("HOME_OF_NOTHING", "x")
  env = machine.machine_info()["env"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.mmap_max=0" and env["ATEN_CPU_CAPABILITY"] == "avx2"
  assert "HOME_OF_NOTHING" not in env


def test_memory_benchmark_through_the_cli(tmp_path):
  """--mode=benchmark --config.benchmark.what=memory on the demo: a record per variant and batch, the machine in
  each, a fit whose planned peaks grow with the batch for the plain step and barely with grad cache."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "-m", "pairdistill_jax.main", "--config=configs/colbert.py:demo", f"--workdir={tmp_path}",
       "--mode=benchmark", "--config.benchmark.what=memory", "--config.benchmark.memory_batches=8,16",
       "--config.benchmark.memory_steps=0", "--config.benchmark.memory_budget_gb=small=0.05"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "machine: " in result.stdout and "fits small" in result.stdout
  records = [json.loads(line) for line in (tmp_path / "benchmark.jsonl").read_text().splitlines()]
  (fit,) = [r for r in records if r["benchmark"] == "memory_fit"]
  steps = [r for r in records if r["benchmark"] == "train_step"]
  assert len(steps) == 2 * len(memory.variants([1, 2])) and all("machine" in r for r in steps)
  # The CLI re-executed itself with malloc on transparent huge pages where that changes something (malloc.py).
  tunables = malloc.tunables_with_huge_pages(env, malloc.thp_mode(), platform.libc_ver()[0])
  assert steps[0]["machine"]["env"].get("GLIBC_TUNABLES") == (tunables or env.get("GLIBC_TUNABLES"))
  rows = {row["variant"]: row for row in fit["rows"]}
  plain, cache = rows["plain"], rows["grad_cache chunk=1"]
  assert plain["per_query_bytes"] > 20 * cache["per_query_bytes"] > 0
  peaks = {(r["memory_variant"], r["batch_size"]): memory.planned_peak_bytes(r) for r in steps}
  assert peaks[("plain", 16)] > peaks[("grad_cache chunk=1", 16)]
