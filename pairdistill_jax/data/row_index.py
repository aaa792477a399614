"""The id -> row index of a token store: ids resolved to rows in vectorised numpy.

Its layout is 'dense' when the ids are 0, 1, 2, … in row order (MS MARCO; no arrays: an id is its row),
'int' when every id is a canonical integer (sorted int64 keys and their rows), else 'str' (sorted UTF-8 byte
keys and their rows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pairdistill_jax import io

PathLike = str | os.PathLike[str]

LAYOUTS = ("dense", "int", "str")
_MAX_INT_DIGITS = 18  # canonical integer ids up to this many digits fit int64


def _canonical_ints(keys_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(is a canonical non-negative integer, its value or 0) for UTF-8 byte-string ids."""
  lengths_K = np.char.str_len(keys_K)
  ok_K = (np.char.isdigit(keys_K) & (lengths_K <= _MAX_INT_DIGITS)
          & ((lengths_K == 1) | ~np.char.startswith(keys_K, b"0")))
  values_K = np.where(ok_K, keys_K, b"0").astype(np.int64)
  return ok_K, values_K


def encode_keys(keys: Sequence[str]) -> np.ndarray:
  """The UTF-8 bytes of each id, as an 'S' array as wide as the longest (ids encoded one at a time: a
  unicode array would take 4 bytes per character of the longest id, for every id)."""
  if isinstance(keys, str):
    raise TypeError("expected a sequence of ids, got a single string; wrap it in a list")
  encoded = [key.encode("utf-8") for key in keys]
  return np.array(encoded, dtype="S") if encoded else np.zeros(0, "S1")


class RowIndex:
  """Maps ids to store rows in one of the LAYOUTS (see the module docstring)."""

  def __init__(self, layout: str, size: int, keys: np.ndarray | None = None, rows: np.ndarray | None = None):
    if layout not in LAYOUTS:
      raise ValueError(f"unknown index layout {layout!r}")
    self.layout, self.size, self._keys, self._rows = layout, size, keys, rows

  def __len__(self) -> int:
    return self.size

  def __contains__(self, key: object) -> bool:
    return isinstance(key, str) and self.find([key])[0] >= 0

  def find(self, keys: Sequence[str]) -> np.ndarray:
    """The row of each id, or -1 where an id is not in the store."""
    keys_K = encode_keys(keys)
    if self.layout == "str":
      pos_K = np.minimum(np.searchsorted(self._keys, keys_K), self.size - 1)
      return np.where(self._keys[pos_K] == keys_K, self._rows[pos_K], -1)
    ok_K, values_K = _canonical_ints(keys_K)
    if self.layout == "dense":
      return np.where(ok_K & (values_K < self.size), values_K, -1)
    pos_K = np.minimum(np.searchsorted(self._keys, values_K), self.size - 1)
    return np.where(ok_K & (self._keys[pos_K] == values_K), self._rows[pos_K], -1)


def _duplicates(keys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(positions i of a sorted array with keys[i] == keys[i - 1], the first position of each one's key)."""
  repeated = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1]) + 1
  starts = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
  return repeated, starts[np.searchsorted(starts, repeated, side="right") - 1]


def build_index(keys_N: np.ndarray, lines_N: np.ndarray, source: PathLike, what: str, skip_bad_lines: bool,
                on_skip: io.SkipCallback | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(meta, arrays) of the id -> row index of records with ids `keys_N` read from lines `lines_N`.

  A repeated id is a FormatError naming its line (or, with `skip_bad_lines`, skipped: the first wins).
  """
  bad = io.BadLines(source, skip_bad_lines, on_skip)
  order_N = np.argsort(keys_N, kind="stable")
  keys_sorted_N = keys_N[order_N]
  repeated, firsts = _duplicates(keys_sorted_N)
  for i, first in sorted(zip(repeated, firsts), key=lambda pair: order_N[pair[0]]):
    bad.handle(io.FormatError(source, int(lines_N[order_N[i]]), f"duplicate {what} "
                              f"{keys_sorted_N[i].decode()!r} (first on line {lines_N[order_N[first]]})"))
  keep = np.ones(len(keys_N), bool)
  keep[repeated] = False
  keys_sorted_N, order_N = keys_sorted_N[keep], order_N[keep]
  ok_N, values_N = _canonical_ints(keys_sorted_N)
  if ok_N.all():
    if not len(repeated) and np.array_equal(values_N, order_N):  # the id of row r is r
      return {"layout": "dense", "size": len(keys_N)}, {}
    by_value = np.argsort(values_N)
    keys_sorted_N, order_N = values_N[by_value], order_N[by_value]
    layout = "int"
  else:
    layout = "str"
  return {"layout": layout, "size": len(keys_sorted_N)}, {"keys": keys_sorted_N, "key_rows": order_N}

