"""`text_source`: the one place that decides, from a path, how a collection or query set is read: a TSV file,
a BEIR corpus.jsonl / queries.jsonl file, or a BEIR directory (its queries restricted to a split)."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pairdistill_jax.data.formats.collection import (iter_beir_corpus, iter_beir_queries, iter_collection,
                                                     iter_queries, read_beir_corpus, read_beir_queries,
                                                     read_collection, read_queries)
from pairdistill_jax.data.formats.common import COLBERT_TITLE_SEPARATOR, PathLike, SkipCallback
from pairdistill_jax.data.formats.qrels import read_qrels

_log = logging.getLogger(__name__)


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
