"""Orbax checkpoints: restore onto another mesh, skipping corrupted checkpoints, keeping latest and best."""

import logging

import jax
import numpy as np

from pairdistill_jax import checkpoint, sharding
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.students import make_student
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.step import make_train_step
from test_train_step import random_batch, tiny_config


class Trainer:
  """A model, optimizer and compiled step on the mesh of `config`."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(config)
    self.model = make_student(config.model, BertConfig(**config.model.bert))
    self.tx = state_lib.optimizer(config)
    with jax.set_mesh(self.mesh):
      self.state, self.shardings = state_lib.create(self.model, self.tx, config, self.mesh, jax.random.PRNGKey(0))
      self.step_fn = make_train_step(self.model, self.tx, config, self.mesh, self.shardings)
    self.batch_sh = sharding.batch_sharding(self.mesh, sharding.rules(config))

  def step(self, batch):
    with jax.set_mesh(self.mesh):
      self.state, metrics = self.step_fn(self.state, sharding.shard_batch(batch, self.batch_sh),
                                         jax.random.PRNGKey(1))
    return float(metrics["loss"])


def test_restore_onto_a_different_mesh_gives_the_same_next_step(tmp_path):
  saver = Trainer(tiny_config(data=8))
  for seed in (0, 1):
    saver.step(random_batch(seed))
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  checkpointer.save(2, saver.state, data_state={"position": 16})
  checkpointer.close()
  expected_loss = saver.step(random_batch(2))

  restorer = Trainer(tiny_config(data=2, fsdp=4))
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  step, restorer.state, data_state = checkpointer.restore_latest(restorer.state, restorer.shardings)
  checkpointer.close()
  assert step == 2 and int(restorer.state.step) == 2 and data_state == {"position": 16}
  kernel = restorer.state.params["bert"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  np.testing.assert_allclose(restorer.step(random_batch(2)), expected_loss, rtol=2e-5)


def save_two_steps_the_newest_corrupted(workdir, trainer):
  """Checkpoints 1 and 2 (after one more step), every file of 2's state overwritten; step 1's params."""
  checkpointer = checkpoint.Checkpointer(workdir, every=1, keep=5)
  checkpointer.save(1, trainer.state)
  checkpointer.wait_until_finished()
  first_params = jax.device_get(trainer.state.params)
  trainer.step(random_batch(0))
  checkpointer.save(2, trainer.state)
  checkpointer.close()
  for path in (workdir / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  return first_params


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
  trainer = Trainer(tiny_config(data=8))
  save_two_steps_the_newest_corrupted(tmp_path, trainer)
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
  with caplog.at_level(logging.WARNING):
    step, state, _ = checkpointer.restore_latest(trainer.state, trainer.shardings)
  assert step == 1 and int(state.step) == 0
  assert "checkpoints/2 cannot be restored" in caplog.text
  # Moved aside, not deleted and not in the way: the run can save step 2 again (it used to raise
  # StepAlreadyExistsError on every rerun, so the run could never finish).
  assert checkpointer.all_steps() == [1]
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").glob("2.corrupt-*")] == ["2.corrupt"]
  checkpointer.save(2, trainer.state)
  checkpointer.close()
  assert checkpoint.Checkpointer(tmp_path, every=1, keep=5).all_steps() == [1, 2]


def test_export_and_evaluate_load_the_newest_checkpoint_that_restores(tmp_path, caplog):
  """load_trained (export, evaluate, mining) falls back past a corrupted newest checkpoint, saying so."""
  config = tiny_config(data=8)
  trainer = Trainer(config)
  bert_config = BertConfig(**config.model.bert)
  tokenizer_dir = tmp_path / "tok"
  tokenizer_dir.mkdir()
  checkpoint.save_model_info(tmp_path, config, bert_config, str(tokenizer_dir))
  expected = save_two_steps_the_newest_corrupted(tmp_path, trainer)
  with caplog.at_level(logging.WARNING):
    trained = checkpoint.load_trained(tmp_path)
  assert trained.step == 1 and "checkpoints/2 cannot be restored" in caplog.text
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / "checkpoints" / "2").exists()  # reading modes leave the workdir as it is


def test_partial_checkpoint_directory_is_never_picked_up(tmp_path):
  trainer = Trainer(tiny_config(data=8))
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
  checkpointer.save(3, trainer.state)
  checkpointer.close()
  # What an interrupted Orbax save leaves behind: a temporary directory that was never committed.
  (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
  assert checkpointer.latest_step() == 3
  checkpointer.close()


def test_keeps_the_latest_and_the_best_by_the_dev_metric(tmp_path):
  trainer = Trainer(tiny_config(data=8))
  checkpointer = checkpoint.Checkpointer(tmp_path, every=1, keep=2, best_metric="ndcg@10")
  scores = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.3, 5: None}
  for step, score in scores.items():
    checkpointer.save(step, trainer.state, metrics=None if score is None else {"ndcg@10": score})
    checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [2, 4, 5]
  checkpointer.close()


def test_save_only_on_the_interval_or_the_last_step(tmp_path):
  trainer = Trainer(tiny_config(data=8))
  checkpointer = checkpoint.Checkpointer(tmp_path, every=10, keep=5)
  assert [checkpointer.save(s, trainer.state, last=s == 25) for s in (5, 10, 25)] == [False, True, True]
  checkpointer.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [10, 25]
