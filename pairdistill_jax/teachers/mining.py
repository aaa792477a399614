"""--mode=mine: the top-k passages of every training query, retrieved with a student, as a TREC run.

The retriever is `config.mine.model` when set (a workdir of ours, a stanford ColBERT or an HF /
sentence-transformers bi-encoder directory), else the workdir's own latest checkpoint, else the model the
config starts from (`init.checkpoint`, then `init.pretrained`). The corpus embeddings are kept in
MINE_DIR/corpus (resumable); the run is skipped when the one on disk came from the same model and settings.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import time

import jax
import ml_collections

from pairdistill_jax import checkpoint, config_lib, distributed, io, paths
from pairdistill_jax.data import formats
from pairdistill_jax.retrieval import encoders, retrieve
from pairdistill_jax.retrieval.encoders import Encoder

_log = logging.getLogger(__name__)


CORPUS_DIR = "corpus"  # the collection's embeddings, beside the run


def corpus_location(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, run: pathlib.Path) -> pathlib.Path:
  """Where mining keeps the collection's embeddings: mine.corpus_dir, else beside the run."""
  return paths.resolve_path(config.mine.corpus_dir, workdir) if config.mine.corpus_dir else run.parent / CORPUS_DIR


def keeps_corpus(config: ml_collections.ConfigDict) -> bool:
  """mine.keep_corpus, or a retriever teacher that is the mining model and will reuse the vectors."""
  pointwise = config.teacher.pointwise
  return config.mine.keep_corpus or (pointwise.scorer == "retriever" and not pointwise.model)


@dataclasses.dataclass
class Mined:
  path: pathlib.Path
  num_queries: int
  num_docs: int
  model: str
  seconds: float
  skipped: bool = False


def student_encoder(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, model: str = "", *,
                    query_maxlen: int = 0, doc_maxlen: int = 0, field: str = "mine.model") -> Encoder:
  """The retriever named by `model`, else the workdir's checkpoint, else the config's initial weights."""
  if not model:
    try:
      return encoders.from_trained(checkpoint.load_trained(workdir), query_maxlen=query_maxlen,
                                   doc_maxlen=doc_maxlen)
    except FileNotFoundError:
      field, model = paths.init_source(config)
      if not field:
        raise FileNotFoundError(
            f"nothing to retrieve with: {workdir} holds no checkpoint and the config starts from random "
            f"weights; train first, or set --config.mine.model (or init.checkpoint / init.pretrained) to a "
            f"model directory") from None
  if not pathlib.Path(model).is_dir():
    raise FileNotFoundError(f"{field}={model!r} is not a local directory (nothing is downloaded at run time)")
  if paths.is_workdir(model):
    return encoders.from_trained(checkpoint.load_trained(model), query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
  return encoders.from_model_dir(model, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen, dtype=config.model.dtype,
                                attention=config.model.attention)


def mine(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, queries_path: str,
         collection_path: str) -> Mined:
  """Retrieves `config.mine.k` passages per query of `queries_path` from `collection_path` (TSV files or BEIR,
  read with data.split and data.title_separator); writes the run."""
  mine_cfg = config.mine
  start = time.perf_counter()
  out = paths.resolve_path(mine_cfg.output, workdir)
  queries_source = config_lib.data_source(config, queries_path, "queries")
  collection_source = config_lib.data_source(config, collection_path, "docs")
  encoder = student_encoder(config, workdir, mine_cfg.model, query_maxlen=mine_cfg.query_maxlen,
                            doc_maxlen=mine_cfg.doc_maxlen, field="mine.model")
  settings = {"model": encoder.name, "fingerprint": encoder.fingerprint, "queries": str(queries_path),
              "collection": str(collection_path), "queries_read": queries_source.settings(),
              "collection_read": collection_source.settings(), "query_maxlen": encoder.tokenizer.query_maxlen,
              **{k: mine_cfg[k]
                 for k in ("k", "index", "nprobe", "faiss_depth", "exact_max_tokens", "vector_dtype")}}
  if distributed.process_0_decides(io.read_json(io.sidecar(out)) == settings and out.exists()):
    _log.info("Mining: %s is up to date (same model and settings); skipped", out)
    return Mined(out, -1, -1, encoder.name, 0.0, skipped=True)
  collection, queries = collection_source.read(), queries_source.read()
  _log.info("Mining the top %d of %d queries (%s) over %d passages (%s) with %s", mine_cfg.k, len(queries),
            queries_path, len(collection), collection_path, encoder.name)
  corpus_dir = corpus_location(config, workdir, out)
  retrieved = retrieve.retrieve(encoder, collection, queries, mine_cfg, corpus_dir,
                                query_block=mine_cfg.query_block)
  if jax.process_index() == 0:
    out.parent.mkdir(parents=True, exist_ok=True)
    formats.write_run(out, retrieved.run, tag="pairdistill-mine")
    io.write_json(io.sidecar(out), settings)
  distributed.barrier("mined run written")
  if keeps_corpus(config):
    _log.info("Keeping %s for the retriever teacher (scoring deletes it unless mine.keep_corpus)", corpus_dir)
  elif jax.process_index() == 0:
    shutil.rmtree(corpus_dir, ignore_errors=True)
  seconds = time.perf_counter() - start
  _log.info("Mined %s in %.1f s (%s)", out, seconds,
            ", ".join(f"{k} {v:.1f} s" for k, v in retrieved.seconds.items()))
  return Mined(out, len(queries), len(collection), encoder.name, seconds)

