"""Config helpers: loading `path.py:arg`, the `name:variant,key=value` argument of config files, and validation.

The fields and their defaults are in configs/common.py. `get_config(arg)` in `configs/*.py` calls `parse_arg` to
read its argument; `main` validates the final config (after `--config.a.b=v` overrides) before anything is compiled.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from typing import Any

import ml_collections

from pairdistill_jax.data import formats
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.models.attention import ATTENTION_KERNELS, NO_DROPOUT_ATTENTION
from pairdistill_jax.models.bert import COMPUTE_DTYPES, REMAT_POLICIES
from pairdistill_jax.students import registry as students


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """The Python file at `path`, loaded by its path (as config_flags loads a config file)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location(f"pairdistill_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config `path.py[:arg]` names, as --config reads it: the file's get_config(arg), or get_config()."""
  path, sep, arg = str(spec).partition(":")
  module = load_module(path)
  return module.get_config(arg) if sep else module.get_config()


AUTO_DOC_WIDTH_START = 64  # data.doc_widths='auto': 64, 128, 256, ... below doc_maxlen


def doc_widths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The passage widths of training batches (data.doc_widths), ascending; the last is model.doc_maxlen."""
  return parse_doc_widths(config.data.doc_widths, config.model.doc_maxlen)


def parse_doc_widths(text: str, doc_maxlen: int) -> tuple[int, ...]:
  """'auto' | 'off' | '' | 'w1,w2,...' -> ascending widths ending at doc_maxlen (configs/common.py data)."""
  text = str(text).strip().lower()
  if text in ("", "off"):
    return (doc_maxlen,)
  if text == "auto":
    widths, width = [], AUTO_DOC_WIDTH_START
    while width < doc_maxlen:
      widths.append(width)
      width *= 2
    return (*widths, doc_maxlen)
  widths = set()
  for item in text.split(","):
    try:
      width = int(item)
    except ValueError:
      raise ConfigError(f"data.doc_widths={text!r}: expected 'auto', 'off' or comma-separated widths such as "
                        f"'64,128'") from None
    _require(1 <= width <= doc_maxlen, f"data.doc_widths={text!r}: width {width} is not in [1, model.doc_maxlen="
             f"{doc_maxlen}]")
    widths.add(width)
  return tuple(sorted(widths | {doc_maxlen}))


def has_variant(arg: str | None, name: str) -> bool:
  """Whether the bare word `name` appears in a config argument such as `demo,batch_size=8`."""
  return name in (item.strip() for item in (arg or "").split(","))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `variant,key=value,...` against typed defaults.

  A bare word `w` sets boolean default `w` to True (`demo`); `key=value` converts `value` to the type of
  the default. Unknown keys raise an error listing the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value: {key}=...")
      result[key] = True
      continue
    result[key] = typed_value(f"config argument {key}", raw.strip(), default)
  return result


def typed_value(name: str, raw: str, like: Any) -> Any:
  """The string `raw` given for `name` as a value of the type of `like` (true/false/1/0 for booleans)."""
  if isinstance(like, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"{name}={raw!r}: expected true or false")
    return raw.lower() in ("true", "1")
  try:
    return type(like)(raw)
  except ValueError:
    raise ConfigError(f"{name}={raw!r}: expected a {type(like).__name__}") from None


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def data_source(config: ml_collections.ConfigDict, path: str, field: str) -> formats.TextSource:
  """The collection ('docs') or query set ('queries') at `path`, read with data.split and the student's
  data.title_separator."""
  separator = students.title_separator(config.data.title_separator, config.model.kind)
  return formats.text_source(path, field, split=config.data.split, title_separator=separator)


def _check_data_files(config: ml_collections.ConfigDict) -> None:
  """data.train exists; data.collection and data.queries are files or BEIR directories of a known format."""
  data_cfg = config.data
  for field in ("train", "collection", "queries"):
    _require(bool(data_cfg[field]), f"data.{field} is empty: set --config.data.{field}=PATH (or use the :demo variant)")
  _require("://" in data_cfg.train or os.path.exists(data_cfg.train), f"data.train: {data_cfg.train} does not exist")
  for field, kind in (("collection", "docs"), ("queries", "queries")):
    if "://" in data_cfg[field]:
      continue
    try:
      data_source(config, data_cfg[field], kind)
    except (OSError, ValueError) as e:
      raise ConfigError(f"data.{field}: {e}") from None


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves the one `-1` axis of `config.mesh` so that the axes multiply to `num_devices`."""
  axes = {name: int(config.mesh[name]) for name in ("data", "fsdp", "tensor")}
  free = [name for name, size in axes.items() if size == -1]
  _require(len(free) <= 1, f"mesh: at most one axis may be -1, got {axes}")
  _require(all(size == -1 or size >= 1 for size in axes.values()),
           f"mesh: axis sizes must be positive or -1, got {axes}")
  fixed = 1
  for size in axes.values():
    fixed *= size if size != -1 else 1
  if free:
    _require(num_devices % fixed == 0,
             f"mesh {axes}: {num_devices} devices are not divisible by the fixed axes' product {fixed}")
    axes[free[0]] = num_devices // fixed
  total = axes["data"] * axes["fsdp"] * axes["tensor"]
  _require(total == num_devices,
           f"mesh {axes} needs {total} devices but {num_devices} are available; set "
           f"--config.mesh.data=-1 to use them all")
  return axes


def _check_grad_cache(train_cfg: ml_collections.ConfigDict, batch_shards: int) -> None:
  """train.grad_cache: no micro-batches besides it, chunks that split the batch evenly over the batch shards."""
  _require(train_cfg.grad_accum == 1, f"train.grad_cache=True and train.grad_accum={train_cfg.grad_accum} both "
           f"split the batch: use one (grad_cache keeps the in-batch negatives of the whole batch)")
  chunk = grad_cache_chunk(train_cfg, batch_shards)
  _require(chunk >= 1 and train_cfg.batch_size % chunk == 0 and chunk % batch_shards == 0,
           f"train.grad_cache_chunk={train_cfg.grad_cache_chunk} must divide train.batch_size="
           f"{train_cfg.batch_size} and be a multiple of the {batch_shards} batch shards (mesh data x fsdp)")


def grad_cache_chunk(train_cfg: ml_collections.ConfigDict, batch_shards: int) -> int:
  """Queries encoded at a time with train.grad_cache (0 in the config: one per batch shard)."""
  return train_cfg.grad_cache_chunk or batch_shards


def validate(config: ml_collections.ConfigDict, num_devices: int, need_data: bool = True) -> None:
  """Checks that a config can run on `num_devices` devices; raises ConfigError saying what to change.

  need_data=False skips the data files (the benchmark trains on synthetic batches).
  """
  model_cfg, train_cfg, data_cfg = config.model, config.train, config.data
  loss_cfg, optim_cfg = config.loss, config.optim
  student = students.get(model_cfg.kind)
  _require(model_cfg.dtype in COMPUTE_DTYPES, f"model.dtype must be one of {COMPUTE_DTYPES}, got {model_cfg.dtype!r}")
  _require(model_cfg.remat in REMAT_POLICIES,
           f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {model_cfg.remat!r}")
  _require(model_cfg.attention in ATTENTION_KERNELS,
           f"model.attention must be one of {ATTENTION_KERNELS}, got {model_cfg.attention!r}")
  _require(model_cfg.attention not in NO_DROPOUT_ATTENTION or model_cfg.bert.attention_probs_dropout_prob == 0,
           f"model.attention={model_cfg.attention!r} has no attention-probability dropout: set "
           f"--config.model.bert.attention_probs_dropout_prob=0 or --config.model.attention=auto")
  _require(model_cfg.query_maxlen >= 3, f"model.query_maxlen={model_cfg.query_maxlen} leaves no room for query tokens")
  _require(model_cfg.doc_maxlen >= 4, f"model.doc_maxlen={model_cfg.doc_maxlen} leaves no room for document tokens")
  _require(data_cfg.nway >= 2, f"data.nway must be at least 2, got {data_cfg.nway}")
  _require(data_cfg.max_pairs >= 0, f"data.max_pairs must be >= 0, got {data_cfg.max_pairs}")
  _require(data_cfg.num_workers >= 0 and data_cfg.prefetch >= 0,
           f"data.num_workers and data.prefetch must be >= 0, got {data_cfg.num_workers} and {data_cfg.prefetch}")
  doc_widths(config)  # a ConfigError naming the bad width
  _require(data_cfg.tokenize_workers >= -1, f"data.tokenize_workers must be >= -1 (-1: one per CPU), got "
           f"{data_cfg.tokenize_workers}")
  if need_data and not data_cfg.demo:
    _check_data_files(config)
  _require(train_cfg.batch_size >= 1 and train_cfg.grad_accum >= 1,
           "train.batch_size and train.grad_accum must be >= 1")
  _require(train_cfg.batch_size % train_cfg.grad_accum == 0,
           f"train.batch_size={train_cfg.batch_size} is not divisible by train.grad_accum={train_cfg.grad_accum}")
  micro = train_cfg.batch_size // train_cfg.grad_accum
  axes = mesh_shape(config, num_devices)
  batch_shards = axes["data"] * axes["fsdp"]
  _require(micro % batch_shards == 0,
           f"micro-batch {micro} (train.batch_size / train.grad_accum) is not divisible by the "
           f"{batch_shards} batch shards of mesh {axes}: change train.batch_size or mesh.data/mesh.fsdp")
  if train_cfg.grad_cache:
    _check_grad_cache(train_cfg, batch_shards)
  student.validate(config, micro)
  _require(loss_cfg.temperature > 0, f"loss.temperature must be > 0, got {loss_cfg.temperature}")
  _require(loss_cfg.kd_weight >= 0 and loss_cfg.pair_alpha >= 0,
           f"loss.kd_weight and loss.pair_alpha must be >= 0, got {loss_cfg.kd_weight} and {loss_cfg.pair_alpha}")
  _require(optim_cfg.lr > 0, f"optim.lr must be > 0, got {optim_cfg.lr}")
  _require(0 <= optim_cfg.warmup_steps <= train_cfg.steps,
           f"optim.warmup_steps={optim_cfg.warmup_steps} must lie in [0, train.steps={train_cfg.steps}]")
  _require(optim_cfg.clip_norm > 0, f"optim.clip_norm must be > 0, got {optim_cfg.clip_norm}")
