"""The ColBERT train step, JAX (the project's own step) against PyTorch `transformers` on the same CPU.

  .venv/bin/python benchmarks/step_vs_torch.py                 # MiniLM shape, 2 queries x nway 16, 5 pairs
  .venv/bin/python benchmarks/step_vs_torch.py --ynn=off       # XLA without YNNPACK fusions
  .venv/bin/python benchmarks/step_vs_torch.py --ynn=off --isa=avx2  # both capped at AVX2: an AVX2 CPU
  .venv/bin/python benchmarks/step_vs_torch.py --pairs=3 --doc_len=64   # a quicker look
  .venv/bin/python benchmarks/step_vs_torch.py --dropout=0 --attention=values  # both sides without attention

JAX: `train.step.make_train_step` of configs/colbert.py with the MiniLM shape (6 layers x 384, 12 heads,
intermediate 1536), float32, the config's dropout (0.1 hidden and attention), the KD loss alone
(loss.pair_alpha=0, loss.in_batch=False), gradient clipping and AdamW, the state donated.
PyTorch: `BertModel` (default SDPA attention, same dropout) + bias-free Linear 384->128, L2-normalised
token vectors, MaxSim over the scored document tokens, KL(softmax(teacher) || softmax(scores)) over each
query's nway passages, loss.backward(), clip_grad_norm_ and AdamW.step(), from the JAX side's initial
weights (with --dropout=0 the first warm-up losses agree; the learning rates differ, the JAX schedule
starting its warmup at 0, which changes no timing).

Both get the same batch: queries [CLS] [unused0] words [SEP] then [MASK] up to query_len (the [MASK]s not
attended, as attend_to_mask_tokens=False), documents of doc_len/4..doc_len tokens right-padded, a tenth of
their tokens out of MaxSim (punctuation). After compiling and --warmup untimed steps of each, they are timed
alternately (JAX, torch, JAX, torch, ...) for --pairs pairs of --steps steps. The last line is
`ratio R` with R = torch median / JAX median step seconds: above 1, JAX is faster.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch_reference as ref  # noqa: E402  (imports neither jax nor torch)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ref.add_shape_args(parser, warmup=2)
  parser.add_argument("--queries", type=int, default=2, help="queries per step (train.batch_size)")
  parser.add_argument("--nway", type=int, default=16, help="passages per query")
  parser.add_argument("--query_len", type=int, default=32)
  parser.add_argument("--doc_len", type=int, default=128)
  parser.add_argument("--dropout", type=float, default=None,
                      help="hidden and attention dropout of both sides (default: the config's)")
  args = parser.parse_args()
  ref.check_args(args)
  return args


def colbert_config(args: argparse.Namespace):
  """configs/colbert.py at the requested shape, float32, the KD loss alone."""
  from configs import colbert

  config = colbert.get_config(f"batch_size={args.queries},nway={args.nway}")
  config.model.update(query_maxlen=args.query_len, doc_maxlen=args.doc_len, dim=args.dim, dtype="float32",
                      attention=ref.jax_attention(args.attention))
  config.model.bert.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=args.intermediate)
  if args.dropout is not None:
    config.model.bert.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
  config.loss.update(pair_alpha=0.0, in_batch=False)
  return config


def make_batch(config, args: argparse.Namespace) -> dict:
  """The project's synthetic batch (teacher scores, pairs, masks) with realistic token ids and padding."""
  import numpy as np
  from pairdistill_jax.bench import modes

  rng = np.random.default_rng(args.seed)
  batch = modes.synthetic_batch(config, args.queries, args.seed)
  q_ids, q_mask = ref.padded_ids(rng, args.queries, args.query_len, args.vocab, 8, ref.QUERY_MARKER)
  batch["q_ids"], batch["q_mask"] = np.where(q_mask > 0, q_ids, ref.MASK).astype(np.int32), q_mask
  rows, doc_shape = args.queries * args.nway, (args.queries, args.nway, args.doc_len)
  d_ids, d_mask = ref.padded_ids(rng, rows, args.doc_len, args.vocab, args.doc_len // 4, ref.DOC_MARKER)
  batch["d_ids"], batch["d_mask"] = d_ids.reshape(doc_shape), d_mask.reshape(doc_shape)
  batch["d_score_mask"] = (batch["d_mask"] * (rng.random(doc_shape) < 0.9)).astype(batch["d_mask"].dtype)
  return batch


def jax_step(config, batch: dict):
  """(mesh, initial parameters on the host, run): the project's compiled train step and a call of it that
  blocks on the new state."""
  import jax
  from pairdistill_jax import sharding, students
  from pairdistill_jax.bench import modes
  from pairdistill_jax.train import state as state_lib
  from pairdistill_jax.train.step import make_train_step

  mesh = sharding.make_mesh(config)
  model = students.make_student(config.model, modes.bert_config(config))
  tx = state_lib.optimizer(config)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create(model, tx, config, mesh, jax.random.PRNGKey(0))
    initial = jax.device_get(state.params)
    step = make_train_step(model, tx, config, mesh, shardings)
    batch = sharding.shard_batch(batch, sharding.batch_sharding(mesh, sharding.rules(config)))
    rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    print(f"jax compile {time.perf_counter() - start:.1f} s")
  current = {"state": state}

  def run():
    current["state"], metrics = compiled(current["state"], batch, rng)
    jax.block_until_ready((current["state"], metrics))
    return float(metrics["loss"])

  return mesh, initial, run


def torch_step(torch, config, batch: dict, initial, args: argparse.Namespace):
  """A PyTorch train step of the same model (the JAX side's initial weights), loss and optimizer on `batch`;
  returns a call of it."""
  from pairdistill_jax.bench import modes
  from pairdistill_jax.convert import bert_table

  bert_cfg, optim_cfg = config.model.bert, config.optim
  model = ref.torch_colbert(torch, args, bert_cfg.hidden_dropout_prob, bert_cfg.attention_probs_dropout_prob)
  hf = bert_table.flax_to_hf(initial["bert"], modes.bert_config(config))
  model.bert.load_state_dict({k: torch.tensor(v) for k, v in hf.items() if not k.startswith("pooler.")})
  model.linear.weight.data = torch.tensor(initial["linear"]["kernel"].T)
  model.train()
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps,
                          weight_decay=optim_cfg.weight_decay)
  t = {k: torch.from_numpy(v) for k, v in batch.items()}
  batch_size, nway, doc_len = t["d_ids"].shape

  def loss_fn():
    q_BxLqxD = model(t["q_ids"].long(), t["q_mask"])
    d_BxNxLdxD = model(t["d_ids"].reshape(-1, doc_len).long(), t["d_mask"].reshape(-1, doc_len)).reshape(
        batch_size, nway, doc_len, -1)
    sim_BxNxLqxLd = torch.einsum("bqd,bnkd->bnqk", q_BxLqxD, d_BxNxLdxD)
    sim_BxNxLqxLd = sim_BxNxLqxLd.masked_fill(t["d_score_mask"][:, :, None, :] == 0, -1e4)
    scores_BxN = sim_BxNxLqxLd.amax(-1).sum(-1) / config.loss.temperature
    return torch.nn.functional.kl_div(torch.log_softmax(scores_BxN, -1), torch.log_softmax(t["teacher"], -1),
                                      log_target=True, reduction="batchmean")

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, optim_cfg.clip_norm)
    opt.step()
    return loss.item()

  return run


def main() -> None:
  args = _parse_args()
  ref.apply_flags(args)
  import jax
  import torch

  config = colbert_config(args)
  ref.print_setup(torch, args)
  print(f"step: {args.queries} queries x nway {args.nway}, doc_len {args.doc_len}, query_len {args.query_len}; "
        f"dropout hidden {config.model.bert.hidden_dropout_prob} attention "
        f"{config.model.bert.attention_probs_dropout_prob}; {args.pairs} pairs of {args.steps} steps")
  batch = make_batch(config, args)
  print(f"document tokens {int(batch['d_mask'].sum())} of {batch['d_mask'].size}")
  mesh, initial, run_jax = jax_step(config, batch)
  run_torch = torch_step(torch, config, batch, initial, args)
  with jax.set_mesh(mesh):
    losses = [(run_jax(), run_torch()) for _ in range(args.warmup)]
    print("losses of the warm-up steps (same initial weights): " + ", ".join(
        f"jax {j:.5f} torch {t:.5f}" for j, t in losses))
    jax_times, torch_times = ref.interleaved(run_jax, run_torch, args.pairs, args.steps)
  j, t = ref.print_medians(jax_times, torch_times)
  ref.print_result("step_vs_torch", args, j, t)


if __name__ == "__main__":
  main()
