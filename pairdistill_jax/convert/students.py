"""Initial student weights: `config.init.checkpoint` (a workdir of ours, or a stanford ColBERT / HF BERT
directory), else `config.init.pretrained` (a stanford ColBERT / HF BERT directory), else a random init of
the shape in `config.model.bert`.

Returns the BERT shape and the parameter subtrees to place into the student ('bert' and 'linear' for
ColBERT; 'query_encoder'/'passage_encoder' or 'encoder' for DPR).
"""

from __future__ import annotations

import logging
import os

import ml_collections

from pairdistill_jax import checkpoint
from pairdistill_jax.convert import hf_io
from pairdistill_jax.models.bert import BertConfig


def init_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(field, directory) of the weights a fresh run starts from; ('', '') for a random init."""
  for field in ("checkpoint", "pretrained"):
    if config.init[field]:
      return field, config.init[field]
  return "", ""


def is_workdir(directory: str) -> bool:
  """Whether `directory` is a training workdir of ours (rather than an HF / stanford ColBERT directory)."""
  return os.path.exists(os.path.join(directory, checkpoint.MODEL_DIR, "config.json"))


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """init.tokenizer, else the tokenizer of the weights the run starts from."""
  if config.init.tokenizer:
    return config.init.tokenizer
  _, directory = init_source(config)
  return os.path.join(directory, checkpoint.MODEL_DIR, "tokenizer") if is_workdir(directory) else directory


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
    raise ValueError(f"model.bert.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                     f"{vocab_size} tokens")
  return BertConfig(**fields)


def import_student(config: ml_collections.ConfigDict, vocab_size: int) -> tuple[BertConfig, dict]:
  """(BERT shape, initial parameter subtrees) for the student of `config.model`."""
  field, directory = init_source(config)
  if not field:
    return random_bert_config(config, vocab_size), {}
  directory = _existing_dir(field, directory)
  if is_workdir(directory):
    trained = checkpoint.load_trained(directory)
    logging.info("Initialised the student from %s (step %d)", directory, trained.step)
    return trained.bert_config, trained.params
  bert_config, bert, extra = hf_io.import_bert(directory)
  if config.model.kind == "colbert":
    params = {"bert": bert}
    if "linear.weight" in extra:  # a stanford ColBERT checkpoint
      params["linear"] = {"kernel": extra.pop("linear.weight").T}
      dim = params["linear"]["kernel"].shape[1]
      if dim != config.model.dim:
        raise ValueError(f"{directory} projects to dim {dim} but model.dim={config.model.dim}: set "
                         f"--config.model.dim={dim}")
    _warn_unused(directory, extra)
    logging.info("Initialised ColBERT %s from %s", " and ".join(params), directory)
    return bert_config, params
  _warn_unused(directory, extra)
  towers = ("encoder",) if config.model.shared_towers else ("query_encoder", "passage_encoder")
  logging.info("Initialised DPR towers %s from %s", towers, directory)
  return bert_config, {tower: bert for tower in towers}


def _warn_unused(directory: str, extra: dict) -> None:
  if extra:
    logging.warning("%s: tensors not used by the student: %s", directory, ", ".join(sorted(extra)))
