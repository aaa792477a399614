"""The training loop: data, model, sharded state (what it starts from: train/start.py), the jitted step,
metric windows (train/metrics_log.py), checkpoints and the run summary.

Per `train.log_every` steps it writes the mean of each metric over the window (every loss term, pair and
top-1 agreement, lr, grad norm) plus queries/s, tokens/s and step time to `WORKDIR/metrics.jsonl` and to
TensorBoard (`WORKDIR/tensorboard`), and shows a progress bar with the ETA.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from pairdistill_jax import checkpoint, config_lib, distributed, paths, remote, sharding, students
from pairdistill_jax.convert.students import import_student
from pairdistill_jax.data import pipeline
from pairdistill_jax.data.tokenization import student_tokenizer
from pairdistill_jax.train import start
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.metrics_log import MetricsLog
from pairdistill_jax.train.preemption import PreemptionWatcher
from pairdistill_jax.train.step import make_train_step


class NonFiniteLossError(ArithmeticError):
  """Training produced a non-finite loss or gradient; the state of that step was not applied."""


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
  data = paths.data_paths(config, workdir)
  tokenizer = student_tokenizer(config.model, data.tokenizer)
  bert_config, pretrained = import_student(config, vocab_size=len(tokenizer.tokenizer))
  if bert_config.max_position_embeddings < max(config.model.query_maxlen, config.model.doc_maxlen):
    raise config_lib.ConfigError(f"model.doc_maxlen/query_maxlen exceed the model's "
                                 f"{bert_config.max_position_embeddings} positions")
  model = students.make_student(config.model, bert_config)
  logging.info("Run: %s", start.run_settings(config, bert_config, mesh))
  if evaluate is None and config.train.eval_every and config.eval.collection:
    from pairdistill_jax.retrieval.evaluate import evaluate_params  # noqa: PLC0415 (faiss only when used)

    def evaluate(step, params):
      return evaluate_params(config, bert_config, params, data.tokenizer, workdir, step=step)
  tx = state_lib.optimizer(config)
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, step_rng = jax.random.split(rng)
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
      batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
      batches = pipeline.train_iterator(config, data, tokenizer, start_step=int(state.step))
      if data_state is not None:
        try:  # checks the data and its order are those the checkpoint saw
          batches.set_state(data_state)
        except ValueError as e:
          raise config_lib.ConfigError(f"{e} (or use a new --workdir)") from None
      try:
        return _run(config, workdir, state, step_fn, batches, batch_sh, step_rng, checkpointer, evaluate)
      finally:
        batches.close()
  finally:
    checkpointer.close()


def _run(config, workdir, state, step_fn, batches, batch_sh, rng, checkpointer, evaluate) -> dict:
  """Steps until train.steps. Each step's metrics are read after the next step is dispatched, so the host
  prepares batch t+1 while the device computes step t; before a checkpoint is saved, the window up to it is
  written, so that metrics.jsonl holds every checkpointed step exactly once."""
  train_cfg = config.train
  start_step = int(state.step)
  log = MetricsLog(workdir, start_step, enabled=jax.process_index() == 0)
  bar = tqdm.tqdm(total=train_cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  window: list[dict] = []
  window_start = time.perf_counter()

  def write_window(step: int) -> None:
    nonlocal window, window_start
    if not window:
      return
    elapsed = time.perf_counter() - window_start
    record = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "tokens"}
    record.update(step_time=elapsed / len(window), queries_per_s=len(window) * train_cfg.batch_size / elapsed,
                  tokens_per_s=sum(w["tokens"] for w in window) / elapsed, window_steps=len(window))
    log.write(step, record, partial=len(window) < train_cfg.log_every)
    bar.set_postfix(loss=f"{record['loss']:.4f}", pairs=f"{record['pair_agreement']:.3f}")
    window, window_start = [], time.perf_counter()

  def consume(step: int, metrics, tokens: int) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not metrics.pop("finite"):
      raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
                               f"grad_norm={metrics['grad_norm']}); that update was not applied")
    window.append(dict(metrics, tokens=tokens))
    bar.update(1)
    if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.steps:
      write_window(step + 1)

  pending = None
  preemption = PreemptionWatcher()
  preempted_at = None
  try:
    for step in range(start_step, train_cfg.steps):
      host = next(batches)
      tokens = int(host["q_mask"].sum() + host["d_mask"].sum()) * jax.process_count()
      if step == start_step:
        logging.info("Compiling the train step...")
        compile_start = time.perf_counter()
      state, metrics = step_fn(state, sharding.shard_batch(host, batch_sh), rng)
      if step == start_step:
        logging.info("Compiled the train step in %.1f s", time.perf_counter() - compile_start)
      if pending:
        consume(*pending)
      pending = (step, metrics, tokens)
      done = step + 1
      eval_metrics = None
      if evaluate and train_cfg.eval_every and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
        eval_metrics = evaluate(done, state.params)
        log.write(done, eval_metrics, section="eval")
      stop = preemption.should_stop(done)
      last = done == train_cfg.steps or stop
      if checkpointer.due(done, last=last):
        consume(*pending)
        pending = None
        write_window(done)
      saved = checkpointer.save(done, state, data_state=batches.get_state(), config=config, metrics=eval_metrics,
                                last=last)
      if saved and jax.process_index() == 0:  # a bucket workdir's curves reach the bucket with each checkpoint
        log.flush()
        remote.push(workdir)
      if stop:
        preempted_at = done
        break
    if pending:
      consume(*pending)
  finally:
    preemption.close()
    bar.close()
    log.close()
  if preempted_at is not None:
    logging.warning("Preempted: saved the checkpoint of step %d; run the same command to resume", preempted_at)
  return dict(summarize(log.history), steps=int(state.step), started_at=start_step, preempted_at=preempted_at)


def summarize(history: list[dict]) -> dict:
  """First and last logged windows of the run (what `make demo` prints)."""
  if not history:
    return {}
  first, last = history[0], history[-1]
  keys = ("loss", "loss_kd", "loss_pair", "loss_ib", "pair_agreement", "top1_agreement")
  return {**{f"first_{k}": first[k] for k in keys if k in first}, **{f"last_{k}": last[k] for k in keys if k in last}}
