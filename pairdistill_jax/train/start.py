"""What a training run starts from, in order: the workdir's newest usable checkpoint, then init.checkpoint /
init.pretrained, then a random init; and the one-line description of the run's effective settings."""

from __future__ import annotations

import logging

import ml_collections

from pairdistill_jax import checkpoint, paths, students
from pairdistill_jax.train import state as state_lib


def run_settings(config: ml_collections.ConfigDict, bert_config, mesh) -> str:
  """The effective settings of a run in one line: what it starts from, the student, its inputs, the mesh."""
  model_cfg, field, directory = config.model, *paths.init_source(config)
  kind = students.get(model_cfg.kind)
  origin = f"init.{field}={directory}" if field else "a random init"
  if config.init.layers:
    origin += f" (layers {config.init.layers})"
  student = f"{kind.kind} {bert_config.num_hidden_layers}x{bert_config.hidden_size}{kind.describe(model_cfg)}"
  return (f"{student} from {origin}; query/doc maxlen {model_cfg.query_maxlen}/{model_cfg.doc_maxlen}, dtype "
          f"{model_cfg.dtype}, dropout {bert_config.hidden_dropout_prob}/{bert_config.attention_probs_dropout_prob}, "
          f"title separator {kind.title_separator_of(config.data.title_separator)!r}; batch "
          f"{config.train.batch_size} x nway {config.data.nway} (grad_accum {config.train.grad_accum}), "
          f"{config.train.steps} steps, "
          f"lr {config.optim.lr}; mesh {dict(mesh.shape)}")


def initial_state(config, workdir, checkpointer, state, shardings, pretrained):
  """The workdir's newest usable checkpoint, then init.checkpoint / init.pretrained (their weights in
  `pretrained`), then the random init in `state`. Returns (state, data-iterator state).

  Checkpoints of another model are refused (CheckpointMismatchError), or with `train.overwrite` deleted."""
  try:
    restored = checkpointer.restore_latest(state, shardings)
  except checkpoint.CheckpointMismatchError as e:
    if not config.train.overwrite:
      raise
    logging.warning("train.overwrite: deleting the checkpoints of another model: %s", e)
    checkpointer.delete_all()
    restored = None
  if restored is not None:
    step, state, data_state = restored
    logging.info("Resuming from %s/%d", checkpointer.directory, step)
    return state, data_state
  field, directory = paths.init_source(config)
  if field:
    logging.info("Starting from init.%s=%s", field, directory)
  else:
    logging.info("Starting from a random init")
    pretrained = students.get(config.model.kind).tied_random_init(config.model, state.params)
  return state_lib.with_pretrained(state, shardings, pretrained), None
