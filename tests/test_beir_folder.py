"""A BEIR folder as data.collection / data.queries: config validation, and mine -> score -> train by the CLI
on a small BEIR folder made from the demo's data, with only the train split's queries."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import data_helpers

from configs import colbert
from pairdistill_jax import config_lib, io
from pairdistill_jax.data import formats

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_DOCS, NUM_TRAIN, NUM_TEST = 40, 6, 2


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> pathlib.Path:
  """A BEIR folder made from the demo's data (data_helpers.beir_from_demo)."""
  return data_helpers.beir_from_demo(tmp_path_factory.mktemp("beir") / "beir_demo", NUM_DOCS, NUM_TRAIN, NUM_TEST)


def _config(tmp_path, **data):
  (tmp_path / "train.jsonl").write_text('["q0", "p0"]\n')
  config = colbert.get_config("demo")
  config.data.update(dict(demo=False, train=str(tmp_path / "train.jsonl")), **data)
  return config


def test_validate_accepts_beir_folders_and_names_other_paths(beir_dir, tmp_path):
  config_lib.validate(_config(tmp_path, collection=str(beir_dir), queries=str(beir_dir)), 1)
  config_lib.validate(_config(tmp_path, collection=str(beir_dir / "corpus.jsonl"),
                              queries=str(beir_dir / "queries.jsonl")), 1)
  (tmp_path / "collection.csv").write_text("1,a\n")
  for data, message in [
      (dict(collection=str(tmp_path), queries=str(beir_dir)), f"data.collection: {tmp_path}: a directory without "
                                                              "corpus.jsonl; expected a collection .tsv file"),
      (dict(collection=str(tmp_path / "collection.csv"), queries=str(beir_dir)), "unknown collection format"),
      (dict(collection=str(beir_dir), queries=str(beir_dir), split="dev"),
       f"data.queries: {beir_dir}: no qrels/dev.tsv to restrict its queries to split 'dev' (splits here: test, "
       "train)"),
  ]:
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(_config(tmp_path, **data), 1)
    assert message in str(info.value)


def _run_main(*args, workdir):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_mine_score_and_train_from_a_beir_folder(beir_dir, minilm_dir, tmp_path):
  """MiniLM mines and (as the retriever teacher) scores the train queries; a tiny random ColBERT trains."""
  train_qids = list(formats.read_qrels(beir_dir / "qrels" / "train.tsv"))
  common = ["--config=configs/colbert.py:demo,batch_size=4,steps=3", "--config.data.demo=False",
            f"--config.data.collection={beir_dir}", f"--config.data.queries={beir_dir}",
            f"--config.data.store_dir={tmp_path / 'stores'}",
            f"--config.init.tokenizer={minilm_dir}", f"--config.mine.model={minilm_dir}", "--config.mine.k=20",
            "--config.teacher.top_n=20"]
  _run_main(*common, "--mode=mine", workdir=tmp_path)
  run = formats.read_run(tmp_path / "mine" / "run.trec")
  assert sorted(run) == sorted(train_qids) and all(len(docs) == 20 for docs in run.values())
  sidecar = json.loads(io.sidecar(tmp_path / "mine" / "run.trec").read_text())
  assert sidecar["queries_read"] == {"format": "beir", "split": "train"}
  assert sidecar["collection_read"] == {"format": "beir", "title_separator": " | "}

  _run_main(*common, "--mode=score", workdir=tmp_path)
  lines = tmp_path / "score" / "train.jsonl"
  examples = list(formats.read_training_lines(lines))
  assert [e.qid for e in examples] == list(run) and all(len(e.pids) == 8 and e.pairs for e in examples)

  trained = _run_main(*common, f"--config.data.train={lines}", "--config.optim.warmup_steps=1",
                      "--config.train.log_every=1", workdir=tmp_path)
  summary = json.loads(next(l for l in trained.stdout.splitlines() if l.startswith("SUMMARY "))[len("SUMMARY "):])
  assert summary["steps"] == 3
  stores = sorted(p.name for p in (tmp_path / "stores").iterdir())
  assert [name.split(".")[:2] for name in stores] == [["beir_demo", "docs"], ["beir_demo", "queries"],
                                                       ["train", "jsonl"]]


def test_evaluate_init_ranks_as_the_cut_transformers_model(beir_dir, minilm_dir, tmp_path):
  """`--mode=evaluate --init`: the student the config starts from (MiniLM cut to layers 0 and 5, mean pooling,
  normalised, one tower), before training; its run ranks each test query's documents as the cut PyTorch model
  does."""
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  _run_main("--config=configs/dpr.py:scifact,layers=2", f"--config.eval.collection={beir_dir}",
            f"--config.data.collection={beir_dir}", f"--config.data.queries={beir_dir}",
            "--config.eval.doc_maxlen=128", "--mode=evaluate", "--init", workdir=tmp_path)
  record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert record["init"]["layers"] == "2" and record["title_separator"] == " " and record["model"] == "dpr@init"
  run = formats.read_run(tmp_path / "eval" / "run.trec")

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  bert = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  bert.encoder.layer = torch.nn.ModuleList([bert.encoder.layer[i] for i in (0, 5)])

  def encode(texts, max_length):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
      hidden = bert(**batch)[0]
    mask = batch["attention_mask"][..., None]
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

  corpus = {d["_id"]: f"{d['title']} {d['text']}" if d["title"] else d["text"]
            for d in _jsonl(beir_dir / "corpus.jsonl")}
  queries = {q["_id"]: q["text"] for q in _jsonl(beir_dir / "queries.jsonl")}
  doc_ids = list(corpus)
  d_NxH = encode([corpus[d] for d in doc_ids], 128)
  for qid in formats.read_qrels(beir_dir / "qrels" / "test.tsv"):
    scores = d_NxH @ encode([queries[qid]], 32)[0]
    expected = [doc_ids[i] for i in np.argsort(-scores, kind="stable") if doc_ids[i] != qid][:5]
    assert list(run[qid])[:5] == expected
