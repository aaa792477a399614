"""Where things are: the workdir's layout, config paths that name `{workdir}`, the training files and tokenizer
of a config, and the weights a run starts from. Looking up writes nothing (the demo's data: demo.ensure_demo_data).

WORKDIR/
  .lock            the running command's lock (workdir.py)
  checkpoints/     Orbax train states (checkpoint.py)
  model/           config.json, bert_config.json, tokenizer/: what export and evaluation need
  metrics.jsonl, tensorboard/   the training curves (train/metrics_log.py)
  eval/            run.trec, metrics.json of --mode=evaluate and the periodic dev evaluation; earlier/ (the
                   runs a rerun replaced), NAME/ (--eval_name)
  demo_data/       the demo's generated data (`:demo` configs)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import ml_collections

from pairdistill_jax import remote

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
EVAL_DIR = "eval"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DEMO_DATA_DIR = "demo_data"


def resolve_path(template: str, workdir: str | os.PathLike) -> pathlib.Path:
  """A config path that may name {workdir}."""
  return pathlib.Path(template.format(workdir=workdir))


def input_path(template: str, workdir: str | os.PathLike) -> pathlib.Path:
  """A config path of an input file or directory that may name {workdir}, or be a URL (staged locally)."""
  return pathlib.Path(remote.staged(template.format(workdir=workdir)))


def init_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(field, directory) of the weights a fresh run starts from; ('', '') for a random init. A URL's directory
  is a local copy: a bucket workdir's read-only mirror (checkpoints read from the bucket), or a staged model."""
  for field in ("checkpoint", "pretrained"):
    source = config.init[field]
    if remote.is_url(source) and (remote.in_bucket(source) / MODEL_DIR / "config.json").exists():
      return field, remote.pulled(source, bucket_only=(CHECKPOINT_DIR,))
    if source:
      return field, remote.staged(source)
  return "", ""


def is_workdir(directory: str | os.PathLike) -> bool:
  """Whether `directory` is a training workdir of ours (rather than an HF / stanford ColBERT directory)."""
  return os.path.exists(os.path.join(directory, MODEL_DIR, "config.json"))


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """init.tokenizer, else the tokenizer of the weights the run starts from."""
  if config.init.tokenizer:
    return config.init.tokenizer
  _, directory = init_source(config)
  return os.path.join(directory, MODEL_DIR, "tokenizer") if is_workdir(directory) else directory


@dataclasses.dataclass
class DataPaths:
  """Where a run's training files and tokenizer are."""

  train: str
  collection: str
  queries: str
  tokenizer: str


def data_paths(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> DataPaths:
  """The training files and tokenizer of `config` (those given as URLs staged to local copies); a :demo config's
  are in WORKDIR/demo_data, written by demo.ensure_demo_data."""
  if config.data.demo:
    root = pathlib.Path(workdir) / DEMO_DATA_DIR
    return DataPaths(str(root / "train.jsonl"), str(root / "collection.tsv"), str(root / "queries.train.tsv"),
                     remote.staged(config.init.tokenizer) or str(root / "tokenizer"))
  return DataPaths(*(remote.staged(path) for path in (config.data.train, config.data.collection,
                                                        config.data.queries, tokenizer_dir(config))))
