"""Where corpus encoding's time goes: one MiniLM layer's pieces, XLA against torch, each timed alone on the CPU.

  .venv/bin/python benchmarks/encode_parts_vs_torch.py        # encode_vs_torch's call: 128 passages x 256 tokens

The four matrix products of a layer (QKV, attention output, FFN in and out) as jitted `x @ w` against
`torch.mm` (oneDNN), then attention softmax(QKᵀ)V over [passages, heads, tokens, head dim] by the project's
kernels (`models/attention.py`: `einsum`, and `chunked`, what model.attention=auto runs on CPU), as
`jax.nn.dot_product_attention` (XLA) and as torch's fused `scaled_dot_product_attention` and its unfused
equivalent. float32, random inputs, medians of
--repeats calls after one warm-up; XLA runs without YNNPACK fusions, as the CLI does.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_experimental_ynn_fusion_type=".strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pairdistill_jax.bench import machine  # noqa: E402
from pairdistill_jax.models import attention as kernels  # noqa: E402


def median_seconds(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def gemms(tokens: int, hidden: int, intermediate: int, repeats: int) -> None:
  matmul = jax.jit(lambda x, w: x @ w)
  total_jax = total_torch = 0.0
  for name, k, n in (("qkv", hidden, 3 * hidden), ("attention out", hidden, hidden),
                     ("ffn in", hidden, intermediate), ("ffn out", intermediate, hidden)):
    x, w = np.random.rand(tokens, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    jx, jw, tx, tw = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
    t_jax = median_seconds(lambda: matmul(jx, jw).block_until_ready(), repeats)
    with torch.inference_mode():
      t_torch = median_seconds(lambda: torch.mm(tx, tw), repeats)
    gflop = 2 * tokens * k * n / 1e9
    total_jax, total_torch = total_jax + t_jax, total_torch + t_torch
    print(f"gemm {name:14s} {tokens}x{k}x{n}: jax {t_jax * 1e3:6.1f} ms ({gflop / t_jax:5.0f} GFLOP/s)  torch "
          f"{t_torch * 1e3:6.1f} ms ({gflop / t_torch:5.0f} GFLOP/s)  torch/jax {t_torch / t_jax:.2f}")
  print(f"gemm one layer: jax {total_jax * 1e3:.0f} ms  torch {total_torch * 1e3:.0f} ms  torch/jax "
        f"{total_torch / total_jax:.2f}")


def attention(batch: int, heads: int, length: int, head_dim: int, repeats: int) -> None:
  q = np.random.rand(batch, heads, length, head_dim).astype(np.float32)
  jq, tq = jnp.asarray(q).swapaxes(1, 2), torch.from_numpy(q)  # JAX's kernels take [B, L, N, D]
  bias = kernels.attention_mask_bias(jnp.ones((batch, length), jnp.int32))

  def project_kernel(kernel):
    return jax.jit(lambda x: kernels.attend(kernel, x, x, x, bias, dropout=lambda p: p))

  def dot_product_attention(x):
    return jax.nn.dot_product_attention(x, x, x, implementation="xla")

  chunks = kernels.chunk_count(batch, heads, length)
  runs = {"jax einsum": project_kernel("einsum"), f"jax chunked ({chunks} chunks)": project_kernel("chunked"),
          "jax dot_product_attention (xla)": jax.jit(dot_product_attention)}
  print(f"attention softmax(QK^T)V, {batch} x {heads} heads, {length} x {length}, head dim {head_dim}:")
  for name, fn in runs.items():
    print(f"  {name:34s} {median_seconds(lambda fn=fn: fn(jq).block_until_ready(), repeats) * 1e3:6.0f} ms")
  with torch.inference_mode():
    fused = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tq, tq), repeats)
    unfused = median_seconds(lambda: torch.softmax(tq @ tq.transpose(-1, -2), -1) @ tq, repeats)
  print(f"  {'torch scaled_dot_product_attention':34s} {fused * 1e3:6.0f} ms")
  print(f"  {'torch softmax(q @ k^T) @ v':34s} {unfused * 1e3:6.0f} ms")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--passages", type=int, default=128)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--intermediate", type=int, default=1536)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(machine.machine_line())
  gemms(args.passages * args.length, args.hidden, args.intermediate, args.repeats)
  attention(args.passages, args.heads, args.length, args.hidden // args.heads, args.repeats)


if __name__ == "__main__":
  main()
