"""The training loop: data, model, sharded state (what it starts from: train/start.py), the jitted step,
metric windows (train/metrics_log.py), checkpoints and the run summary.

Per `train.log_every` steps it writes the mean of each metric over the window (every loss term, pair and
top-1 agreement, lr, grad norm) plus queries/s, tokens/s and step time to `WORKDIR/metrics.jsonl` and to
TensorBoard (`WORKDIR/tensorboard`), and shows a progress bar with the ETA.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tqdm

from pairdistill_jax import checkpoint, config_lib, distributed, paths, remote, sharding, students
from pairdistill_jax.convert.students import import_student
from pairdistill_jax.data import demo, pipeline
from pairdistill_jax.data.tokenization import student_tokenizer
from pairdistill_jax.errors import NonFiniteLossError
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.train import start
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.metrics_log import MetricsLog, MetricWindow
from pairdistill_jax.train.preemption import PreemptionWatcher, stop_reason
from pairdistill_jax.train.step import make_train_step

# The first and last logged windows of these metrics make the run summary (first_loss, last_loss, ...).
SUMMARY_KEYS = ("loss", "loss_kd", "loss_pair", "loss_ib", "pair_agreement", "top1_agreement")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          evaluate: Callable[[int, Any], dict] | None = None) -> dict:
  """Trains the student of `config`; returns the run summary (first and last logged windows).

  `evaluate(step, params) -> metrics` runs every `train.eval_every` steps (the periodic dev evaluation; by
  default retrieval on `config.eval` when eval.collection is set); its metrics go to metrics.jsonl (with
  "eval_" prefixes) and TensorBoard's eval/ section, and rank checkpoints for `train.best_metric`.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  logging.info("Mesh: %s", dict(mesh.shape))
  demo.ensure_demo_data(config, workdir)
  data = paths.data_paths(config, workdir)
  tokenizer = student_tokenizer(config.model, data.tokenizer)
  bert_config, pretrained = import_student(config, vocab_size=len(tokenizer.tokenizer))
  if bert_config.max_position_embeddings < max(config.model.query_maxlen, config.model.doc_maxlen):
    raise config_lib.ConfigError(f"model.doc_maxlen/query_maxlen exceed the model's "
                                 f"{bert_config.max_position_embeddings} positions")
  model = students.make_student(config.model, bert_config)
  logging.info("Run: %s", start.run_settings(config, bert_config, mesh))
  if evaluate is None:
    evaluate = _dev_evaluation(config, bert_config, data.tokenizer, workdir)
  tx = state_lib.optimizer(config)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
  distributed.assert_same_on_all_hosts(config.to_json_best_effort(), "config")
  checkpointer = checkpoint.Checkpointer(workdir, every=config.train.checkpoint_every,
                                         keep=config.train.keep_checkpoints, best_metric=config.train.best_metric,
                                         config=config)
  try:
    with jax.set_mesh(mesh):
      state, shardings = state_lib.create(model, tx, config, mesh, init_rng)
      state, data_state = start.initial_state(config, workdir, checkpointer, state, shardings, pretrained)
      distributed.assert_same_on_all_hosts(int(state.step), "step to resume from")
      if jax.process_index() == 0:  # after the checkpoints were found to fit this config
        checkpoint.save_model_info(workdir, config, bert_config, data.tokenizer)
      step_fn = make_train_step(model, tx, config, mesh, shardings)
      batches = pipeline.train_iterator(config, data, tokenizer, start_step=int(state.step))
      if data_state is not None:
        try:  # checks the data and its order are those the checkpoint saw
          batches.set_state(data_state)
        except ValueError as e:
          raise config_lib.ConfigError(f"{e} (or use a new --workdir)") from None
      try:
        return _run(state, _RunInputs(
            config=config, workdir=workdir, step_fn=step_fn, batches=batches,
            batch_sharding=sharding.batch_sharding(mesh, sharding.rules(config)), rng=step_rng,
            checkpointer=checkpointer, evaluate=evaluate))
      finally:
        batches.close()
  finally:
    checkpointer.close()


def _dev_evaluation(config: ml_collections.ConfigDict, bert_config: BertConfig, tokenizer_dir: str,
                    workdir: pathlib.Path) -> Callable[[int, Any], dict] | None:
  """The default periodic evaluation, retrieval on config.eval; None without train.eval_every or
  eval.collection."""
  if not (config.train.eval_every and config.eval.collection):
    return None
  from pairdistill_jax.retrieval.evaluate import evaluate_params  # noqa: PLC0415 (faiss only when used)

  def evaluate(step: int, params) -> dict:
    return evaluate_params(config, bert_config, params, tokenizer_dir, workdir, step=step)
  return evaluate


@dataclasses.dataclass(frozen=True)
class _RunInputs:
  """What the steps of a run use besides the train state."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  step_fn: Callable[..., tuple[state_lib.TrainState, dict]]  # (state, sharded batch, rng) -> (state, metrics)
  batches: pipeline.TrainIterator
  batch_sharding: jax.sharding.NamedSharding
  rng: jax.Array
  checkpointer: checkpoint.Checkpointer
  evaluate: Callable[[int, Any], dict] | None


@dataclasses.dataclass(frozen=True)
class _Dispatched:
  """A dispatched step whose metrics (device arrays) are not read yet."""

  step: int
  metrics: dict
  tokens: int  # real query and document tokens in the global batch


class _Progress:
  """Each step's metrics into the logging window; a window's record to metrics.jsonl and TensorBoard
  (`MetricsLog`, process 0) and to the progress bar."""

  def __init__(self, train_cfg: ml_collections.ConfigDict, workdir: pathlib.Path, start_step: int):
    self.log_every, self.steps = train_cfg.log_every, train_cfg.steps
    self.log = MetricsLog(workdir, start_step, enabled=jax.process_index() == 0)
    self.bar = tqdm.tqdm(total=train_cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         disable=jax.process_index() != 0)
    self.window = MetricWindow(train_cfg.batch_size)

  def add(self, dispatched: _Dispatched) -> None:
    """Reads the step's metrics (raising NonFiniteLossError on a non-finite one); ends the window on a
    train.log_every step and on the last."""
    step = dispatched.step
    metrics = {k: float(v) for k, v in jax.device_get(dispatched.metrics).items()}
    if not metrics.pop("finite"):
      raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
                               f"grad_norm={metrics['grad_norm']}); that update was not applied")
    self.window.add(metrics, dispatched.tokens)
    self.bar.update(1)
    if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
      self.end_window(step + 1)

  def end_window(self, step: int) -> None:
    """Writes the record of the window up to `step` (none when it is empty) and starts the next."""
    if not self.window:
      return
    record = self.window.record()
    self.log.write(step, record, partial=len(self.window) < self.log_every)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", pairs=f"{record['pair_agreement']:.3f}")
    self.window.restart()

  def close(self) -> None:
    self.bar.close()
    self.log.close()


def _run(state: state_lib.TrainState, run: _RunInputs) -> dict:
  """Steps until train.steps. Each step's metrics are read after the next step is dispatched, so the host
  prepares batch t+1 while the device computes step t; before a checkpoint is saved, the window up to it is
  written, so that metrics.jsonl holds every checkpointed step exactly once."""
  train_cfg = run.config.train
  start_step = int(state.step)
  progress = _Progress(train_cfg, run.workdir, start_step)
  pending: _Dispatched | None = None
  preemption = PreemptionWatcher()
  preempted_at = None
  try:
    for step in range(start_step, train_cfg.steps):
      state, dispatched = _dispatch(state, run, step, compiling=step == start_step)
      if pending:
        progress.add(pending)
      pending = dispatched
      done = step + 1
      eval_metrics = _evaluate_if_due(run, state, done, progress.log)
      stop = preemption.should_stop(done)
      last = done == train_cfg.steps or stop
      if run.checkpointer.due(done, last=last):
        progress.add(pending)
        pending = None
        progress.end_window(done)
      _save(run, state, done, eval_metrics, last, progress.log)
      if stop:
        preempted_at = done
        break
    if pending:
      progress.add(pending)
  finally:
    preemption.close()
    progress.close()
  stopped_by = preemption.signal_name if preempted_at is not None else None
  if stopped_by:
    reason = stop_reason(stopped_by)
    logging.warning("%s: saved the checkpoint of step %d; run the same command to resume",
                    reason[0].upper() + reason[1:], preempted_at)
  return dict(summarize(progress.log.history), steps=int(state.step), started_at=start_step,
              preempted_at=preempted_at, stopped_by=stopped_by)


def _dispatch(state: state_lib.TrainState, run: _RunInputs, step: int,
              compiling: bool) -> tuple[state_lib.TrainState, _Dispatched]:
  """Dispatches train step `step` on the next batch (`compiling`: the first step of this process, which
  compiles)."""
  host = next(run.batches)
  tokens = int(host["q_mask"].sum() + host["d_mask"].sum()) * jax.process_count()
  if compiling:
    logging.info("Compiling the train step...")
    compile_start = time.perf_counter()
  state, metrics = run.step_fn(state, sharding.shard_batch(host, run.batch_sharding), run.rng)
  if compiling:
    logging.info("Compiled the train step in %.1f s", time.perf_counter() - compile_start)
  return state, _Dispatched(step, metrics, tokens)


def _evaluate_if_due(run: _RunInputs, state: state_lib.TrainState, done: int, log: MetricsLog) -> dict | None:
  """The periodic evaluation's metrics (also logged) when it is due after `done` steps; else None."""
  train_cfg = run.config.train
  if not (run.evaluate and train_cfg.eval_every and (done % train_cfg.eval_every == 0 or done == train_cfg.steps)):
    return None
  eval_metrics = run.evaluate(done, state.params)
  log.write(done, eval_metrics, section="eval")
  return eval_metrics


def _save(run: _RunInputs, state: state_lib.TrainState, done: int, eval_metrics: dict | None, last: bool,
          log: MetricsLog) -> None:
  """Saves the checkpoint of `done` steps when it is due; a bucket workdir's curves reach the bucket with it."""
  saved = run.checkpointer.save(done, state, data_state=run.batches.get_state(), config=run.config,
                                metrics=eval_metrics, last=last)
  if saved and jax.process_index() == 0:
    log.flush()
    remote.push(run.workdir)


def summarize(history: list[dict]) -> dict:
  """First and last logged windows of the run (what `make demo` prints)."""
  if not history:
    return {}
  first, last = history[0], history[-1]
  return {**{f"first_{k}": first[k] for k in SUMMARY_KEYS if k in first},
          **{f"last_{k}": last[k] for k in SUMMARY_KEYS if k in last}}
