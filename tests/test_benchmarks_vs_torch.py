"""benchmarks/step_vs_torch.py and encode_vs_torch.py as a user runs them, at a tiny shape: the JAX side computes
what PyTorch computes from the same weights, --isa caps both sides, and the output ends with the machine, the
RESULT record and the ratio."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers=1", "--hidden=32", "--heads=2", "--intermediate=64", "--vocab=2000", "--dim=16", "--pairs=3",
        "--warmup=1", "--ynn=off", "--isa=avx2"]


def run_benchmark(script: str, *args: str) -> tuple[str, dict]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, f"benchmarks/{script}", *TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert re.search(r"^ratio \d+\.\d{3}$", out.splitlines()[-1]), out[-500:]
  (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
  return out, json.loads(line.removeprefix("RESULT "))


def check_record(out: str, record: dict) -> None:
  machine = record["machine"]
  assert machine["env"]["XLA_FLAGS"].split() == ["--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_max_isa=AVX2"]
  assert machine["env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and machine["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
  assert machine["torch"]["cpu_capability"] == "AVX2"  # ATen read the cap before it loaded
  assert "machine: " in out and "transparent huge pages" in out
  assert record["ratio"] == pytest.approx(record["torch_s"] / record["jax_s"])
  for side in ("jax", "torch"):
    assert record[f"{side}_s"] > 0 and 0 <= record[f"{side}_sys_s"] <= record[f"{side}_cpu_s"]
    assert record[f"{side}_page_faults"] >= 0


def test_step_benchmark_matches_torch_and_records_the_caps():
  out, record = run_benchmark("step_vs_torch.py", "--doc_len=16", "--query_len=8", "--nway=4", "--dropout=0")
  (losses,) = re.findall(r"same initial weights\): jax ([\d.]+) torch ([\d.]+)", out)
  assert float(losses[0]) == pytest.approx(float(losses[1]), abs=2e-5)  # without dropout: the same loss
  check_record(out, record)
  assert record["benchmark"] == "step_vs_torch" and record["args"]["isa"] == "avx2"


def test_encode_benchmark_matches_torch_and_records_the_caps():
  out, record = run_benchmark("encode_vs_torch.py", "--length=24", "--batch_size=8", "--min_len=5")
  (diff,) = re.findall(r"max \|jax - torch\| over the passages' token vectors: (\S+)", out)
  assert float(diff) < 1e-5  # unit vectors: float32 rounding only
  check_record(out, record)
  assert record["jax_passages_s"] == pytest.approx(8 / record["jax_s"])
