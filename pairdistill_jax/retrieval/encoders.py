"""Students ready to encode text on this process's devices: a Flax module, its parameters, its tokenizer.

`from_params` wraps a trained student (its training config's `model`); `from_model_dir` imports a stanford
ColBERT directory, or an HF / sentence-transformers BERT directory read as a bi-encoder with [CLS] or mean
pooling (plus the L2 normalisation that a sentence-transformers `Normalize` module asks for).
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
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from pairdistill_jax.convert import hf_io
from pairdistill_jax.convert.export import ColBERTSettings
from pairdistill_jax.data.tokenization import ColBERTTokenizer, DPRTokenizer, load_tokenizer
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.models.students import DPR, ColBERT, l2_normalize, make_student
from pairdistill_jax.retrieval import devices

if TYPE_CHECKING:
  from pairdistill_jax.checkpoint import TrainedModel

Tokenizer = ColBERTTokenizer | DPRTokenizer
_ST_MODULES = "modules.json"
_ST_CONFIG = "sentence_bert_config.json"
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoder:
  """Encodes token batches with `module.encode_query` / `encode_doc`, rows split over the local devices.

  Attributes:
    kind: 'colbert' (token vectors) or 'dpr' (one vector per text).
    module: the student module (`models.students.ColBERT` or `DPR`).
    params: its parameters (numpy, or jax arrays of any sharding); replicated on the local devices.
    tokenizer: the matching tokenizer; its maxlens are the encoding lengths.
    normalize: L2-normalise DPR vectors (sentence-transformers models with a Normalize module).
    name: a label for logs and run files.
  """

  kind: str
  module: nn.Module
  params: Any
  tokenizer: Tokenizer
  normalize: bool = False
  name: str = "model"
  mesh: jax.sharding.Mesh = dataclasses.field(default_factory=devices.local_mesh, repr=False)
  fingerprint: str = dataclasses.field(init=False)

  def __post_init__(self) -> None:
    if self.kind not in ("colbert", "dpr"):
      raise ValueError(f"kind must be 'colbert' or 'dpr', got {self.kind!r}")
    host_params = host_tree(self.params)
    self.fingerprint = _fingerprint(host_params, self._doc_settings())
    self.params = jax.device_put(host_params, devices.replicated(self.mesh))
    self._encode = jax.jit(self._apply, static_argnums=0)

  def _doc_settings(self) -> dict[str, Any]:
    """Everything besides the weights that changes a document's vectors."""
    settings = {"kind": self.kind, "normalize": self.normalize, "dtype": str(self.module.dtype),
                "tokenizer": type(self.tokenizer).__name__, "doc_maxlen": self.tokenizer.doc_maxlen,
                "vocab": len(self.tokenizer.tokenizer)}
    if isinstance(self.tokenizer, ColBERTTokenizer):
      settings.update(doc_token=self.tokenizer.doc_token, mask_punctuation=self.tokenizer.mask_punctuation)
    if isinstance(self.module, DPR):
      settings.update(pooling=self.module.pooling)
    return settings

  def _apply(self, which: str, params: Any, ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    method = self.module.encode_query if which == "query" else self.module.encode_doc
    out = self.module.apply({"params": params}, ids_BxL, mask_BxL, method=method)
    return l2_normalize(out) if self.normalize else out.astype(np.float32)

  def encode(self, which: str, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
    """float32 vectors of one token batch ('query' or 'doc'); any row count (padded to the devices)."""
    rows = ids_BxL.shape[0]
    padded = devices.round_up(rows, self.mesh.size)
    sharding = devices.row_sharded(self.mesh)
    ids = jax.device_put(devices.pad_rows(ids_BxL, padded), sharding)
    mask = jax.device_put(devices.pad_rows(mask_BxL, padded), sharding)
    return np.asarray(self._encode(which, self.params, ids, mask))[:rows]

  def encode_queries(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """ColBERT: [Q, query_maxlen, dim] (all vectors, [MASK] augmentation included); DPR: [Q, dim].

    Batches are padded to one row count; DPR batches are cut to a bucketed width (ColBERT queries keep
    query_maxlen: every [MASK] position is scored).
    """
    if not texts:
      raise ValueError("no queries to encode")
    rows = min(devices.round_up(batch_size, self.mesh.size), devices.round_up(len(texts), self.mesh.size))
    batches = []
    for start in range(0, len(texts), rows):
      tokens = self.tokenizer.encode_queries(list(texts[start:start + rows]))
      ids_BxL, mask_BxL = tokens["ids"], tokens["mask"]
      if self.kind == "dpr":
        width = devices.width_bucket(int(mask_BxL.sum(1).max()), ids_BxL.shape[1])
        ids_BxL, mask_BxL = ids_BxL[:, :width], mask_BxL[:, :width]
      n = len(ids_BxL)
      batches.append(self.encode("query", devices.pad_rows(ids_BxL, rows), devices.pad_rows(mask_BxL, rows))[:n])
    return np.concatenate(batches)


def host_tree(params: Any) -> Any:
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
  m = model_config
  query_maxlen, doc_maxlen = query_maxlen or m.query_maxlen, doc_maxlen or m.doc_maxlen
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  tokenizer = load_tokenizer(tokenizer_dir)
  if m.kind == "colbert":
    tok = ColBERTTokenizer(tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                           mask_punctuation=m.mask_punctuation, attend_to_mask_tokens=m.attend_to_mask_tokens)
  else:
    tok = DPRTokenizer(tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
  return Encoder(m.kind, make_student(model_config, bert_config), params, tok, name=name)


def from_trained(trained: TrainedModel, *, query_maxlen: int = 0, doc_maxlen: int = 0) -> Encoder:
  """A workdir's trained student (`checkpoint.load_trained`), named kind@step."""
  return from_params(trained.config.model, trained.bert_config, trained.params, trained.tokenizer_dir,
                     query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                     name=f"{trained.config.model.kind}@{trained.step}")


def from_model_dir(directory: str | pathlib.Path, *, pooling: str | None = None, query_maxlen: int = 0,
                   doc_maxlen: int = 0) -> Encoder:
  """A stanford ColBERT directory, or an HF / sentence-transformers BERT directory (bi-encoder).

  For the latter, `pooling` ('cls' or 'mean') overrides the sentence-transformers Pooling config and is
  required when there is none. Maxlens of 0 take the directory's (artifact.metadata, or the
  sentence-transformers max_seq_length for queries and documents alike).
  """
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"model directory {d} does not exist")
  if _is_stanford_colbert(d):
    return _colbert_from_dir(d, query_maxlen, doc_maxlen)
  return _bi_encoder_from_dir(d, pooling, query_maxlen, doc_maxlen)


def _is_stanford_colbert(d: pathlib.Path) -> bool:
  if (d / hf_io.COLBERT_METADATA).is_file():
    return True
  config = d / hf_io.CONFIG
  return config.is_file() and "HF_ColBERT" in (json.loads(config.read_text()).get("architectures") or [])


def _colbert_from_dir(d: pathlib.Path, query_maxlen: int, doc_maxlen: int) -> Encoder:
  bert_config, params, metadata = hf_io.import_colbert(d)
  settings = ColBERTSettings.from_metadata(metadata)
  dim = params["linear"]["kernel"].shape[1]
  query_maxlen, doc_maxlen = query_maxlen or settings.query_maxlen, doc_maxlen or settings.doc_maxlen
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  tokenizer = ColBERTTokenizer(load_tokenizer(d), query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                               mask_punctuation=settings.mask_punctuation,
                               attend_to_mask_tokens=settings.attend_to_mask_tokens,
                               query_token=settings.query_token_id, doc_token=settings.doc_token_id)
  return Encoder("colbert", ColBERT(bert_config, dim=dim), params, tokenizer, name=d.name)


@dataclasses.dataclass(frozen=True)
class _STLayout:
  transformer_dir: pathlib.Path
  pooling: str | None
  normalize: bool
  max_seq_length: int | None


def _read_st_layout(d: pathlib.Path) -> _STLayout:
  """Where the BERT is and what follows it, from a sentence-transformers modules.json (if any)."""
  if not (d / _ST_MODULES).is_file():
    return _STLayout(d, None, False, None)
  modules = {m["type"].rsplit(".", 1)[-1]: d / m["path"] for m in json.loads((d / _ST_MODULES).read_text())}
  unsupported = sorted(set(modules) - {"Transformer", "Pooling", "Normalize"})
  if unsupported or "Transformer" not in modules:
    raise ValueError(f"{d}/{_ST_MODULES}: only Transformer -> Pooling [-> Normalize] models can be evaluated; "
                     f"found modules {sorted(modules)}")
  transformer_dir = modules["Transformer"]
  st_config = transformer_dir / _ST_CONFIG
  max_seq_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
  pooling = _st_pooling(modules["Pooling"] / hf_io.CONFIG) if "Pooling" in modules else None
  return _STLayout(transformer_dir, pooling, "Normalize" in modules, max_seq_length)


def _st_pooling(path: pathlib.Path) -> str:
  config = json.loads(path.read_text())
  active = [flag for flag, on in config.items() if flag.startswith("pooling_mode_") and on is True]
  mode = config.get("pooling_mode") or (_ST_POOLING_FLAGS.get(active[0]) if len(active) == 1 else None)
  if mode not in ("cls", "mean"):
    raise ValueError(f"{path}: pooling {config} is not supported; only cls and mean pooling are")
  return mode


def _bi_encoder_from_dir(d: pathlib.Path, pooling: str | None, query_maxlen: int, doc_maxlen: int) -> Encoder:
  layout = _read_st_layout(d)
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
  default_len = min(layout.max_seq_length or tokenizer.model_max_length, bert_config.max_position_embeddings)
  query_maxlen, doc_maxlen = query_maxlen or default_len, doc_maxlen or default_len
  _check_positions(bert_config, query_maxlen, doc_maxlen)
  module = DPR(bert_config, pooling=pooling, shared_towers=True)
  return Encoder("dpr", module, {"encoder": bert_params},
                 DPRTokenizer(tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen),
                 normalize=layout.normalize, name=d.name)
