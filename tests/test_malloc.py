"""When the CLI re-executes itself with glibc's malloc on transparent huge pages (pairdistill_jax/malloc.py);
tests/test_bench_memory.py checks that a real CLI process runs with it."""

from __future__ import annotations

import pytest

from pairdistill_jax import malloc


@pytest.mark.parametrize("environ, mode, libc, want", [
    ({}, "madvise", "glibc", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", "glibc",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc", None),  # the user's opt-out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc", None),  # already re-executed
    ({}, "always", "glibc", None),  # every large block gets huge pages already
    ({}, "never", "glibc", None),
    ({}, "", "glibc", None),  # no /sys file
    ({}, "madvise", "", None),  # musl or another libc
])
def test_tunables_only_where_they_change_something(environ, mode, libc, want):
  assert malloc.tunables_with_huge_pages(environ, mode, libc) == want


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  monkeypatch.setattr(malloc, "THP_MODE_FILE", str(path))
  assert malloc.thp_mode() == "madvise"
  monkeypatch.setattr(malloc, "THP_MODE_FILE", str(tmp_path / "missing"))
  assert malloc.thp_mode() == ""


def test_where_the_interpreter_cannot_be_executed_again_the_process_runs_on(monkeypatch):
  """An unprivileged user may not re-execute the interpreter (a venv whose python lies under /root): the CLI
  goes on without the tunable, GLIBC_TUNABLES as it was."""
  def refused(path, argv):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(malloc.os, "execv", refused)
  monkeypatch.setattr(malloc, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(malloc.sys, "platform", "linux")
  for before in (None, "glibc.malloc.arena_max=2"):
    if before is None:
      monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
      monkeypatch.setenv("GLIBC_TUNABLES", before)
    malloc.reexec_with_huge_pages()
    assert malloc.os.environ.get("GLIBC_TUNABLES") == before
