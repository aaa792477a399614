"""The machine a benchmark ran on: CPU model and ISA, cores, memory pages, library versions, XLA, allocator and
oneDNN/MKL settings.

Speed ratios between JAX and PyTorch depend on the CPU (AVX2 against AVX-512/AMX kernels) and on what a fresh
page of memory costs (a virtual machine's page faults, transparent huge pages, the malloc in use), so every
benchmark prints `machine_line()` and records `machine_info()` beside its numbers.
"""

from __future__ import annotations

import os
import platform
import sys

from pairdistill_jax import malloc

# /proc/cpuinfo flag -> the name Intel and AMD give the extension.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
             "amx_tile": "AMX", "amx_bf16": "AMX-BF16"}
_ENV_PREFIXES = ("XLA_FLAGS", "OMP_", "MKL_", "ONEDNN_", "DNNL_", "KMP_", "OPENBLAS_", "ATEN_CPU_CAPABILITY",
                 "GLIBC_TUNABLES", "MALLOC_", "LD_PRELOAD")


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def _torch_settings() -> dict | None:
  """torch's version and CPU back ends, if the caller has imported torch (None otherwise: nothing is loaded)."""
  torch = sys.modules.get("torch")
  if torch is None:
    return None
  return {"version": torch.__version__, "threads": torch.get_num_threads(),
          "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
          "mkl": bool(torch.backends.mkl.is_available()),
          "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def machine_info() -> dict:
  """What identifies the machine and software a measurement ran on (recorded in benchmark JSON)."""
  cpu = _cpuinfo()
  flags = set(cpu.get("flags", "").split())
  info = {
      "cpu": cpu.get("model name", platform.processor() or platform.machine()),
      "cpu_id": f"family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')} stepping "
                f"{cpu.get('stepping', '?')}",
      "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags],
      "cores": os.cpu_count(),
      "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "virtual_machine": "hypervisor" in flags,
      "transparent_huge_pages": malloc.thp_mode() or "unknown",
      "python": platform.python_version(),
      "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
      "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }
  if "jax" in sys.modules:
    import jax  # noqa: PLC0415  (only reported where the caller has loaded it)
    import jaxlib  # noqa: PLC0415
    info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend())
  torch = _torch_settings()
  if torch is not None:
    info["torch"] = torch
  return info


def machine_line(info: dict | None = None) -> str:
  """One line for the log and the README: `machine: <cpu> (<id>), <isa>, N cores; jax ...; torch ...; env`."""
  info = machine_info() if info is None else info
  parts = [f"machine: {info['cpu']} ({info['cpu_id']}), {' '.join(info['isa']) or 'no AVX2'}, "
           f"{info['usable_cores']}/{info['cores']} cores{' (virtual machine)' if info['virtual_machine'] else ''}, "
           f"transparent huge pages {info['transparent_huge_pages']}"]
  if "jax" in info:
    parts.append(f"jax {info['jax']} jaxlib {info['jaxlib']} ({info['backend']})")
  if "torch" in info:
    t = info["torch"]
    parts.append(f"torch {t['version']} ({t['threads']} threads, oneDNN {'on' if t['onednn'] else 'off'}, "
                 f"MKL {'on' if t['mkl'] else 'off'}, {t['cpu_capability']})")
  parts.append(" ".join(f"{k}={v!r}" for k, v in info["env"].items()) or "no XLA/oneDNN/MKL/OMP/malloc variables")
  if info["loadavg"] is not None:
    parts.append(f"load {info['loadavg']:.2f}")
  return "; ".join(parts)
