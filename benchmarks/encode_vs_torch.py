"""Corpus encoding, JAX (the retrieval Encoder's jitted forward) against PyTorch `transformers`, passages/s.

  .venv/bin/python benchmarks/encode_vs_torch.py                # MiniLM shape, 256 tokens, batch 128, 5 pairs
  .venv/bin/python benchmarks/encode_vs_torch.py --ynn=off      # XLA without YNNPACK fusions
  .venv/bin/python benchmarks/encode_vs_torch.py --ynn=off --isa=avx2  # both capped at AVX2: an AVX2 CPU
  .venv/bin/python benchmarks/encode_vs_torch.py --batch_size=32 --pairs=3   # a quicker look
  .venv/bin/python benchmarks/encode_vs_torch.py --attention=einsum # another attention kernel (default auto)
  .venv/bin/python benchmarks/encode_vs_torch.py --attention=values # both sides without attention: its cost

JAX: `retrieval.encoders.Encoder.encode('doc', ...)` of a ColBERT student at the MiniLM shape (6 layers x 384,
12 heads, intermediate 1536), float32: rows put on the devices, the jitted `encode_doc` (BERT, Linear H->128,
L2 normalisation), vectors back to host numpy, as `retrieval.corpus.encode_chunk` calls it. The batch size
defaults to the config's eval.batch_size (the rows per call of corpus encoding).
PyTorch: `BertModel` (default SDPA attention) + the same Linear and normalisation, eval mode, under
`torch.inference_mode()`, with the same weights and token ids.

Passages are [CLS] [unused1] words [SEP] of --min_len..--length tokens (default: all --length long) right-padded.
After compiling and --warmup untimed calls of each, they are timed alternately (JAX, torch, JAX, torch, ...)
for --pairs pairs of --steps batches. The last line is `ratio R` with R = JAX passages/s / torch passages/s:
above 1, JAX is faster.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch_reference as ref  # noqa: E402  (imports neither jax nor torch)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ref.add_shape_args(parser, warmup=1)
  parser.add_argument("--length", type=int, default=256, help="tokens per passage (the encoding width)")
  parser.add_argument("--min_len", type=int, default=0, help="shortest passage (0: all --length long)")
  parser.add_argument("--batch_size", type=int, default=0, help="passages per call (0: eval.batch_size)")
  args = parser.parse_args()
  ref.check_args(args)
  return args


def colbert_config(args: argparse.Namespace):
  """configs/colbert.py's model at the requested shape, float32."""
  from configs import colbert

  config = colbert.get_config()
  config.model.update(doc_maxlen=args.length, dim=args.dim, dtype="float32",
                      attention=ref.jax_attention(args.attention))
  config.model.bert.update(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=args.intermediate)
  args.batch_size = args.batch_size or config.eval.batch_size
  return config


def jax_encoder(config):
  """The retrieval Encoder of a randomly initialised ColBERT student.

  Encoding token ids needs no tokenizer: a stand-in holds the fields the Encoder records in its settings.
  """
  import jax
  from pairdistill_jax import students
  from pairdistill_jax.bench import modes
  from pairdistill_jax.retrieval.encoders import Encoder
  from pairdistill_jax.train import state as state_lib

  model_cfg = config.model
  module = students.make_student(model_cfg, modes.bert_config(config))
  params = state_lib.init_params(module, config, jax.random.PRNGKey(0))
  tokenizer = types.SimpleNamespace(tokenizer=range(config.model.bert.vocab_size),
                                    query_maxlen=model_cfg.query_maxlen, doc_maxlen=model_cfg.doc_maxlen,
                                    query_token="[unused0]", doc_token="[unused1]",
                                    mask_punctuation=model_cfg.mask_punctuation,
                                    attend_to_mask_tokens=model_cfg.attend_to_mask_tokens)
  return Encoder("colbert", module, params, tokenizer, name="random MiniLM-shaped ColBERT")


def torch_encoder(torch, config, params, args: argparse.Namespace):
  """The same ColBERT in PyTorch (eval mode, the JAX parameters)."""
  from pairdistill_jax.bench import modes
  from pairdistill_jax.convert import bert_table

  model = ref.torch_colbert(torch, args, 0.0, 0.0).eval()
  hf = bert_table.flax_to_hf(params["bert"], modes.bert_config(config))
  model.bert.load_state_dict({k: torch.tensor(v) for k, v in hf.items() if not k.startswith("pooler.")})
  model.linear.weight.data = torch.tensor(params["linear"]["kernel"].T)
  return model


def main() -> None:
  args = _parse_args()
  ref.apply_flags(args)
  import numpy as np
  import torch

  config = colbert_config(args)
  ref.print_setup(torch, args)
  print(f"encode: {args.batch_size} passages x {args.length} tokens a call; {args.pairs} pairs of {args.steps} calls")
  rng = np.random.default_rng(args.seed)
  ids, mask = ref.padded_ids(rng, args.batch_size, args.length, args.vocab, args.min_len or args.length,
                             ref.DOC_MARKER)
  encoder = jax_encoder(config)
  start = time.perf_counter()
  jax_vectors = encoder.encode("doc", ids, mask)
  print(f"jax compile and first call {time.perf_counter() - start:.1f} s")
  model = torch_encoder(torch, config, encoder.params, args)
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask)

  def run_torch():
    with torch.inference_mode():
      return model(ids_t, mask_t).numpy()

  diff = np.abs(jax_vectors - run_torch())[mask > 0].max()
  print(f"max |jax - torch| over the passages' token vectors: {diff:.2e}")
  for _ in range(args.warmup):
    encoder.encode("doc", ids, mask), run_torch()
  jax_times, torch_times = ref.interleaved(lambda: encoder.encode("doc", ids, mask), run_torch, args.pairs,
                                           args.steps)
  j, t = ref.print_medians(jax_times, torch_times)
  print(f"passages/s: jax {args.batch_size / j.wall_s:.1f} torch {args.batch_size / t.wall_s:.1f}")
  ref.print_result("encode_vs_torch", args, j, t, jax_passages_s=args.batch_size / j.wall_s,
                   torch_passages_s=args.batch_size / t.wall_s)


if __name__ == "__main__":
  main()
