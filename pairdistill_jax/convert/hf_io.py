"""Reading HF / stanford-ColBERT checkpoint directories and writing HF-loadable ones.

Readers return numpy; writers produce directories that `transformers.*.from_pretrained` loads.
Weight names go through the one table in `bert_table`.
"""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from pairdistill_jax import io
from pairdistill_jax.convert.bert_table import flax_to_hf, hf_to_flax
from pairdistill_jax.models.bert import BertConfig

PathLike = str | os.PathLike

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
COLBERT_METADATA = "artifact.metadata"
ST_MODULES = "modules.json"  # sentence-transformers
ST_CONFIG = "sentence_bert_config.json"
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")

_ANCHOR = "embeddings.word_embeddings.weight"  # the key that marks a BERT in a state dict
_MLM_HEAD = "cls."
_COLBERT_LINEAR = "linear.weight"

# Importing ml_dtypes registers 'bfloat16' with numpy, which safe_open(framework='numpy') needs for BF16.
_HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

_log = logging.getLogger(__name__)


def _to_float32_if_half(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) if x.dtype in _HALF_DTYPES else x


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  with safetensors.safe_open(str(path), framework="numpy") as f:
    return {name: _to_float32_if_half(f.get_tensor(name)) for name in f.keys()}


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415  (torch is optional: only .bin checkpoints need it)
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch file; reading it needs torch (pip install torch), "
                      f"or convert the checkpoint to {SAFETENSORS}.") from e
  state = torch.load(path, weights_only=True, map_location="cpu")
  not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise ValueError(f"{path}: expected a state dict of tensors; these entries are not tensors: "
                     f"{not_tensors}")
  return {k: v.detach().float().numpy() if v.dtype in (torch.float16, torch.bfloat16)
          else v.detach().numpy() for k, v in state.items()}


def _read_sharded(index: pathlib.Path,
                  read: Callable[[pathlib.Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  weight_map = json.loads(index.read_text())["weight_map"]
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(read(index.parent / shard))
  absent = sorted(weight_map.keys() - tensors.keys())
  if absent:
    raise ValueError(f"{index}: these tensors are listed but in no shard: {absent}")
  return tensors


def read_state_dict(directory: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a HF checkpoint directory as numpy (half-precision floats become float32)."""
  d = pathlib.Path(directory)
  readers = ((SAFETENSORS, _read_safetensors),
             (SAFETENSORS_INDEX, lambda p: _read_sharded(p, _read_safetensors)),
             (TORCH_BIN, _read_torch_bin),
             (TORCH_BIN_INDEX, lambda p: _read_sharded(p, _read_torch_bin)))
  for name, read in readers:
    if (d / name).is_file():
      return read(d / name)
  raise FileNotFoundError(
      f"no weights in {d}: looked for {', '.join(name for name, _ in readers)}.")


def bert_prefix(keys: Iterable[str]) -> str:
  """The key prefix of the BERT inside a state dict: '' (BertModel) or e.g. 'bert.' (BertFor*)."""
  prefixes = sorted({k[:-len(_ANCHOR)] for k in keys
                     if k == _ANCHOR or k.endswith("." + _ANCHOR)})
  if len(prefixes) == 1:
    return prefixes[0]
  if not prefixes:
    raise ValueError(f"no BERT found: no key ends with {_ANCHOR!r}; is this a BERT checkpoint?")
  raise ValueError(f"several BERTs found, under prefixes {prefixes}; call hf_to_flax with the "
                   f"prefix of the one wanted.")


def _read_config(d: pathlib.Path) -> BertConfig:
  if not (d / CONFIG).is_file():
    raise FileNotFoundError(f"no {CONFIG} in {d}; a HF checkpoint directory needs one.")
  return BertConfig.from_json_file(d / CONFIG)


def import_bert(directory: PathLike) -> tuple[BertConfig, dict, dict[str, np.ndarray]]:
  """(config, BertEncoder params, the non-BERT tensors) of a HF BERT checkpoint directory."""
  d = pathlib.Path(directory)
  config = _read_config(d)
  state = read_state_dict(d)
  mlm_head = sorted(k for k in state if k.startswith(_MLM_HEAD))
  if mlm_head:
    _log.warning("%s: dropping %d masked-LM head tensors (%s...)", d, len(mlm_head), mlm_head[0])
    state = {k: v for k, v in state.items() if not k.startswith(_MLM_HEAD)}
  prefix = bert_prefix(state)
  config = dataclasses.replace(config, add_pooling_layer=f"{prefix}pooler.dense.weight" in state)
  params, unplaced = hf_to_flax(state, config, prefix)
  unplaced = set(unplaced)
  extra = {k: v for k, v in state.items() if not k.startswith(prefix) or k in unplaced}
  return config, params, extra


def import_colbert(directory: PathLike) -> tuple[BertConfig, dict, dict]:
  """(config, {'bert': ..., 'linear': {'kernel': ...}}, artifact metadata) of a ColBERT dir."""
  d = pathlib.Path(directory)
  config, bert_params, extra = import_bert(d)
  linear = extra.pop(_COLBERT_LINEAR, None)
  if linear is None:
    raise ValueError(f"{d}: no {_COLBERT_LINEAR!r} tensor (the ColBERT projection); is this a "
                     f"stanford ColBERT / HF_ColBERT checkpoint?")
  if extra:
    raise ValueError(f"{d}: cannot place these tensors in a ColBERT model: {sorted(extra)}")
  if linear.ndim != 2 or linear.shape[1] != config.hidden_size:
    raise ValueError(f"{d}: {_COLBERT_LINEAR} has shape {linear.shape}, expected "
                     f"(dim, {config.hidden_size}).")
  metadata_path = d / COLBERT_METADATA
  metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
  kernel = np.ascontiguousarray(linear.T, dtype=np.float32)
  return config, {"bert": bert_params, "linear": {"kernel": kernel}}, metadata


def write_safetensors(path: PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (floating ones as contiguous float32) to a safetensors file."""
  arrays = {}
  for name, value in tensors.items():
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
      array = array.astype(np.float32)
    arrays[name] = np.ascontiguousarray(array)
  safetensors.numpy.save_file(arrays, str(path), metadata=dict(metadata or {"format": "pt"}))


def export_bert(directory: PathLike, config: BertConfig, params: Mapping, *, prefix: str = "",
                extra_tensors: Mapping[str, Any] | None = None,
                config_extra: Mapping[str, Any] | None = None,
                tokenizer_dir: PathLike | None = None) -> None:
  """Writes a HF checkpoint directory atomically (replacing an existing one)."""
  tensors = flax_to_hf(params, config, prefix)
  clashes = sorted(tensors.keys() & (extra_tensors or {}).keys())
  if clashes:
    raise ValueError(f"extra_tensors would overwrite BERT weights: {clashes}")
  hf_config = {**config.to_hf_dict(), **(config_extra or {})}
  tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
  with io.atomic_directory(pathlib.Path(directory)) as tmp:
    write_safetensors(tmp / SAFETENSORS, {**tensors, **(extra_tensors or {})})
    (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for f in tokenizer_files:
      shutil.copy2(f, tmp / f.name)


def _tokenizer_files(tokenizer_dir: PathLike) -> list[pathlib.Path]:
  files = [pathlib.Path(tokenizer_dir) / name for name in TOKENIZER_FILES]
  files = [f for f in files if f.is_file()]
  if not files:
    raise FileNotFoundError(f"no tokenizer files in {tokenizer_dir}: looked for "
                            f"{', '.join(TOKENIZER_FILES)}.")
  return files


def import_cross_encoder(directory: PathLike) -> tuple[BertConfig, int, dict]:
  """(config, num_labels, CrossEncoder params) of a HF BertForSequenceClassification directory.

  num_labels is the classifier's output count; config.json's num_labels / id2label, where present,
  must agree with it.
  """
  d = pathlib.Path(directory)
  config, bert_params, extra = import_bert(d)
  weight, bias = extra.pop("classifier.weight", None), extra.pop("classifier.bias", None)
  if weight is None or bias is None:
    raise ValueError(f"{d}: no classifier.weight / classifier.bias tensors: not a sequence-"
                     f"classification checkpoint; point at a BertForSequenceClassification directory "
                     f"(e.g. cross-encoder/ms-marco-MiniLM-L-6-v2), not a plain BertModel.")
  if extra:
    raise ValueError(f"{d}: cannot place these tensors in a CrossEncoder: {sorted(extra)}")
  num_labels = weight.shape[0]
  if weight.shape != (num_labels, config.hidden_size) or bias.shape != (num_labels,):
    raise ValueError(f"{d}: classifier.weight {weight.shape} and classifier.bias {bias.shape} do "
                     f"not fit a classifier (num_labels, {config.hidden_size}) / (num_labels,).")
  if not config.add_pooling_layer:
    raise ValueError(f"{d}: no pooler weights; BertForSequenceClassification classifies the pooled "
                     f"[CLS], so the checkpoint must hold bert.pooler.dense.*.")
  hf_config = json.loads((d / CONFIG).read_text())
  declared = {"num_labels": hf_config.get("num_labels"),
              "id2label": len(hf_config["id2label"]) if "id2label" in hf_config else None}
  wrong = {k: v for k, v in declared.items() if v is not None and v != num_labels}
  if wrong:
    raise ValueError(f"{d}: {CONFIG} declares {wrong} labels but classifier.weight has "
                     f"{num_labels} rows; fix {CONFIG} or the weights.")
  classifier = {"kernel": np.ascontiguousarray(weight.T, dtype=np.float32),
                "bias": np.ascontiguousarray(bias, dtype=np.float32)}
  return config, num_labels, {"bert": bert_params, "classifier": classifier}


@dataclasses.dataclass(frozen=True)
class STLayout:
  """A sentence-transformers directory: where its BERT is and what follows it."""

  transformer_dir: pathlib.Path
  pooling: str | None
  normalize: bool
  max_seq_length: int | None


def read_st_layout(d: pathlib.Path) -> STLayout:
  """Where the BERT is and what follows it, from a sentence-transformers modules.json (if any)."""
  if not (d / ST_MODULES).is_file():
    return STLayout(d, None, False, None)
  modules = {m["type"].rsplit(".", 1)[-1]: d / m["path"] for m in json.loads((d / ST_MODULES).read_text())}
  unsupported = sorted(set(modules) - {"Transformer", "Pooling", "Normalize"})
  if unsupported or "Transformer" not in modules:
    raise ValueError(f"{d}/{ST_MODULES}: only Transformer -> Pooling [-> Normalize] models can be evaluated; "
                     f"found modules {sorted(modules)}")
  transformer_dir = modules["Transformer"]
  st_config = transformer_dir / ST_CONFIG
  max_seq_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
  pooling = _st_pooling(modules["Pooling"] / CONFIG) if "Pooling" in modules else None
  return STLayout(transformer_dir, pooling, "Normalize" in modules, max_seq_length)


def _st_pooling(path: pathlib.Path) -> str:
  config = json.loads(path.read_text())
  active = [flag for flag, on in config.items() if flag.startswith("pooling_mode_") and on is True]
  mode = config.get("pooling_mode") or (_ST_POOLING_FLAGS.get(active[0]) if len(active) == 1 else None)
  if mode not in ("cls", "mean"):
    raise ValueError(f"{path}: pooling {config} is not supported; only cls and mean pooling are")
  return mode
