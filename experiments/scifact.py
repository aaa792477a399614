"""PairDistill on real text: BEIR SciFact, all-MiniLM-L6-v2 as teacher, students cut from it (`make scifact`).

Every stage is the CLI a user runs (`python -m pairdistill_jax.main ...`), in this order:

  teacher   evaluate all-MiniLM-L6-v2 on the 300 test queries (5,183 abstracts); mine the top 32 of the 809
            train queries with it; score them with it as the pointwise teacher (cosine x 20) and its margins as
            the pairwise preferences (configs/*.py:scifact, configs/scifact.py)
  students  for DPR and ColBERT cut to `--layers` of MiniLM: evaluate the cut before training (--init), then
            train, export to PyTorch and evaluate the export, three ways: PairDistill (KD + pairs, + in-batch
            for ColBERT), the control pair_alpha=0, and the control with the in-batch (contrastive) loss only

SciFact is read from SCIFACT_DATA, by default ../shared/data/scifact beside the checkout. Results go to
WORKDIR/results.json (a rerun skips the stages it holds) and one table is printed; each
stage's output is in WORKDIR/logs/.

  .venv/bin/python experiments/scifact.py --workdir=workdir/scifact [--layers=2] [--steps=120]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import scifact as scifact_config  # noqa: E402
from pairdistill_jax.errors import ConfigError  # noqa: E402

RUNS = {  # name: overrides of the students' training
    "pairdistill": [],
    "no_pairs": ["--config.loss.pair_alpha=0"],
    "in_batch_only": ["--config.loss.kd_weight=0", "--config.loss.pair_alpha=0", "--config.loss.in_batch=True"],
}
EXPORTS = {"dpr": "query_encoder", "colbert": "colbert"}  # the exported directory evaluated (shared DPR tower)


def run(stage: str, args: list[str], workdir: pathlib.Path) -> str:
  """Runs the CLI; its output goes to WORKDIR/logs/STAGE.log; returns the output, exits on failure."""
  command = [sys.executable, "-m", "pairdistill_jax.main", *args]
  print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(command[1:])}", flush=True)
  log = workdir / "logs" / f"{stage}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  output = log.read_text()
  if code:
    sys.exit(f"{stage} failed (exit {code}); its output is in {log}:\n{output[-3000:]}")
  return output


def metrics_of(output: str) -> dict[str, float]:
  return json.loads(re.findall(r"^METRICS (.*)$", output, re.M)[-1])


def summary_of(output: str) -> dict:
  return json.loads(re.findall(r"^SUMMARY (.*)$", output, re.M)[-1])


class Results:
  """results.json: one record per finished stage, with its seconds; a rerun skips them."""

  def __init__(self, path: pathlib.Path, settings: dict):
    self.path = path
    self.data = json.loads(path.read_text()) if path.exists() else {}
    if self.data.get("settings", settings) != settings:
      sys.exit(f"{path} holds results of other settings ({self.data['settings']}); use another --workdir")
    self.data["settings"] = settings
    self.data.setdefault("stages", {})

  def stage(self, name: str, fn) -> dict:
    if name not in self.data["stages"]:
      start = time.perf_counter()
      record = fn()
      record["seconds"] = round(time.perf_counter() - start, 1)
      self.data["stages"][name] = record
      self.path.write_text(json.dumps(self.data, indent=2))
    return self.data["stages"][name]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdir/scifact")
  parser.add_argument("--layers", default="2", help="layers of MiniLM the students keep (a count)")
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--kinds", default="dpr,colbert")
  a = parser.parse_args()
  workdir = pathlib.Path(a.workdir).resolve()
  data = scifact_config.data_dir()
  try:
    scifact_config.check_data(data)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  os.environ["SCIFACT_DATA"] = data  # every stage's :scifact config reads this folder
  start = time.perf_counter()
  results = Results(workdir / "results.json", {"layers": a.layers, "steps": a.steps})
  teacher_dir = workdir / "teacher"
  common = [f"--config.data.store_dir={workdir / 'store'}"]
  shared_corpus = teacher_dir / "corpus"  # evaluation, mining and scoring encode the collection once
  teacher = ["--config=configs/dpr.py:scifact", f"--workdir={teacher_dir}", *common,
             f"--config.eval.corpus_dir={shared_corpus}", f"--config.mine.corpus_dir={shared_corpus}"]
  results.stage("teacher", lambda: {"metrics": metrics_of(run(
      "teacher-evaluate", [*teacher, "--mode=evaluate", f"--model_dir={scifact_config.minilm_dir()}"], workdir))})
  results.stage("mine", lambda: {"output": run("mine", [*teacher, "--mode=mine"], workdir)[-300:]})
  results.stage("score", lambda: {"output": run("score", [*teacher, "--mode=score"], workdir)[-300:]})
  lines = teacher_dir / "score" / "train.jsonl"
  for kind in a.kinds.split(","):
    config = [f"--config=configs/{kind}.py:scifact,layers={a.layers},steps={a.steps}", *common]
    results.stage(f"{kind}/before", lambda: {"metrics": metrics_of(run(
        f"{kind}-before", [*config, f"--workdir={workdir / kind / 'before'}", "--mode=evaluate", "--init"],
        workdir))})
    for name, overrides in RUNS.items():
      here = workdir / kind / name
      args = [*config, f"--workdir={here}", f"--config.data.train={lines}", *overrides]

      def train_export_evaluate(args=args, here=here, name=name):
        summary = summary_of(run(f"{kind}-{name}-train", args, workdir))
        run(f"{kind}-{name}-export", [*args, "--mode=export"], workdir)
        metrics = metrics_of(run(f"{kind}-{name}-evaluate", [
            *args, "--mode=evaluate", f"--model_dir={here / 'export' / EXPORTS[kind]}"], workdir))
        return {"summary": summary, "metrics": metrics}

      results.stage(f"{kind}/{name}", train_export_evaluate)
  total = time.perf_counter() - start
  print(table(results.data["stages"]))
  print(f"total {total / 60:.1f} min this run; stage seconds in {results.path}")


def table(stages: dict) -> str:
  teacher = stages["teacher"]["metrics"]["nDCG@10"]
  rows = [("model", "nDCG@10", "x teacher", "RR@10", "R@100"),
          ("teacher all-MiniLM-L6-v2 (6 layers)", *_cells(stages["teacher"]["metrics"], teacher))]
  for name, record in stages.items():
    if "/" in name:
      rows.append((name, *_cells(record["metrics"], teacher)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)


def _cells(metrics: dict, teacher: float) -> tuple[str, ...]:
  return (f"{metrics['nDCG@10']:.4f}", f"{metrics['nDCG@10'] / teacher:.2f}", f"{metrics['RR@10']:.4f}",
          f"{metrics['R@100']:.4f}")


if __name__ == "__main__":
  main()
