"""Initial student weights: `config.init.checkpoint` (a workdir of ours, or a stanford ColBERT / HF BERT
directory), else `config.init.pretrained` (a stanford ColBERT / HF BERT directory), else a random init of
the shape in `config.model.bert`.

Returns the BERT shape and the parameter subtrees to place into the student (its kind's `import_params`:
'bert' and 'linear' for ColBERT; 'query_encoder'/'passage_encoder' or 'encoder' for DPR). `init.layers` keeps a
subset of the initial weights' layers (a smaller student cut from a pretrained one, as DistilBERT / TinyBERT
initialise); `model.bert`'s dropout rates apply to every init, its shape only to a random one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from pairdistill_jax import checkpoint, config_lib, paths, students
from pairdistill_jax.convert import hf_io
from pairdistill_jax.models.bert import BertConfig


def _existing_dir(field: str, directory: str) -> str:
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"init.{field}={directory!r} is not a local directory. Nothing is downloaded at run time: "
        f"fetch the checkpoint beforehand (e.g. `huggingface-cli download colbert-ir/colbertv2.0 "
        f"--local-dir DIR`) and pass --config.init.{field}=DIR, or set it to '' to start from "
        f"random weights.")
  return directory


def random_bert_config(config: ml_collections.ConfigDict, vocab_size: int) -> BertConfig:
  """The BERT of `config.model.bert`, its vocabulary sized to the tokenizer when vocab_size is 0."""
  fields = dict(config.model.bert)
  if fields.get("vocab_size", 0) == 0:
    fields["vocab_size"] = vocab_size
  if fields["vocab_size"] < vocab_size:
    raise config_lib.ConfigError(f"model.bert.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                     f"{vocab_size} tokens")
  return BertConfig(**fields)


_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def layer_indices(spec: str, num_layers: int) -> list[int]:
  """`init.layers`: '' = all layers; 'N' = N layers evenly spaced from the first to the last; 'i,j,...' =
  those layers (0-based, increasing)."""
  spec = str(spec).strip()
  if not spec:
    return list(range(num_layers))
  try:
    values = [int(v) for v in spec.split(",")]
  except ValueError:
    raise config_lib.ConfigError(
        f"init.layers={spec!r}: expected a layer count or comma-separated layer indices") from None
  if "," not in spec:
    count = values[0]
    if not 1 <= count <= num_layers:
      raise config_lib.ConfigError(
          f"init.layers={spec!r}: the initial model has {num_layers} layers; keep 1 to {num_layers}")
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, count)}) if count > 1 else [0]
  if any(v < 0 or v >= num_layers for v in values) or values != sorted(set(values)):
    raise config_lib.ConfigError(f"init.layers={spec!r}: indices must be increasing and within the initial model's "
                     f"{num_layers} layers (0..{num_layers - 1})")
  return values


def _cut_bert(bert: Mapping[str, Any], indices: list[int]) -> dict:
  """A BERT parameter tree keeping layers `indices`, renumbered layer_0, layer_1, ..."""
  layers = bert["encoder"]
  kept = {f"layer_{new}": layers[f"layer_{old}"] for new, old in enumerate(indices)}
  return {**bert, "encoder": {**{k: v for k, v in layers.items() if not k.startswith("layer_")}, **kept}}


def _adapt(config: ml_collections.ConfigDict, source: str, bert_config: BertConfig,
           params: dict) -> tuple[BertConfig, dict]:
  """Applies init.layers and model.bert's dropout to the initial weights; refuses model.bert shape fields
  that the initial weights would silently override."""
  base = dataclasses.asdict(BertConfig())  # bert-base: the shape of configs/common.py's random init
  ignored = [f"model.bert.{f}={config.model.bert[f]} (the initial weights have {getattr(bert_config, f)})"
             for f in _SHAPE_FIELDS
             if config.model.bert[f] not in (0, base[f], getattr(bert_config, f))]  # 0: unset
  if ignored:
    raise config_lib.ConfigError(
        f"{', '.join(ignored)}: the model's shape comes from {source}; drop these overrides (init.layers cuts "
        f"layers), or start from a random init of that shape with --config.init.pretrained=''")
  indices = layer_indices(config.init.layers, bert_config.num_hidden_layers)
  if len(indices) < bert_config.num_hidden_layers:
    logging.info("Keeping layers %s of the %d of %s", indices, bert_config.num_hidden_layers, source)
    params = {name: _cut_bert(tree, indices) if "encoder" in tree else tree for name, tree in params.items()}
  bert_config = dataclasses.replace(bert_config, num_hidden_layers=len(indices),
                                    **{f: config.model.bert[f] for f in _DROPOUT_FIELDS})
  return bert_config, params


def import_student(config: ml_collections.ConfigDict, vocab_size: int) -> tuple[BertConfig, dict]:
  """(BERT shape, initial parameter subtrees) for the student of `config.model`."""
  field, directory = paths.init_source(config)
  if not field:
    if config.init.layers:
      raise config_lib.ConfigError("init.layers cuts the layers of initial weights, but the config starts "
                                   "from a random init: set init.pretrained or init.checkpoint, or "
                                   "model.bert.num_hidden_layers for a random model")
    return random_bert_config(config, vocab_size), {}
  directory = _existing_dir(field, directory)
  bert_config, params = _import_weights(config, directory)
  return _adapt(config, f"init.{field}={directory}", bert_config, params)


def _import_weights(config: ml_collections.ConfigDict, directory: str) -> tuple[BertConfig, dict]:
  if paths.is_workdir(directory):
    trained = checkpoint.load_trained(directory)
    logging.info("Initialised the student from %s (step %d)", directory, trained.step)
    return trained.bert_config, trained.params
  bert_config, bert, extra = hf_io.import_bert(directory)
  params = students.get(config.model.kind).import_params(config.model, directory, bert, extra)
  _warn_unused(directory, extra)
  return bert_config, params


def _warn_unused(directory: str, extra: dict) -> None:
  if extra:
    logging.warning("%s: tensors not used by the student: %s", directory, ", ".join(sorted(extra)))
