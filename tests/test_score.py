"""--mode=score: teacher scores vs PyTorch `transformers`, the line format, device-count independence, resume."""

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import colbert
from pairdistill_jax import config_lib, io
from pairdistill_jax.data import formats
from pairdistill_jax.teachers import rounds, score

WORDS = ("protein cell gene cancer patients study results effect treatment risk water energy model data system "
         "network learning query passage document ranking vector history city river music film team season").split()
N_QUERIES, N_PASSAGES, CANDIDATES = 10, 40, 12


def _hf_classifier(directory: pathlib.Path, tokenizer_dir: pathlib.Path, num_labels: int, seed: int) -> None:
  torch.manual_seed(seed)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
  transformers.BertForSequenceClassification(config).eval().save_pretrained(directory)
  tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def task(tmp_path_factory, minilm_dir):
  """A small collection, queries, a run of 12 candidates per query, and random HF teachers."""
  root = tmp_path_factory.mktemp("score")
  rng = np.random.default_rng(0)
  text = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
  collection = {str(100 + p): text(int(rng.integers(5, 40))) for p in range(N_PASSAGES)}
  queries = {f"q{q}": text(int(rng.integers(2, 6))) for q in range(N_QUERIES)}
  run = {qid: {pid: float(rng.normal()) for pid in rng.choice(list(collection), CANDIDATES, replace=False)}
         for qid in queries}
  formats.write_collection(root / "collection.tsv", collection)
  formats.write_queries(root / "queries.tsv", queries)
  formats.write_run(root / "run.trec", run)
  _hf_classifier(root / "mono", minilm_dir, 1, seed=0)
  _hf_classifier(root / "duo", minilm_dir, 2, seed=1)
  return root, collection, queries, run


def _config(root: pathlib.Path, out: str) -> ml_collections.ConfigDict:
  c = colbert.get_config("demo")
  c.teacher.update(run=str(root / "run.trec"), output=out, top_n=CANDIDATES, nway=8, topk=6, max_distance=2,
                   n_pairs=4, chunk_queries=3, bucket_multiple=64)
  c.teacher.pointwise.update(scorer="cross_encoder", model=str(root / "mono"), max_length=64, dtype="float32",
                             batch_per_device=4)
  c.teacher.pairwise.update(scorer="duobert", model=str(root / "duo"), max_length=96, dtype="float32",
                            batch_per_device=2)
  return c


def _score(task, out_name, devices=None, **overrides):
  root = task[0]
  config = _config(root, str(root / out_name))
  for key, value in overrides.items():
    config.teacher[key] = value
  return score.score(config, root, queries_path=str(root / "queries.tsv"),
                     collection_path=str(root / "collection.tsv"), devices=devices)


@pytest.fixture(scope="module")
def scored(task):
  return _score(task, "all_devices.jsonl")


def test_lines_match_torch_teachers_and_the_format(task, scored, minilm_dir):
  root, collection, queries, run = task
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  mono = transformers.BertForSequenceClassification.from_pretrained(root / "mono").eval()
  duo = transformers.BertForSequenceClassification.from_pretrained(root / "duo").eval()
  raw_lines = scored.path.read_text().splitlines()
  examples = list(formats.read_training_lines(scored.path))
  assert [e.qid for e in examples] == list(run)  # the run's order
  for raw, example in zip(raw_lines, examples):
    row = json.loads(raw)
    assert row[0] == example.qid and all(isinstance(entry[0], int) for entry in row[1:])  # numeric pids as ints
    assert all(len(entry) == 3 for entry in row[1:])
    candidates = sorted(run[example.qid], key=lambda d: (-run[example.qid][d], d))
    q = queries[example.qid]
    with torch.no_grad():
      enc = tokenizer([q] * len(candidates), [collection[d] for d in candidates], truncation=True,
                      max_length=64, padding=True, return_tensors="pt")
      expected = mono(**enc).logits[:, 0].numpy()
    order = np.argsort(-expected, kind="stable")[:8]
    assert list(example.pids) == [candidates[o] for o in order]
    np.testing.assert_allclose(example.scores, expected[order], atol=1e-4)
    assert list(example.scores) == sorted(example.scores, reverse=True)
    assert len(example.pairs) == 4
    for i, j, logp in example.pairs:
      assert 0 <= i < j <= i + 2 and j < 6  # topk 6, max_distance 2
      ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
      qi, d0, d1 = ids(q), ids(collection[example.pids[i]]), ids(collection[example.pids[j]])
      input_ids = [tokenizer.cls_token_id, *qi, tokenizer.sep_token_id, *d0, tokenizer.sep_token_id, *d1,
                   tokenizer.sep_token_id]
      types = [0] * (len(qi) + 2) + [1] * (len(d0) + len(d1) + 2)
      with torch.no_grad():
        logits = duo(input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([types])).logits[0]
      assert logp == pytest.approx(float(torch.log_softmax(logits.double(), -1)[1]), abs=1e-4)
  # written lines read back and write again byte for byte (the PairDistill format, field for field)
  formats.write_training_lines(root / "rewritten.jsonl", examples)
  assert (root / "rewritten.jsonl").read_text() == scored.path.read_text()
  assert scored.num_pairs == 4 * N_QUERIES and not (root / "all_devices.jsonl.chunks").exists()


def test_one_device_gives_identical_lines(task, scored):
  one = _score(task, "one_device.jsonl", devices=jax.devices()[:1])
  assert one.path.read_bytes() == scored.path.read_bytes()


def test_crash_and_restart_gives_the_same_file_without_redoing_chunks(task, scored, monkeypatch):
  calls = []
  real = score._score_chunk

  def crash_on_third(chunk, *args):
    calls.append(chunk[0][0])
    if len(calls) == 3:
      raise RuntimeError("simulated crash")
    return real(chunk, *args)

  monkeypatch.setattr(score, "_score_chunk", crash_on_third)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _score(task, "resumed.jsonl")
  root = task[0]
  assert sorted(p.name for p in (root / "resumed.jsonl.chunks").iterdir()) == ["000000.jsonl", "000001.jsonl",
                                                                              "manifest.json"]
  assert not (root / "resumed.jsonl").exists()
  calls.clear()
  monkeypatch.setattr(score, "_score_chunk", lambda chunk, *args: calls.append(chunk[0][0]) or real(chunk, *args))
  resumed = _score(task, "resumed.jsonl")
  assert len(calls) == 2  # chunks 2 and 3 of 4 (10 queries, 3 per chunk)
  assert resumed.path.read_bytes() == scored.path.read_bytes()
  calls.clear()
  assert _score(task, "resumed.jsonl").skipped and not calls  # up to date: nothing recomputed


def test_chunks_left_without_a_manifest_are_not_reused(task, scored):
  """A clean-up interrupted after the manifest went: the leftover chunks are stale and must be redone."""
  root = task[0]
  chunks = root / "leftover.jsonl.chunks"
  chunks.mkdir()
  (chunks / "000000.jsonl").write_text('["q0", [100, 1.0, []]]\n')
  assert _score(task, "leftover.jsonl").path.read_bytes() == scored.path.read_bytes()


def test_chunks_of_other_settings_are_refused(task, monkeypatch):
  root = task[0]
  chunks = root / "other.jsonl.chunks"
  chunks.mkdir()
  (chunks / "manifest.json").write_text(json.dumps({"seed": 123}))
  with pytest.raises(ValueError, match="other settings"):
    _score(task, "other.jsonl")
  shutil.rmtree(chunks)


def test_unknown_passage_in_the_run_is_named(task, tmp_path):
  root = task[0]
  bad_run = tmp_path / "run.trec"
  bad_run.write_text("q0 Q0 999999 0 9.0 x\n" + (root / "run.trec").read_text())  # q0 comes first
  with pytest.raises(ValueError, match=r"run.trec: passage '999999' \(query 'q0'\) is not in"):
    _score(task, "bad.jsonl", run=str(bad_run))


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_imported_bi_encoder_as_pointwise_teacher(task, minilm_dir, monkeypatch, scale):
  """A sentence-transformers model as the pointwise teacher: its cosine scores, as sentence-transformers
  computes them, times the teacher scale (default 20, the scale it was trained with: raw cosines give
  nearly uniform softmax targets); no pairs (pairwise.scorer='none'). Each passage is encoded once."""
  import sentence_transformers  # noqa: PLC0415

  from pairdistill_jax.retrieval import corpus  # noqa: PLC0415

  root, collection, queries, run = task
  encoded = []
  encode_chunk = corpus.encode_chunk
  monkeypatch.setattr(corpus, "encode_chunk", lambda enc, texts, *a, **k: (encoded.extend(texts),
                                                                             encode_chunk(enc, texts, *a, **k))[1])
  config = _config(root, str(root / f"bi_encoder_{scale}.jsonl"))
  config.teacher.pointwise.update(scorer="retriever", model=str(minilm_dir), max_length=128, scale=scale)
  config.teacher.pairwise.scorer = "none"
  result = score.score(config, root, queries_path=str(root / "queries.tsv"),
                       collection_path=str(root / "collection.tsv"), student=rounds.student_factory(config, root))
  assert sorted(encoded) == sorted(collection.values())  # once each, not once per (query, passage)
  assert io.read_json(io.sidecar(result.path))["settings"]["pointwise"]["scale"] == (scale or 20.0)
  model = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
  for example in formats.read_training_lines(result.path):
    q_D = model.encode([queries[example.qid]], normalize_embeddings=True)[0]
    p_NxD = model.encode([collection[p] for p in run[example.qid]], normalize_embeddings=True)
    expected = dict(zip(run[example.qid], (scale or 20.0) * (p_NxD @ q_D)))
    best = sorted(expected, key=lambda p: -expected[p])[:8]
    assert list(example.pids) == best and not example.pairs
    np.testing.assert_allclose(example.scores, [expected[p] for p in best], atol=2e-5 * (scale or 20.0))


@pytest.mark.parametrize("scale", [0.0, 5.0])
def test_bi_encoder_as_pairwise_teacher_beside_a_cross_encoder(task, scored, minilm_dir, scale):
  """Two different teachers, each with its own scale: the cross-encoder chooses and scores the entries (as in
  the duoBERT run), the sentence-transformers model gives the pairs: log σ(scale · (cos_i − cos_j)), as
  sentence-transformers computes the cosines (default scale 20)."""
  import sentence_transformers  # noqa: PLC0415

  root, collection, queries, _ = task
  config = _config(root, str(root / f"pairwise_bi_encoder_{scale}.jsonl"))
  config.teacher.pairwise.update(scorer="retriever", model=str(minilm_dir), max_length=128, scale=scale)
  result = score.score(config, root, queries_path=str(root / "queries.tsv"),
                       collection_path=str(root / "collection.tsv"), student=rounds.student_factory(config, root))
  recorded = io.read_json(io.sidecar(result.path))["settings"]["pairwise"]
  assert recorded["scale"] == (scale or 20.0) and recorded["resolved"].startswith("retriever:")
  model = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
  reference = list(formats.read_training_lines(scored.path))
  lines = list(formats.read_training_lines(result.path))
  assert [(x.qid, x.pids, x.scores) for x in lines] == [(x.qid, x.pids, x.scores) for x in reference]
  for example, duo in zip(lines, reference):
    assert [p[:2] for p in example.pairs] == [p[:2] for p in duo.pairs] and example.pairs
    q_D = model.encode([queries[example.qid]], normalize_embeddings=True)[0].astype(np.float64)
    cos = model.encode([collection[p] for p in example.pids], normalize_embeddings=True).astype(np.float64) @ q_D
    expected = [-np.logaddexp(0.0, -(scale or 20.0) * (cos[i] - cos[j])) for i, j, _ in example.pairs]
    np.testing.assert_allclose([lp for *_, lp in example.pairs], expected, atol=2e-5 * (scale or 20.0))


def test_a_pairwise_scale_without_a_retriever_pairwise_teacher_is_refused(task):
  config = _config(task[0], "unused.jsonl")
  config.teacher.pairwise.scale = 5.0
  with pytest.raises(config_lib.ConfigError, match=r"teacher.pairwise.scale=5.0 scales a retriever's margins"):
    score.check_teacher_config(config.teacher)
