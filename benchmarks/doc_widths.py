"""Train-step time at real passage lengths: fixed padding to doc_maxlen vs length-bucketed widths (data.doc_widths).

  .venv/bin/python benchmarks/doc_widths.py                                  # SciFact, MiniLM shape, 4 x 16
  .venv/bin/python benchmarks/doc_widths.py --corpus=/data/msmarco/collection.tsv --queries=... --batches=8

Tokenises a sample of the corpus's passages (and queries) with the ColBERT tokenizer over the all-MiniLM-L6-v2
vocabulary (configs/scifact.py minilm_dir(); title ' | ' text as ColBERT joins them) and prints their length
distribution. Then it draws `--batches` training batches of `batch_size` queries x `nway` passages from that
sample (real token ids and masks; random teacher scores and pairs) and times the project's jitted train step
(train/step.py, a random init of the MiniLM shape: 6 layers x 384, ColBERT dim 128, float32) on each batch
twice, interleaved (ABBA order): padded to doc_maxlen ("fixed"), and cut to the width data.doc_widths picks
for it ("bucketed": the smallest width that holds the batch's longest passage, batching.doc_width). Each
width is compiled before timing. Then it times one step at every width with the same batch shape (what a
batch of that width would cost), and the share of batches that would get each width at the paper's shape.
Prints the load average before and after: the machine may be shared.

A script rather than `--mode=benchmark`, whose measurements use synthetic full-length batches of the config's
shapes and need no data or tokenizer: this one needs a corpus and a tokenizer to get the lengths.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from configs import scifact  # noqa: E402
from pairdistill_jax import config_lib, sharding, students  # noqa: E402
from pairdistill_jax.bench import modes  # noqa: E402
from pairdistill_jax.data import batching, formats  # noqa: E402
from pairdistill_jax.data.tokenization import ColBERTTokenizer, load_tokenizer  # noqa: E402
from pairdistill_jax.models.bert import BertConfig  # noqa: E402
from pairdistill_jax.train import state as state_lib  # noqa: E402
from pairdistill_jax.train.step import make_train_step  # noqa: E402

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PAPER_SHAPE = (32, 64)  # queries x nway of the ColBERT recipe


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--corpus", default=scifact.data_dir(), help="BEIR folder, corpus.jsonl or collection.tsv")
  parser.add_argument("--queries", default="", help="queries (default: --corpus when it is a BEIR folder)")
  parser.add_argument("--split", default="train", help="a BEIR folder's query split")
  parser.add_argument("--sample", type=int, default=2000, help="passages tokenised for the length distribution")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--nway", type=int, default=16)
  parser.add_argument("--doc_maxlen", type=int, default=180)
  parser.add_argument("--query_maxlen", type=int, default=32)
  parser.add_argument("--doc_widths", default="64,128,180")
  parser.add_argument("--batches", type=int, default=4, help="drawn batches, each timed fixed and bucketed")
  parser.add_argument("--width_rounds", type=int, default=2, help="rounds of one step at every width")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def _colbert_config(args) -> "ml_collections.ConfigDict":  # noqa: F821
  config = config_lib.load_config(f"{ROOT / 'configs' / 'colbert.py'}:batch_size={args.batch_size},nway={args.nway}")
  config.model.update(dtype="float32", query_maxlen=args.query_maxlen, doc_maxlen=args.doc_maxlen)
  config.model.bert.update(vocab_size=30522, **MINILM)
  config.data.doc_widths = args.doc_widths
  config.loss.in_batch_group = min(config.loss.in_batch_group, args.batch_size)
  config_lib.validate(config, jax.device_count(), need_data=False)
  return config


def _load_texts(args, rng: np.random.Generator) -> tuple[list[str], list[str]]:
  docs = formats.text_source(args.corpus, "docs", split=args.split).read()
  queries_path = args.queries or (args.corpus if pathlib.Path(args.corpus).is_dir() else "")
  queries = formats.text_source(queries_path, "queries", split=args.split).read() if queries_path else {}
  doc_texts = list(docs.values())
  chosen = rng.choice(len(doc_texts), size=min(args.sample, len(doc_texts)), replace=False)
  query_texts = list(queries.values()) or ["what is the effect of this on that?"]
  print(f"corpus {args.corpus}: {len(doc_texts)} passages, {len(chosen)} sampled; {len(queries)} queries")
  return [doc_texts[i] for i in chosen], query_texts


def _percentiles(lengths: np.ndarray, doc_maxlen: int, widths: tuple[int, ...]) -> str:
  points = (10, 25, 50, 75, 90)
  cells = ", ".join(f"p{p} {np.percentile(lengths, p):.0f}" for p in points)
  shares = ", ".join(f"<= {w}: {(lengths <= w).mean():.1%}" for w in widths)
  return (f"passage tokens ([CLS] [D] ... [SEP], cut at {doc_maxlen}): mean {lengths.mean():.1f}, {cells}; "
          f"{shares}; cut at {doc_maxlen}: {(lengths >= doc_maxlen).mean():.1%}")


def _width_shares(lengths: np.ndarray, widths: tuple[int, ...], passages: int) -> str:
  """P(a batch of `passages` drawn passages gets width w) = F(w)^n - F(previous w)^n."""
  below = [0.0] + [float((lengths <= w).mean()) ** passages for w in widths]
  return ", ".join(f"{w}: {below[i + 1] - below[i]:.1%}" for i, w in enumerate(widths))


def _cut(batch: dict, width: int) -> dict:
  return {k: v[..., :width] if k.startswith("d_") else v for k, v in batch.items()}


def main() -> None:
  args = _parse_args()
  print(f"load average before: {os.getloadavg()} ({os.cpu_count()} CPUs); jax devices: {jax.devices()}")
  rng = np.random.default_rng(args.seed)
  config = _colbert_config(args)
  widths = config_lib.doc_widths(config)
  tokenizer = ColBERTTokenizer(load_tokenizer(scifact.minilm_dir()), query_maxlen=args.query_maxlen,
                               doc_maxlen=args.doc_maxlen)
  doc_texts, query_texts = _load_texts(args, rng)
  docs = tokenizer.encode_docs(doc_texts)
  lengths = docs["mask"].sum(1)
  print(_percentiles(lengths, args.doc_maxlen, widths))
  for shape in ((args.batch_size, args.nway), PAPER_SHAPE):
    print(f"share of {shape[0]} x {shape[1]} batches by width: {_width_shares(lengths, widths, shape[0] * shape[1])}")

  def draw_batch() -> dict:
    rows = rng.choice(len(doc_texts), size=args.batch_size * args.nway, replace=True)
    queries = tokenizer.encode_queries([query_texts[i] for i in rng.choice(len(query_texts), args.batch_size)])
    batch = modes.synthetic_batch(config, args.batch_size, seed=int(rng.integers(1 << 30)))
    batch.update(q_ids=queries["ids"], q_mask=queries["mask"])
    shape = (args.batch_size, args.nway, args.doc_maxlen)
    batch.update({f"d_{k}": docs[k][rows].reshape(shape) for k in ("ids", "mask", "score_mask")})
    return batch

  batches = [draw_batch() for _ in range(args.batches)]
  chosen = [batching.doc_width(int(b["d_mask"].sum(-1).max()), widths) for b in batches]
  print(f"drawn batches' widths: {chosen}")

  mesh = sharding.make_mesh(config)
  model = students.make_student(config.model, BertConfig(**config.model.bert))
  tx = state_lib.optimizer(config)
  key = jax.random.PRNGKey(1)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create(model, tx, config, mesh, jax.random.PRNGKey(0))
    step = make_train_step(model, tx, config, mesh, shardings)
    batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
    holder = {"state": state}

    def run(batch: dict) -> float:
      device_batch = sharding.shard_batch(batch, batch_sh)
      start = time.perf_counter()
      holder["state"], metrics = step(holder["state"], device_batch, key)
      jax.block_until_ready(metrics)
      return time.perf_counter() - start

    for width in widths:  # compile every width before timing
      compile_s = run(_cut(batches[0], width))
      print(f"compiled width {width}: {compile_s:.1f} s (first call)")

    fixed, bucketed = [], []
    for i, (batch, width) in enumerate(zip(batches, chosen)):
      order = ("fixed", "bucketed") if i % 2 == 0 else ("bucketed", "fixed")
      for arm in order:
        if arm == "fixed":
          fixed.append(run(batch))
        else:
          bucketed.append(run(_cut(batch, width)))
    per_width = {w: [] for w in widths}
    for r in range(args.width_rounds):
      for width in (widths if r % 2 == 0 else widths[::-1]):
        per_width[width].append(run(_cut(batches[0], width)))

  shape = f"{args.batch_size} x nway {args.nway}, query_maxlen {args.query_maxlen}, MiniLM 6x384 ColBERT, float32"
  print(f"\ntrain step, {shape}, on {mesh.size} {jax.devices()[0].platform} device(s):")
  print(f"  fixed    (doc_maxlen {args.doc_maxlen}): mean {np.mean(fixed):.3f} s  steps {np.round(fixed, 3).tolist()}")
  print(f"  bucketed ({'/'.join(map(str, widths))}): mean {np.mean(bucketed):.3f} s  steps "
        f"{np.round(bucketed, 3).tolist()}  widths {chosen}")
  print(f"  bucketed / fixed: {np.mean(bucketed) / np.mean(fixed):.3f}")
  for width, times in per_width.items():
    print(f"  one step at width {width}: mean {np.mean(times):.3f} s  ({np.round(times, 3).tolist()})")
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
