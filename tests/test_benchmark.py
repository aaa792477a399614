"""The benchmark and the accelerator options: FLOP count vs XLA, chunked MaxSim, remat policies and
dot_product_attention, the collectives of the sharded step, and `--mode=benchmark` end to end."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import colbert as colbert_config
from configs import dpr as dpr_config
from pairdistill_jax import config_lib, sharding
from pairdistill_jax.bench import flops, hlo, measure, modes
from pairdistill_jax.convert import hf_to_flax
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig, BertEncoder
from pairdistill_jax.students import make_student
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.step import make_train_step


def tiny_config(kind="colbert", hidden=32, batch=32, **mesh):
  config = (colbert_config if kind == "colbert" else dpr_config).get_config("demo")
  config.model.update(query_maxlen=8, doc_maxlen=12)
  config.model.bert.update(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=4 * hidden)
  config.data.update(nway=4, max_pairs=3)
  config.train.update(batch_size=batch)
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1), **mesh)
  return config


def compile_step(config, devices):
  """(compiled train step, abstract state, state shardings) of `config` on `devices`; nothing is allocated."""
  mesh = sharding.make_mesh(config, devices)
  model = make_student(config.model, modes.bert_config(config))
  tx = state_lib.optimizer(config)
  rules = sharding.rules(config)
  boxed = jax.eval_shape(functools.partial(state_lib.init_boxed, model, tx, config), jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                       shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, rules))
           for k, v in modes.synthetic_batch(config, config.train.batch_size).items()}
  with jax.set_mesh(mesh):
    step = make_train_step(model, tx, config, mesh, shardings)
    return step.lower(state, batch, jax.random.PRNGKey(1)).compile(), state, shardings


# --- FLOP count ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_flop_count_agrees_with_xla_cost_analysis(kind):
  """XLA counts 2·m·n·k per dot as we do, plus the elementwise work we leave out (LayerNorm, GELU,
  softmax, AdamW): at hidden 128 that is a few percent."""
  config = tiny_config(kind, hidden=128, batch=4)
  config.model.update(query_maxlen=16, doc_maxlen=32)
  config.model.bert.vocab_size = 512
  compiled, _, _ = compile_step(config, jax.devices()[:1])
  xla = measure.compiled_flops(compiled)
  analytic = flops.train_step(config).train
  assert 1.0 <= xla / analytic < 1.10, (xla, analytic)


def test_bert_flops_by_hand():
  # One layer, L=2, H=4, I=8: Q, K, V, output 4·(2·2·4·4) = 256; FFN in and out 2·(2·2·4·8) = 256;
  # scores and weighted values 2·(2·2·2·4) = 64.
  assert flops.bert_forward(dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1), 2, 1) == 576
  assert flops.bert_forward(dict(hidden_size=4, intermediate_size=8, num_hidden_layers=3), 2, 5) == 15 * 576


# --- chunked MaxSim -----------------------------------------------------------------------------------

def np_maxsim_and_grads(q, d, mask, cotangent):
  """float64 MaxSim and the gradients of Σ cotangent·scores w.r.t. q and d (the argmax token's vector)."""
  sim = np.einsum("bqd,mkd->bmqk", q, d)
  sim = np.where(mask[None, :, None, :] > 0, sim, -np.inf)
  best = sim.argmax(-1)
  grad_q, grad_d = np.zeros_like(q), np.zeros_like(d)
  for b, m, i in np.ndindex(*best.shape):
    grad_q[b, i] += cotangent[b, m] * d[m, best[b, m, i]]
    grad_d[m, best[b, m, i]] += cotangent[b, m] * q[b, i]
  return sim.max(-1).sum(-1), grad_q, grad_d


@pytest.mark.parametrize("chunk", [1, 3, 4, 10])
def test_chunked_maxsim_equals_float64_values_and_gradients(chunk):
  rng = np.random.default_rng(chunk)
  q, d = rng.normal(size=(3, 5, 8)), rng.normal(size=(10, 6, 8))
  mask = (rng.random((10, 6)) < 0.7).astype(np.int32)
  mask[:, 0] = 1
  cotangent = rng.normal(size=(3, 10))
  want, want_q, want_d = np_maxsim_and_grads(q, d, mask, cotangent)
  fn = lambda q, d: scoring.maxsim(q, d, jnp.asarray(mask), chunk=chunk)
  scores, vjp = jax.vjp(fn, jnp.asarray(q, jnp.float32), jnp.asarray(d, jnp.float32))
  grad_q, grad_d = vjp(jnp.asarray(cotangent, jnp.float32))
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_q, want_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_d, want_d, rtol=1e-5, atol=1e-5)


def test_chunked_maxsim_never_holds_the_whole_similarity_tensor():
  batch, docs, lq, ld, dim = 4, 64, 32, 64, 32
  sim_bytes = batch * docs * lq * ld * 4
  mask = jnp.ones((docs, ld), jnp.int32)

  def temp_bytes(chunk):
    grad = jax.grad(lambda q, d: scoring.maxsim(q, d, mask, chunk=chunk).sum(), argnums=(0, 1))
    compiled = jax.jit(grad).lower(jnp.ones((batch, lq, dim)), jnp.ones((docs, ld, dim))).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(0) >= sim_bytes
  assert temp_bytes(8) < sim_bytes / 2


# --- remat policies and dot_product_attention -----------------------------------------------------------

SMALL = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def torch_small():
  """A seeded random transformers BertModel, its weights in our layout, and a padded batch."""
  torch.manual_seed(0)
  model = transformers.BertModel._from_config(transformers.BertConfig(**SMALL.to_hf_dict()),
                                              attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
  params, unplaced = hf_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, SMALL)
  assert unplaced == []
  rng = np.random.default_rng(0)
  mask = (np.arange(10)[None] < np.array([[10], [6], [2]])).astype(np.int64)
  ids = rng.integers(1, SMALL.vocab_size, size=mask.shape) * mask
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
  return params, ids, mask, want.numpy()


def _loss_and_grads(params, ids, mask, **options):
  model = BertEncoder(SMALL, **options)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(*ids.shape, SMALL.hidden_size)), jnp.float32)

  def loss(p):
    hidden, _ = model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    return (hidden * weights * mask[..., None]).sum(), hidden

  (value, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, hidden, grads


@pytest.fixture(scope="module")
def default_loss_and_grads(torch_small):
  params, ids, mask, _ = torch_small
  value, _, grads = _loss_and_grads(params, ids, mask)
  return value, grads


@pytest.mark.parametrize("options", [
    dict(attention="dot_product_attention"),
    dict(remat="full"),
    dict(remat="dots_saveable"),
    dict(remat="dots_with_no_batch_dims_saveable", attention="dot_product_attention"),
])
def test_remat_and_attention_options_match_torch_and_the_default_gradients(torch_small, default_loss_and_grads,
                                                                          options):
  params, ids, mask, want_hidden = torch_small
  ref_value, ref_grads = default_loss_and_grads
  value, hidden, grads = _loss_and_grads(params, ids, mask, **options)
  assert np.abs(np.asarray(hidden) - want_hidden).max() <= 1e-5
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  # Round-off relative to the largest gradient (the key bias's exact gradient is 0: softmax ignores shifts).
  atol = 1e-5 * max(np.abs(ref).max() for ref in jax.tree.leaves(ref_grads))
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_dot_product_attention_refuses_attention_dropout(torch_small):
  params, ids, mask, _ = torch_small
  config = dataclasses.replace(SMALL, attention_probs_dropout_prob=0.1)
  model = BertEncoder(config, attention="dot_product_attention")
  with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
    model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
  with pytest.raises(config_lib.ConfigError, match="attention_probs_dropout_prob=0"):
    config_lib.validate(modes.with_overrides(colbert_config.get_config("demo"), {
        "model.attention": "dot_product_attention", "model.bert.attention_probs_dropout_prob": "0.1"}), 1)
  with pytest.raises(ValueError, match="remat must be"):
    BertEncoder(SMALL, remat="dots").apply({"params": params}, ids, mask)


# --- collectives of the sharded step --------------------------------------------------------------------

HLO = """
  %all-reduce.1 = (f32[64,32]{1,0}, f32[]) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %all-gather-start = (bf16[8,32]{1,0}, bf16[64,32]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done = bf16[64,32]{1,0} all-gather-done(%all-gather-start)
  ROOT %all-to-all = s32[32,12]{1,0} all-to-all(%ids), dimensions={0}
  %fusion = f32[64,32]{1,0} fusion(%all-reduce.1), kind=kLoop
"""


def test_collectives_parsed_and_classed_by_hand():
  found = hlo.collectives(HLO)
  assert [c.op for c in found] == ["all-reduce", "all-gather", "all-to-all"]
  summary = hlo.summarize(found, params={(32, 64)})
  assert summary["by_op"] == {"all-reduce": {"count": 1, "bytes": 64 * 32 * 4 + 4},
                                "all-gather": {"count": 1, "bytes": 64 * 32 * 2},
                                "all-to-all": {"count": 1, "bytes": 32 * 12 * 4}}
  assert summary["by_content"] == {"params": 64 * 32 * 6, "scalars": 4, "activations": 32 * 12 * 4}
  assert summary["activation_gathers"] == 1


def test_fsdp_step_gathers_parameters_and_never_the_batch():
  config = tiny_config(data=1, fsdp=8)
  compiled, state, shardings = compile_step(config, jax.devices())
  summary = hlo.summarize(hlo.collectives(compiled.as_text()), hlo.param_shapes(state.params, shardings.params))
  assert summary["activation_gathers"] == 0
  gathered = {c.operands[0].dims for c in hlo.collectives(compiled.as_text()) if c.op == "all-gather"}
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(shardings.params)):
    name = jax.tree_util.keystr(path)
    if "fsdp" in jax.tree.leaves(tuple(s.spec)) and "pooler" not in name:  # the students skip the pooler
      assert x.shape in gathered, name


def test_in_batch_groups_across_devices_show_as_activation_gathers():
  """The detector's negative control: groups of 4 queries with one query per device need the other
  devices' document vectors."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  score = jax.jit(lambda q, d, m: scoring.grouped_scores(scoring.maxsim, q, d, m, group_size=4),
                  in_shardings=(rows, rows, rows))
  compiled = score.lower(jnp.ones((8, 5, 16)), jnp.ones((8, 3, 6, 16)), jnp.ones((8, 3, 6))).compile()
  assert hlo.summarize(hlo.collectives(compiled.as_text()), set())["activation_gathers"] > 0


# --- --mode=benchmark ------------------------------------------------------------------------------------

def run_benchmark(workdir, *overrides):
  args = [sys.executable, "-m", "pairdistill_jax.main", "--mode=benchmark", f"--workdir={workdir}",
          "--config=configs/colbert.py:demo,batch_size=32,nway=4", "--config.model.query_maxlen=8",
          "--config.model.doc_maxlen=12", "--config.model.bert.vocab_size=64",
          "--config.model.bert.hidden_size=32", "--config.model.bert.num_hidden_layers=1",
          "--config.model.bert.intermediate_size=64", "--config.data.max_pairs=3",
          "--config.benchmark.steps=2", "--config.benchmark.warmup=0", *overrides]
  return subprocess.run(args, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_mode_prints_one_json_line_per_measurement(tmp_path):
  result = run_benchmark(tmp_path, "--config.benchmark.what=train,encode", "--config.benchmark.encode_batch=20",
                         "--config.benchmark.peak_flops=1e12")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line[len(measure.RECORD_PREFIX):]) for line in result.stdout.splitlines()
           if line.startswith(measure.RECORD_PREFIX)]
  assert [r["benchmark"] for r in lines] == ["train_step", "encode"]
  assert [json.loads(line) for line in (tmp_path / measure.RECORD_FILE).read_text().splitlines()] == lines
  train, encode = lines
  assert train["devices"] == 8 and train["batch_size"] == 32 and train["timed_steps"] == 2
  assert train["step_s_median"] <= train["step_s_p90"]
  assert train["queries_per_s"] == pytest.approx(32 / train["step_s_median"])
  assert train["tokens_per_s"] == pytest.approx(32 * (8 + 4 * 12) / train["step_s_median"])
  assert train["mfu"] == pytest.approx(train["model_flops_per_step"] / train["step_s_median"] / 8e12)
  assert train["compiled_temp_bytes"] > 0 and train["compile_s"] > 0
  # Data parallel with in-batch groups inside a device: gradients are all-reduced, nothing is gathered.
  assert train["collectives"]["activation_gathers"] == 0
  assert "all-gather" not in train["collectives"]["by_op"]
  assert train["collectives"]["by_op"]["all-reduce"]["count"] > 0
  assert train["collectives"]["by_content"]["params"] > 0
  assert encode["encode_batch"] == 24  # rounded up to the 8 devices
  assert encode["passages_per_s"] == pytest.approx(24 / encode["step_s_median"])
  assert "train_step: config" in result.stdout and "encode: encode_doc" in result.stdout
  assert "activation gathers 0" in result.stdout


@pytest.mark.parametrize("overrides, message", [
    (["--config.benchmark.variants=model.nope=1"], "no field 'model.nope'"),
    (["--config.benchmark.variants=model.remat=sometimes"], "model.remat must be one of"),
    (["--config.benchmark.what=train,fly"], "benchmark.what"),
    (["--config.benchmark.what=scaling", "--config.benchmark.scaling=1,16"], "device counts must lie in 1..8"),
])
def test_benchmark_mode_rejects_bad_settings_before_compiling(tmp_path, overrides, message):
  result = run_benchmark(tmp_path, *overrides)
  assert result.returncode == 2
  assert message in result.stderr
  assert not (tmp_path / measure.RECORD_FILE).exists()


def test_variants_and_overrides():
  assert modes.parse_variants(" model.remat=full ; loss.maxsim_chunk=8,model.dtype=bfloat16;") == [
      ("model.remat=full", {"model.remat": "full"}),
      ("loss.maxsim_chunk=8,model.dtype=bfloat16", {"loss.maxsim_chunk": "8", "model.dtype": "bfloat16"})]
  config = modes.with_overrides(tiny_config(), {"loss.maxsim_chunk": "8", "loss.in_batch": "false",
                                                 "optim.lr": "2e-5"})
  assert (config.loss.maxsim_chunk, config.loss.in_batch, config.optim.lr) == (8, False, 2e-5)
  assert tiny_config().loss.maxsim_chunk == 0
