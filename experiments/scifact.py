"""PairDistill on real text: a BEIR folder (SciFact by default), all-MiniLM-L6-v2 as teacher, students cut from it.

Every stage is the CLI a user runs (`python -m pairdistill_jax.main ...`). Settings (--settings, any of):

  minilm          the teacher evaluated on the test queries; it mines the top 32 of every train query and scores
                  them, as the pointwise teacher (cosine x 20) and through its margins as the pairwise one
                  (configs/scifact.py); each student kind (--kinds) is evaluated before training (--init), then
                  trained, exported to PyTorch and evaluated through the export, three ways: PairDistill (KD +
                  pairs, + in-batch for ColBERT), the control pair_alpha=0, and the in-batch (contrastive) loss
                  alone; each with --seeds seeds (train.seed: data order, random initialisation, dropout)
  weak_pointwise  the pairwise teacher knows more than the pointwise one, as in the paper: the same mined run
                  rescored with a weaker pointwise teacher, minilm's DPR PairDistill student of seed 0 (a 2-layer
                  bi-encoder), while MiniLM (6 layers) stays the pairwise teacher through its own margins
                  (teacher.pairwise.scorer=retriever); PairDistill against pair_alpha=0, each with --seeds seeds
  round2          PairDistill's second round (--mode=rounds): each kind's minilm PairDistill student of seed 0
                  (round 1) mines the train queries, MiniLM scores them, and round 2 trains from round 1
  tune            the weak_pointwise setting's pairwise knobs (--tune: one field changed at a time; teacher.*
                  fields rescore the lines) for --tune-kind, trained without and evaluated on a dev split of
                  --dev-fraction of the train queries (never the test queries); the best on dev with pairs
                  (pair_alpha > 0) is then trained on all train queries as weak_pointwise/KIND/tuned, --seeds
                  seeds, and tested

The table gives mean ± standard deviation over seeds, and PairDistill against each control by a paired
randomisation test on per-query nDCG@10, each query's value averaged over the seeds
(pairdistill_jax/retrieval/significance.py). WORKDIR/results.json holds every stage (metrics, per-query nDCG@10,
training summary, seconds); a rerun skips the stages it holds, and a stage stopped midway resumes.
Arguments after `--` are passed to every stage (e.g. `-- --config.eval.batch_size=32`).

  .venv/bin/python experiments/scifact.py [--data=BEIR_DIR] [--seeds=3] [--settings=minilm,weak_pointwise,round2]
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

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import scifact as scifact_config  # noqa: E402
from pairdistill_jax import io  # noqa: E402
from pairdistill_jax.data import formats  # noqa: E402
from pairdistill_jax.errors import ConfigError  # noqa: E402
from pairdistill_jax.retrieval import significance  # noqa: E402

SETTINGS = ("minilm", "weak_pointwise", "round2", "tune")
TUNE_GRID = "loss.pair_alpha=0,3,10;teacher.pairwise.scale=5,80"  # the weak_pointwise setting's defaults: 1 and 20
RUNS = {  # name: overrides of the students' training
    "pairdistill": [],
    "no_pairs": ["--config.loss.pair_alpha=0"],
    "in_batch_only": ["--config.loss.kd_weight=0", "--config.loss.pair_alpha=0", "--config.loss.in_batch=True"],
}
WEAK_RUNS = ("pairdistill", "no_pairs")
EXPORTS = {"dpr": "query_encoder", "colbert": "colbert"}  # the exported directory evaluated (shared DPR tower)
METRIC = "nDCG@10"  # the per-query metric kept and tested
# Seconds each kind of stage took on a quiet 2-core Xeon (layers 2, 120 steps; round2 guessed from its parts): the
# estimate before stages have run in this workdir.
PRIOR_SECONDS = {"teacher": 260, "mine": 15, "score": 15, "before/dpr": 100, "before/colbert": 120,
                 "run/dpr": 230, "run/colbert": 290, "weak_score": 40, "round2/dpr": 600, "round2/colbert": 700,
                 "split": 1}


def run(stage: str, args: list[str], workdir: pathlib.Path) -> str:
  """Runs the CLI; its output goes to WORKDIR/logs/STAGE.log; returns the output, exits on failure."""
  command = [sys.executable, "-m", "pairdistill_jax.main", *args]
  print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(command[1:])}", flush=True)
  log = workdir / "logs" / f"{stage.replace('/', '-')}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  output = log.read_text()
  if code:
    sys.exit(f"{stage} failed (exit {code}); its output is in {log}:\n{output[-3000:]}")
  return output


def metrics_of(output: str) -> dict[str, float]:
  return json.loads(re.findall(r"^METRICS (.*)$", output, re.M)[-1])


def summary_of(output: str, key: str = "SUMMARY") -> dict | list:
  return json.loads(re.findall(rf"^{key} (.*)$", output, re.M)[-1])


def evaluation(output: str, eval_dir: pathlib.Path) -> dict:
  """The means printed by --mode=evaluate and the per-query METRIC of its metrics.json."""
  per_query = json.loads((eval_dir / "metrics.json").read_text())["per_query"][METRIC]
  return {"metrics": metrics_of(output), "per_query": {METRIC: per_query}}


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
      io.write_json(self.path, self.data, indent=1)
    return self.data["stages"][name]


class Plan:
  """The stages in order, as (name, kind of stage for the estimate, function)."""

  def __init__(self):
    self.stages: list[tuple[str, str, object]] = []

  def add(self, name: str, cost: str, fn) -> None:
    self.stages.append((name, cost, fn))

  def estimate(self, done: dict) -> tuple[int, float]:
    """Stages still to run and their seconds: each kind's mean over finished stages here, else PRIOR_SECONDS."""
    measured: dict[str, list[float]] = {}
    for name, cost, _ in self.stages:
      if name in done:
        measured.setdefault(cost, []).append(done[name]["seconds"])
    todo = [cost for name, cost, _ in self.stages if name not in done]
    return len(todo), sum(float(np.mean(measured[c])) if c in measured else PRIOR_SECONDS[c] for c in todo)


class Experiment:
  """Builds the plan: each setting's stages, their CLI arguments and directories under `workdir`."""

  def __init__(self, a, workdir: pathlib.Path, extra: list[str]):
    self.a, self.workdir, self.plan = a, workdir, Plan()
    self.minilm = scifact_config.minilm_dir()
    self.common = [f"--config.data.store_dir={workdir / 'store'}", *extra]
    self.shared_corpus = workdir / "teacher" / "corpus"  # evaluation, mining and scoring encode the collection once
    self.mined = workdir / "teacher" / "mine" / "run.trec"
    self.lines = workdir / "teacher" / "score" / "train.jsonl"
    self.weak_lines = workdir / "weak_pointwise" / "score" / "train.jsonl"
    self.weak_teacher = workdir / "dpr" / "pairdistill" / "seed0"  # minilm's DPR PairDistill student of seed 0

  def config(self, kind: str) -> list[str]:
    return [f"--config=configs/{kind}.py:scifact,layers={self.a.layers},steps={self.a.steps}", *self.common]

  def student(self, kind: str, seed: int, train_lines: pathlib.Path, here: pathlib.Path, *overrides) -> list[str]:
    return [f"--workdir={here}", *self.config(kind), f"--config.data.train={train_lines}",
            f"--config.train.seed={seed}", *overrides]

  def trained(self, kind: str, here: pathlib.Path, args, mode: str = "train"):
    """A stage function: trains (or runs --mode=rounds), exports, and evaluates the export of the student in
    `here`; `args` may be a function returning them (resolved when the stage runs)."""
    stage = str(here.relative_to(self.workdir))

    def fn():
      train_args = args() if callable(args) else args
      if train_args is None:
        return {"skipped": "the same training as an earlier stage"}
      output = run(f"{stage}/train", [*train_args, f"--mode={mode}"], self.workdir)
      summary = summary_of(output, "ROUNDS" if mode == "rounds" else "SUMMARY")
      model_dir = here / "round_2" if mode == "rounds" else here
      evaluated = [f"--workdir={model_dir}", *train_args[1:]]
      run(f"{stage}/export", [*evaluated, "--mode=export"], self.workdir)
      result = evaluation(run(f"{stage}/evaluate", [
          *evaluated, "--mode=evaluate", f"--model_dir={model_dir / 'export' / EXPORTS[kind]}"], self.workdir),
          model_dir / "eval")
      return {"summary": summary, **result}
    return fn

  def build(self) -> Plan:
    a, plan, workdir = self.a, self.plan, self.workdir
    teacher = ["--config=configs/dpr.py:scifact", f"--workdir={workdir / 'teacher'}", *self.common,
               f"--config.eval.corpus_dir={self.shared_corpus}", f"--config.mine.corpus_dir={self.shared_corpus}",
               "--config.mine.keep_corpus=True"]  # kept for the weak_pointwise setting's pairwise teacher
    plan.add("teacher", "teacher", lambda: evaluation(run(
        "teacher-evaluate", [*teacher, "--mode=evaluate", f"--model_dir={self.minilm}"], workdir),
        workdir / "teacher" / "eval"))
    plan.add("mine", "mine", lambda: {"output": run("mine", [*teacher, "--mode=mine"], workdir)[-300:]})
    plan.add("score", "score", lambda: {"output": run("score", [*teacher, "--mode=score"], workdir)[-300:]})
    kinds = a.kinds.split(",")
    if "minilm" in a.settings:
      for kind in kinds:
        here = workdir / kind / "before"
        plan.add(f"{kind}/before", f"before/{kind}", lambda kind=kind, here=here: evaluation(run(
            f"{kind}-before", [*self.config(kind), f"--workdir={here}", "--mode=evaluate", "--init"], workdir),
            here / "eval"))
    for seed in range(a.seeds):
      for kind in kinds if "minilm" in a.settings else ():
        for name in a.runs:
          self.minilm_run(kind, name, seed)
      if "weak_pointwise" in a.settings:
        self.weak_pointwise(kinds, seed)
    if "tune" in a.settings:
      self.tune(a.tune_kind)
    if "round2" in a.settings:
      for kind in kinds:
        self.round2(kind)
    return plan

  def minilm_run(self, kind: str, name: str, seed: int) -> None:
    here = self.workdir / kind / name / f"seed{seed}"
    self.plan.add(f"{kind}/{name}/seed{seed}", f"run/{kind}",
                  self.trained(kind, here, self.student(kind, seed, self.lines, here, *RUNS[name])))

  def weak_score_args(self, out: pathlib.Path, *overrides) -> list[str]:
    """--mode=score of minilm's mined run: the weak pointwise teacher, MiniLM's margins as the pairwise one."""
    return [*self.config("dpr"), f"--workdir={out.parent}", f"--config.teacher.run={self.mined}",
            f"--config.teacher.output={out}", f"--config.mine.corpus_dir={self.shared_corpus}",
            f"--config.teacher.pointwise.model={self.weak_teacher}", "--config.teacher.pointwise.max_length=128",
            "--config.teacher.pairwise.scorer=retriever", f"--config.teacher.pairwise.model={self.minilm}",
            "--config.teacher.pairwise.max_length=0",  # MiniLM's own 256, as evaluated: it reuses its vectors
            "--config.mine.keep_corpus=True", *overrides, "--mode=score"]

  def weak_pointwise(self, kinds: list[str], seed: int) -> None:
    if seed == 0:
      if not any(name == "dpr/pairdistill/seed0" for name, _, _ in self.plan.stages):
        self.minilm_run("dpr", "pairdistill", 0)  # the weak pointwise teacher
      self.plan.add("weak_pointwise/score", "weak_score", lambda: {"output": run(
          "weak_pointwise/score", self.weak_score_args(self.weak_lines), self.workdir)[-300:]})
    for kind in kinds:
      for name in WEAK_RUNS:
        here = self.workdir / "weak_pointwise" / kind / name / f"seed{seed}"
        self.plan.add(f"weak_pointwise/{kind}/{name}/seed{seed}", f"run/{kind}",
                      self.trained(kind, here, self.student(kind, seed, self.weak_lines, here, *RUNS[name])))

  def tune(self, kind: str) -> None:
    """The tune setting (module docstring): dev split, one run per grid value, then the best one tested."""
    tune_dir = self.workdir / "tune"
    dev_qrels, grid = tune_dir / "dev_qrels.tsv", tune_grid(self.a.tune)
    self.plan.add("tune/split", "split", lambda: write_dev_split(
        pathlib.Path(os.environ["SCIFACT_DATA"]), self.a.dev_fraction, dev_qrels))
    for tag, override in grid.items():
      lines = self.weak_lines
      if override.startswith("--config.teacher."):  # rescored lines
        lines = tune_dir / "score" / tag / "train.jsonl"
        self.plan.add(f"tune/score/{tag}", "weak_score", lambda tag=tag, lines=lines, override=override: {
            "output": run(f"tune/score/{tag}", self.weak_score_args(lines, override), self.workdir)[-300:]})
      without_dev = lines.with_name(f"{lines.stem}.without_dev.jsonl")
      here = tune_dir / kind / tag
      loss = [override] if override.startswith("--config.loss.") else []

      def args(lines=lines, without_dev=without_dev, here=here, loss=loss):
        drop_queries(lines, formats.read_qrels(dev_qrels), without_dev)
        return self.student(kind, 0, without_dev, here, *loss, f"--config.eval.qrels={dev_qrels}")
      self.plan.add(f"tune/{kind}/{tag}", f"run/{kind}", self.trained(kind, here, args))
    for seed in range(self.a.seeds):
      here = self.workdir / "weak_pointwise" / kind / "tuned" / f"seed{seed}"

      def tuned(seed=seed, here=here):
        tag = best_tuning(self.results, kind, grid)
        override = grid[tag]
        if not override:
          return None  # the defaults won: weak_pointwise/KIND/pairdistill
        lines = self.weak_lines
        if override.startswith("--config.teacher."):
          lines = tune_dir / "score" / tag / "train.jsonl"
        return self.student(kind, seed, lines, here, *([override] if override.startswith("--config.loss.") else []))
      self.plan.add(f"weak_pointwise/{kind}/tuned/seed{seed}", f"run/{kind}", self.trained(kind, here, tuned))

  def round2(self, kind: str) -> None:
    here = self.workdir / kind / "rounds"
    args = [f"--workdir={here}", *self.config(kind), f"--config.data.train={self.lines}", "--config.rounds.count=2",
            f"--config.teacher.pointwise.model={self.minilm}"]  # round 2's teacher is MiniLM, not the student
    fn = self.trained(kind, here, args, "rounds")

    def link_round_1():
      here.mkdir(parents=True, exist_ok=True)  # round 1 is minilm's PairDistill student of seed 0
      if not (here / "round_1").exists():
        (here / "round_1").symlink_to(pathlib.Path("..") / "pairdistill" / "seed0")
      return fn()
    self.plan.add(f"{kind}/round2", f"round2/{kind}", link_round_1)


def tune_grid(spec: str) -> dict[str, str]:
  """'loss.pair_alpha=0,3;teacher.pairwise.scale=5' -> {'default': '', 'loss.pair_alpha=0': '--config...=0', ...}."""
  grid = {"default": ""}
  for part in filter(None, spec.split(";")):
    field, _, values = part.partition("=")
    if not field.startswith(("loss.", "teacher.")) or not values:
      sys.exit(f"error: --tune: {part!r} is not FIELD=V1,V2,... of a loss.* or teacher.* field")
    for value in values.split(","):
      grid[f"{field}={value}"] = f"--config.{field}={value}"
  return grid


def write_dev_split(data: pathlib.Path, fraction: float, out: pathlib.Path) -> dict:
  """A fixed `fraction` of the train queries (a seeded permutation of their sorted ids) as dev qrels."""
  train = formats.read_qrels(data / "qrels" / "train.tsv")
  qids = sorted(train)
  dev = sorted(np.random.default_rng(0).permutation(qids)[:max(1, round(fraction * len(qids)))].tolist())
  out.parent.mkdir(parents=True, exist_ok=True)
  formats.write_qrels(out, {q: train[q] for q in dev}, beir=True)
  return {"dev_queries": len(dev), "train_queries": len(qids) - len(dev)}


def drop_queries(lines: pathlib.Path, qrels: dict, out: pathlib.Path) -> None:
  """Writes the training lines of `lines` whose query is not judged in `qrels` (the dev split) to `out`."""
  formats.write_training_lines(out, (x for x in formats.read_training_lines(lines) if x.qid not in qrels))


def best_tuning(results: dict, kind: str, grid: dict[str, str]) -> str:
  """The grid value with the best dev nDCG@10 among those that keep pairs (pair_alpha > 0)."""
  scored = {tag: results[f"tune/{kind}/{tag}"]["metrics"][METRIC] for tag in grid
            if not re.fullmatch(r"loss\.pair_alpha=0(\.0*)?", tag)}
  return max(scored, key=scored.get)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdir/scifact")
  parser.add_argument("--data", default="", help="a BEIR folder with qrels/train.tsv and qrels/test.tsv "
                      "(default: SCIFACT_DATA, else ../shared/data/scifact beside the checkout)")
  parser.add_argument("--layers", default="2", help="layers of MiniLM the students keep (a count)")
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--kinds", default="dpr,colbert")
  parser.add_argument("--seeds", type=int, default=1, help="seeds per trained setting (0, 1, ...)")
  parser.add_argument("--settings", default="minilm", help=f"any of {','.join(SETTINGS)}")
  parser.add_argument("--runs", default=",".join(RUNS), help="the minilm setting's student runs, any of these")
  parser.add_argument("--tune", default=TUNE_GRID, help="the tune setting's grid: FIELD=V1,V2;FIELD=V1,...")
  parser.add_argument("--tune-kind", default="dpr", choices=sorted(EXPORTS), help="the student kind tuned")
  parser.add_argument("--dev-fraction", type=float, default=0.2, help="train queries held out as the dev split")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate only")
  a, extra = parser.parse_known_args()
  a.settings = [s for s in a.settings.split(",") if s]
  a.runs = [r for r in a.runs.split(",") if r]
  unknown = [s for s in a.settings if s not in SETTINGS] + [k for k in a.kinds.split(",") if k not in EXPORTS]
  unknown += [r for r in a.runs if r not in RUNS]
  bad_extra = [e for e in extra if e != "--" and not e.startswith("--config.")]
  if unknown or bad_extra or a.seeds < 1:
    parser.error(f"unknown settings or kinds {unknown}, arguments that are not --config.* overrides {bad_extra}, "
                 f"or --seeds={a.seeds} < 1" if unknown or bad_extra else f"--seeds must be >= 1, got {a.seeds}")
  extra = [e for e in extra if e != "--"]
  if "round2" in a.settings and "minilm" not in a.settings:
    parser.error("round2 continues the minilm setting's PairDistill students: add minilm to --settings")
  if "tune" in a.settings and "weak_pointwise" not in a.settings:
    parser.error("tune tunes the weak_pointwise setting: add weak_pointwise to --settings")
  workdir = pathlib.Path(a.workdir).resolve()
  data = os.path.abspath(a.data) if a.data else scifact_config.data_dir()
  try:
    scifact_config.check_data(data)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  os.environ["SCIFACT_DATA"] = data  # every stage's :scifact config reads this folder
  start = time.perf_counter()
  results = Results(workdir / "results.json", {"layers": a.layers, "steps": a.steps, "data": data, "extra": extra})
  experiment = Experiment(a, workdir, extra)
  experiment.results = results.data["stages"]
  plan = experiment.build()
  todo, seconds = plan.estimate(results.data["stages"])
  print(f"{len(plan.stages)} stages, {todo} to run: about {seconds / 60:.0f} min on a 2-core CPU like the one that "
        f"measured PRIOR_SECONDS (finished stages' own times where this workdir has them)", flush=True)
  if a.dry_run:
    return
  for name, _, fn in plan.stages:
    results.stage(name, fn)
  for text in (table(results.data["stages"]), comparisons(results.data["stages"]), tuning(results.data["stages"])):
    if text:
      print(text)
  print(f"total {(time.perf_counter() - start) / 60:.1f} min this run; stage seconds in {results.path}")


def groups(stages: dict) -> dict[str, list[dict]]:
  """Trained stages on the test queries grouped by setting without the seed: {'dpr/pairdistill': [seed 0, ...]}."""
  out: dict[str, list[dict]] = {}
  for name, record in stages.items():
    if "metrics" in record and name != "teacher" and not name.startswith("tune/"):
      out.setdefault(re.sub(r"/seed\d+$", "", name), []).append(record)
  return out


def table(stages: dict) -> str:
  teacher = stages["teacher"]["metrics"][METRIC]
  rows = [("model (test queries)", "seeds", "nDCG@10", "x teacher", "RR@10", "R@100"),
          ("teacher all-MiniLM-L6-v2 (6 layers)", "", *_cells([stages["teacher"]], teacher))]
  rows += [(name, str(len(records)), *_cells(records, teacher)) for name, records in groups(stages).items()]
  return _markdown(rows)


def _cells(records: list[dict], teacher: float) -> tuple[str, ...]:
  def cell(metric):
    values = np.array([r["metrics"][metric] for r in records])
    return f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")
  mean = np.mean([r["metrics"][METRIC] for r in records])
  return cell(METRIC), f"{mean / teacher:.2f}", cell("RR@10"), cell("R@100")


def comparisons(stages: dict) -> str:
  """PairDistill (and the tuned setting) against each control, round 2 against round 1: paired randomisation
  tests on per-query nDCG@10 of the test queries, seeds averaged per query."""
  by_name = groups(stages)
  pairs = []
  for name in by_name:
    base, _, run_name = name.rpartition("/")
    if run_name in ("pairdistill", "tuned"):
      pairs += [(name, f"{base}/{control}") for control in ("no_pairs", "in_batch_only")
                if f"{base}/{control}" in by_name]
    if run_name == "round2" and f"{base}/pairdistill/seed0" in stages:
      pairs.append((name, f"{base}/pairdistill/seed0"))
  rows = [("A − B", "seeds", "Δ nDCG@10", "p (paired randomisation)", "queries A>B / A<B", "Δ per seed")]
  for a_name, b_name in pairs:
    a_records = by_name[a_name]
    b_records = [stages[b_name]] if b_name in stages else by_name[b_name]
    base = a_name.rpartition("/")[0] + "/"
    rows.append(_comparison_row(f"{a_name} − {b_name.removeprefix(base)}", a_records, b_records))
  return _markdown(rows) if len(rows) > 1 else ""


def _comparison_row(label: str, a_records: list[dict], b_records: list[dict]) -> tuple[str, ...]:
  result = significance.compare([r["per_query"][METRIC] for r in a_records],
                                [r["per_query"][METRIC] for r in b_records])
  per_seed = [ra["metrics"][METRIC] - rb["metrics"][METRIC] for ra, rb in zip(a_records, b_records)]
  return (label, f"{len(a_records)} / {len(b_records)}", f"{result.delta:+.4f}", _p(result.p_value),
          f"{result.wins[0]} / {result.wins[1]}", ", ".join(f"{d:+.4f}" for d in per_seed))


def tuning(stages: dict) -> str:
  """The tune setting's dev results: each grid value against the defaults and against pair_alpha=0."""
  runs = {name: record for name, record in stages.items() if name.startswith("tune/") and "metrics" in record}
  rows = [("tuning run (dev queries, seed 0)", "nDCG@10", "Δ vs default", "p vs default", "Δ vs pair_alpha=0",
           "p vs pair_alpha=0")]
  for name, record in runs.items():
    kind = name.split("/")[1]
    cells = [name, f"{record['metrics'][METRIC]:.4f}"]
    for base in (f"tune/{kind}/default", f"tune/{kind}/loss.pair_alpha=0"):
      if base in runs and base != name:
        result = significance.compare([record["per_query"][METRIC]], [runs[base]["per_query"][METRIC]])
        cells += [f"{result.delta:+.4f}", _p(result.p_value)]
      else:
        cells += ["", ""]
    rows.append(tuple(cells))
  return _markdown(rows) if len(rows) > 1 else ""


def _p(value: float) -> str:
  """A p-value to 3 decimals, or its order below 0.001 (100,000 resamples resolve about 1e-5)."""
  return f"{value:.3f}" if value >= 0.001 else f"{value:.0e}"


def _markdown(rows: list[tuple[str, ...]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)


if __name__ == "__main__":
  main()
