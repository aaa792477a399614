"""Collections and query sets: TSV (`collection.tsv`, `queries.tsv`) and BEIR (`corpus.jsonl`, `queries.jsonl`)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pairdistill_jax import io
from pairdistill_jax.data.formats.common import (COLBERT_TITLE_SEPARATOR, PathLike, SkipCallback, bounded_id,
                                                 iter_id_text, json_id, read_mapping, with_title)


def _fields(count: int) -> str:
  return f"{count} tab-separated field{'' if count == 1 else 's'}"


def _tsv_id(value: str, what: str) -> str:
  """`value`, or a ValueError when it is empty or too long."""
  if not value:
    raise ValueError(f"empty {what}")
  return bounded_id(value, what)


def _parse_collection_line(line: str) -> tuple[str, str]:
  """`pid \\t text` -> (pid, text)."""
  columns = line.split("\t")
  if len(columns) != 2:
    raise ValueError(f"the line has {_fields(len(columns))}; a collection line is id<TAB>text (to read a third "
                     "column as titles, start the file with the header line id<TAB>text<TAB>title)")
  return _tsv_id(columns[0], "pid"), columns[1]


def _parse_titled_collection_line(line: str, title_separator: str) -> tuple[str, str]:
  """`pid \\t text [\\t title]` (after the header line `id \\t text \\t title`) -> (pid, titled text)."""
  columns = line.split("\t")
  if len(columns) not in (2, 3):
    raise ValueError(f"the line has {_fields(len(columns))}; a titled collection line is id<TAB>text<TAB>title")
  title = columns[2] if len(columns) == 3 else ""
  return _tsv_id(columns[0], "pid"), with_title(title, columns[1], title_separator)


def _collection_headers(title_separator: str) -> dict[tuple[str, ...], Callable[[str], tuple[str, str]]]:
  """The header lines a collection may start with, and how the lines after each are read."""
  titled = functools.partial(_parse_titled_collection_line, title_separator=title_separator)
  return {("id", "text"): _parse_collection_line, ("id", "text", "title"): titled}


def _parse_query_line(line: str) -> tuple[str, str]:
  columns = line.split("\t")
  if len(columns) != 2:
    raise ValueError(f"expected 2 tab-separated columns (qid, query), found {len(columns)}")
  return _tsv_id(columns[0], "qid"), columns[1]


def read_collection(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> dict[str, str]:
  """collection.tsv (`pid \\t text`) -> {pid: text}.

  A first line `id \\t text` is a header row and skipped (as stanford ColBERT does). After a first line
  `id \\t text \\t title`, a third column is the passage's title: {pid: title + title_separator + text, or
  the text when the title is empty}. Without that header a third column is an error, since a tab inside a
  passage would otherwise silently make the rest of it a title.
  """
  return read_mapping(path, _parse_collection_line, what="pid", skip_bad_lines=skip_bad_lines,
                       on_skip=on_skip, headers=_collection_headers(title_separator))


def iter_collection(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> Iterator[tuple[int, str, str]]:
  """Streams collection.tsv as (line number, pid, text) without holding it in memory.

  Like `read_collection`, but duplicate pids are not detected here: the caller owns that check.
  """
  headers = _collection_headers(title_separator)
  return iter_id_text(path, _parse_collection_line, skip_bad_lines, on_skip, headers)


def iter_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> Iterator[tuple[int, str, str]]:
  """Streams queries.tsv as (line number, qid, query); duplicate qids are the caller's to detect."""
  return iter_id_text(path, _parse_query_line, skip_bad_lines, on_skip)


def read_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> dict[str, str]:
  """queries.tsv (`qid \\t query`) -> {qid: query}."""
  return read_mapping(path, _parse_query_line, what="qid", skip_bad_lines=skip_bad_lines, on_skip=on_skip)


def _write_tsv(path: PathLike, rows: Mapping[str, str], what: str) -> None:
  with io.atomic_write(path) as f:
    for key, value in rows.items():
      for field in (key, value):
        if any(c in field for c in "\t\n\r"):
          raise ValueError(f"{what} {key!r} holds a tab or line break, which {os.fspath(path)} cannot store")
      f.write(f"{key}\t{value}\n")


def write_collection(path: PathLike, passages: Mapping[str, str]) -> None:
  """Writes collection.tsv lines `pid \\t text` (no titles, so no header line)."""
  _write_tsv(path, passages, "passage")


def write_queries(path: PathLike, queries: Mapping[str, str]) -> None:
  """Writes queries.tsv lines `qid \\t query`."""
  _write_tsv(path, queries, "query")


# -------------------------------------------------------------------------------------------- BEIR


def _parse_beir_line(line: str, fields: tuple[str, ...]) -> dict[str, Any]:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise ValueError("expected a JSON object")
  for name in fields:
    if name not in row:
      raise ValueError(f"missing field {name!r}")
  if not json_id(row["_id"], "_id"):
    raise ValueError("empty _id")
  for name in fields[1:]:
    if not isinstance(row.get(name), str):
      raise ValueError(f"field {name!r} must be a string")
  return row


def _parse_beir_doc(line: str, title_separator: str) -> tuple[str, str]:
  row = _parse_beir_line(line, ("_id", "text"))
  title = row.get("title") or ""
  if not isinstance(title, str):
    raise ValueError("field 'title' must be a string")
  return str(row["_id"]), with_title(title, row["text"], title_separator)


def _parse_beir_query(line: str) -> tuple[str, str]:
  row = _parse_beir_line(line, ("_id", "text"))
  return str(row["_id"]), row["text"]


def read_beir_corpus(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> dict[str, str]:
  """BEIR corpus.jsonl (`_id`, `title`, `text`) -> {id: title + title_separator + text, or the text when
  the title is empty}."""
  return read_mapping(path, functools.partial(_parse_beir_doc, title_separator=title_separator),
                       what="document id", skip_bad_lines=skip_bad_lines, on_skip=on_skip)


def iter_beir_corpus(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> Iterator[tuple[int, str, str]]:
  """Streams corpus.jsonl as (line number, id, text); duplicate ids are the caller's to detect."""
  parse = functools.partial(_parse_beir_doc, title_separator=title_separator)
  return iter_id_text(path, parse, skip_bad_lines, on_skip)


def read_beir_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> dict[str, str]:
  """BEIR queries.jsonl (`_id`, `text`) -> {id: text}."""
  return read_mapping(path, _parse_beir_query, what="query id", skip_bad_lines=skip_bad_lines,
                       on_skip=on_skip)


def iter_beir_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> Iterator[tuple[int, str, str]]:
  """Streams queries.jsonl as (line number, id, query); duplicate ids are the caller's to detect."""
  return iter_id_text(path, _parse_beir_query, skip_bad_lines, on_skip)
