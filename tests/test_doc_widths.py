"""Length-bucketed document widths (data.doc_widths): the widths and the choice by hand, the same width on every
process (from the global batch), padding cut without changing scores, loss or gradients, one compile per width,
and training through the CLI with exact resume."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import colbert as colbert_config
from configs import dpr as dpr_config
from pairdistill_jax import checkpoint, config_lib, sharding
from pairdistill_jax.data import batching, pipeline
from pairdistill_jax.data.formats import TrainingExample
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.students import make_student
from pairdistill_jax.train import forward
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train import step as step_lib

import data_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_KEYS = ("d_ids", "d_mask", "d_score_mask")


# --- the widths and the choice, by hand ------------------------------------------------------------------------

@pytest.mark.parametrize("text, doc_maxlen, widths", [
    ("auto", 180, (64, 128, 180)),
    ("auto", 128, (64, 128)),
    ("auto", 300, (64, 128, 256, 300)),
    ("auto", 512, (64, 128, 256, 512)),
    ("auto", 48, (48,)),
    ("off", 180, (180,)),
    ("", 180, (180,)),
    (" 128, 64 ,64", 180, (64, 128, 180)),  # sorted, duplicates dropped, doc_maxlen added
    ("64,128,180", 180, (64, 128, 180)),
    ("16", 16, (16,)),
])
def test_widths_by_hand(text, doc_maxlen, widths):
  assert config_lib.parse_doc_widths(text, doc_maxlen) == widths


@pytest.mark.parametrize("text, message", [
    ("64,200", "width 200 is not in \\[1, model.doc_maxlen=180\\]"),
    ("0,64", "width 0 is not in"),
    ("64;128", "expected 'auto', 'off' or comma-separated widths"),
    ("fast", "expected 'auto', 'off'"),
])
def test_bad_widths_are_refused_before_anything_compiles(text, message):
  config = colbert_config.get_config("demo")
  config.model.doc_maxlen = 180
  config.data.doc_widths = text
  with pytest.raises(ConfigError, match=f"data.doc_widths=.*{message}"):
    config_lib.validate(config, 1, need_data=False)


@pytest.mark.parametrize("longest, width", [(1, 64), (63, 64), (64, 64), (65, 128), (70, 128), (128, 128),
                                            (129, 180), (180, 180)])
def test_width_is_the_smallest_that_holds_the_longest_passage(longest, width):
  assert batching.doc_width(longest, (64, 128, 180)) == width


def test_a_passage_longer_than_every_width_is_an_error():
  with pytest.raises(ValueError, match="181 tokens is longer than the largest document width 180"):
    batching.doc_width(181, (64, 128, 180))


# --- padding cut: the same scores, loss and gradients -----------------------------------------------------------

def _loss_config(kind):
  config = (colbert_config if kind == "colbert" else dpr_config).get_config("demo")
  config.model.update(query_maxlen=32, doc_maxlen=180)
  config.model.bert.update(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64)
  config.data.update(nway=4, max_pairs=3, doc_widths="auto")
  config.train.batch_size = 4
  return config


def _batch_with_longest_passage(longest, *, batch=4, nway=4, doc_maxlen=180, query_maxlen=32, seed=0):
  """Passages of 3..`longest` tokens (one exactly `longest`); the padding positions hold random ids, not [PAD],
  so only the mask keeps them out."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, longest + 1, size=(batch, nway))
  lengths[1, 2] = longest
  d_mask = (np.arange(doc_maxlen) < lengths[..., None]).astype(np.int32)
  q_mask = np.ones((batch, query_maxlen), np.int32)
  q_mask[:, 12:] = 0
  return dict(
      q_ids=rng.integers(7, 100, size=(batch, query_maxlen)).astype(np.int32), q_mask=q_mask,
      d_ids=rng.integers(7, 100, size=(batch, nway, doc_maxlen)).astype(np.int32), d_mask=d_mask,
      d_score_mask=d_mask * (rng.random(d_mask.shape) < 0.85), teacher=rng.normal(size=(batch, nway)) * 3,
      passage_mask=np.ones((batch, nway), bool), pair_i=np.tile(np.int32([0, 1, 0]), (batch, 1)),
      pair_j=np.tile(np.int32([1, 2, 3]), (batch, 1)),
      pair_logp=np.log(rng.uniform(0.05, 1.0, size=(batch, 3))).astype(np.float32),
      pair_mask=np.ones((batch, 3), bool))


def _cut(batch, width):
  return {k: v[..., :width] if k in DOC_KEYS else v for k, v in batch.items()}


@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_a_batch_whose_longest_passage_is_70_tokens_gets_width_128_and_the_same_loss(kind):
  config = _loss_config(kind)
  full = _batch_with_longest_passage(70)
  if kind == "dpr":
    del full["d_score_mask"]
  width = batching.doc_width(int(full["d_mask"].sum(-1).max()), config_lib.doc_widths(config))
  assert width == 128
  cut = _cut(full, width)
  assert cut["d_ids"].shape == (4, 4, 128)

  model = make_student(config.model, BertConfig(**config.model.bert))
  params = state_lib.init_params(model, config, jax.random.PRNGKey(0))
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda p, b: forward.compute_loss(model, config, p, b, None), has_aux=True))
  (loss_full, metrics_full), grads_full = loss_and_grads(params, full)
  (loss_cut, metrics_cut), grads_cut = loss_and_grads(params, cut)
  assert abs(float(loss_full) - float(loss_cut)) <= 1e-6, (float(loss_full), float(loss_cut))
  for key in metrics_full:
    np.testing.assert_allclose(metrics_cut[key], metrics_full[key], rtol=1e-6, atol=1e-6, err_msg=key)
  for (path, g_full), g_cut in zip(jax.tree_util.tree_leaves_with_path(grads_full), jax.tree.leaves(grads_cut)):
    np.testing.assert_allclose(g_cut, g_full, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  # The scores themselves: every query against every passage of the batch.
  def scores(batch):
    q, d = forward.student_vectors(model, config, params, batch, None)
    if kind == "dpr":
      return scoring.dot(q, d)
    return scoring.maxsim(q, d, batch["d_score_mask"].reshape(d.shape[:2]))

  scores_full, scores_cut = scores(full), scores(cut)
  np.testing.assert_allclose(scores_cut, scores_full, rtol=1e-6, atol=1e-5)
  assert np.abs(np.asarray(scores_full)).max() > 1  # not a trivially small comparison


# --- one compile per width ---------------------------------------------------------------------------------------

def test_the_train_step_compiles_once_per_width_and_never_again(caplog):
  config = _loss_config("colbert")
  config.model.update(query_maxlen=8, doc_maxlen=12)
  config.data.doc_widths = "4,8"
  config.loss.in_batch_group = 4
  config.train.update(batch_size=8, steps=20)
  widths = config_lib.doc_widths(config)
  assert widths == (4, 8, 12)
  longest = [8, 12, 4, 7, 3, 12, 10, 5, 8, 4, 11, 12]
  batches = [_cut(_batch_with_longest_passage(n, batch=8, doc_maxlen=12, query_maxlen=8, seed=s),
                  batching.doc_width(n, widths)) for s, n in enumerate(longest)]
  assert [b["d_ids"].shape[-1] for b in batches] == [8, 12, 4, 8, 4, 12, 12, 8, 8, 4, 12, 12]
  mesh = sharding.make_mesh(config)  # all 8 test devices: the batch split over them
  model = make_student(config.model, BertConfig(**config.model.bert))
  tx = state_lib.optimizer(config)
  cache_sizes = []
  with jax.set_mesh(mesh), caplog.at_level(logging.INFO):
    state, shardings = state_lib.create(model, tx, config, mesh, jax.random.PRNGKey(0))
    step = step_lib.make_train_step(model, tx, config, mesh, shardings)
    batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
    for batch in batches:
      state, metrics = step(state, sharding.shard_batch(batch, batch_sh), jax.random.PRNGKey(1))
      cache_sizes.append(step._cache_size())
      assert float(metrics["doc_width"]) == batch["d_ids"].shape[-1]
      assert float(metrics["finite"]) == 1
  # jit's cache gains one program at each new width and none afterwards (no retrace or recompile per batch).
  assert cache_sizes == [1, 2, 3] + [3] * 9
  traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Tracing the train step")]
  assert traced == [f"Tracing the train step for documents of width {w} (it compiles once per width)"
                    for w in (8, 12, 4)]


# --- the pipeline: the width of the global batch, on every process ------------------------------------------------

NWAY, BATCH = 2, 4
WORD = "water"  # one MiniLM token: a passage of n words is n + 3 tokens ([CLS] [D] ... [SEP])
# (words per passage of lines 4b .. 4b+3) for global batch b in file order: width 8 holds <= 5 words, 12 <= 9.
BLOCKS = [(2, 3, 11, 13),   # process 0's rows short, process 1's long: 16 for both
          (1, 2, 5, 4),     # all short: 8
          (3, 7, 2, 5),     # 12, from process 0's row
          (9, 6, 8, 1)]     # 12
EXPECTED_WIDTHS = [16, 8, 12, 12]


@pytest.fixture(scope="module")
def bucket_data(tmp_path_factory, minilm_dir):
  root = tmp_path_factory.mktemp("doc_widths")
  collection, examples = {}, []
  for b, block in enumerate(BLOCKS):
    for r, words in enumerate(block):
      k = 4 * b + r
      collection[f"p{k}a"] = " ".join([WORD] * words)
      collection[f"p{k}b"] = " ".join([WORD] * min(words, 2))
      examples.append(TrainingExample(f"q{k}", (f"p{k}a", f"p{k}b"), (1.0 + k, 0.5), ((0, 1, -0.2),)))
  queries = {f"q{k}": "why water" for k in range(len(examples))}
  return data_helpers.write_training_data(root, collection, queries, examples, minilm_dir)


def _bucket_iterator(data, doc_widths="8,12", **kwargs):
  config = colbert_config.get_config("demo")
  config.model.doc_maxlen = 16
  config.data.update(nway=NWAY, max_pairs=1, num_workers=0, prefetch=0, shuffle=kwargs.pop("shuffle", False),
                     doc_widths=doc_widths)
  config.train.update(batch_size=BATCH, seed=0)
  return pipeline.train_iterator(config, data.paths, data.tokenizer, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_every_process_cuts_to_the_width_of_the_global_batch(bucket_data):
  steps = len(BLOCKS)
  single = _take(_bucket_iterator(bucket_data), steps)
  shards = [_take(_bucket_iterator(bucket_data, process_index=p, process_count=2), steps) for p in (0, 1)]
  assert [b["d_ids"].shape[-1] for b in single] == EXPECTED_WIDTHS
  for step in range(steps):
    # Process 0 of step 0 holds only passages of <= 6 tokens, yet takes the global batch's width 16.
    assert shards[0][step]["d_ids"].shape == shards[1][step]["d_ids"].shape == (BATCH // 2, NWAY,
                                                                                EXPECTED_WIDTHS[step])
    for key, value in single[step].items():
      np.testing.assert_array_equal(np.concatenate([shards[0][step][key], shards[1][step][key]]), value, key)
  assert int(shards[0][0]["d_mask"].sum(-1).max()) <= 8


def test_cut_batches_are_the_fully_padded_batches_without_their_padding(bucket_data):
  bucketed = _take(_bucket_iterator(bucket_data, shuffle=True), 12)
  padded = _take(_bucket_iterator(bucket_data, doc_widths="off", shuffle=True), 12)
  assert {b["d_ids"].shape[-1] for b in bucketed} == {8, 12, 16}  # all three widths occur in the shuffled order
  for cut, full in zip(bucketed, padded):
    width = cut["d_ids"].shape[-1]
    assert full["d_ids"].shape[-1] == 16
    assert width == batching.doc_width(int(full["d_mask"].sum(-1).max()), (8, 12, 16))
    assert not full["d_mask"][..., width:].any()  # only padding was cut
    for key, value in full.items():
      np.testing.assert_array_equal(cut[key], value[..., :width] if key in DOC_KEYS else value, err_msg=key)
  lines = [bucket_data.examples[int(round(t - 1))] for t in padded[0]["teacher"][:, 0]]
  expected = data_helpers.make_batch(lines, bucket_data.collection, bucket_data.queries, bucket_data.tokenizer,
                                     nway=NWAY, max_pairs=1)
  for key, value in expected.items():
    np.testing.assert_array_equal(padded[0][key], value, err_msg=key)


def test_resumed_iterators_cut_to_the_same_widths(bucket_data):
  uninterrupted = _take(_bucket_iterator(bucket_data, shuffle=True), 10)
  interrupted = _bucket_iterator(bucket_data, shuffle=True)
  _take(interrupted, 4)
  state = json.loads(json.dumps(interrupted.get_state()))
  assert "doc_widths" not in json.dumps(state)  # the iterator's state does not depend on the widths
  resumed = _bucket_iterator(bucket_data, shuffle=True, doc_widths="off")
  resumed.set_state(state)  # accepted: other widths change the padding only
  resumed = _bucket_iterator(bucket_data, shuffle=True)
  resumed.set_state(state)
  for got, want in zip(_take(resumed, 6), uninterrupted[4:]):
    assert list(got) == list(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# --- through the CLI -------------------------------------------------------------------------------------------

ARGS = ["--config=configs/colbert.py:demo,batch_size=4,nway=4", "--config.train.steps=12",
        "--config.train.checkpoint_every=6", "--config.train.log_every=3", "--config.optim.warmup_steps=3",
        "--config.data.doc_widths=32,36,40"]


def _run_main(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}", *ARGS, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def _traced_widths(output):
  return [int(line.split("documents of width ")[1].split()[0]) for line in output.splitlines()
          if "Tracing the train step for documents of width" in line]


def test_cli_trains_with_bucketed_widths_compiling_once_per_width_and_resumes_exactly(tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  output = _run_main(uninterrupted)
  assert "document widths 32/36/40" in output
  # The demo's batches of 4 x 4 passages hold 24..37 tokens: widths 36 and 40, each compiled once.
  traced = _traced_widths(output)
  assert sorted(traced) == [36, 40], traced
  records = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [3, 6, 9, 12]
  assert all(36 <= r["doc_width"] <= 40 for r in records) and min(r["doc_width"] for r in records) < 40
  assert np.isfinite([r["loss"] for r in records]).all()

  # Resumed from step 6 (the last checkpoint removed): the same parameters, bit for bit.
  resumed = tmp_path / "resumed"
  shutil.copytree(uninterrupted, resumed)
  shutil.rmtree(resumed / "checkpoints" / "12")
  output = _run_main(resumed)
  assert "trained up to step 12 (resumed at step 6)" in output
  assert sorted(_traced_widths(output)) == [36, 40]
  for got, want in zip(jax.tree.leaves(checkpoint.load_trained(resumed).params),
                       jax.tree.leaves(checkpoint.load_trained(uninterrupted).params)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_two_processes_agree_on_each_width_and_match_one_process(tmp_path):
  """2 real processes (2 CPU devices each) with bucketing: the losses of 1 process on 4 devices. Each process
  holds 2 of the 4 queries: alone, it would pick a smaller width than the global batch's at 5 of the 12 steps."""
  from tests.test_multiprocess import losses, run  # noqa: PLC0415

  args = [*ARGS, "--config.train.log_every=1"]
  single, multi = tmp_path / "single", tmp_path / "multi"
  output = run([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={single}", *args], env_devices=4,
               workdir=single)
  assert sorted(_traced_widths(output)) == [36, 40]
  run(["bash", "launch/local_multiprocess.sh", "2", f"--workdir={multi}", *args], env_devices=2, workdir=multi)
  expected, got = losses(single), losses(multi)
  assert sorted(got) == sorted(expected) == list(range(1, 13))
  for step, values in got.items():
    np.testing.assert_allclose(values, expected[step], rtol=1e-5, err_msg=f"step {step}")
  records = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  assert {r["doc_width"] for r in records} == {36.0, 40.0}
