"""Readers and writers for the data files, one module per format family; the public names are re-exported here.

  common.py          file access and line accounting every reader shares, ids, FormatError
  training_lines.py  PairDistill / ColBERTv2 training lines (TrainingExample)
  collection.py      collections and query sets: TSV and BEIR
  qrels.py           TREC and BEIR qrels
  runs.py            TREC runs
  sources.py         text_source: how a path's collection or query set is read

Every reader streams its file line by line (plain, or gzip when the name ends in `.gz`) and raises a
`FormatError` naming file, line (1-based) and reason. Readers that take `skip_bad_lines` instead skip bad
lines (lines that are not UTF-8 included), log a warning for the first few, and report each one to
`on_skip` (pass `list.append` to collect them, or a counter). Blank lines are ignored everywhere, and so is
a UTF-8 byte order mark at the start of a file. An id (qid, pid, document id) longer than `MAX_ID_LENGTH`
characters is a bad line: ids are held in fixed-width arrays, where one huge id would cost its size for
every id. Every writer writes atomically (`pairdistill_jax.io.atomic_write`): on failure nothing is left
behind and an existing file is untouched.
"""

from pairdistill_jax.data.formats.collection import (iter_beir_corpus, iter_beir_queries, iter_collection,
                                                     iter_queries, read_beir_corpus, read_beir_queries,
                                                     read_collection, read_queries, write_collection,
                                                     write_queries)
from pairdistill_jax.data.formats.common import (COLBERT_TITLE_SEPARATOR, MAX_ID_LENGTH, FormatError, PathLike,
                                                 SkipCallback)
from pairdistill_jax.data.formats.qrels import read_qrels, write_qrels
from pairdistill_jax.data.formats.runs import iter_run, read_run, write_run
from pairdistill_jax.data.formats.sources import FIELDS, TextSource, text_source
from pairdistill_jax.data.formats.training_lines import (TrainingExample, iter_training_lines, read_training_lines,
                                                         write_training_lines)

__all__ = [
    "COLBERT_TITLE_SEPARATOR", "FIELDS", "MAX_ID_LENGTH", "FormatError", "PathLike", "SkipCallback", "TextSource",
    "TrainingExample", "iter_beir_corpus", "iter_beir_queries", "iter_collection", "iter_queries", "iter_run",
    "iter_training_lines", "read_beir_corpus", "read_beir_queries", "read_collection", "read_qrels", "read_queries",
    "read_run", "read_training_lines", "text_source", "write_collection", "write_qrels", "write_queries",
    "write_run", "write_training_lines",
]
