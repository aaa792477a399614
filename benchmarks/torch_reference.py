"""What benchmarks/step_vs_torch.py and encode_vs_torch.py share: the XLA flags, interleaved timing, the
PyTorch ColBERT of the project's shape (transformers `BertModel`, default SDPA attention), padded token ids.

It imports neither jax nor torch at the top: `apply_flags` must run before they are imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# --ynn: 'default' leaves XLA's own choice (jaxlib 0.10 sends dots to YNNPACK fusions), 'off' enables no YNN
# fusion type (XLA's own dot emitter), 'on' every type; anything else is passed as the type list ('dot').
YNN_VALUES = {"off": "", "on": "dot,eltwise,reduce"}
# --isa: the newest instructions both sides may use, so that one machine runs another CPU's code paths: XLA's
# code generator, ATen's vectorised kernels, MKL's and oneDNN's dispatch (set before jax and torch load).
ISA_CAPS = {
    "avx2": {"XLA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"XLA": "AVX512", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
CLS, SEP, MASK, PAD = 101, 102, 103, 0  # bert-base-uncased ids
QUERY_MARKER, DOC_MARKER = 1, 2  # [unused0], [unused1]


def add_shape_args(parser: argparse.ArgumentParser, *, warmup: int) -> None:
  """The MiniLM shape (all-MiniLM-L6-v2), the timing and the XLA flag options both scripts take."""
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--intermediate", type=int, default=1536)
  parser.add_argument("--vocab", type=int, default=30522)
  parser.add_argument("--dim", type=int, default=128, help="ColBERT vector size")
  parser.add_argument("--pairs", type=int, default=5, help="(JAX, torch) measurement pairs, at least 3")
  parser.add_argument("--steps", type=int, default=1, help="calls per measurement")
  parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls of each side after compiling")
  parser.add_argument("--ynn", default="default",
                      help="off | on | default | a YNN fusion type list (sets %s before jax loads)" % YNN_FLAG)
  parser.add_argument("--isa", default="native", choices=("native", *ISA_CAPS),
                      help="cap both sides at AVX2 or AVX-512 without BF16/AMX (XLA's --xla_cpu_max_isa, "
                           "ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), to measure another "
                           "CPU's code paths on this one; native: what this CPU has")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="", help="append the RESULT record (machine, medians, ratio) to this file")
  parser.add_argument("--attention", default="auto",
                      help="model.attention of the JAX side, or 'values': both sides' attention replaced by its "
                           "values (plus 0 x queries and keys, so that their projections still run), which "
                           "measures what attention costs each side")


def check_args(args: argparse.Namespace) -> None:
  if args.pairs < 3 or args.steps < 1 or args.warmup < 1:
    raise SystemExit(f"--pairs must be >= 3, --steps and --warmup >= 1; got {args.pairs}, {args.steps}, "
                     f"{args.warmup}")


def apply_flags(args: argparse.Namespace) -> None:
  """Before jax and torch load: the YNN fusion flag in XLA_FLAGS (replacing any given) unless --ynn=default,
  and --isa's caps on both sides (XLA_FLAGS and the torch libraries' variables)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if args.ynn != "default":
    flags = [f for f in flags if not f.startswith(YNN_FLAG + "=")]
    flags.append(f"{YNN_FLAG}={YNN_VALUES.get(args.ynn, args.ynn)}")
  if args.isa != "native":
    caps = ISA_CAPS[args.isa]
    flags = [f for f in flags if not f.startswith("--xla_cpu_max_isa=")] + [f"--xla_cpu_max_isa={caps['XLA']}"]
    os.environ.update({name: value for name, value in caps.items() if name != "XLA"})
  os.environ["XLA_FLAGS"] = " ".join(flags)


VALUES = "values"  # --attention=values: the ablation without attention


def jax_attention(attention: str) -> str:
  """The model.attention the JAX side runs; for --attention=values the project's `attend` is replaced by the
  values (the kernel named then is never called)."""
  if attention != VALUES:
    return attention
  from pairdistill_jax.models import bert

  bert.attend = lambda kernel, q, k, v, mask_bias, dropout: v + 0 * (q + k)
  return "einsum"


def torch_attention(attention: str) -> str:
  """The transformers attention implementation of the torch side: SDPA, or for --attention=values the values
  (as `jax_attention`)."""
  if attention != VALUES:
    return "sdpa"
  import transformers

  def values(module, query, key, value, attention_mask, **kwargs):
    return (value + 0 * (query + key)).transpose(1, 2).contiguous(), None

  transformers.AttentionInterface.register(VALUES, values)
  return VALUES


def loadavg() -> str:
  """The 1, 5 and 15 minute load averages."""
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def print_setup(torch_module, args: argparse.Namespace) -> None:
  """The machine line (CPU, ISA, cores, versions, flags: bench/machine.py) and the threads of both sides."""
  import jax  # noqa: F401  (loaded, so that the machine line reports it)

  from pairdistill_jax.bench import machine

  print(machine.machine_line())
  print(f"torch interop threads {torch_module.get_num_interop_threads()}; --ynn={args.ynn} --isa={args.isa}")
  print(f"shape: {args.layers} layers x {args.hidden} hidden, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}, dim {args.dim}; float32")


@dataclasses.dataclass(frozen=True)
class Timing:
  """Per call: wall seconds, process CPU seconds (user + system), system seconds and minor page faults (fresh
  pages the kernel had to map: memory a side's allocator returned and took back)."""
  wall_s: float
  cpu_s: float
  sys_s: float
  page_faults: float


def timed(run: Callable[[], object], calls: int) -> Timing:
  """`Timing` per call of `run` (which blocks until its results exist)."""
  usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(calls):
    run()
  wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
  user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
  return Timing(wall / calls, (user + system) / calls, system / calls, (after.ru_minflt - usage.ru_minflt) / calls)


def interleaved(run_jax: Callable[[], object], run_torch: Callable[[], object], pairs: int,
                calls: int) -> tuple[list[Timing], list[Timing]]:
  """JAX, torch, JAX, torch, ... `pairs` times; prints each pair and the load average around them."""
  print(f"load average before: {loadavg()}")
  loads = [float(loadavg().split()[0])]
  jax_times, torch_times = [], []
  for i in range(pairs):
    jax_times.append(timed(run_jax, calls))
    torch_times.append(timed(run_torch, calls))
    j, t = jax_times[-1], torch_times[-1]
    print(f"pair {i}: jax {j.wall_s:.3f} s (cpu {j.cpu_s:.2f}, sys {j.sys_s:.2f}) torch {t.wall_s:.3f} s "
          f"(cpu {t.cpu_s:.2f}, sys {t.sys_s:.2f}) torch/jax {t.wall_s / j.wall_s:.2f}  load {loadavg()}")
    loads.append(float(loadavg().split()[0]))
  print(f"load average after: {loadavg()}")
  if max(loads) > os.cpu_count() + 1:  # this process alone keeps the load near the core count
    print(f"warning: load average up to {max(loads):.1f} on {os.cpu_count()} cores: other processes shared the "
          f"CPUs, which slows torch's OpenMP threads more than XLA's (the ratio is inflated); rerun when quiet")
  return jax_times, torch_times


def medians(times: list[Timing]) -> Timing:
  return Timing(*(statistics.median(getattr(t, f.name) for t in times) for f in dataclasses.fields(Timing)))


def print_medians(jax_times: list[Timing], torch_times: list[Timing]) -> tuple[Timing, Timing]:
  """Medians per call of both sides, their CPU time over wall time (cores kept busy) and what fresh memory
  pages cost them (system time, minor page faults: both depend on the machine's kernel and allocator)."""
  j, t = medians(jax_times), medians(torch_times)
  print(f"median jax {j.wall_s:.3f} s (cpu {j.cpu_s:.2f} s, {j.cpu_s / j.wall_s:.2f} cores) "
        f"torch {t.wall_s:.3f} s (cpu {t.cpu_s:.2f} s, {t.cpu_s / t.wall_s:.2f} cores)")
  print(f"cpu-time ratio torch/jax {t.cpu_s / j.cpu_s:.3f}")
  print(f"system time and page faults a call: jax {j.sys_s:.2f} s, {j.page_faults:,.0f} faults "
        f"({j.page_faults * resource.getpagesize() / 2**20:,.0f} MiB of fresh pages); torch {t.sys_s:.2f} s, "
        f"{t.page_faults:,.0f} faults ({t.page_faults * resource.getpagesize() / 2**20:,.0f} MiB)")
  return j, t


def print_result(benchmark: str, args: argparse.Namespace, j: Timing, t: Timing, **extra) -> None:
  """The `RESULT {json}` line (machine, arguments, medians; appended to --json when given), then `ratio R` last."""
  from pairdistill_jax.bench import machine

  record = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine.machine_info(),
            "args": vars(args), "jax_s": j.wall_s, "torch_s": t.wall_s, "jax_cpu_s": j.cpu_s, "torch_cpu_s": t.cpu_s,
            "jax_sys_s": j.sys_s, "torch_sys_s": t.sys_s, "jax_page_faults": j.page_faults,
            "torch_page_faults": t.page_faults,
            "ratio": t.wall_s / j.wall_s, **extra}
  line = json.dumps(record, sort_keys=True)
  print(f"RESULT {line}")
  if args.json:
    with open(args.json, "a", encoding="utf-8") as f:
      f.write(line + "\n")
  print(f"ratio {record['ratio']:.3f}")


def padded_ids(rng: np.random.Generator, rows: int, length: int, vocab: int, min_len: int,
               marker: int) -> tuple[np.ndarray, np.ndarray]:
  """[CLS] marker words [SEP] of min_len..length tokens, right-padded with [PAD]: (ids, mask) int32."""
  lengths = rng.integers(min(min_len, length), length + 1, size=rows)
  ids = rng.integers(1000, vocab, size=(rows, length)).astype(np.int32)
  ids[:, 0], ids[:, 1] = CLS, marker
  ids[np.arange(rows), lengths - 1] = SEP
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, PAD).astype(np.int32), mask


def torch_colbert(torch, args: argparse.Namespace, dropout: float, attention_dropout: float):
  """transformers BertModel (no pooler; SDPA attention, or none with --attention=values) + bias-free Linear
  H->dim, as stanford HF_ColBERT."""
  import transformers

  class TorchColBERT(torch.nn.Module):

    def __init__(self):
      super().__init__()
      config = transformers.BertConfig(
          vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
          num_attention_heads=args.heads, intermediate_size=args.intermediate, hidden_dropout_prob=dropout,
          attention_probs_dropout_prob=attention_dropout, attn_implementation=torch_attention(args.attention))
      self.bert = transformers.BertModel(config, add_pooling_layer=False)
      self.linear = torch.nn.Linear(args.hidden, args.dim, bias=False)

    def forward(self, ids_BxL, mask_BxL):
      hidden_BxLxH = self.bert(input_ids=ids_BxL, attention_mask=mask_BxL).last_hidden_state
      return torch.nn.functional.normalize(self.linear(hidden_BxLxH), dim=-1)

  torch.manual_seed(args.seed)
  model = TorchColBERT()
  print(f"torch attention: {model.bert.config._attn_implementation}")
  return model
