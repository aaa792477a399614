"""The training loop: the periodic evaluation hook and its records."""

import json

import jax

from configs import colbert as colbert_config
from pairdistill_jax.train import loop


def test_evaluation_hook_runs_on_its_interval_and_is_logged(tmp_path):
  config = colbert_config.get_config("demo,steps=25")
  config.train.update(eval_every=10, log_every=5)
  calls = []

  def evaluate(step, params):
    calls.append((step, sorted(params)))
    return {"ndcg@10": step / 100}

  summary = loop.train(config, tmp_path, evaluate=evaluate)
  assert [step for step, _ in calls] == [10, 20, 25]
  assert calls[0][1] == ["bert", "linear"]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["eval_ndcg@10"]) for r in records if "eval_ndcg@10" in r] == [
      (10, 0.1), (20, 0.2), (25, 0.25)]
  assert summary["steps"] == 25
  assert jax.device_count() == 8  # the loop ran on the 8-device test mesh
