"""The training pipeline: the batch layout, store batches equal on-the-fly ones, process shards, order,
resume, the original's same-order option, and the training loop's use of it."""

import json
import logging
import pathlib

import numpy as np
import pytest

from pairdistill_jax import config_lib
from pairdistill_jax.data import batching, demo, pipeline, store, training_set
from pairdistill_jax.data.formats import FormatError, TrainingExample
from pairdistill_jax.data.tokenization import DPRTokenizer

import data_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
NWAY, MAX_PAIRS, LINES, BATCH = 6, 5, 37, 8  # 4 steps per epoch, 5 lines left over
WORDS = "protein water cell , . ! boils folds under heat ; light ( fast ) why how 42".split()


def _example(k: int, rng: np.random.Generator) -> TrainingExample:
  """Line k: 3 to 9 passages; its top teacher score 100 + k identifies it in a batch."""
  count = int(rng.integers(3, 10))
  pids = tuple(str(p) for p in rng.choice(200, size=count, replace=False))
  scores = (100.0 + k, *sorted(rng.normal(size=count - 1).round(3), reverse=True))
  pairs = tuple((i, j, round(-float(rng.uniform(0.01, 3)), 3))
                for i in range(count) for j in range(i + 1, min(i + 3, count)))
  return TrainingExample(f"q{k}", pids, scores, pairs[:5])


def _line_ids(batch) -> list[int]:
  return (batch["teacher"][:, 0] - 100).round().astype(int).tolist()


@pytest.fixture(scope="module")
def data(tmp_path_factory, minilm_dir):
  root = tmp_path_factory.mktemp("pipeline")
  rng = np.random.default_rng(0)
  collection = {str(p): " ".join(rng.choice(WORDS, int(rng.integers(0, 25)))) for p in range(200)}
  queries = {f"q{k}": " ".join(rng.choice(WORDS, 4)) for k in range(LINES)}
  examples = [_example(k, rng) for k in range(LINES)]
  return data_helpers.write_training_data(root, collection, queries, examples, minilm_dir)


def _config(**data):
  config = config_lib.load_config(f"{ROOT / 'configs' / 'colbert.py'}:demo")
  config.data.update(dict(dict(nway=NWAY, max_pairs=MAX_PAIRS, num_workers=0, prefetch=0), **data))
  config.train.update(batch_size=BATCH, seed=0)
  return config


def _iterator(data, tokenizer=None, **kwargs):
  data_settings = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("start_step", "process_index",
                                                                       "process_count", "num_shards", "seed")}
  config = _config(**data_settings)
  config.train.seed = kwargs.pop("seed", 0)
  return pipeline.train_iterator(config, data.paths, tokenizer or data.tokenizer, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(got, expected):
  assert list(got) == list(expected)
  for key in expected:
    assert got[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_pack_targets_by_hand():
  long = TrainingExample("q", tuple("abcdefghi"), (9.0, 8, 7, 6, 5, 4, 3, 2, 1),
                         ((0, 1, -0.1), (2, 7, -0.2), (8, 0, -0.3), (3, 4, -0.4), (4, 5, -0.5), (1, 2, -0.6)))
  short = TrainingExample("r", ("x", "y", "z", "w"), (1.5, 1.0, 0.5, 0.25), ((1, 3, -0.7),))
  targets = batching.pack_targets([long, short], nway=6, max_pairs=5)
  np.testing.assert_array_equal(targets["teacher"], [[9, 8, 7, 6, 5, 4], [1.5, 1.0, 0.5, 0.25, 0, 0]])
  np.testing.assert_array_equal(targets["passage_mask"], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(targets["pair_i"], [[0, 3, 4, 1, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(targets["pair_j"], [[1, 4, 5, 2, 0], [3, 0, 0, 0, 0]])
  np.testing.assert_allclose(targets["pair_logp"], [[-0.1, -0.4, -0.5, -0.6, 0], [-0.7, 0, 0, 0, 0]])
  np.testing.assert_array_equal(targets["pair_mask"], [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match="query q has 4 pairs, more than data.max_pairs=3"):
    batching.pack_targets([long, short], nway=6, max_pairs=3)  # pairs are never cut silently
  with pytest.raises(ValueError, match="no pointwise teacher scores"):
    batching.pack_targets([TrainingExample("q", ("a",), None)], nway=2, max_pairs=1)


@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_store_batches_equal_tokenised_batches(data, kind):
  tokenizer = data.tokenizer if kind == "colbert" else DPRTokenizer(data.tokenizer.tokenizer, query_maxlen=8,
                                                                    doc_maxlen=16)
  iterator = _iterator(data, tokenizer)
  for batch in _take(iterator, 5):
    examples = [data.examples[k] for k in _line_ids(batch)]
    expected = data_helpers.make_batch(examples, data.collection, data.queries, tokenizer, nway=NWAY,
                                   max_pairs=MAX_PAIRS)
    _assert_batches_equal(batch, expected)
  assert ("d_score_mask" in batch) == (kind == "colbert")


def test_two_processes_read_disjoint_shards_covering_the_epoch(data):
  steps_per_epoch = LINES // BATCH
  single = _take(_iterator(data, process_index=0, process_count=1), 2 * steps_per_epoch)
  shards = [_take(_iterator(data, process_index=p, process_count=2), 2 * steps_per_epoch) for p in (0, 1)]
  for epoch in range(2):
    seen = []
    for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
      first, second = _line_ids(shards[0][step]), _line_ids(shards[1][step])
      assert len(first) == len(second) == BATCH // 2
      assert not set(first) & set(second)
      assert first + second == _line_ids(single[step])
      _assert_batches_equal({k: np.concatenate([shards[0][step][k], shards[1][step][k]]) for k in single[step]},
                            single[step])
      seen += first + second
    assert len(seen) == len(set(seen)) == steps_per_epoch * BATCH
  epochs = [sum((_line_ids(b) for b in single[e * steps_per_epoch:(e + 1) * steps_per_epoch]), [])
            for e in (0, 1)]
  assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_same_seed_same_order(data):
  order = [_line_ids(b) for b in _take(_iterator(data, seed=3), 6)]
  assert [_line_ids(b) for b in _take(_iterator(data, seed=3), 6)] == order
  assert [_line_ids(b) for b in _take(_iterator(data, seed=4), 6)] != order
  file_order = [_line_ids(b) for b in _take(_iterator(data, shuffle=False), 5)]
  assert file_order == [list(range(s * BATCH, (s + 1) * BATCH)) for s in range(4)] + [list(range(BATCH))]


def test_resume_from_saved_state_equals_uninterrupted_run(data):
  uninterrupted = _take(_iterator(data, num_workers=2, prefetch=3), 11)
  interrupted = _iterator(data, num_workers=2, prefetch=3)
  _take(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))
  interrupted.close()
  resumed = _iterator(data, num_workers=2, prefetch=3)
  resumed.set_state(state)
  for got, expected in zip(_take(resumed, 8), uninterrupted[3:]):
    _assert_batches_equal(got, expected)
  assert resumed.get_state()["step"] == 11
  for got, expected in zip(_take(_iterator(data, start_step=9), 2), uninterrupted[9:]):
    _assert_batches_equal(got, expected)


def test_state_from_other_settings_is_refused(data):
  state = _iterator(data).get_state()
  with pytest.raises(ValueError, match=r"seed: saved 0, now 1"):
    _iterator(data, seed=1).set_state(state)


def test_same_order_on_every_shard_reproduces_the_original(data):
  batches = [_take(_iterator(data, same_order_on_every_shard=True, shuffle=False, process_index=p,
                             process_count=2, num_shards=4), 3) for p in (0, 1)]
  for step, expected in enumerate([[0, 4], [8, 12], [16, 20]]):
    assert _line_ids(batches[0][step]) == _line_ids(batches[1][step]) == expected * 2
  shuffled = _take(_iterator(data, same_order_on_every_shard=True, process_count=1, num_shards=4), 5)
  lines = sum((_line_ids(b) for b in shuffled), [])
  assert all(k % 4 == 0 for k in lines) and all(_line_ids(b)[:2] * 4 == _line_ids(b) for b in shuffled)
  with pytest.raises(ValueError, match="divisible by the 3 data-parallel shards"):
    _iterator(data, same_order_on_every_shard=True, num_shards=3)


def test_training_lines_with_missing_ids(tmp_path, data):
  docs = store.open_store(data.paths.collection, tmp_path, data.tokenizer, "docs", progress=False)
  queries = store.open_store(data.paths.queries, tmp_path, data.tokenizer, "queries", progress=False)
  train = tmp_path / "train.jsonl"
  train.write_text('["q0", ["1", 1.0], ["2", 0.5]]\n["q1", ["3", 1.0], ["999", 0.5]]\n'
                   '["nope", ["1", 1.0]]\n["q2", ["4", 2.0, [[1, -0.5]]], ["5", 1.0]]\n')
  with pytest.raises(FormatError, match=r"train.jsonl:2: pid '999' is not in the collection"):
    training_set.compile_training_set(train, docs, queries, tmp_path, nway=2, max_pairs=1, progress=False)
  skipped = []
  compiled = training_set.compile_training_set(train, docs, queries, tmp_path, nway=2, max_pairs=1,
                                           skip_bad_lines=True, on_skip=skipped.append, progress=False)
  assert [(e.line, e.reason) for e in skipped] == [(2, "pid '999' is not in the collection"),
                                                  (3, "qid 'nope' is not in the queries")]
  np.testing.assert_array_equal(compiled.query_row, queries.rows(["q0", "q2"]))
  np.testing.assert_array_equal(compiled.passage_row, [docs.rows(["1", "2"]), docs.rows(["4", "5"])])
  np.testing.assert_array_equal(compiled.targets["pair_mask"], [[False], [True]])


def test_lines_with_more_pairs_than_max_pairs_are_refused_with_their_line(tmp_path, data):
  docs = store.open_store(data.paths.collection, tmp_path, data.tokenizer, "docs", progress=False)
  queries = store.open_store(data.paths.queries, tmp_path, data.tokenizer, "queries", progress=False)
  train = tmp_path / "train.jsonl"
  train.write_text('["q0", ["1", 1.0, [[1, -0.5]]], ["2", 0.5]]\n'
                   '["q1", ["3", 1.0, [[1, -0.5], [2, -0.1], [3, -0.2]]], ["4", 0.5, [[2, -0.3]]], ["5", 0.1], '
                   '["6", 0.0]]\n')
  for skip in (False, True):  # not a bad line to skip: the config is too small for the data
    with pytest.raises(FormatError, match=r"train.jsonl:2: 3 pairs among its first 3 passages, more than "
                                          r"data.max_pairs=2: set --config.data.max_pairs=3"):
      training_set.compile_training_set(train, docs, queries, tmp_path, nway=3, max_pairs=2, skip_bad_lines=skip,
                                    progress=False)
  compiled = training_set.compile_training_set(train, docs, queries, tmp_path, nway=3, max_pairs=3, progress=False)
  np.testing.assert_array_equal(compiled.targets["pair_mask"], [[1, 0, 0], [1, 1, 1]])


def test_training_line_without_teacher_scores_names_its_line(tmp_path, data):
  docs = store.open_store(data.paths.collection, tmp_path, data.tokenizer, "docs", progress=False)
  queries = store.open_store(data.paths.queries, tmp_path, data.tokenizer, "queries", progress=False)
  train = tmp_path / "train.jsonl"
  train.write_text('["q0", ["1", 1.0], ["2", 0.5]]\n["q1", "1", "2"]\n["q2", ["4", 2.0], ["5", 1.0]]\n')
  with pytest.raises(FormatError, match=r"train.jsonl:2: no teacher scores"):
    training_set.compile_training_set(train, docs, queries, tmp_path, nway=2, max_pairs=1, progress=False)
  skipped = []
  compiled = training_set.compile_training_set(train, docs, queries, tmp_path, nway=2, max_pairs=1,
                                           skip_bad_lines=True, on_skip=skipped.append, progress=False)
  assert [e.line for e in skipped] == [2]
  np.testing.assert_array_equal(compiled.query_row, queries.rows(["q0", "q2"]))


def test_nway_beyond_every_line_warns_with_the_counts(tmp_path, data, caplog):
  docs = store.open_store(data.paths.collection, tmp_path, data.tokenizer, "docs", progress=False)
  queries = store.open_store(data.paths.queries, tmp_path, data.tokenizer, "queries", progress=False)
  train = tmp_path / "train.jsonl"
  train.write_text('["q0", ["1", 1.0], ["2", 0.5]]\n["q1", ["3", 1.0], ["4", 0.5], ["5", 0.1]]\n')
  expected = ("data.nway=6 but the training lines have at most 3 passages (mean 2.5): 58% of the slots are "
              "padding (--config.data.nway=3 would hold every passage)")
  for _ in range(2):  # compiled, then reused
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=training_set.__name__):
      training_set.compile_training_set(train, docs, queries, tmp_path, nway=6, max_pairs=1, progress=False)
    assert [r.getMessage() for r in caplog.records].count(expected) == 1, caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=training_set.__name__):
    training_set.compile_training_set(train, docs, queries, tmp_path, nway=3, max_pairs=1, progress=False)
  assert "padding" not in caplog.text


def test_compiled_training_set_is_reused(data, monkeypatch):
  _iterator(data)

  def no_compile(*args, **kwargs):
    raise AssertionError("the training lines were compiled again")

  monkeypatch.setattr(training_set, "_compile", no_compile)
  assert _line_ids(next(_iterator(data))) == _line_ids(next(_iterator(data)))


def test_training_loop_reads_the_demo_through_the_pipeline(tmp_path):
  from pairdistill_jax import paths as paths_lib
  from pairdistill_jax.data.tokenization import student_tokenizer

  config = _config()
  config.data.update(nway=8, max_pairs=4)
  demo.ensure_demo_data(config, tmp_path)
  paths = paths_lib.data_paths(config, tmp_path)
  batches = pipeline.train_iterator(config, paths, student_tokenizer(config.model, paths.tokenizer), start_step=2)
  batch = next(batches)
  assert batch["d_ids"].shape == (BATCH, 8, config.model.doc_maxlen)
  assert batch["q_ids"].shape == (BATCH, config.model.query_maxlen)
  assert batch["pair_mask"].shape == (BATCH, 4) and batch["pair_mask"].any()
  assert batches.get_state()["step"] == 3
