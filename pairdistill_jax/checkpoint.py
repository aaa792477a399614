"""Orbax checkpoints of the train state, and the description of the trained model beside them.

WORKDIR/checkpoints/<step>/   the train state (Orbax; asynchronous, atomic: a step directory appears only
                              once it is complete — in a bucket, once its commit_success.txt is written);
                              one that fails to restore is moved aside to <step>.corrupt-<time>/ (kept,
                              never deleted, and out of the way of a rerun). A bucket workdir's checkpoints
                              are written to the bucket directly (remote.py)
WORKDIR/model/                config.json (the run's config), bert_config.json, tokenizer/ (a copy), so
                              export and evaluation need nothing but the workdir
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from pairdistill_jax import config_lib, distributed, io, remote, students
from pairdistill_jax.paths import CHECKPOINT_DIR, MODEL_DIR
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.models.bert import BertConfig



class CheckpointMismatchError(config_lib.ConfigError):
  """The workdir's checkpoints hold another model (shapes or structure) than the config describes."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params.bert.embeddings.word_embeddings.embedding': shape, ...} of a state or its saved metadata."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _model_differences(saved_config: pathlib.Path, config: ml_collections.ConfigDict | None) -> list[str]:
  """'model.dim: 32 there, 64 here' for each model and init field in which the saved run's config differs."""
  if config is None:
    return []
  try:
    saved = _flat(json.loads(saved_config.read_text()))
  except (OSError, ValueError):
    return []
  wanted = _flat(json.loads(config.to_json_best_effort()))
  return [f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in sorted(wanted.keys() | saved.keys())
          if k.startswith(("model.", "init.layers")) and saved.get(k) != wanted.get(k)]


class Checkpointer:
  """Saves the train state, the data-iterator state and the config every `every` steps and at the last
  step; keeps the newest `keep` checkpoints plus the best one by the dev metric `best_metric` (if set).
  All processes call it together; Orbax writes each process's shards and commits atomically."""

  def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int, best_metric: str = "",
               config: ml_collections.ConfigDict | None = None):
    self.every = every
    self.config_of_run = config  # names the differing fields when a checkpoint does not fit
    self.best_metric = best_metric
    policies = [LatestN(n=keep)]
    if best_metric:
      policies.append(BestN(get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True,
                                           preservation_policy=AnyPreservationPolicy(policies))
    self.directory = remote.in_bucket(workdir) / CHECKPOINT_DIR
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int, *, last: bool = False) -> bool:
    """Whether `save` saves at `step`: on the interval, or the last step of a run."""
    return last or step % self.every == 0

  def save(self, step: int, state: Any, *, data_state: Any = None, config: ml_collections.ConfigDict | None = None,
           metrics: dict | None = None, last: bool = False) -> bool:
    """Starts an asynchronous save (the state after `step` steps) when `due`."""
    if not self.due(step, last=last):
      return False
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave({"iterator": data_state})}
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    if metrics is not None and self.best_metric not in metrics:
      metrics = None  # only checkpoints with the ranking metric compete for "best"
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, like: Any, shardings: Any) -> tuple[Any, Any]:
    """(state, data-iterator state) saved at `step`; the state placed with `shardings`, which may differ
    from the saving run's mesh."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data["iterator"]

  def restore_latest(self, like: Any, shardings: Any, *, move_aside: bool = True) -> tuple[int, Any, Any] | None:
    """(step, state, data state) of the newest checkpoint that restores; a corrupted one is skipped with a
    warning (and, with `move_aside`, renamed to <step>.corrupt-<time>, so that training can save that step
    again) and the one before it is tried. None when there is none; CheckpointMismatchError when the newest
    readable one holds another model (check_fits)."""
    for step in reversed(self.all_steps()):
      self.check_fits(step, like)
      try:
        return (step, *self.restore(step, like, shardings))
      except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
        logging.warning("Checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                        self.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
        if move_aside:
          self._move_aside(step)
    return None

  def check_fits(self, step: int, like: Any) -> None:
    """Raises CheckpointMismatchError when the arrays saved at `step` differ in names or shapes from `like`'s
    (another model or optimizer); a checkpoint whose metadata cannot be read passes (restoring it fails)."""
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 (unreadable: restore_latest finds it corrupt)
      return
    if saved is None:
      return
    saved_shapes, wanted_shapes = _leaf_shapes(saved), _leaf_shapes(like)
    differences = [f"{name}: {saved_shapes.get(name, 'absent')} there, {wanted_shapes.get(name, 'absent')} here"
                   for name in sorted(saved_shapes.keys() | wanted_shapes.keys())
                   if saved_shapes.get(name) != wanted_shapes.get(name)]
    if not differences:
      return
    if self.config_of_run is None:  # export, evaluation: the workdir's own model/ description
      raise CheckpointMismatchError(
          f"the checkpoints in {self.directory} do not fit the workdir's model/ description: "
          f"{len(differences)} of the saved arrays differ, e.g. {'; '.join(differences[:3])}")
    fields = _model_differences(self.directory / str(step) / "config" / "metadata", self.config_of_run)
    raise CheckpointMismatchError(
        f"the checkpoints in {self.directory} do not fit this config "
        f"({'; '.join(fields) or 'same model fields'}): {len(differences)} of the saved arrays differ, e.g. "
        f"{'; '.join(differences[:3])}. Use a new --workdir, or --config.train.overwrite=True to delete the "
        f"old checkpoints and start over")

  def delete_all(self) -> None:
    """Deletes every checkpoint (process 0); those moved aside as corrupt stay."""
    if jax.process_index() == 0:
      for step in self.all_steps():
        (self.directory / str(step)).rmtree()
    distributed.barrier("checkpoints deleted")
    self._manager.reload()

  def _move_aside(self, step: int) -> None:
    """Renames checkpoints/<step> to <step>.corrupt-<time> (process 0; kept for inspection)."""
    if jax.process_index() == 0:
      target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
      (self.directory / str(step)).rename(target)
      logging.warning("Moved the unreadable checkpoint aside to %s", target)
    distributed.barrier(f"checkpoint {step} moved aside")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_model_info(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, bert_config: BertConfig,
                    tokenizer_dir: str) -> None:
  """Writes WORKDIR/model/: the config, the BERT shape and a copy of the tokenizer."""
  with io.atomic_directory(pathlib.Path(workdir) / MODEL_DIR) as tmp:
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
    (tmp / "bert_config.json").write_text(json.dumps(dataclasses.asdict(bert_config), indent=2))
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")


@dataclasses.dataclass
class TrainedModel:
  config: ml_collections.ConfigDict
  bert_config: BertConfig
  params: Any  # numpy arrays on the host
  tokenizer_dir: str
  step: int


def load_trained(workdir: str | pathlib.Path, step: int | None = None) -> TrainedModel:
  """The student parameters of the workdir's latest (or given) checkpoint, on the host, with its config."""
  workdir = pathlib.Path(workdir)
  info = workdir / MODEL_DIR
  if not (info / "config.json").exists():
    raise FileNotFoundError(f"{workdir} holds no trained model ({info}/config.json missing): train first")
  config = ml_collections.ConfigDict(json.loads((info / "config.json").read_text()))
  bert_config = BertConfig(**json.loads((info / "bert_config.json").read_text()))
  checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
  model = students.make_student(config.model, bert_config)
  tx = state_lib.optimizer(config)
  init = functools.partial(state_lib.init_boxed, model, tx, config)
  like = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = jax.tree.map(lambda _: device, like)
  try:
    if step is None:  # the newest that restores (a corrupted one is skipped with a warning, left in place)
      restored = checkpointer.restore_latest(like, shardings, move_aside=False)
      if restored is None:
        raise FileNotFoundError(f"{checkpointer.directory} holds no checkpoint that restores")
      step, state, _ = restored
    else:
      state, _ = checkpointer.restore(step, like, shardings)
  finally:
    checkpointer.close()
  return TrainedModel(config, bert_config, jax.tree.map(np.asarray, state.params), str(info / "tokenizer"),
                      step)
