"""What an evaluation runs on (`config.eval`; paths may contain `{workdir}`):

  format='tsv'   MS MARCO / LoTTE: collection.tsv, a queries .tsv, and qrels as TREC (`qid 0 docid rel`),
                 BEIR-style .tsv, or LoTTE qas .jsonl (`answer_pids` are the relevant passages)
  format='beir'  collection = the dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; the
                 queries / qrels fields override those paths); documents whose id equals the query id are
                 never retrieved (BEIR's convention; eval.drop_self says otherwise for either format)
Collections and queries may be any format formats.text_source reads (TSV files, BEIR files or directories).
Judged queries without a text and relevant documents outside the collection are counted in a warning (they
score 0); qrels that no query text or no collection document matches are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping

import ml_collections

from pairdistill_jax import paths
from pairdistill_jax.data import formats
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.retrieval import corpus, metrics

FORMATS = ("tsv", "beir")
DROP_SELF = {"auto": None, "true": True, "false": False}  # eval.drop_self; None: as the format says

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalData:
  """What to evaluate on: `queries` are the judged queries that have a text."""

  collection: dict[str, str]
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]
  drop_self: bool


def check_eval_config(eval_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the `eval.*` field to change."""
  if eval_cfg.format not in FORMATS:
    raise ConfigError(f"eval.format must be one of {FORMATS}, got {eval_cfg.format!r}")
  needed = ("collection",) if eval_cfg.format == "beir" else ("collection", "queries", "qrels")
  for field in needed:
    if not eval_cfg[field]:
      raise ConfigError(f"eval.{field} is empty: set --config.eval.{field}=PATH")
  for field in ("k", "batch_size", "chunk_size", "nprobe", "faiss_depth"):
    if eval_cfg[field] < 1:
      raise ConfigError(f"eval.{field} must be >= 1, got {eval_cfg[field]}")
  if eval_cfg.vector_dtype not in corpus.VECTOR_DTYPES:
    raise ConfigError(f"eval.vector_dtype must be one of {corpus.VECTOR_DTYPES}, got {eval_cfg.vector_dtype!r}")
  if str(eval_cfg.drop_self).lower() not in DROP_SELF:
    raise ConfigError(f"eval.drop_self must be one of {tuple(DROP_SELF)}, got {eval_cfg.drop_self!r}")
  metrics.parse_metrics(eval_cfg.metrics)


def _read_lotte_qas(path: pathlib.Path) -> dict[str, dict[str, int]]:
  """LoTTE qas.jsonl (`qid`, `answer_pids`) -> qrels with every answer passage relevant."""
  qrels = {}
  for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
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


def _beir_paths(eval_cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[pathlib.Path, ...]:
  """(collection, queries, qrels): the dataset directory (or its corpus.jsonl), and the files beside it
  unless eval.queries / eval.qrels name others."""
  collection = paths.input_path(eval_cfg.collection, workdir)
  root = collection.parent if collection.is_file() else collection
  queries = paths.input_path(eval_cfg.queries, workdir) if eval_cfg.queries else root / "queries.jsonl"
  qrels = paths.input_path(eval_cfg.qrels, workdir) if eval_cfg.qrels else root / "qrels" / f"{eval_cfg.split}.tsv"
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


def load_data(eval_cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, title_separator: str) -> EvalData:
  """Reads the collection (titles joined to texts with `title_separator`), the judged queries and the qrels
  that `config.eval` names; collection and queries may be TSV files or BEIR (formats.text_source).

  Judged queries without a text and relevant documents outside the collection are counted in a warning (they
  score 0); a ValueError refuses qrels that no query text or no collection document matches.
  """
  workdir = pathlib.Path(workdir)
  if eval_cfg.format == "beir":
    corpus_path, queries_path, qrels_path = _beir_paths(eval_cfg, workdir)
  else:
    corpus_path, queries_path, qrels_path = (paths.input_path(eval_cfg[field], workdir)
                                             for field in ("collection", "queries", "qrels"))
  collection = formats.text_source(corpus_path, "docs", title_separator=title_separator).read()
  all_queries = formats.text_source(queries_path, "queries", split=eval_cfg.split).read()
  qrels = _read_qrels(qrels_path)
  queries = _judged_queries(all_queries, qrels, queries_path, qrels_path)
  _check_relevant_documents(collection, qrels, corpus_path, qrels_path)
  _log.info("Evaluation data: %d documents (%s), %d judged queries (%s)", len(collection), corpus_path,
            len(queries), qrels_path)
  drop_self = DROP_SELF[str(eval_cfg.drop_self).lower()]
  drop_self = eval_cfg.format == "beir" if drop_self is None else drop_self
  return EvalData(collection, queries, qrels, drop_self=drop_self)
