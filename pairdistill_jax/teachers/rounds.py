"""--mode=rounds: PairDistill's iterative training, each round in WORKDIR/round_<r>.

Round r mines the training queries with the previous student (`--mode=mine`), scores the run with the
teachers (`--mode=score`) and trains from that student on the new lines. Round 1's "previous student" is the
model the config starts from (`init.checkpoint` / `init.pretrained`, e.g. colbertv2.0); when the config has
training lines of its own (`data.train`, or the demo's), round 1 trains on them instead of mining. Every
stage resumes or skips when rerun, so the command can simply be restarted after a crash or preemption.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from pairdistill_jax import config_lib, distributed, paths, remote
from pairdistill_jax.teachers import load, mining, score
from pairdistill_jax.train import loop

_log = logging.getLogger(__name__)


def round_dir(workdir: str | pathlib.Path, r: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"round_{r}"


def _with_workdir(template: str, first_round: pathlib.Path) -> str:
  """Demo paths name {workdir}: in later rounds they still mean round 1's (where the demo data lives)."""
  return template.replace("{workdir}", str(first_round)) if template else template


def round_config(config: ml_collections.ConfigDict, previous: pathlib.Path | None, first_round: pathlib.Path,
                 data: paths.DataPaths) -> ml_collections.ConfigDict:
  """A mining round's config: mine with and start from `previous` (None: the config's initial model)."""
  c = ml_collections.ConfigDict(config.to_dict())
  if previous is None:  # round 1: mine.model if set, else the initial model; pinned so a rerun uses the same
    c.mine.model = c.mine.model or paths.init_source(c)[1]
  else:
    c.init.checkpoint = c.mine.model = str(previous)
    c.init.layers = ""  # the previous round's student is already cut
  c.data.update(demo=False, collection=data.collection, queries=data.queries, train="")
  if config.data.demo:
    for field in ("collection", "queries", "qrels"):
      c.eval[field] = _with_workdir(c.eval[field], first_round)
  return c


def run_rounds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, devices=None) -> list[dict]:
  """Runs `config.rounds.count` rounds; returns each round's training summary."""
  count = config.rounds.count
  if count < 1:
    raise config_lib.ConfigError(f"rounds.count must be >= 1, got {count}")
  score.check_teacher_config(config.teacher)  # before any training, mining or scoring
  if config.teacher.pairwise.scorer != "none" and config.teacher.n_pairs > config.data.max_pairs:
    raise config_lib.ConfigError(
        f"teacher.n_pairs={config.teacher.n_pairs} pairs per scored line exceed data.max_pairs="
        f"{config.data.max_pairs} that training takes: raise --config.data.max_pairs or lower teacher.n_pairs")
  load.check_model_dirs(config.teacher)
  first = round_dir(workdir, 1)
  summaries = []
  if config.data.demo or config.data.train:
    _log.info("Round 1/%d in %s: training on the config's data", count, first)
    summaries.append(loop.train(config, first))
    _share(first)
    if _stopped(summaries):
      return summaries
  else:
    for field in ("collection", "queries"):
      if not config.data[field]:
        raise config_lib.ConfigError(f"data.{field} is empty: --mode=rounds mines data.queries from "
                                     f"data.collection (set --config.data.{field}=PATH)")
  data = paths.data_paths(config, first)
  for r in range(len(summaries) + 1, count + 1):
    here = round_dir(workdir, r)
    previous = round_dir(workdir, r - 1) if r > 1 else None
    c = round_config(config, previous, first, data)
    config_lib.validate(c, jax.device_count(), need_data=False)  # before hours of mining and scoring
    _log.info("Round %d/%d in %s: mine with and start from %s", r, count, here, c.mine.model)
    mining.mine(c, here, queries_path=data.queries, collection_path=data.collection)
    scored = score.score(c, here, queries_path=data.queries, collection_path=data.collection,
                         student=student_factory(c, here), devices=devices)
    _share(here)
    c.data.train = str(scored.path)
    config_lib.validate(c, jax.device_count())
    summaries.append(loop.train(c, here))
    _share(here)
    if _stopped(summaries):
      return summaries
  return summaries


def _stopped(summaries: list[dict]) -> bool:
  """Whether the last round's training was stopped (preemption or Ctrl-C) with its checkpoint saved: then no
  later round may mine with its unfinished student; a rerun resumes that training and goes on."""
  stopped = summaries[-1].get("preempted_at") is not None
  if stopped:
    _log.warning("Round %d stopped at step %d: the later rounds wait for the rerun", len(summaries),
                 summaries[-1]["preempted_at"])
  return stopped


def _share(workdir: pathlib.Path) -> None:
  """In a bucket workdir, what process 0 wrote (scored lines, the model description) reaches the mirrors of
  the other hosts, which read it in the next stage."""
  mirror = remote.find(workdir)
  if mirror is None or jax.process_count() == 1:
    return
  if jax.process_index() == 0:
    mirror.push()
  distributed.barrier(f"{workdir} pushed")
  if jax.process_index() != 0:
    mirror.pull()


def student_factory(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """For a retriever teacher (of `role`): its `model`, or '' = the retriever `--mode=mine` uses."""
  def build(cfg: ml_collections.ConfigDict, role: str):
    return mining.student_encoder(config, workdir, cfg.model or config.mine.model, doc_maxlen=cfg.max_length,
                                  field=f"teacher.{role}.model" if cfg.model else "mine.model")
  return build
