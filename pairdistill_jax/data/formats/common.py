"""What every format's reader shares: file access, line accounting, ids; see the package docstring."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from pairdistill_jax import io
from pairdistill_jax.io import FormatError, PathLike, SkipCallback

MAX_ID_LENGTH = 1024
# What joins a passage's title and text by default: ColBERT's `title | text` (BEIR's evaluation and
# sentence-transformers join `title text`; each student kind says its own for data.title_separator='auto').
COLBERT_TITLE_SEPARATOR = " | "
_BYTE_ORDER_MARK = "\ufeff"


def open_binary(path: PathLike) -> IO[bytes]:
  return gzip.open(path, "rb") if os.fspath(path).endswith(".gz") else open(path, "rb")


def iter_lines(path: PathLike, bad: io.BadLines) -> Iterator[tuple[int, str]]:
  """Yields (line number, text without its line ending) for the non-blank lines of `path`.

  Lines end only at '\\n' (a '\\r' inside a passage stays part of it); a byte order mark starting the
  file is dropped. A line that is not UTF-8 goes to `bad`. Raises a FormatError for an empty file.
  """
  number, n_content = 0, 0
  with open_binary(path) as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        n_content += 1
        bad.handle(FormatError(path, number, f"not UTF-8 ({e.reason} at byte {e.start})"))
        continue
      if number == 1:
        line = line.removeprefix(_BYTE_ORDER_MARK)
      if line.strip():
        n_content += 1
        yield number, line
  if not n_content:
    raise FormatError(path, max(number, 1), "file is empty" if not number else "file holds only blank lines")


def read_records(
    path: PathLike,
    parse: Callable[[str], Any],
    bad: io.BadLines,
    headers: Mapping[tuple[str, ...], Callable[[str], Any]] | None = None,
) -> Iterator[tuple[int, Any]]:
  """Yields (line number, parse(line)); `parse` raises ValueError with the reason for a bad line.

  With `headers` ({tab-separated columns of a header line: the parser of the lines after it}), a first
  line that is one of them is skipped and chooses the parser.
  """
  for index, (number, line) in enumerate(iter_lines(path, bad)):
    header_parse = headers.get(tuple(line.split("\t"))) if index == 0 and headers else None
    if header_parse is not None:
      parse = header_parse
      continue
    try:
      record = parse(line)
    except ValueError as e:
      bad.handle(FormatError(path, number, str(e)))
      continue
    yield number, record


def read_mapping(
    path: PathLike,
    parse: Callable[[str], tuple[str, str]],
    *,
    what: str,
    skip_bad_lines: bool = False,
    on_skip: SkipCallback | None = None,
    headers: Mapping[tuple[str, ...], Callable[[str], tuple[str, str]]] | None = None,
) -> dict[str, str]:
  """Builds {id: value} from (id, value) records, rejecting duplicate ids."""
  bad = io.BadLines(path, skip_bad_lines, on_skip)
  out: dict[str, str] = {}
  number = 1
  for number, (key, value) in read_records(path, parse, bad, headers):
    if key in out:
      bad.handle(FormatError(path, number, f"duplicate {what} {key!r}"))
      continue
    out[key] = value
  bad.finish(len(out))
  if not out:
    raise FormatError(path, number, f"no {what}s (only a header)")
  return out


def iter_id_text(
    path: PathLike,
    parse: Callable[[str], tuple[str, str]],
    skip_bad_lines: bool,
    on_skip: SkipCallback | None,
    headers: Mapping[tuple[str, ...], Callable[[str], tuple[str, str]]] | None = None,
) -> Iterator[tuple[int, str, str]]:
  """Yields (line number, id, text) records without collecting them."""
  bad = io.BadLines(path, skip_bad_lines, on_skip)
  n_good = 0
  for number, (key, text) in read_records(path, parse, bad, headers):
    n_good += 1
    yield number, key, text
  bad.finish(n_good)
  if not n_good:
    raise FormatError(path, 1, "no records (only a header)")


def bounded_id(value: str, what: str) -> str:
  """`value`, or a ValueError when it is longer than MAX_ID_LENGTH characters."""
  if len(value) > MAX_ID_LENGTH:
    raise ValueError(f"{what} is {len(value):,} characters long, longer than the limit of {MAX_ID_LENGTH} "
                     f"(it starts {value[:32]!r})")
  return value


def json_id(value: Any, what: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise ValueError(f"{what} must be a string or an integer, got {json.dumps(value)}")
  return bounded_id(str(value), what)


def json_number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{what} must be a number, got {json.dumps(value)}")
  return value


def parse_int(value: str, what: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{what} {value!r} is not an integer") from None


def trec_field(value: str, what: str) -> str:
  """`value` if it can be a whitespace-separated TREC column, else a ValueError."""
  if not value or any(c.isspace() for c in value):
    raise ValueError(f"{what} {value!r} must be non-empty and hold no whitespace (TREC columns)")
  return value


def with_title(title: str, text: str, separator: str) -> str:
  """`title + separator + text`, or the text alone when the title is empty."""
  return f"{title}{separator}{text}" if title else text
