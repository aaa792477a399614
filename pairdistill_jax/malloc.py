"""glibc's malloc on transparent huge pages for the CLI's process (GLIBC_TUNABLES=glibc.malloc.hugetlb=1).

XLA:CPU allocates each call's temporary buffers afresh and glibc hands blocks that large back to the kernel when
they are freed, so every call faults its buffers in again, 4 KiB at a time: the MiniLM-shaped ColBERT step of
benchmarks/step_vs_torch.py maps 1.6 GB of fresh pages a step, 0.8 s of system time in a 2.9 s step on a 2-core
virtual machine. With glibc.malloc.hugetlb=1, malloc asks the kernel for transparent huge pages for those blocks
(madvise) and the step took 2.35-2.40 s, corpus encoding 6% less (README, Performance). glibc reads
GLIBC_TUNABLES when a process starts, so the CLI re-executes itself once with it before loading jax.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
  """The kernel's transparent huge page mode: 'always', 'madvise', 'never', or '' where it cannot be read."""
  try:
    with open(THP_MODE_FILE, encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return ""
  return next((word[1:-1] for word in text.split() if word.startswith("[")), "")


def tunables_with_huge_pages(environ: Mapping[str, str], mode: str, libc: str) -> str | None:
  """The GLIBC_TUNABLES to run with, or None to run as is: only with glibc, with the kernel in `madvise` mode
  (under `always` large blocks get huge pages anyway, under `never` none can) and where GLIBC_TUNABLES names no
  glibc.malloc.hugetlb yet (the user's choice, e.g. =0 to opt out, or this process already re-executed)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if libc != "glibc" or mode != "madvise" or "glibc.malloc.hugetlb" in tunables:
    return None
  return f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES


def reexec_with_huge_pages() -> None:
  """Re-executes this Python process (same command line, same PID) with `tunables_with_huge_pages`, if any.
  Where the interpreter cannot be executed again (seen for an unprivileged user), it runs on as it is."""
  if not sys.platform.startswith("linux"):
    return
  tunables = tunables_with_huge_pages(os.environ, thp_mode(), platform.libc_ver()[0])
  if tunables is None:
    return
  before = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  except OSError:
    if before is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = before
