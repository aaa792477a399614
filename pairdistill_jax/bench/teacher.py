"""`--config.benchmark.what=teacher`: the throughput of config.teacher's pointwise and pairwise teachers.

Synthetic English-like queries and passages (benchmark.teacher_items of them, of teacher_query_words and
teacher_passage_words words) go through the path `--mode=score` uses: the teacher's tokenisation, then
length-bucketed, sharded batches on the teacher mesh. A first pass compiles every bucket; the second is
timed. Reports passages/s (pointwise) and pairs/s (pairwise), tokens/s and the tokenisation rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from pairdistill_jax import config_lib, sharding
from pairdistill_jax.bench import measure
from pairdistill_jax.teachers import load
from pairdistill_jax.teachers.batched_scoring import ShardedScorer, teacher_mesh

_WORDS = ("the of and to in is that for it as with was on by are this be from at or an which have not they "
          "protein cell gene cancer patients study results effect treatment risk water energy model data "
          "system network learning retrieval query passage document relevance ranking dense vector index "
          "history city river music film team season league president government war century language").split()


_TOKEN_FIELDS = ("input_ids", "q_ids", "d_ids")  # not token_type_ids: the same tokens


def synthetic_texts(n: int, arity: int, query_words: int, passage_words: int, seed: int = 0) -> list[tuple[str, ...]]:
  """`n` (query, passage[, passage]) tuples of random words."""
  rng = np.random.default_rng(seed)

  def text(words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=words))

  return [(text(query_words), *(text(passage_words) for _ in range(arity - 1))) for _ in range(n)]


def time_scorer(scorer: ShardedScorer, texts: Sequence[tuple[str, ...]]) -> dict:
  """Tokenisation rate, then one compiling pass and one timed pass over the items."""
  start = time.perf_counter()
  items = scorer.teacher.encode(texts)
  tokenize_s = time.perf_counter() - start
  start = time.perf_counter()
  scorer.score(items)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  scorer.score(items)
  seconds = time.perf_counter() - start
  tokens = sum(len(v) for item in items for name, v in item.items() if name in _TOKEN_FIELDS)
  return {"items": len(items), "seconds": seconds, "items_per_s": len(items) / seconds,
          "tokens_per_s": tokens / seconds, "compile_and_first_pass_s": first_s,
          "tokenize_items_per_s": len(items) / tokenize_s, "rows_per_batch": scorer.rows}


def run(config: ml_collections.ConfigDict, student: Callable | None = None,
        devices: Sequence[jax.Device] | None = None) -> list[dict]:
  """One record per teacher of config.teacher (the pairwise one unless its scorer is none/pointwise)."""
  teacher_cfg, bench_cfg = config.teacher, config.benchmark
  mesh = teacher_mesh(teacher_cfg, devices)
  rules = sharding.rules(config)
  roles = [("pointwise", 2, "passages_per_s")]
  if teacher_cfg.pairwise.scorer not in ("none", "pointwise"):
    roles.append(("pairwise", 3, "pairs_per_s"))
  records = []
  for role, arity, unit in roles:
    teacher = load.load(teacher_cfg[role], role, student)
    if isinstance(teacher, load.RetrieverTeacher):
      raise config_lib.ConfigError("a retriever teacher costs one corpus encoding plus the queries': measure it "
                                   "with --config.benchmark.what=encode instead of teacher")
    scorer = ShardedScorer(teacher, mesh, rules, batch_per_device=teacher_cfg[role].batch_per_device,
                           bucket_multiple=teacher_cfg.bucket_multiple)
    texts = synthetic_texts(bench_cfg.teacher_items, arity, bench_cfg.teacher_query_words,
                            bench_cfg.teacher_passage_words)
    timing = time_scorer(scorer, texts)
    records.append({"benchmark": "teacher", "variant": f"{role} {teacher.name}", "devices": mesh.size,
                    "mesh": dict(mesh.shape), "device_kind": jax.devices()[0].device_kind,
                    unit: timing["items_per_s"], **timing})
  return records


def table(records: Sequence[dict]) -> str:
  header = ("teacher", "devices", "rows/batch", "items/s", "tokens/s", "tokenize/s", "first pass s")
  rows = [header] + [(r["variant"], str(r["devices"]), str(r["rows_per_batch"]), f"{r['items_per_s']:.1f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['tokenize_items_per_s']:.0f}",
                      f"{r['compile_and_first_pass_s']:.1f}") for r in records]
  return measure.aligned(rows)
