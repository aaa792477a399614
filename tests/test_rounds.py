"""End to end on the demo: round 1 trains; round 2 mines with it, scores the run, trains from its checkpoint."""

import math

import numpy as np
import pytest

from configs import colbert
from pairdistill_jax.data import formats
from pairdistill_jax.teachers import pairs, rounds


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rounds")
  config = colbert.get_config("demo,steps=20")
  config.train.log_every = 5
  config.mine.k = config.teacher.top_n = 20
  return workdir, config, rounds.run_rounds(config, workdir)


def test_round_two_mines_scores_and_trains_from_round_one(two_rounds):
  workdir, config, summaries = two_rounds
  assert [s["steps"] for s in summaries] == [20, 20]
  r1, r2 = workdir / "round_1", workdir / "round_2"
  run = formats.read_run(r2 / "mine" / "run.trec")
  train_queries = formats.read_queries(r1 / "demo_data" / "queries.train.tsv")
  assert set(run) == set(train_queries) and all(len(docs) == config.mine.k for docs in run.values())
  examples = list(formats.read_training_lines(r2 / "score" / "train.jsonl"))
  assert [e.qid for e in examples] == list(run)
  for example in examples[:50]:
    assert len(example.pids) == config.data.nway
    assert list(example.scores) == sorted(example.scores, reverse=True)
    # The teacher is round 1's student: its score of (q, p) is the MaxSim the mining search found.
    np.testing.assert_allclose(example.scores, [run[example.qid][p] for p in example.pids], rtol=1e-4)
    assert len(example.pairs) == config.teacher.n_pairs
    for i, j, logp in example.pairs:
      assert (i, j) in pairs.candidate_pairs(len(example.pids), topk=20, max_distance=5)
      margin = example.scores[i] - example.scores[j]
      assert logp == pytest.approx(-math.log1p(math.exp(-margin)), abs=1e-5)  # log sigmoid of the margin
  # Round 2 starts from round 1's student, which is also its teacher: the distillation loss starts near 0.
  assert summaries[1]["first_loss_kd"] < 0.2 * summaries[0]["first_loss_kd"]
  assert summaries[1]["first_loss_pair"] < 0.2 * summaries[0]["first_loss_pair"]


def test_without_training_lines_round_one_mines_with_the_initial_model(two_rounds, tmp_path, caplog):
  workdir, _, _ = two_rounds
  demo_data = workdir / "round_1" / "demo_data"
  config = colbert.get_config("demo,steps=10")
  config.mine.k = config.teacher.top_n = 20
  config.data.update(demo=False, collection=str(demo_data / "collection.tsv"),
                     queries=str(demo_data / "queries.train.tsv"))
  config.init.checkpoint = str(workdir / "round_1")  # e.g. colbertv2.0 in the paper's setting
  config.rounds.count = 1
  config.optim.warmup_steps = 2
  config.eval.update(collection=str(demo_data / "collection.tsv"), queries=str(demo_data / "queries.dev.tsv"),
                     qrels=str(demo_data / "qrels.dev.tsv"))
  summaries = rounds.run_rounds(config, tmp_path)
  assert [s["steps"] for s in summaries] == [10]
  assert (tmp_path / "round_1" / "mine" / "run.trec").exists()
  assert len((tmp_path / "round_1" / "score" / "train.jsonl").read_text().splitlines()) == 600
  caplog.set_level("INFO")
  assert len(rounds.run_rounds(config, tmp_path)) == 1  # a rerun redoes nothing
  assert "is up to date (same model and settings); skipped" in caplog.text
  assert "is up to date (same run, teachers and settings); skipped" in caplog.text


def test_rounds_refuse_more_scored_pairs_than_training_takes(tmp_path):
  config = colbert.get_config("demo")
  config.teacher.n_pairs = config.data.max_pairs + 1
  with pytest.raises(ValueError, match=r"teacher.n_pairs=5 pairs per scored line exceed data.max_pairs=4"):
    rounds.run_rounds(config, tmp_path)
  assert not (tmp_path / "round_1").exists()  # refused before any work


def test_a_stopped_training_ends_the_rounds_before_the_next_mining(tmp_path, monkeypatch):
  """Round 1's training preempted (or stopped by Ctrl-C) with its checkpoint saved: round 2 must not mine with
  the unfinished student; the rounds return, and a rerun resumes."""
  config = colbert.get_config("demo,steps=20")
  trained = []

  def stopped_training(config, workdir):
    trained.append(workdir)
    return {"steps": 7, "started_at": 0, "preempted_at": 7, "stopped_by": "SIGINT"}

  def no_mining(*args, **kwargs):
    raise AssertionError("mined with a student whose training was stopped")

  monkeypatch.setattr(rounds.loop, "train", stopped_training)
  monkeypatch.setattr(rounds.mining, "mine", no_mining)
  assert config.rounds.count >= 2
  summaries = rounds.run_rounds(config, tmp_path)
  assert [s["preempted_at"] for s in summaries] == [7] and trained == [tmp_path / "round_1"]
