"""Orbax checkpoints of the train state, and the description of the trained model beside them.

WORKDIR/checkpoints/<step>/   the train state (Orbax; asynchronous, atomic: a step directory appears only
                              once it is complete)
WORKDIR/model/                config.json (the run's config), bert_config.json, tokenizer/ (a copy), so
                              export and evaluation need nothing but the workdir
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pairdistill_jax.models.bert import BertConfig

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """Saves the train state every `every` steps (and at the last step), keeping the newest `keep`."""

  def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int):
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, last: bool = False) -> bool:
    """Starts an asynchronous save of `state` (the state after `step` steps) on the interval or if `last`."""
    if step % self.every and not last:
      return False
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

  def restore(self, step: int, like: Any, shardings: Any) -> Any:
    """The state saved at `step`, placed with `shardings` (which may differ from the saving run's)."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_model_info(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, bert_config: BertConfig,
                    tokenizer_dir: str) -> None:
  """Writes WORKDIR/model/: the config, the BERT shape and a copy of the tokenizer."""
  target = pathlib.Path(workdir) / MODEL_DIR
  tmp = target.with_name(f".{MODEL_DIR}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
  (tmp / "bert_config.json").write_text(json.dumps(dataclasses.asdict(bert_config), indent=2))
  shutil.copytree(tokenizer_dir, tmp / "tokenizer")
  shutil.rmtree(target, ignore_errors=True)
  tmp.rename(target)


@dataclasses.dataclass
class TrainedModel:
  config: ml_collections.ConfigDict
  bert_config: BertConfig
  params: Any  # numpy arrays on the host
  tokenizer_dir: str
  step: int


def load_trained(workdir: str | pathlib.Path, step: int | None = None) -> TrainedModel:
  """The student parameters of the workdir's latest (or given) checkpoint, on the host, with its config."""
  from pairdistill_jax.models.students import make_student  # noqa: PLC0415 (import cycle)
  from pairdistill_jax.train import state as state_lib  # noqa: PLC0415

  workdir = pathlib.Path(workdir)
  info = workdir / MODEL_DIR
  if not (info / "config.json").exists():
    raise FileNotFoundError(f"{workdir} holds no trained model ({info}/config.json missing): train first")
  config = ml_collections.ConfigDict(json.loads((info / "config.json").read_text()))
  bert_config = BertConfig(**json.loads((info / "bert_config.json").read_text()))
  checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINT_DIR} holds no checkpoint")
  model = make_student(config.model, bert_config)
  tx = state_lib.optimizer(config)
  init = functools.partial(state_lib.init_boxed, model, tx, config)
  like = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = checkpointer.restore(step, like, jax.tree.map(lambda _: device, like))
  checkpointer.close()
  return TrainedModel(config, bert_config, jax.tree.map(np.asarray, state.params), str(info / "tokenizer"),
                      step)
