"""The benchmarks of `--mode=benchmark`: the train step, corpus encoding, scaling over devices, variants.

Everything runs on synthetic batches of the config's shapes from a random init (no data files, no
pretrained weights), is compiled once and timed over `benchmark.steps` calls after `benchmark.warmup`.
Each measurement is one record, printed as a `BENCHMARK {json}` line and appended to
WORKDIR/benchmark.jsonl; a table of all of them follows.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pairdistill_jax import config_lib, sharding, students
from pairdistill_jax.bench import flops as flops_lib
from pairdistill_jax.bench import hlo, machine, measure
from pairdistill_jax.bench import memory as memory_lib
from pairdistill_jax.bench import teacher as teacher_bench
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.step import make_train_step

WHAT = ("train", "encode", "scaling", "memory", "teacher")  # memory: bench/memory.py; teacher: bench/teacher.py
_DEFAULT_VOCAB = 30522  # bert-base's, for configs whose vocab_size is the demo's placeholder 0
_MiB = 2**20


def bert_config(config: ml_collections.ConfigDict) -> BertConfig:
  bert = dict(config.model.bert)
  bert["vocab_size"] = bert["vocab_size"] or _DEFAULT_VOCAB
  return BertConfig(**bert)


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`batch_size` rows in the training layout (data.batching): random tokens, full-length passages, queries
  half [MASK] padding, `max_pairs` pairs per query, and what the student kind adds (ColBERT: a tenth of the document
  tokens out of MaxSim)."""
  model_cfg, nway, pairs = config.model, config.data.nway, config.data.max_pairs
  rng = np.random.default_rng(seed)
  vocab = bert_config(config).vocab_size
  q_mask = np.ones((batch_size, model_cfg.query_maxlen), np.int32)
  q_mask[:, model_cfg.query_maxlen // 2:] = 0
  d_mask = np.ones((batch_size, nway, model_cfg.doc_maxlen), np.int32)
  pair_i = rng.integers(0, nway - 1, size=(batch_size, pairs)).astype(np.int32)
  batch = dict(
      q_ids=rng.integers(1, vocab, size=(batch_size, model_cfg.query_maxlen)).astype(np.int32), q_mask=q_mask,
      d_ids=rng.integers(1, vocab, size=(batch_size, nway, model_cfg.doc_maxlen)).astype(np.int32), d_mask=d_mask,
      teacher=rng.normal(size=(batch_size, nway)).astype(np.float32),
      passage_mask=np.ones((batch_size, nway), bool), pair_i=pair_i,
      pair_j=np.minimum(pair_i + rng.integers(1, 6, size=pair_i.shape), nway - 1).astype(np.int32),
      pair_logp=np.log(rng.uniform(0.05, 1.0, size=(batch_size, pairs))).astype(np.float32),
      pair_mask=np.ones((batch_size, pairs), bool))
  return students.get(model_cfg.kind).synthetic_batch(batch, rng)


def _local_rows(global_rows: int) -> int:
  return global_rows // jax.process_count()


def describe(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """The settings a measurement depends on."""
  model_cfg, bert, train_cfg = config.model, config.model.bert, config.train
  chunk = config_lib.grad_cache_chunk(train_cfg, mesh.shape["data"] * mesh.shape["fsdp"]) if train_cfg.grad_cache else 0
  out = {"model": model_cfg.kind, "device_kind": mesh.devices.flat[0].device_kind, "devices": mesh.size,
         "mesh": dict(mesh.shape), "dtype": model_cfg.dtype, "remat": model_cfg.remat,
         "attention": model_cfg.attention, "batch_size": config.train.batch_size,
         "grad_accum": train_cfg.grad_accum, "grad_cache_chunk": chunk, "nway": config.data.nway,
         "query_maxlen": model_cfg.query_maxlen,
         "doc_maxlen": model_cfg.doc_maxlen,
         "layers": bert.num_hidden_layers, "hidden": bert.hidden_size, "heads": bert.num_attention_heads,
         "intermediate": bert.intermediate_size}
  return out | students.get(model_cfg.kind).benchmark_settings(config)


def _program_stats(compiled: jax.stages.Compiled, call, config: ml_collections.ConfigDict, model_flops: float,
                   devices: Sequence[jax.Device]) -> dict:
  """Timing, throughput, XLA's FLOP count and memory of a compiled program called by `call`."""
  bench_cfg = config.benchmark
  xla_flops = measure.compiled_flops(compiled)
  planned = {"timed_steps": bench_cfg.steps, "model_flops_per_step": model_flops,
             "xla_flops_per_step": xla_flops * len(devices) if xla_flops is not None else None,
             **measure.compiled_memory(compiled)}
  if bench_cfg.steps == 0:  # compiled only (benchmark.memory_steps=0)
    return planned
  stats = measure.time_stats(measure.timed_calls(call, bench_cfg.warmup, bench_cfg.steps))
  return {**stats, **planned, **measure.throughput(model_flops, stats["step_s_median"], devices, bench_cfg.peak_flops),
          "runtime_peak_bytes": measure.runtime_peak_memory(devices)}


def _compile(jitted, *args) -> tuple[jax.stages.Compiled, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
                    name: str = "config") -> dict:
  """Compiles the sharded train step of `config` on `devices` (default all) and times it."""
  mesh = sharding.make_mesh(config, devices)
  model = students.make_student(config.model, bert_config(config))
  tx = state_lib.optimizer(config)
  model_cfg, batch_size = config.model, config.train.batch_size
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create(model, tx, config, mesh, jax.random.PRNGKey(0))
    step = make_train_step(model, tx, config, mesh, shardings)
    batch = sharding.shard_batch(synthetic_batch(config, _local_rows(batch_size), jax.process_index()),
                                 sharding.batch_sharding(mesh, sharding.rules(config)))
    rng = jax.random.PRNGKey(1)
    logging.info("benchmark %s: compiling the train step on %d devices", name, mesh.size)
    compiled, compile_s = _compile(step, state, batch, rng)
    params = hlo.param_shapes(state.params, shardings.params)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    current = {"state": state}

    def call():
      current["state"], metrics = compiled(current["state"], batch, rng)
      return current["state"], metrics

    step_flops = flops_lib.train_step(config)
    record = _program_stats(compiled, call, config, step_flops.train, list(mesh.devices.flat))
  median = record.get("step_s_median")
  tokens = batch_size * (model_cfg.query_maxlen + config.data.nway * model_cfg.doc_maxlen)
  rates = {"queries_per_s": batch_size / median, "tokens_per_s": tokens / median} if median else {}
  forward_flops = {"query_encoder": step_flops.query_encoder, "doc_encoder": step_flops.doc_encoder,
                   "scoring": step_flops.scoring}
  return {"benchmark": "train_step", "variant": name, **describe(config, mesh), "params": int(num_params),
          "compile_s": compile_s, **rates, **record, "model_flops_forward": forward_flops,
          "collectives": hlo.summarize(hlo.collectives(compiled.as_text()), params)}


def time_encoding(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
                  name: str = "encode_doc") -> dict:
  """Times `encode_doc` on benchmark.encode_batch passages of doc_maxlen tokens (rounded up to the
  devices), parameters replicated and rows split over every device, as corpus encoding runs."""
  mesh = sharding.make_mesh(config, devices)
  model = students.make_student(config.model, bert_config(config))
  model_cfg = config.model
  rows = -(-config.benchmark.encode_batch // mesh.size) * mesh.size
  with jax.set_mesh(mesh):
    def init(r):
      return nn.meta.unbox(model.init({"params": r}, *state_lib.init_inputs(config))["params"])

    params = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
    ids = np.random.default_rng(jax.process_index()).integers(
        1, bert_config(config).vocab_size, size=(_local_rows(rows), model_cfg.doc_maxlen)).astype(np.int32)
    inputs = sharding.shard_batch({"ids": ids, "mask": np.ones_like(ids)},
                                  NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    encode = jax.jit(lambda p, i, k: model.apply({"params": p}, i, k, method="encode_doc"))
    logging.info("benchmark encode: compiling on %d devices", mesh.size)
    compiled, compile_s = _compile(encode, params, inputs["ids"], inputs["mask"])
    record = _program_stats(compiled, lambda: compiled(params, inputs["ids"], inputs["mask"]), config,
                            flops_lib.encoder_forward(model_cfg, model_cfg.doc_maxlen, rows),
                            list(mesh.devices.flat))
  median = record["step_s_median"]
  return {"benchmark": "encode", "variant": name, **describe(config, mesh), "encode_batch": rows,
          "compile_s": compile_s, "passages_per_s": rows / median,
          "tokens_per_s": rows * model_cfg.doc_maxlen / median, **record}


def parse_variants(text: str) -> list[tuple[str, dict[str, str]]]:
  """'a.b=1,c.d=x;e.f=2' -> [('a.b=1,c.d=x', {'a.b': '1', 'c.d': 'x'}), ('e.f=2', {'e.f': '2'})]."""
  variants = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    overrides = {}
    for item in part.split(","):
      key, sep, value = item.partition("=")
      if not sep:
        raise config_lib.ConfigError(f"benchmark.variants: {item!r} is not field=value (in {part!r})")
      overrides[key.strip()] = value.strip()
    variants.append((part, overrides))
  return variants


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set from strings (typed as the fields they replace)."""
  out = config.copy_and_resolve_references()
  for key, raw in overrides.items():
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.get(part) if isinstance(node, (ml_collections.ConfigDict, dict)) else None
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or leaf not in node:
      raise config_lib.ConfigError(f"override {key}={raw}: the config has no field {key!r}")
    node[leaf] = config_lib.typed_value(key, raw, node[leaf])
  return out


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One measurement to run: the train step or encoding of `config` on `devices`."""

  program: str  # 'train' (the train step) or 'encode'
  name: str
  config: ml_collections.ConfigDict
  devices: tuple[jax.Device, ...]
  scaling: bool = False
  memory_variant: str = ""  # benchmark.what=memory: the way of fitting the batch (memory.variants)


def scaling_measurements(config: ml_collections.ConfigDict) -> list[Measurement]:
  """The train step on the first n devices of this host for each n of benchmark.scaling, with the same
  per-device batch (benchmark.per_device_batch, or train.batch_size / jax.device_count())."""
  bench_cfg = config.benchmark
  counts = [int(n) for n in str(bench_cfg.scaling).split(",") if n.strip()]
  if jax.process_count() > 1:
    raise config_lib.ConfigError("benchmark scaling runs on one host; drop 'scaling' from benchmark.what")
  if not counts or max(counts) > jax.device_count():
    raise config_lib.ConfigError(
        f"benchmark.scaling={bench_cfg.scaling!r}: device counts must lie in 1..{jax.device_count()} (on a "
        f"CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 devices)")
  per_device = bench_cfg.per_device_batch or config.train.batch_size // jax.device_count()
  return [Measurement("train", f"{n} devices", with_overrides(config, {"train.batch_size": str(per_device * n)}),
                      tuple(jax.devices()[:n]), scaling=True) for n in counts]


def memory_measurements(config: ml_collections.ConfigDict) -> list[Measurement]:
  """The train step on one device for each per-device batch of benchmark.memory_batches and each variant of
  memory.variants (benchmark.memory_steps timed steps each; 0: compiled only)."""
  bench_cfg = config.benchmark
  batches = memory_lib.parse_ints("benchmark.memory_batches", bench_cfg.memory_batches)
  chunks = memory_lib.parse_ints("benchmark.memory_chunks", bench_cfg.memory_chunks)
  memory_lib.parse_budgets(bench_cfg.memory_budget_gb)  # a ConfigError before anything compiles
  one_device = (jax.local_devices()[0],)
  return [Measurement("train", f"memory {variant} B={batch}", with_overrides(config, {
      **overrides, "train.batch_size": str(batch), "mesh.data": "1", "mesh.fsdp": "1", "mesh.tensor": "1",
      "benchmark.steps": str(bench_cfg.memory_steps)}), one_device, memory_variant=variant)
          for variant, overrides in memory_lib.variants(chunks) for batch in batches]


def measurement_names(bench_cfg: ml_collections.ConfigDict) -> list[str]:
  """The benchmarks named in benchmark.what (of WHAT)."""
  return [w.strip() for w in bench_cfg.what.split(",") if w.strip()]


def planned_measurements(config: ml_collections.ConfigDict) -> list[Measurement]:
  """The measurements benchmark.what asks for, each config validated before anything compiles."""
  bench_cfg = config.benchmark
  what = measurement_names(bench_cfg)
  unknown = sorted(set(what) - set(WHAT))
  if unknown or not what:
    raise config_lib.ConfigError(f"benchmark.what={bench_cfg.what!r}: a comma list of {', '.join(WHAT)}")
  every = tuple(jax.devices())
  measurements = []
  if "train" in what:
    measurements += [Measurement("train", name, with_overrides(config, overrides), every)
                     for name, overrides in [("config", {})] + parse_variants(bench_cfg.variants)]
  if "encode" in what:
    measurements.append(Measurement("encode", "encode_doc", config, every))
  if "scaling" in what:
    measurements += scaling_measurements(config)
  if "memory" in what:
    measurements += memory_measurements(config)
  for measurement in measurements:
    try:
      config_lib.validate(measurement.config, len(measurement.devices), need_data=False)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"benchmark {measurement.name}: {e}") from None
  return measurements


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None,
        student: Callable | None = None) -> list[dict]:
  """Runs the planned measurements; emits each record (process 0) and prints the table; returns them.

  student(cfg, role) builds a retriever teacher for the 'teacher' measurement.
  """
  records, scaling_base = [], None
  measurements = planned_measurements(config)
  info = machine.machine_info()  # in every record: figures hold for the machine that measured them
  if jax.process_index() == 0:
    print(machine.machine_line(info), flush=True)
  if "teacher" in measurement_names(config.benchmark):
    teacher_records = [dict(r, machine=info) for r in teacher_bench.run(config, student)]
    if jax.process_index() == 0:
      for record in teacher_records:
        measure.emit(record, workdir)
      print(teacher_bench.table(teacher_records))
    records += teacher_records
  for measurement in measurements:
    measure_fn = time_train_step if measurement.program == "train" else time_encoding
    record = measure_fn(measurement.config, measurement.devices, measurement.name)
    record["machine"] = info
    if measurement.memory_variant:
      record["memory_variant"] = measurement.memory_variant
    if measurement.scaling:
      per_device = record["queries_per_s"] / record["devices"]
      scaling_base = scaling_base or per_device
      record["scaling_efficiency"] = per_device / scaling_base
    records.append(record)
    if jax.process_index() == 0:
      measure.emit(record, workdir)
  step_records = [r for r in records if r["benchmark"] != "teacher" and "memory_variant" not in r]
  if jax.process_index() == 0 and step_records:
    print(table(step_records))
    print(collectives_table(step_records))
  memory_records = [r for r in records if "memory_variant" in r]
  if memory_records:
    rows = memory_lib.summary(memory_records, memory_lib.parse_budgets(config.benchmark.memory_budget_gb))
    if jax.process_index() == 0:
      measure.emit({"benchmark": "memory_fit", "rows": rows, "machine": info}, workdir)
      print(memory_lib.table(rows, memory_records))
  return records


# (column, format): items are queries for train steps and passages for encoding; xla/model is XLA's FLOP
# count over the model FLOPs (above 1 by the elementwise work, and by recomputation under remat).
_COLUMNS = (("measurement", "{}"), ("devices", "{}"), ("compile_s", "{:.1f}"), ("step_s_p50", "{:.4f}"),
            ("step_s_p90", "{:.4f}"), ("items/s", "{:.1f}"), ("tokens/s", "{:.0f}"), ("TFLOP/s", "{:.3f}"),
            ("MFU", "{:.1%}"), ("xla/model", "{:.2f}"), ("temp_MiB", "{:.0f}"), ("peak_MiB", "{:.0f}"),
            ("scaling", "{:.0%}"))


def _cells(r: dict) -> dict:
  xla = r.get("xla_flops_per_step")
  return {"measurement": f"{r['benchmark']}: {r['variant']}", "devices": r["devices"],
          "compile_s": r["compile_s"], "step_s_p50": r["step_s_median"], "step_s_p90": r["step_s_p90"],
          "items/s": r.get("queries_per_s", r.get("passages_per_s")), "tokens/s": r["tokens_per_s"],
          "TFLOP/s": r["achieved_flops_per_s"] / 1e12, "MFU": r["mfu"],
          "xla/model": xla / r["model_flops_per_step"] if xla else None,
          "temp_MiB": r["compiled_temp_bytes"] / _MiB if "compiled_temp_bytes" in r else None,
          "peak_MiB": r["runtime_peak_bytes"] / _MiB if r.get("runtime_peak_bytes") else None,
          "scaling": r.get("scaling_efficiency")}


def table(records: Sequence[dict]) -> str:
  """The records as an aligned text table ('-' where a value is unknown, e.g. MFU on a CPU)."""
  rows = [[name for name, _ in _COLUMNS]]
  for r in records:
    cells = _cells(r)
    rows.append([fmt.format(cells[name]) if cells[name] is not None else "-" for name, fmt in _COLUMNS])
  return measure.aligned(rows)


def collectives_table(records: Sequence[dict]) -> str:
  """Per train step: each collective op (count, MiB per device) and what they move."""
  lines = ["collectives per device and step: op count (MiB); MiB moved of params / scalars / activations"]
  for r in records:
    if "collectives" not in r:
      continue
    c = r["collectives"]
    ops = ", ".join(f"{op} {v['count']}x ({v['bytes'] / _MiB:.2f} MiB)" for op, v in sorted(c["by_op"].items()))
    moved = " / ".join(f"{c['by_content'][k] / _MiB:.2f}" for k in ("params", "scalars", "activations"))
    lines.append(f"  {r['variant']} ({r['devices']} devices, mesh {r['mesh']}): {ops or 'none'}; moved {moved}; "
                 f"activation gathers {c['activation_gathers']}")
  return "\n".join(lines)
