"""Evaluation: encode the collection and the judged queries, search, write the TREC run and metrics.json.

`config.eval` says what to evaluate on (paths may contain `{workdir}`):
  format='tsv'   MS MARCO / LoTTE: collection.tsv, a queries .tsv, and qrels as TREC (`qid 0 docid rel`),
                 BEIR-style .tsv, or LoTTE qas .jsonl (`answer_pids` are the relevant passages)
  format='beir'  collection = the dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; the
                 queries / qrels fields override those paths); documents whose id equals the query id are
                 never retrieved (BEIR's convention)
Outputs go to WORKDIR/eval/: corpus/ (the resumable embeddings), run.trec, metrics.json. Only process 0
searches and writes; the others help encode the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from pairdistill_jax.data import formats
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.retrieval import corpus, encoders, metrics, search
from pairdistill_jax.retrieval.encoders import Encoder

if TYPE_CHECKING:
  from pairdistill_jax.checkpoint import TrainedModel

EVAL_DIR = "eval"
RUN_FILE = "run.trec"
METRICS_FILE = "metrics.json"
FORMATS = ("tsv", "beir")

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalData:
  """What to evaluate on: `queries` are the judged queries that have a text."""

  collection: dict[str, str]
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]
  drop_self: bool


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  name: str
  num_queries: int
  num_docs: int
  index: str
  seconds: dict[str, float]
  out_dir: pathlib.Path

  def table(self) -> str:
    title = (f"{self.name}: {self.num_queries} queries, {self.num_docs} documents, {self.index} search, "
             f"{self.seconds['total']:.1f} s (run and metrics in {self.out_dir})")
    return metrics.format_table(self.metrics, title)


def resolve_path(template: str, workdir: str | pathlib.Path) -> pathlib.Path:
  """A config path that may name {workdir}."""
  return pathlib.Path(template.format(workdir=workdir))


def check_eval_config(e: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `eval.*` field to change."""
  if e.format not in FORMATS:
    raise ValueError(f"eval.format must be one of {FORMATS}, got {e.format!r}")
  needed = ("collection",) if e.format == "beir" else ("collection", "queries", "qrels")
  for field in needed:
    if not e[field]:
      raise ValueError(f"eval.{field} is empty: set --config.eval.{field}=PATH")
  for field in ("k", "batch_size", "chunk_size", "nprobe", "faiss_depth"):
    if e[field] < 1:
      raise ValueError(f"eval.{field} must be >= 1, got {e[field]}")
  metrics.parse_metrics(e.metrics)


def _read_lotte_qas(path: pathlib.Path) -> dict[str, dict[str, int]]:
  """LoTTE qas.jsonl (`qid`, `answer_pids`) -> qrels with every answer passage relevant."""
  qrels = {}
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      qrels[str(row["qid"])] = {str(pid): 1 for pid in row["answer_pids"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise formats.FormatError(path, number, f"expected a JSON object with qid and answer_pids ({e})") from None
  return qrels


def _read_qrels(path: pathlib.Path) -> dict[str, dict[str, int]]:
  return _read_lotte_qas(path) if path.suffix == ".jsonl" else formats.read_qrels(path)


def _beir_paths(e: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[pathlib.Path, ...]:
  root = resolve_path(e.collection, workdir)
  corpus_path = root if root.is_file() else root / "corpus.jsonl"
  root = corpus_path.parent
  queries = resolve_path(e.queries, workdir) if e.queries else root / "queries.jsonl"
  qrels = resolve_path(e.qrels, workdir) if e.qrels else root / "qrels" / f"{e.split}.tsv"
  return corpus_path, queries, qrels


def load_data(e: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> EvalData:
  """Reads the collection, the judged queries and the qrels that `config.eval` names."""
  workdir = pathlib.Path(workdir)
  if e.format == "beir":
    corpus_path, queries_path, qrels_path = _beir_paths(e, workdir)
    collection, all_queries = formats.read_beir_corpus(corpus_path), formats.read_beir_queries(queries_path)
  else:
    corpus_path, queries_path, qrels_path = (resolve_path(e[f], workdir) for f in ("collection", "queries", "qrels"))
    collection, all_queries = formats.read_collection(corpus_path), formats.read_queries(queries_path)
  qrels = _read_qrels(qrels_path)
  queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
  if len(queries) < len(qrels):
    _log.warning("%d judged queries of %s have no text in %s; they count as 0 in every metric",
                 len(qrels) - len(queries), qrels_path, queries_path)
  if not queries:
    raise ValueError(f"no query of {qrels_path} is in {queries_path}: do the files belong together?")
  _log.info("Evaluation data: %d documents (%s), %d judged queries (%s)", len(collection), corpus_path,
            len(queries), qrels_path)
  return EvalData(collection, queries, qrels, drop_self=e.format == "beir")


def _search_options(e: ml_collections.ConfigDict) -> search.SearchOptions:
  return search.SearchOptions(index=e.index, nprobe=e.nprobe, faiss_depth=e.faiss_depth,
                              exact_max_tokens=e.exact_max_tokens)


def hits_to_run(qids: list[str], doc_ids: list[str], scores_QxK: np.ndarray, ids_QxK: np.ndarray, k: int,
                drop_self: bool) -> dict[str, dict[str, float]]:
  """{qid: {docid: score}} of each query's best `k` hits (without the query's own id when `drop_self`)."""
  run = {}
  for qid, scores, ids in zip(qids, scores_QxK, ids_QxK):
    scored = {doc_ids[i]: float(s) for s, i in zip(scores, ids) if i >= 0}
    if drop_self:
      scored.pop(qid, None)
    run[qid] = dict(metrics.ranked(scored)[:k])
  return run


@dataclasses.dataclass
class Retrieved:
  """The run as a stream of (qid, {docid: score}) (empty off process 0), the index kind, seconds per stage.

  Iterating `run` encodes and searches the queries block by block; `seconds` fills in as it goes.
  """

  run: Iterator[tuple[str, dict[str, float]]]
  index: str
  seconds: dict[str, float]


def retrieve(encoder: Encoder, collection: Mapping[str, str], queries: Mapping[str, str],
             e: ml_collections.ConfigDict, corpus_dir: str | pathlib.Path, *, drop_self: bool = False,
             query_block: int = 16_384) -> Retrieved:
  """Encodes the collection (every process helps; resumable in corpus_dir) and builds its index; the run
  then streams from process 0, `query_block` queries encoded and searched at a time (the best `e.k` each),
  so 800k training queries never sit in memory at once."""
  start = time.perf_counter()
  doc_ids = list(collection)
  store = corpus.encode_corpus(encoder, [collection[d] for d in doc_ids], corpus_dir,
                               batch_size=e.batch_size, chunk_size=e.chunk_size)
  options = _search_options(e)
  seconds = {"encode_corpus": time.perf_counter() - start}
  if jax.process_index() != 0:
    return Retrieved(iter(()), options.resolve(store), seconds)
  started = time.perf_counter()
  searcher = search.Searcher(store, options, encoder.mesh)
  seconds.update(index=time.perf_counter() - started, encode_queries=0.0, search=0.0)

  def stream() -> Iterator[tuple[str, dict[str, float]]]:
    qids = list(queries)
    for begin in range(0, len(qids), query_block):
      block = qids[begin:begin + query_block]
      started = time.perf_counter()
      encoded = encoder.encode_queries([queries[q] for q in block], e.batch_size)
      searched = time.perf_counter()
      scores, ids = searcher.search(encoded, e.k + int(drop_self))
      seconds["encode_queries"] += searched - started
      seconds["search"] += time.perf_counter() - searched
      yield from hits_to_run(block, doc_ids, scores, ids, e.k, drop_self).items()

  return Retrieved(stream(), searcher.kind, seconds)


def evaluate(encoder: Encoder, data: EvalData, e: ml_collections.ConfigDict, out_dir: str | pathlib.Path,
             *, extra: Mapping[str, Any] | None = None) -> EvalResult:
  """Encodes, searches, writes OUT_DIR/run.trec and metrics.json; returns the metrics (empty off process 0)."""
  out_dir = pathlib.Path(out_dir)
  start = time.perf_counter()
  retrieved = retrieve(encoder, data.collection, data.queries, e, out_dir / "corpus", drop_self=data.drop_self)
  run = dict(retrieved.run)
  seconds, index = retrieved.seconds, retrieved.index
  if jax.process_index() != 0:
    return EvalResult({}, encoder.name, len(data.qrels), len(data.collection), index, dict(seconds, total=0.0),
                      out_dir)
  formats.write_run(out_dir / RUN_FILE, run)
  values = metrics.compute_metrics(run, data.qrels, e.metrics)
  seconds["total"] = time.perf_counter() - start
  result = EvalResult(values, encoder.name, len(data.qrels), len(data.collection), index, seconds, out_dir)
  with formats.atomic_write(out_dir / METRICS_FILE) as f:
    json.dump({"metrics": values, "model": encoder.name, "queries": result.num_queries,
               "documents": result.num_docs, "index": index, "k": e.k, "seconds": seconds,
               "run": RUN_FILE, **(extra or {})}, f, indent=2)
  return result


def evaluate_params(config: ml_collections.ConfigDict, bert_config: BertConfig, params: Any,
                    tokenizer_dir: str | pathlib.Path, workdir: str | pathlib.Path, *,
                    step: int | None = None) -> dict[str, float]:
  """Evaluates student parameters on `config.eval` into WORKDIR/eval/; returns {metric: value}.

  For the training loop's periodic dev evaluation: call it on every process (they share the encoding).
  """
  e = config.eval
  check_eval_config(e)
  encoder = encoders.from_params(config.model, bert_config, params, tokenizer_dir, query_maxlen=e.query_maxlen,
                                 doc_maxlen=e.doc_maxlen, name=config.model.kind)
  result = evaluate(encoder, load_data(e, workdir), e, pathlib.Path(workdir) / EVAL_DIR, extra={"step": step})
  return result.metrics


def evaluate_trained(trained: TrainedModel, eval_config: ml_collections.ConfigDict,
                     workdir: str | pathlib.Path) -> EvalResult:
  """Evaluates a workdir's trained model (the model of its own config) on the data of `eval_config`."""
  check_eval_config(eval_config)
  encoder = encoders.from_trained(trained, query_maxlen=eval_config.query_maxlen,
                                  doc_maxlen=eval_config.doc_maxlen)
  return evaluate(encoder, load_data(eval_config, workdir), eval_config, pathlib.Path(workdir) / EVAL_DIR,
                  extra={"step": trained.step})


def evaluate_model_dir(model_dir: str | pathlib.Path, eval_config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path, *, pooling: str | None = None) -> EvalResult:
  """Evaluates an imported stanford ColBERT / HF / sentence-transformers directory without training."""
  check_eval_config(eval_config)
  encoder = encoders.from_model_dir(model_dir, pooling=pooling, query_maxlen=eval_config.query_maxlen,
                                    doc_maxlen=eval_config.doc_maxlen)
  return evaluate(encoder, load_data(eval_config, workdir), eval_config, pathlib.Path(workdir) / EVAL_DIR,
                  extra={"model_dir": str(model_dir)})
