"""Evaluation: encode the collection and the judged queries, search, write the TREC run and metrics.json.

`config.eval` says what to evaluate on (retrieval/eval_data.py); titles are joined to texts with
data.title_separator ('auto': as the model's kind does), recorded in metrics.json.
Outputs go to WORKDIR/eval/ (or WORKDIR/eval/NAME/ for --eval_name): corpus/ (the resumable embeddings),
run.trec, metrics.json (the means; per_query: each judged query's values, for significance tests). Only
process 0 searches and writes; the others help encode the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from pairdistill_jax import io, paths, students
from pairdistill_jax.convert.students import import_student
from pairdistill_jax.data import formats
from pairdistill_jax.data.tokenization import load_tokenizer
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.retrieval import encoders, eval_data, metrics, retrieve
from pairdistill_jax.retrieval.encoders import Encoder
from pairdistill_jax.train import state as state_lib

if TYPE_CHECKING:
  from pairdistill_jax.checkpoint import TrainedModel

RUN_FILE = "run.trec"
METRICS_FILE = "metrics.json"

_log = logging.getLogger(__name__)


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


def evaluate(encoder: Encoder, data: eval_data.EvalData, eval_cfg: ml_collections.ConfigDict,
             out_dir: str | pathlib.Path | None, *, workdir: str | pathlib.Path,
             extra: Mapping[str, Any] | None = None) -> EvalResult:
  """Encodes, searches, writes OUT_DIR (None: WORKDIR/eval)/run.trec and metrics.json; returns the metrics
  (empty off process 0). The corpus embeddings go to eval.corpus_dir (its {workdir} is `workdir`), else
  OUT_DIR/corpus.

  The log's first line and metrics.json state every setting that changes the numbers: the encoder's
  (`Encoder.settings`), the search's (`Searcher.settings`: index kind and parameters, stored vector dtype), k,
  and `extra` (e.g. the step, the title separator).
  """
  out_dir = pathlib.Path(out_dir or pathlib.Path(workdir) / paths.EVAL_DIR)
  start = time.perf_counter()
  settings = {**encoder.settings(), "vector_dtype": eval_cfg.vector_dtype, "index": eval_cfg.index, "k": eval_cfg.k,
              "drop_self": data.drop_self, **(extra or {})}
  _log.info("Evaluating %s on %d queries, %d documents: %s", encoder.name, len(data.queries),
            len(data.collection), ", ".join(f"{key}={value!r}" for key, value in settings.items()))
  corpus_dir = paths.resolve_path(eval_cfg.corpus_dir, workdir) if eval_cfg.corpus_dir else out_dir / "corpus"
  retrieved = retrieve.retrieve(encoder, data.collection, data.queries, eval_cfg, corpus_dir, drop_self=data.drop_self)
  run = dict(retrieved.run)
  settings.update(retrieved.search)
  seconds, index = retrieved.seconds, retrieved.search["index"]
  if jax.process_index() != 0:
    return EvalResult({}, encoder.name, len(data.qrels), len(data.collection), index, dict(seconds, total=0.0),
                      out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)  # the corpus may live elsewhere (eval.corpus_dir)
  formats.write_run(out_dir / RUN_FILE, run)
  by_query = metrics.per_query(run, data.qrels, eval_cfg.metrics)
  values = {name: sum(v.values()) / len(data.qrels) for name, v in by_query.items()}
  seconds["total"] = time.perf_counter() - start
  result = EvalResult(values, encoder.name, len(data.qrels), len(data.collection), index, seconds, out_dir)
  io.write_json(out_dir / METRICS_FILE, {"metrics": values, "model": encoder.name, "queries": result.num_queries,
                                         "documents": result.num_docs, **settings, "seconds": seconds, "run": RUN_FILE,
                                         "per_query": by_query})
  return result


def keep_earlier_run(out_dir: str | pathlib.Path) -> pathlib.Path | None:
  """Moves the run.trec and metrics.json of an earlier evaluation in `out_dir` to
  OUT_DIR/earlier/<model>-<time>/ (process 0), so a rerun keeps them; returns where, or None."""
  out_dir = pathlib.Path(out_dir)
  if jax.process_index() != 0 or not (out_dir / METRICS_FILE).is_file():
    return None
  try:
    model = json.loads((out_dir / METRICS_FILE).read_text()).get("model", "model")
  except ValueError:
    model = "unreadable"
  stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((out_dir / METRICS_FILE).stat().st_mtime))
  target = out_dir / "earlier" / f"{re.sub(r'[^A-Za-z0-9_.@-]+', '_', model)}-{stamp}"
  target.mkdir(parents=True, exist_ok=True)
  for name in (RUN_FILE, METRICS_FILE):
    if (out_dir / name).exists():
      (out_dir / name).rename(target / name)
  _log.info("Kept the earlier evaluation (%s) in %s", model, target)
  return target


def evaluate_params(config: ml_collections.ConfigDict, bert_config: BertConfig, params: Any,
                    tokenizer_dir: str | pathlib.Path, workdir: str | pathlib.Path, *,
                    step: int | None = None) -> dict[str, float]:
  """Evaluates student parameters on `config.eval` into WORKDIR/eval/; returns {metric: value}.

  For the training loop's periodic dev evaluation: call it on every process (they share the encoding).
  """
  eval_cfg = config.eval
  eval_data.check_eval_config(eval_cfg)
  encoder = encoders.from_params(config.model, bert_config, params, tokenizer_dir, query_maxlen=eval_cfg.query_maxlen,
                                 doc_maxlen=eval_cfg.doc_maxlen, name=config.model.kind)
  separator = students.title_separator(config.data.title_separator, config.model.kind)
  data = eval_data.load_data(eval_cfg, workdir, title_separator=separator)
  result = evaluate(encoder, data, eval_cfg, None, workdir=workdir,
                    extra={"step": step, "title_separator": separator})
  return result.metrics


def evaluate_trained(trained: TrainedModel, eval_config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     *, title_separator: str = "auto", out_dir: str | pathlib.Path | None = None) -> EvalResult:
  """Evaluates a workdir's trained model (the model of its own config) on the data of `eval_config` into
  `out_dir` (default WORKDIR/eval); 'auto' joins titles as the model's kind does (students.title_separator)."""
  eval_data.check_eval_config(eval_config)
  separator = students.title_separator(title_separator, trained.config.model.kind)
  data = eval_data.load_data(eval_config, workdir, title_separator=separator)
  encoder = encoders.from_trained(trained, query_maxlen=eval_config.query_maxlen,
                                  doc_maxlen=eval_config.doc_maxlen)
  return evaluate(encoder, data, eval_config, out_dir, workdir=workdir,
                  extra={"step": trained.step, "title_separator": separator})


def evaluate_model_dir(model_dir: str | pathlib.Path, eval_config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path, *, pooling: str | None = None, title_separator: str = "auto",
                       out_dir: str | pathlib.Path | None = None, dtype: str = "float32",
                       attention: str = "auto") -> EvalResult:
  """Evaluates an imported stanford ColBERT / HF / sentence-transformers directory without training (encoding in
  `dtype` with the `attention` kernel), into `out_dir` (default WORKDIR/eval); 'auto' joins titles as its kind
  does: ' | ' for stanford ColBERT, ' ' for a bi-encoder (students.title_separator)."""
  eval_data.check_eval_config(eval_config)
  encoder = encoders.from_model_dir(model_dir, pooling=pooling, query_maxlen=eval_config.query_maxlen,
                                    doc_maxlen=eval_config.doc_maxlen, dtype=dtype, attention=attention)
  separator = students.title_separator(title_separator, encoder.kind)
  data = eval_data.load_data(eval_config, workdir, title_separator=separator)
  return evaluate(encoder, data, eval_config, out_dir, workdir=workdir,
                  extra={"model_dir": str(model_dir), "title_separator": separator})


def evaluate_initial(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                     out_dir: str | pathlib.Path | None = None) -> EvalResult:
  """Evaluates the student the config starts from (init.checkpoint / init.pretrained cut to init.layers, new
  parameters such as ColBERT's projection drawn as training draws them), into `out_dir` (default
  WORKDIR/eval): the 'before training' number."""
  eval_cfg = config.eval
  eval_data.check_eval_config(eval_cfg)
  separator = students.title_separator(config.data.title_separator, config.model.kind)
  data = eval_data.load_data(eval_cfg, workdir, title_separator=separator)
  tokenizer_dir = paths.data_paths(config, workdir).tokenizer
  bert_config, pretrained = import_student(config, vocab_size=len(load_tokenizer(tokenizer_dir)))
  model = students.make_student(config.model, bert_config)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.train.seed))  # train.loop's split
  params = jax.device_get(state_lib.init_params(model, config, init_rng))
  field, source = paths.init_source(config)
  if not field:  # as train.start ties a random init
    pretrained = students.get(config.model.kind).tied_random_init(config.model, params)
  params = params | pretrained
  encoder = encoders.from_params(config.model, bert_config, params, tokenizer_dir, query_maxlen=eval_cfg.query_maxlen,
                                 doc_maxlen=eval_cfg.doc_maxlen, name=f"{config.model.kind}@init")
  return evaluate(encoder, data, eval_cfg, out_dir, workdir=workdir,
                  extra={"init": {field or "random": source, "layers": config.init.layers},
                         "title_separator": separator})
