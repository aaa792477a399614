"""Evaluation: encode the collection and the judged queries, search, write the TREC run and metrics.json.

`config.eval` says what to evaluate on (paths may contain `{workdir}`):
  format='tsv'   MS MARCO / LoTTE: collection.tsv, a queries .tsv, and qrels as TREC (`qid 0 docid rel`),
                 BEIR-style .tsv, or LoTTE qas .jsonl (`answer_pids` are the relevant passages)
  format='beir'  collection = the dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; the
                 queries / qrels fields override those paths); documents whose id equals the query id are
                 never retrieved (BEIR's convention)
Collections and queries may be any format formats.text_source reads (TSV files, BEIR files or directories);
titles are joined to texts with data.title_separator ('auto': as the model's kind does), recorded in
metrics.json.
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
  if e.vector_dtype not in corpus.VECTOR_DTYPES:
    raise ValueError(f"eval.vector_dtype must be one of {corpus.VECTOR_DTYPES}, got {e.vector_dtype!r}")
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
  if not qrels:
    raise formats.FormatError(path, 1, "no questions (the file is empty or blank)")
  return qrels


def _read_qrels(path: pathlib.Path) -> dict[str, dict[str, int]]:
  return _read_lotte_qas(path) if path.suffix == ".jsonl" else formats.read_qrels(path)


def _beir_paths(e: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[pathlib.Path, ...]:
  """(collection, queries, qrels): the dataset directory (or its corpus.jsonl), and the files beside it
  unless eval.queries / eval.qrels name others."""
  collection = resolve_path(e.collection, workdir)
  root = collection.parent if collection.is_file() else collection
  queries = resolve_path(e.queries, workdir) if e.queries else root / "queries.jsonl"
  qrels = resolve_path(e.qrels, workdir) if e.qrels else root / "qrels" / f"{e.split}.tsv"
  return collection, queries, qrels


def _judged_queries(all_queries: Mapping[str, str], qrels: metrics.Qrels, queries_path: pathlib.Path,
                    qrels_path: pathlib.Path) -> dict[str, str]:
  """The texts of the queries judged in `qrels`; warns with counts when some have none, refuses when none has."""
  queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
  if not queries:
    raise ValueError(f"none of the {len(qrels)} queries judged in {qrels_path} is in {queries_path}: do the files "
                     "belong together?")
  if len(queries) < len(qrels):
    _log.warning("%d of %d judged queries of %s are not in %s; they count as 0 in every metric",
                 len(qrels) - len(queries), len(qrels), qrels_path, queries_path)
  return queries


def _check_relevant_documents(collection: Mapping[str, str], qrels: metrics.Qrels, corpus_path: pathlib.Path,
                              qrels_path: pathlib.Path) -> None:
  """Warns with counts when documents judged relevant (relevance > 0) are not in the collection; refuses when
  none is, as every metric would be 0."""
  relevant = {docid for judged in qrels.values() for docid, rel in judged.items() if rel > 0}
  if not relevant:
    raise ValueError(f"{qrels_path} judges no document relevant (relevance > 0): every metric would be 0")
  missing = {docid for docid in relevant if docid not in collection}
  if missing == relevant:
    raise ValueError(f"none of the {len(relevant)} relevant documents of {qrels_path} is in the collection "
                     f"{corpus_path}: do the files belong together?")
  if missing:
    affected = sum(any(rel > 0 and docid in missing for docid, rel in judged.items()) for judged in qrels.values())
    _log.warning("%d of %d relevant documents of %s (for %d of %d judged queries) are not in the collection %s; "
                 "they count as not retrieved", len(missing), len(relevant), qrels_path, affected, len(qrels),
                 corpus_path)


def load_data(e: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, title_separator: str) -> EvalData:
  """Reads the collection (titles joined to texts with `title_separator`), the judged queries and the qrels
  that `config.eval` names; collection and queries may be TSV files or BEIR (formats.text_source).

  Judged queries without a text and relevant documents outside the collection are counted in a warning (they
  score 0); a ValueError refuses qrels that no query text or no collection document matches.
  """
  workdir = pathlib.Path(workdir)
  if e.format == "beir":
    corpus_path, queries_path, qrels_path = _beir_paths(e, workdir)
  else:
    corpus_path, queries_path, qrels_path = (resolve_path(e[f], workdir) for f in ("collection", "queries", "qrels"))
  collection = formats.text_source(corpus_path, "docs", title_separator=title_separator).read()
  all_queries = formats.text_source(queries_path, "queries", split=e.split).read()
  qrels = _read_qrels(qrels_path)
  queries = _judged_queries(all_queries, qrels, queries_path, qrels_path)
  _check_relevant_documents(collection, qrels, corpus_path, qrels_path)
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
  """The run as a stream of (qid, {docid: score}) (empty off process 0), the search settings
  (`Searcher.settings`; off process 0 only the index kind), seconds per stage.

  Iterating `run` encodes and searches the queries block by block; `seconds` fills in as it goes.
  """

  run: Iterator[tuple[str, dict[str, float]]]
  search: dict[str, Any]
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
                               batch_size=e.batch_size, chunk_size=e.chunk_size, vector_dtype=e.vector_dtype)
  options = _search_options(e)
  seconds = {"encode_corpus": time.perf_counter() - start}
  if jax.process_index() != 0:
    return Retrieved(iter(()), {"index": options.resolve(store)}, seconds)
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

  return Retrieved(stream(), searcher.settings(), seconds)


def evaluate(encoder: Encoder, data: EvalData, e: ml_collections.ConfigDict, out_dir: str | pathlib.Path,
             *, extra: Mapping[str, Any] | None = None) -> EvalResult:
  """Encodes, searches, writes OUT_DIR/run.trec and metrics.json; returns the metrics (empty off process 0).

  The log's first line and metrics.json state every setting that changes the numbers: the encoder's
  (`Encoder.settings`), the search's (`Searcher.settings`: index kind and parameters, stored vector dtype), k,
  and `extra` (e.g. the step, the title separator).
  """
  out_dir = pathlib.Path(out_dir)
  start = time.perf_counter()
  settings = {**encoder.settings(), "vector_dtype": e.vector_dtype, "index": e.index, "k": e.k, **(extra or {})}
  _log.info("Evaluating %s on %d queries, %d documents: %s", encoder.name, len(data.queries),
            len(data.collection), ", ".join(f"{key}={value!r}" for key, value in settings.items()))
  corpus_dir = resolve_path(e.corpus_dir, out_dir.parent) if e.corpus_dir else out_dir / "corpus"
  retrieved = retrieve(encoder, data.collection, data.queries, e, corpus_dir, drop_self=data.drop_self)
  run = dict(retrieved.run)
  settings.update(retrieved.search)
  seconds, index = retrieved.seconds, retrieved.search["index"]
  if jax.process_index() != 0:
    return EvalResult({}, encoder.name, len(data.qrels), len(data.collection), index, dict(seconds, total=0.0),
                      out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)  # the corpus may live elsewhere (eval.corpus_dir)
  formats.write_run(out_dir / RUN_FILE, run)
  values = metrics.compute_metrics(run, data.qrels, e.metrics)
  seconds["total"] = time.perf_counter() - start
  result = EvalResult(values, encoder.name, len(data.qrels), len(data.collection), index, seconds, out_dir)
  with formats.atomic_write(out_dir / METRICS_FILE) as f:
    json.dump({"metrics": values, "model": encoder.name, "queries": result.num_queries,
               "documents": result.num_docs, **settings, "seconds": seconds, "run": RUN_FILE}, f, indent=2)
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
  separator = formats.title_separator(config.data.title_separator, config.model.kind)
  result = evaluate(encoder, load_data(e, workdir, title_separator=separator), e, pathlib.Path(workdir) / EVAL_DIR,
                    extra={"step": step, "title_separator": separator})
  return result.metrics


def evaluate_trained(trained: TrainedModel, eval_config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     *, title_separator: str = "auto") -> EvalResult:
  """Evaluates a workdir's trained model (the model of its own config) on the data of `eval_config`;
  'auto' joins titles as the model's kind does (formats.title_separator)."""
  check_eval_config(eval_config)
  separator = formats.title_separator(title_separator, trained.config.model.kind)
  data = load_data(eval_config, workdir, title_separator=separator)
  encoder = encoders.from_trained(trained, query_maxlen=eval_config.query_maxlen,
                                  doc_maxlen=eval_config.doc_maxlen)
  return evaluate(encoder, data, eval_config, pathlib.Path(workdir) / EVAL_DIR,
                  extra={"step": trained.step, "title_separator": separator})


def evaluate_model_dir(model_dir: str | pathlib.Path, eval_config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path, *, pooling: str | None = None,
                       title_separator: str = "auto") -> EvalResult:
  """Evaluates an imported stanford ColBERT / HF / sentence-transformers directory without training; 'auto'
  joins titles as its kind does: ' | ' for stanford ColBERT, ' ' for a bi-encoder (formats.title_separator)."""
  check_eval_config(eval_config)
  encoder = encoders.from_model_dir(model_dir, pooling=pooling, query_maxlen=eval_config.query_maxlen,
                                    doc_maxlen=eval_config.doc_maxlen)
  separator = formats.title_separator(title_separator, encoder.kind)
  return evaluate(encoder, load_data(eval_config, workdir, title_separator=separator), eval_config,
                  pathlib.Path(workdir) / EVAL_DIR, extra={"model_dir": str(model_dir), "title_separator": separator})


def evaluate_initial(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> EvalResult:
  """Evaluates the student the config starts from (init.checkpoint / init.pretrained cut to init.layers, new
  parameters such as ColBERT's projection drawn as training draws them): the 'before training' number."""
  from pairdistill_jax.convert import students  # noqa: PLC0415 (the training-side import path)
  from pairdistill_jax.data.tokenization import load_tokenizer  # noqa: PLC0415
  from pairdistill_jax.models.students import make_student  # noqa: PLC0415
  from pairdistill_jax.train import state as state_lib  # noqa: PLC0415

  e = config.eval
  check_eval_config(e)
  separator = formats.title_separator(config.data.title_separator, config.model.kind)
  data = load_data(e, workdir, title_separator=separator)
  tokenizer_dir = students.tokenizer_dir(config)
  bert_config, pretrained = students.import_student(config, vocab_size=len(load_tokenizer(tokenizer_dir)))
  model = make_student(config.model, bert_config)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.train.seed))  # train.loop's split
  params = jax.device_get(state_lib.init_params(model, config, init_rng)) | pretrained
  encoder = encoders.from_params(config.model, bert_config, params, tokenizer_dir, query_maxlen=e.query_maxlen,
                                 doc_maxlen=e.doc_maxlen, name=f"{config.model.kind}@init")
  field, source = students.init_source(config)
  return evaluate(encoder, data, e, pathlib.Path(workdir) / EVAL_DIR,
                  extra={"init": {field or "random": source, "layers": config.init.layers},
                         "title_separator": separator})
