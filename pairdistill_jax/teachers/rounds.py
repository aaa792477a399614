"""--mode=rounds: PairDistill's iterative training, each round in WORKDIR/round_<r>.

Round 1 trains on the config's own training lines (`data.train`, or the demo's). Every later round r
mines the training queries with round r-1's student (`--mode=mine`), scores the run with the teachers
(`--mode=score`) and trains from round r-1's checkpoint (`init.checkpoint`) on the new lines. Every stage
resumes or skips when rerun, so the command can simply be restarted after a crash or preemption.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from pairdistill_jax import config_lib
from pairdistill_jax.teachers import mining, score

_log = logging.getLogger(__name__)


def round_dir(workdir: str | pathlib.Path, r: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"round_{r}"


def _with_workdir(template: str, first_round: pathlib.Path) -> str:
  """Demo paths name {workdir}: in later rounds they still mean round 1's (where the demo data lives)."""
  return template.replace("{workdir}", str(first_round)) if template else template


def next_round_config(config: ml_collections.ConfigDict, previous: pathlib.Path, first_round: pathlib.Path,
                      paths) -> ml_collections.ConfigDict:
  """Round r's config: mine with and start from round r-1's student; train on the scored lines."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.init.checkpoint = str(previous)
  c.mine.model = c.mine.model or str(previous)
  c.data.update(demo=False, collection=paths.collection, queries=paths.queries, train="")
  if config.data.demo:
    for field in ("collection", "queries", "qrels"):
      c.eval[field] = _with_workdir(c.eval[field], first_round)
  return c


def run_rounds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, devices=None) -> list[dict]:
  """Runs `config.rounds.count` rounds; returns each round's training summary."""
  from pairdistill_jax.train import loop  # noqa: PLC0415 (import cycle through checkpoint)

  if config.rounds.count < 1:
    raise config_lib.ConfigError(f"rounds.count must be >= 1, got {config.rounds.count}")
  first = round_dir(workdir, 1)
  _log.info("Round 1/%d in %s: training on the config's data", config.rounds.count, first)
  summaries = [loop.train(config, first)]
  paths = loop.data_paths(config, first)
  for r in range(2, config.rounds.count + 1):
    here, previous = round_dir(workdir, r), round_dir(workdir, r - 1)
    c = next_round_config(config, previous, first, paths)
    _log.info("Round %d/%d in %s: mine with and start from %s", r, config.rounds.count, here, previous)
    mining.mine(c, here, queries_path=paths.queries, collection_path=paths.collection)
    scored = score.score(c, here, queries_path=paths.queries, collection_path=paths.collection,
                         student=student_factory(c, here), devices=devices)
    c.data.train = str(scored.path)
    config_lib.validate(c, jax.device_count())
    summaries.append(loop.train(c, here))
  return summaries


def student_factory(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """For a retriever teacher: its `model`, or '' = the retriever `--mode=mine` uses."""
  def build(cfg: ml_collections.ConfigDict):
    return mining.student_encoder(config, workdir, cfg.model or config.mine.model, doc_maxlen=cfg.max_length)
  return build
