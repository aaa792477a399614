"""Readers and writers for the data files: training lines, collections, queries, BEIR, qrels, runs.

Every reader streams its file line by line (plain, or gzip when the name ends in `.gz`) and raises a
`FormatError` naming file, line (1-based) and reason. Readers that take `skip_bad_lines` instead skip bad
lines (lines that are not UTF-8 included), log a warning for the first few, and report each one to
`on_skip` (pass `list.append` to collect them, or a counter). Blank lines are ignored everywhere, and so is
a UTF-8 byte order mark at the start of a file. An id (qid, pid, document id) longer than `MAX_ID_LENGTH`
characters is a bad line: ids are held in fixed-width arrays, where one huge id would cost its size for
every id. Every writer writes atomically: a temporary file in the target directory, flushed and fsynced,
then `os.replace`d over the target; on failure nothing is left behind and an existing file is untouched.

`text_source` is the one place that decides, from a path, how a collection or query set is read: a TSV
file, a BEIR corpus.jsonl / queries.jsonl file, or a BEIR directory (its queries restricted to a split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import json
import logging
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from typing import IO, Any

PathLike = str | os.PathLike[str]
SkipCallback = Callable[["FormatError"], None]

_log = logging.getLogger(__name__)
_MAX_WARNINGS = 5
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
_BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]
_BYTE_ORDER_MARK = "\ufeff"
MAX_ID_LENGTH = 1024
# What joins a passage's title and text by default: ColBERT's `title | text` (BEIR's evaluation and
# sentence-transformers join `title text`; each student kind says its own for data.title_separator='auto').
COLBERT_TITLE_SEPARATOR = " | "


class FormatError(ValueError):
  """A data file that does not follow its format; the message is `file:line: reason`."""

  def __init__(self, path: PathLike, line: int, reason: str):
    super().__init__(f"{os.fspath(path)}:{line}: {reason}")
    self.path = os.fspath(path)
    self.line = line
    self.reason = reason


# ----------------------------------------------------------------------------------------- file access


def _open_binary(path: PathLike) -> IO[bytes]:
  return gzip.open(path, "rb") if os.fspath(path).endswith(".gz") else open(path, "rb")


def _iter_lines(path: PathLike, bad: _BadLines) -> Iterator[tuple[int, str]]:
  """Yields (line number, text without its line ending) for the non-blank lines of `path`.

  Lines end only at '\\n' (a '\\r' inside a passage stays part of it); a byte order mark starting the
  file is dropped. A line that is not UTF-8 goes to `bad`. Raises a FormatError for an empty file.
  """
  number, n_content = 0, 0
  with _open_binary(path) as f:
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


class _BadLines:
  """Raises a reader's errors, or (skip_bad_lines) counts, logs and reports them."""

  def __init__(self, path: PathLike, skip: bool, on_skip: SkipCallback | None):
    self.path, self.skip, self.on_skip = path, skip, on_skip
    self.count = 0
    self.last_line = 1

  def handle(self, error: FormatError) -> None:
    if not self.skip:
      raise error
    self.count += 1
    self.last_line = error.line
    if self.count <= _MAX_WARNINGS:
      _log.warning("skipping bad line: %s", error)
    if self.on_skip is not None:
      self.on_skip(error)

  def finish(self, n_good: int) -> None:
    """Logs the total; raises when every line was bad."""
    if not self.count:
      return
    _log.warning("skipped %d bad lines of %s", self.count, os.fspath(self.path))
    if n_good == 0:
      raise FormatError(self.path, self.last_line, f"no valid lines (all {self.count} lines were bad)")


def _read_records(
    path: PathLike,
    parse: Callable[[str], Any],
    bad: _BadLines,
    headers: Mapping[tuple[str, ...], Callable[[str], Any]] | None = None,
) -> Iterator[tuple[int, Any]]:
  """Yields (line number, parse(line)); `parse` raises ValueError with the reason for a bad line.

  With `headers` ({tab-separated columns of a header line: the parser of the lines after it}), a first
  line that is one of them is skipped and chooses the parser.
  """
  for index, (number, line) in enumerate(_iter_lines(path, bad)):
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


def _read_mapping(
    path: PathLike,
    parse: Callable[[str], tuple[str, str]],
    *,
    what: str,
    skip_bad_lines: bool = False,
    on_skip: SkipCallback | None = None,
    headers: Mapping[tuple[str, ...], Callable[[str], tuple[str, str]]] | None = None,
) -> dict[str, str]:
  """Builds {id: value} from (id, value) records, rejecting duplicate ids."""
  bad = _BadLines(path, skip_bad_lines, on_skip)
  out: dict[str, str] = {}
  number = 1
  for number, (key, value) in _read_records(path, parse, bad, headers):
    if key in out:
      bad.handle(FormatError(path, number, f"duplicate {what} {key!r}"))
      continue
    out[key] = value
  bad.finish(len(out))
  if not out:
    raise FormatError(path, number, f"no {what}s (only a header)")
  return out


def _current_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[str]]:
  """Opens a UTF-8 text stream that replaces `path` only when the block finishes without error.

  The data goes to a temporary file in the same directory (gzip-compressed when `path` ends in `.gz`,
  with a zero timestamp so output is reproducible), which is flushed, fsynced and `os.replace`d over
  `path`. On any error the temporary file is removed and `path` is left as it was.
  """
  target = pathlib.Path(path)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  raw = os.fdopen(fd, "wb")
  try:
    compressed = None
    if target.name.endswith(".gz"):
      compressed = gzip.GzipFile(filename=target.name, mode="wb", fileobj=raw, mtime=0)
    text = io.TextIOWrapper(raw if compressed is None else compressed, encoding="utf-8", newline="\n")
    try:
      yield text
    finally:
      text.detach()
      if compressed is not None:
        compressed.close()
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()
    os.chmod(tmp_name, 0o666 & ~_current_umask())
    os.replace(tmp_name, target)
  except BaseException:
    raw.close()
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
    raise


def sidecar(path: PathLike) -> pathlib.Path:
  """The JSON record written beside an output file (`run.trec` -> `run.trec.json`)."""
  path = pathlib.Path(path)
  return path.with_name(path.name + ".json")


def read_record(path: PathLike) -> dict | None:
  """A small JSON record (a sidecar or manifest), or None when it is missing or unreadable."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


# ------------------------------------------------------------------------------------ training lines


@dataclasses.dataclass(frozen=True)
class TrainingExample:
  """One training line: a query, its passages (teacher-sorted) and the teacher's pairwise preferences.

  Ids are strings. `scores` are the pointwise teacher's raw logits (None for the `[qid, pid, …]`
  format); `pairs` are (i, j, logp_ij) with i, j indices into `pids` and logp_ij = log P(i beats j).
  Construction validates everything that does not need the collection.
  """

  qid: str
  pids: tuple[str, ...]
  scores: tuple[float, ...] | None
  pairs: tuple[tuple[int, int, float], ...] = ()

  def __post_init__(self) -> None:
    if not self.pids:
      raise ValueError("no passages")
    seen: set[str] = set()
    for pid in self.pids:
      if pid in seen:
        raise ValueError(f"duplicate pid {pid!r}")
      seen.add(pid)
    if self.scores is not None:
      if len(self.scores) != len(self.pids):
        raise ValueError(f"{len(self.scores)} scores for {len(self.pids)} passages")
      for i, score in enumerate(self.scores):
        if not math.isfinite(score):
          raise ValueError(f"non-finite score {score} (passage {i})")
    elif self.pairs:
      raise ValueError("pairs given without pointwise scores")
    for i, j, logp in self.pairs:
      self._check_pair(i, j, logp)

  def _check_pair(self, i: int, j: int, logp: float) -> None:
    n = len(self.pids)
    for index in (i, j):
      if not 0 <= index < n:
        raise ValueError(f"pair index {index} out of range (line has {n} passages)")
    if i == j:
      raise ValueError(f"pair ({i}, {j}) compares a passage with itself")
    if not math.isfinite(logp):
      raise ValueError(f"non-finite logp {logp} (pair {i}, {j})")
    if logp > 0:
      raise ValueError(f"logp {logp} > 0 (a probability above 1) (pair {i}, {j})")


def _bounded_id(value: str, what: str) -> str:
  """`value`, or a ValueError when it is longer than MAX_ID_LENGTH characters."""
  if len(value) > MAX_ID_LENGTH:
    raise ValueError(f"{what} is {len(value):,} characters long, longer than the limit of {MAX_ID_LENGTH} "
                     f"(it starts {value[:32]!r})")
  return value


def _json_id(value: Any, what: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise ValueError(f"{what} must be a string or an integer, got {json.dumps(value)}")
  return _bounded_id(str(value), what)


def _json_number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{what} must be a number, got {json.dumps(value)}")
  return value


def _parse_entry(i: int, entry: Any) -> tuple[str, float, list[tuple[int, int, float]]]:
  """[pid, score] or [pid, score, [[j, logp], ...]] -> (pid, score, pairs)."""
  if not isinstance(entry, list) or len(entry) not in (2, 3):
    raise ValueError(f"passage entry {i} must be [pid, score] or [pid, score, [[j, logp], ...]]")
  pid = _json_id(entry[0], f"pid of entry {i}")
  score = _json_number(entry[1], f"score of entry {i}")
  raw_pairs = entry[2] if len(entry) == 3 else []
  if not isinstance(raw_pairs, list):
    raise ValueError(f"pairs of entry {i} must be a list of [j, logp]")
  pairs = []
  for pair in raw_pairs:
    if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int):
      raise ValueError(f"pair {json.dumps(pair)} of entry {i} must be [j, logp] with an integer j")
    pairs.append((i, pair[0], _json_number(pair[1], f"logp of pair {pair[0]} of entry {i}")))
  return pid, score, pairs


def _parse_training_line(line: str) -> TrainingExample:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, list) or len(row) < 2:
    raise ValueError("expected a JSON list [qid, passage, ...] with at least one passage")
  qid = _json_id(row[0], "qid")
  entries = row[1:]
  if all(not isinstance(e, list) for e in entries):
    pids = tuple(_json_id(e, f"pid {i}") for i, e in enumerate(entries))
    return TrainingExample(qid, pids, None)
  parsed = [_parse_entry(i, e) for i, e in enumerate(entries)]
  return TrainingExample(
      qid=qid,
      pids=tuple(p[0] for p in parsed),
      scores=tuple(p[1] for p in parsed),
      pairs=tuple(pair for p in parsed for pair in p[2]),
  )


def _training_line_parser(
    collection_ids: Container[str] | None, query_ids: Container[str] | None, require_scores: bool
) -> Callable[[str], TrainingExample]:
  def parse(line: str) -> TrainingExample:
    example = _parse_training_line(line)
    if require_scores and example.scores is None:
      raise ValueError("no teacher scores: distillation needs [qid, [pid, score, ...], ...] lines, not "
                       "[qid, pid, ...]")
    if query_ids is not None and example.qid not in query_ids:
      raise ValueError(f"qid {example.qid!r} is not in the queries")
    if collection_ids is not None:
      for pid in example.pids:
        if pid not in collection_ids:
          raise ValueError(f"pid {pid!r} is not in the collection")
    return example

  return parse


def iter_training_lines(
    path: PathLike,
    *,
    skip_bad_lines: bool = False,
    collection_ids: Container[str] | None = None,
    query_ids: Container[str] | None = None,
    on_skip: SkipCallback | None = None,
    require_scores: bool = False,
) -> Iterator[tuple[int, TrainingExample]]:
  """Streams (line number, example) of training lines; see `read_training_lines`. With `require_scores`,
  a line without teacher scores (`[qid, pid, …]`) is a bad line."""
  bad = _BadLines(path, skip_bad_lines, on_skip)
  n_good = 0
  parse = _training_line_parser(collection_ids, query_ids, require_scores)
  for number, example in _read_records(path, parse, bad):
    n_good += 1
    yield number, example
  bad.finish(n_good)


def read_training_lines(
    path: PathLike,
    *,
    skip_bad_lines: bool = False,
    collection_ids: Container[str] | None = None,
    query_ids: Container[str] | None = None,
    on_skip: SkipCallback | None = None,
) -> Iterator[TrainingExample]:
  """Streams training lines: PairDistill, ColBERTv2 `[qid, [pid, score], …]` or `[qid, pid, …]`.

  With `collection_ids`, every pid must be in it; with `query_ids`, every qid. With `skip_bad_lines`, bad
  lines are skipped and reported to `on_skip` (e.g. `errors.append`); the count is logged when the file
  ends.
  """
  lines = iter_training_lines(path, skip_bad_lines=skip_bad_lines, collection_ids=collection_ids,
                              query_ids=query_ids, on_skip=on_skip)
  return (example for _, example in lines)


def _id_to_json(value: str) -> str | int:
  """Ids that look like canonical integers go back to JSON as integers (as MS MARCO's files have them)."""
  return int(value) if _CANONICAL_INT.fullmatch(value) else value


def _number_to_json(value: float) -> int | float:
  return value if type(value) is int else float(value)


def _training_line(example: TrainingExample) -> str:
  """The PairDistill JSON line (json.dumps with its default separators)."""
  qid = _id_to_json(example.qid)
  if example.scores is None:
    return json.dumps([qid, *(_id_to_json(pid) for pid in example.pids)])
  pairs_by_entry: list[list[list[int | float]]] = [[] for _ in example.pids]
  for i, j, logp in example.pairs:
    pairs_by_entry[i].append([int(j), _number_to_json(logp)])
  entries = [
      [_id_to_json(pid), _number_to_json(score), pairs]
      for pid, score, pairs in zip(example.pids, example.scores, pairs_by_entry)
  ]
  return json.dumps([qid, *entries])


def write_training_lines(path: PathLike, examples: Iterable[TrainingExample]) -> int:
  """Writes PairDistill lines (`[qid, pid, …]` for examples without scores); returns the line count.

  Pairs are written under their entry i in the order given, so an example read from a file is written
  back byte for byte.
  """
  count = 0
  with atomic_write(path) as f:
    for example in examples:
      f.write(_training_line(example))
      f.write("\n")
      count += 1
  return count


# ------------------------------------------------------------------------------- collection, queries


def _with_title(title: str, text: str, separator: str) -> str:
  """`title + separator + text`, or the text alone when the title is empty."""
  return f"{title}{separator}{text}" if title else text


def _fields(count: int) -> str:
  return f"{count} tab-separated field{'' if count == 1 else 's'}"


def _tsv_id(value: str, what: str) -> str:
  """`value`, or a ValueError when it is empty or too long."""
  if not value:
    raise ValueError(f"empty {what}")
  return _bounded_id(value, what)


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
  return _tsv_id(columns[0], "pid"), _with_title(title, columns[1], title_separator)


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
  return _read_mapping(path, _parse_collection_line, what="pid", skip_bad_lines=skip_bad_lines,
                       on_skip=on_skip, headers=_collection_headers(title_separator))


def _iter_id_text(
    path: PathLike,
    parse: Callable[[str], tuple[str, str]],
    skip_bad_lines: bool,
    on_skip: SkipCallback | None,
    headers: Mapping[tuple[str, ...], Callable[[str], tuple[str, str]]] | None = None,
) -> Iterator[tuple[int, str, str]]:
  """Yields (line number, id, text) records without collecting them."""
  bad = _BadLines(path, skip_bad_lines, on_skip)
  n_good = 0
  for number, (key, text) in _read_records(path, parse, bad, headers):
    n_good += 1
    yield number, key, text
  bad.finish(n_good)
  if not n_good:
    raise FormatError(path, 1, "no records (only a header)")


def iter_collection(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> Iterator[tuple[int, str, str]]:
  """Streams collection.tsv as (line number, pid, text) without holding it in memory.

  Like `read_collection`, but duplicate pids are not detected here: the caller owns that check.
  """
  headers = _collection_headers(title_separator)
  return _iter_id_text(path, _parse_collection_line, skip_bad_lines, on_skip, headers)


def iter_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> Iterator[tuple[int, str, str]]:
  """Streams queries.tsv as (line number, qid, query); duplicate qids are the caller's to detect."""
  return _iter_id_text(path, _parse_query_line, skip_bad_lines, on_skip)


def read_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> dict[str, str]:
  """queries.tsv (`qid \\t query`) -> {qid: query}."""
  return _read_mapping(path, _parse_query_line, what="qid", skip_bad_lines=skip_bad_lines, on_skip=on_skip)


def _write_tsv(path: PathLike, rows: Mapping[str, str], what: str) -> None:
  with atomic_write(path) as f:
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
  if not _json_id(row["_id"], "_id"):
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
  return str(row["_id"]), _with_title(title, row["text"], title_separator)


def _parse_beir_query(line: str) -> tuple[str, str]:
  row = _parse_beir_line(line, ("_id", "text"))
  return str(row["_id"]), row["text"]


def read_beir_corpus(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> dict[str, str]:
  """BEIR corpus.jsonl (`_id`, `title`, `text`) -> {id: title + title_separator + text, or the text when
  the title is empty}."""
  return _read_mapping(path, functools.partial(_parse_beir_doc, title_separator=title_separator),
                       what="document id", skip_bad_lines=skip_bad_lines, on_skip=on_skip)


def iter_beir_corpus(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None,
    title_separator: str = COLBERT_TITLE_SEPARATOR,
) -> Iterator[tuple[int, str, str]]:
  """Streams corpus.jsonl as (line number, id, text); duplicate ids are the caller's to detect."""
  parse = functools.partial(_parse_beir_doc, title_separator=title_separator)
  return _iter_id_text(path, parse, skip_bad_lines, on_skip)


def read_beir_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> dict[str, str]:
  """BEIR queries.jsonl (`_id`, `text`) -> {id: text}."""
  return _read_mapping(path, _parse_beir_query, what="query id", skip_bad_lines=skip_bad_lines,
                       on_skip=on_skip)


def iter_beir_queries(
    path: PathLike, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None
) -> Iterator[tuple[int, str, str]]:
  """Streams queries.jsonl as (line number, id, query); duplicate ids are the caller's to detect."""
  return _iter_id_text(path, _parse_beir_query, skip_bad_lines, on_skip)


# ------------------------------------------------------------------------------------- qrels, runs


def _parse_int(value: str, what: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{what} {value!r} is not an integer") from None


def _parse_qrel(line: str, beir: bool) -> tuple[str, str, int]:
  if beir:
    columns = line.split("\t")
    if len(columns) != 3:
      raise ValueError(f"expected 3 tab-separated columns (query-id, corpus-id, score), found {len(columns)}")
    qid, docid, rel = columns
  else:
    columns = line.split()
    if len(columns) != 4:
      raise ValueError(f"expected 4 columns (TREC qrels: qid 0 docid rel), found {len(columns)}")
    qid, _, docid, rel = columns
  return _bounded_id(qid, "query id"), _bounded_id(docid, "document id"), _parse_int(rel, "relevance")


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
  """Qrels -> {qid: {docid: relevance}}.

  BEIR (a header row `query-id corpus-id score`, then tab-separated rows) or TREC (`qid 0 docid rel`),
  detected per file from its first line.
  """
  qrels: dict[str, dict[str, int]] = {}
  beir = None
  for number, line in _iter_lines(path, _BadLines(path, False, None)):
    if beir is None:
      beir = line.split() == _BEIR_QRELS_HEADER
      if beir:
        continue
    try:
      qid, docid, rel = _parse_qrel(line, beir)
    except ValueError as e:
      raise FormatError(path, number, str(e)) from None
    judged = qrels.setdefault(qid, {})
    if docid in judged:
      raise FormatError(path, number, f"duplicate judgment for query {qid!r}, document {docid!r}")
    judged[docid] = rel
  if not qrels:
    raise FormatError(path, number, "no judgments (only a header)")
  return qrels


def _trec_field(value: str, what: str) -> str:
  """`value` if it can be a whitespace-separated TREC column, else a ValueError."""
  if not value or any(c.isspace() for c in value):
    raise ValueError(f"{what} {value!r} must be non-empty and hold no whitespace (TREC columns)")
  return value


def write_qrels(path: PathLike, qrels: Mapping[str, Mapping[str, int]], *, beir: bool = False) -> None:
  """Writes TREC qrels lines `qid 0 docid rel`, or (beir) the BEIR header and `qid \\t docid \\t rel` rows."""
  with atomic_write(path) as f:
    if beir:
      f.write("\t".join(_BEIR_QRELS_HEADER) + "\n")
    for qid, judged in qrels.items():
      _trec_field(qid, "query id")
      for docid, rel in judged.items():
        _trec_field(docid, "document id")
        f.write(f"{qid}\t{docid}\t{int(rel)}\n" if beir else f"{qid} 0 {docid} {int(rel)}\n")


def _parse_run_line(line: str) -> tuple[str, str, float]:
  columns = line.split()
  if len(columns) != 6:
    raise ValueError(f"expected 6 columns (TREC run: qid Q0 docid rank score tag), found {len(columns)}")
  qid, _, docid, rank, score, _ = columns
  _parse_int(rank, "rank")
  try:
    value = float(score)
  except ValueError:
    raise ValueError(f"score {score!r} is not a number") from None
  if not math.isfinite(value):
    raise ValueError(f"non-finite score {score}")
  return _bounded_id(qid, "query id"), _bounded_id(docid, "document id"), value


def read_run(path: PathLike) -> dict[str, dict[str, float]]:
  """TREC run (`qid Q0 docid rank score tag`) -> {qid: {docid: score}}."""
  run: dict[str, dict[str, float]] = {}
  for number, (qid, docid, score) in _read_records(path, _parse_run_line, _BadLines(path, False, None)):
    scored = run.setdefault(qid, {})
    if docid in scored:
      raise FormatError(path, number, f"duplicate document {docid!r} for query {qid!r}")
    scored[docid] = score
  return run


def iter_run(path: PathLike) -> Iterator[tuple[str, dict[str, float]]]:
  """Streams a TREC run query by query: (qid, {docid: score}) per block of consecutive lines.

  For runs too large to hold at once (800k queries x 100). A query whose lines are not consecutive is an
  error (sort the run by query); `read_run` accepts any order.
  """
  qid, scored, seen, number = None, {}, set(), 0
  for number, (line_qid, docid, score) in _read_records(path, _parse_run_line, _BadLines(path, False, None)):
    if line_qid != qid:
      if qid is not None:
        yield qid, scored
      if line_qid in seen:
        raise FormatError(path, number, f"query {line_qid!r} appears again after other queries; sort the run "
                                        f"by query (e.g. `sort -s -k1,1`)")
      qid, scored = line_qid, {}
      seen.add(qid)
    if docid in scored:
      raise FormatError(path, number, f"duplicate document {docid!r} for query {qid!r}")
    scored[docid] = score
  if qid is None:
    raise FormatError(path, number, "no run lines")
  yield qid, scored


def write_run(path: PathLike, run: Mapping[str, Mapping[str, float]] | Iterable[tuple[str, Mapping[str, float]]],
              tag: str = "pairdistill") -> None:
  """Writes a TREC run; each query's documents ranked by score descending, ties by docid ascending.

  `run` may be a stream of (qid, {docid: score}) pairs (written as they come; the file appears only whole).
  """
  _trec_field(tag, "run tag")
  with atomic_write(path) as f:
    for qid, scored in run.items() if isinstance(run, Mapping) else run:
      _trec_field(qid, "query id")
      ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
      for rank, (docid, score) in enumerate(ranked, 1):
        if not math.isfinite(score):
          raise ValueError(f"non-finite score {score} for query {qid!r}, document {docid!r}")
        f.write(f"{qid} Q0 {_trec_field(docid, 'document id')} {rank} {float(score)!r} {tag}\n")


# ------------------------------------------------------------------ sources: a TSV file or BEIR


FIELDS = ("docs", "queries")
_WHAT = {"docs": "collection", "queries": "queries"}
_ACCEPTED = {
    "docs": "a collection .tsv file (pid, text tab-separated; titles as a third column after the header line "
            "id, text, title), a BEIR corpus.jsonl file, or a BEIR directory holding corpus.jsonl",
    "queries": "a queries .tsv file (qid, query tab-separated), a BEIR queries.jsonl file, or a BEIR directory "
               "holding queries.jsonl and qrels/<split>.tsv",
}
_BEIR_FILES = {"docs": "corpus.jsonl", "queries": "queries.jsonl"}
_SUFFIX_FORMATS = {".tsv": "tsv", ".jsonl": "beir"}  # also with .gz after them
_STREAMS = {("tsv", "docs"): iter_collection, ("tsv", "queries"): iter_queries,
            ("beir", "docs"): iter_beir_corpus, ("beir", "queries"): iter_beir_queries}
_MAPPINGS = {("tsv", "docs"): read_collection, ("tsv", "queries"): read_queries,
             ("beir", "docs"): read_beir_corpus, ("beir", "queries"): read_beir_queries}


@dataclasses.dataclass(frozen=True)
class TextSource:
  """A collection ('docs') or query set ('queries') and how it is read; `text_source` makes one from a path.

  `records` is the file of its records, in `format` 'tsv' or 'beir'. `split` (the queries of a BEIR
  directory) keeps only the queries judged in `qrels`, qrels/<split>.tsv. `title_separator` joins a
  passage's title and text.
  """

  path: pathlib.Path
  field: str
  format: str
  records: pathlib.Path
  split: str | None = None
  title_separator: str = COLBERT_TITLE_SEPARATOR

  @property
  def qrels(self) -> pathlib.Path | None:
    return None if self.split is None else self.path / "qrels" / f"{self.split}.tsv"

  @property
  def files(self) -> tuple[pathlib.Path, ...]:
    """The files the texts come from: what a cache of them depends on."""
    return (self.records,) if self.qrels is None else (self.records, self.qrels)

  def settings(self) -> dict[str, str]:
    """How the texts are read besides the files' bytes (for cache keys and the records of outputs)."""
    settings = {"format": self.format, **self._reader_options()}
    if self.split is not None:
      settings["split"] = self.split
    return settings

  def _reader_options(self) -> dict[str, str]:
    return {"title_separator": self.title_separator} if self.field == "docs" else {}

  def iter(self, *, skip_bad_lines: bool = False,
           on_skip: SkipCallback | None = None) -> Iterator[tuple[int, str, str]]:
    """Streams (line number in `records`, id, text); duplicate ids are the caller's to detect."""
    records = _STREAMS[self.format, self.field](self.records, skip_bad_lines=skip_bad_lines, on_skip=on_skip,
                                                **self._reader_options())
    return records if self.split is None else self._judged_only(records, lambda record: record[1])

  def read(self, *, skip_bad_lines: bool = False, on_skip: SkipCallback | None = None) -> dict[str, str]:
    """{id: text}; a repeated id is a FormatError naming its line."""
    texts = _MAPPINGS[self.format, self.field](self.records, skip_bad_lines=skip_bad_lines, on_skip=on_skip,
                                               **self._reader_options())
    return texts if self.split is None else dict(self._judged_only(texts.items(), lambda item: item[0]))

  def _judged_only(self, records: Iterable[Any], key: Callable[[Any], str]) -> Iterator[Any]:
    """The records whose id `key(record)` is judged in `qrels`; none at all is an error."""
    judged = read_qrels(self.qrels)
    kept = total = 0
    for record in records:
      total += 1
      if key(record) in judged:
        kept += 1
        yield record
    if not kept:
      raise ValueError(f"{self.records}: none of its {total} queries is judged in {self.qrels}")
    _log.info("%s: %d of %d queries are judged in %s", self.records, kept, total, self.qrels)


def text_source(path: PathLike, field: str, *, split: str = "train",
                title_separator: str = COLBERT_TITLE_SEPARATOR) -> TextSource:
  """How to read the collection ('docs') or query set ('queries') at `path`, the format decided by the path.

  A .tsv file is collection.tsv / queries.tsv; a .jsonl file is a BEIR corpus.jsonl / queries.jsonl, read
  whole (either may end in .gz). A directory holding corpus.jsonl (queries.jsonl) is a BEIR dataset; its
  queries are only those judged in qrels/<split>.tsv, since its queries.jsonl holds every split's. Any
  other path is an error naming it and the accepted formats.
  """
  if field not in FIELDS:
    raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
  path = pathlib.Path(path)
  if path.is_dir():
    return _beir_directory(path, field, split, title_separator)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; expected {_ACCEPTED[field]}")
  name = path.name.removesuffix(".gz")
  kind = next((kind for suffix, kind in _SUFFIX_FORMATS.items() if name.endswith(suffix)), None)
  if kind is None:
    raise ValueError(f"{path}: unknown {_WHAT[field]} format; expected {_ACCEPTED[field]}")
  return TextSource(path, field, kind, path, title_separator=title_separator)


def _beir_directory(path: pathlib.Path, field: str, split: str, title_separator: str) -> TextSource:
  records = path / _BEIR_FILES[field]
  if not records.is_file():
    raise ValueError(f"{path}: a directory without {records.name}; expected {_ACCEPTED[field]}")
  if field == "docs":
    return TextSource(path, field, "beir", records, title_separator=title_separator)
  source = TextSource(path, field, "beir", records, split=split)
  if not source.qrels.is_file():
    splits = sorted(p.name.removesuffix(".tsv") for p in (path / "qrels").glob("*.tsv"))
    raise ValueError(f"{path}: no qrels/{split}.tsv to restrict its queries to split {split!r} (splits here: "
                     f"{', '.join(splits) or 'none'})")
  return source
