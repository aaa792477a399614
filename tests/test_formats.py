"""Data file formats: round trips, exact bytes, one error per kind of bad input, atomic writes, SciFact."""

import gzip
import logging
import os

import pytest

from pairdistill_jax import students
from pairdistill_jax.data import formats
from pairdistill_jax.data.formats import FormatError, TrainingExample

import data_helpers

SUFFIXES = ["", ".gz"]

PAIRDISTILL = TrainingExample(
    qid="1048585",
    pids=("7187158", "7187157", "doc-3"),
    scores=(9.27734375, -2.5, 0.125),
    pairs=((0, 1, -0.0625), (0, 2, -0.5), (1, 2, -1e-05)),
)
PAIRDISTILL_LINE = (
    '[1048585, [7187158, 9.27734375, [[1, -0.0625], [2, -0.5]]], [7187157, -2.5, [[2, -1e-05]]], '
    '["doc-3", 0.125, []]]\n'
)


def _write_bytes(path, data: bytes):
  path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
  return path


def _read_bytes(path) -> bytes:
  data = path.read_bytes()
  return gzip.decompress(data) if path.name.endswith(".gz") else data


def _expect_error(path, line: int, reason: str, read):
  with pytest.raises(FormatError) as info:
    read(path)
  message = str(info.value)
  assert message.startswith(f"{path}:{line}: "), message
  assert reason in message, message
  assert info.value.line == line
  return info.value


# ------------------------------------------------------------------------------------ training lines


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_pairdistill_line_exact_bytes(tmp_path, suffix):
  path = tmp_path / f"train.jsonl{suffix}"
  assert formats.write_training_lines(path, [PAIRDISTILL]) == 1
  assert _read_bytes(path) == PAIRDISTILL_LINE.encode()
  if suffix:
    assert path.read_bytes()[:2] == b"\x1f\x8b"


def test_plain_format_exact_bytes(tmp_path):
  path = tmp_path / "triples.jsonl"
  formats.write_training_lines(path, [TrainingExample("q7", ("12", "012", "x"), None)])
  assert path.read_bytes() == b'["q7", 12, "012", "x"]\n'


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_training_lines_round_trip(tmp_path, suffix):
  colbertv2 = TrainingExample("5", ("1", "2"), (3.5, -1.0))
  plain = TrainingExample("abc", ("10", "11", "12"), None)
  path = tmp_path / f"train.jsonl{suffix}"
  assert formats.write_training_lines(path, [PAIRDISTILL, colbertv2, plain]) == 3
  assert list(formats.read_training_lines(path)) == [PAIRDISTILL, colbertv2, plain]


def test_released_line_is_written_back_byte_for_byte(tmp_path):
  line = (
      '[400296, [1540783, 8.1015625, [[1, -0.20361328125], [3, -0.0302734375]]], '
      '[3518497, 7.734375, [[2, -0.693359375]]], [2174223, 7.16015625, []], [5, -3, []]]\n'
  )
  source = _write_bytes(tmp_path / "in.jsonl", line.encode())
  examples = list(formats.read_training_lines(source))
  assert examples == [TrainingExample(
      "400296", ("1540783", "3518497", "2174223", "5"), (8.1015625, 7.734375, 7.16015625, -3),
      ((0, 1, -0.20361328125), (0, 3, -0.0302734375), (1, 2, -0.693359375)))]
  formats.write_training_lines(tmp_path / "out.jsonl", examples)
  assert (tmp_path / "out.jsonl").read_text() == line


def test_reads_colbertv2_formats(tmp_path):
  path = _write_bytes(tmp_path / "v2.jsonl", b'[3, [10, 0.5], [11, -0.25]]\n[4, 20, 21, "22"]\n')
  assert list(formats.read_training_lines(path)) == [
      TrainingExample("3", ("10", "11"), (0.5, -0.25)),
      TrainingExample("4", ("20", "21", "22"), None),
  ]


BAD_TRAINING_LINES = {
    "malformed_json": ('[1, [2, 0.5, []]', "malformed JSON"),
    "not_a_list": ('{"qid": 1}', "expected a JSON list"),
    "no_passages": ("[1]", "expected a JSON list"),
    "short_entry": ("[1, [2]]", "passage entry 0 must be [pid, score]"),
    "score_not_a_number": ('[1, [2, "high", []]]', "score of entry 0 must be a number"),
    "pair_without_logp": ("[1, [2, 0.5, [[1]]], [3, 0.1, []]]", "must be [j, logp]"),
    "float_pid": ("[1, [2.5, 0.5, []]]", "pid of entry 0 must be a string or an integer"),
    "nan_score": ("[1, [2, NaN, []], [3, 0.1, []]]", "non-finite score nan"),
    "infinite_logp": ("[1, [2, 0.5, [[1, -Infinity]]], [3, 0.1, []]]", "non-finite logp -inf"),
    "positive_logp": ("[1, [2, 0.5, [[1, 0.25]]], [3, 0.1, []]]", "logp 0.25 > 0 (a probability above 1)"),
    "pair_out_of_range": ("[1, [2, 0.5, [[70, -0.1]]], [3, 0.1, []]]",
                          "pair index 70 out of range (line has 2 passages)"),
    "negative_pair_index": ("[1, [2, 0.5, []], [3, 0.1, [[-1, -0.1]]]]", "pair index -1 out of range"),
    "self_pair": ("[1, [2, 0.5, []], [3, 0.1, [[1, -0.1]]]]", "pair (1, 1) compares a passage with itself"),
    "duplicate_pid": ("[1, [2, 0.5, []], [2, 0.1, []]]", "duplicate pid '2'"),
    "duplicate_pid_plain": ("[1, 7, 8, 7]", "duplicate pid '7'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TRAINING_LINES))
def test_bad_training_line(tmp_path, kind):
  bad, reason = BAD_TRAINING_LINES[kind]
  path = _write_bytes(tmp_path / "train.jsonl", f"[9, [1, 0.5, []]]\n\n{bad}\n".encode())
  _expect_error(path, 3, reason, lambda p: list(formats.read_training_lines(p)))


def test_pid_missing_from_collection(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b"[9, [1, 0.5, []]]\n[9, [1, 0.5, []], [4, 0.1, []]]\n")
  _expect_error(path, 2, "pid '4' is not in the collection",
                lambda p: list(formats.read_training_lines(p, collection_ids={"1", "2"})))


def test_qid_missing_from_queries(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b"[9, [1, 0.5, []]]\n\n[8, [1, 0.5, []]]\n")
  _expect_error(path, 3, "qid '8' is not in the queries",
                lambda p: list(formats.read_training_lines(p, query_ids={"9"})))


def test_training_lines_with_line_numbers(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b"\n[1, 5]\n[2, oops]\n[3, 6]\n")
  lines = list(formats.iter_training_lines(path, skip_bad_lines=True))
  assert [(n, ex.qid, ex.pids) for n, ex in lines] == [(2, "1", ("5",)), (4, "3", ("6",))]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_training_file(tmp_path, suffix):
  path = _write_bytes(tmp_path / f"train.jsonl{suffix}", b"")
  _expect_error(path, 1, "file is empty", lambda p: list(formats.read_training_lines(p)))


def test_blank_only_training_file(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b"\n  \n")
  _expect_error(path, 2, "only blank lines", lambda p: list(formats.read_training_lines(p)))


def test_not_utf8(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"1\tgood\n2\tbad \xff\n")
  _expect_error(path, 2, "not UTF-8", formats.read_collection)


def test_skip_bad_training_lines_counts_and_warns(tmp_path, caplog):
  lines = [
      "[1, [10, 0.5, []]]",
      "[2, [10, 0.5, [[5, -0.1]]]]",
      "[3, 10, 11]",
      "not json",
      "[4, [10, 1.0, [[1, -0.1]]], [12, 0.0, []]]",
  ]
  path = _write_bytes(tmp_path / "train.jsonl", ("\n".join(lines) + "\n").encode())
  skipped = []
  with caplog.at_level(logging.WARNING, logger=formats.__name__):
    examples = list(formats.read_training_lines(path, skip_bad_lines=True, on_skip=skipped.append,
                                                collection_ids={"10", "11", "12"}))
  assert [e.qid for e in examples] == ["1", "3", "4"]
  reasons = [(e.line, e.reason.split(" (")[0]) for e in skipped]
  assert reasons == [(2, "pair index 5 out of range"), (4, "malformed JSON")]
  assert "skipped 2 bad lines" in caplog.text
  assert f"{path}:4: malformed JSON" in caplog.text


def test_skip_bad_lines_with_every_line_bad(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b"x\ny\n")
  _expect_error(path, 2, "no valid lines (all 2 lines were bad)",
                lambda p: list(formats.read_training_lines(p, skip_bad_lines=True)))


def test_writer_rejects_invalid_examples():
  with pytest.raises(ValueError, match=r"pair index 3 out of range \(line has 2 passages\)"):
    TrainingExample("1", ("a", "b"), (1.0, 0.0), ((0, 3, -0.1),))
  with pytest.raises(ValueError, match="2 scores for 3 passages"):
    TrainingExample("1", ("a", "b", "c"), (1.0, 0.0))


# ------------------------------------------------------------------------------------ atomic writes


def _failing(items, fail_after: int):
  for n, item in enumerate(items):
    if n == fail_after:
      raise RuntimeError("teacher crashed")
    yield item


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_write_leaves_nothing_behind(tmp_path, suffix):
  path = tmp_path / f"train.jsonl{suffix}"
  with pytest.raises(RuntimeError, match="teacher crashed"):
    formats.write_training_lines(path, _failing([PAIRDISTILL] * 5, fail_after=3))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_write_keeps_existing_file(tmp_path, suffix):
  path = _write_bytes(tmp_path / f"train.jsonl{suffix}", b"previous contents\n")
  before = path.read_bytes()
  with pytest.raises(RuntimeError, match="teacher crashed"):
    formats.write_training_lines(path, _failing([PAIRDISTILL] * 5, fail_after=2))
  assert os.listdir(tmp_path) == [path.name]
  assert path.read_bytes() == before


def test_failed_collection_write_keeps_existing_file(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"1\told\n")
  with pytest.raises(ValueError, match="passage '2' holds a tab or line break"):
    formats.write_collection(path, {"1": "fine", "2": "has\ttab", "3": "never written"})
  assert os.listdir(tmp_path) == ["collection.tsv"]
  assert path.read_bytes() == b"1\told\n"


def test_written_file_has_umask_permissions(tmp_path):
  umask = os.umask(0o022)
  os.umask(umask)
  path = tmp_path / "queries.tsv"
  formats.write_queries(path, {"1": "q"})
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------- collection, queries


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_collection_round_trip(tmp_path, suffix):
  passages = {"0": "The presence of communication.", "1": "caf\u00e9 | \u2028 \x85 inside", "7": ""}
  path = tmp_path / f"collection.tsv{suffix}"
  formats.write_collection(path, passages)
  expected = "0\tThe presence of communication.\n1\tcaf\u00e9 | \u2028 \x85 inside\n7\t\n"
  assert _read_bytes(path) == expected.encode()
  assert formats.read_collection(path) == passages


def test_collection_titles_and_line_endings(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv",
                      b"id\ttext\ttitle\n1\ttext one\tTitle\r\n2\ttext two\t\n3\ttext\rthree\n")
  assert formats.read_collection(path) == {"1": "Title | text one", "2": "text two", "3": "text\rthree"}


@pytest.mark.parametrize("header, second_line, second_text", [
    (b"id\ttext\n", b"1\tsecond\n", "second"),
    (b"\nid\ttext\ttitle\n", b"1\tsecond\tT\n", "T | second"),
])
def test_collection_header_row(tmp_path, header, second_line, second_text):
  path = _write_bytes(tmp_path / "collection.tsv", header + b"0\tfirst\n" + second_line)
  assert formats.read_collection(path) == {"0": "first", "1": second_text}
  assert list(formats.iter_collection(path)) == [(header.count(b"\n") + 1, "0", "first"),
                                                 (header.count(b"\n") + 2, "1", second_text)]


def test_collection_of_only_a_header(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"id\ttext\ttitle\n")
  _expect_error(path, 1, "no pids (only a header)", formats.read_collection)
  _expect_error(path, 1, "only a header", lambda p: list(formats.iter_collection(p)))


def test_header_only_on_the_first_line(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"0\tfirst\nid\ttext\n")
  assert formats.read_collection(path) == {"0": "first", "id": "text"}


def test_streamed_collection_and_queries(tmp_path):
  collection = _write_bytes(tmp_path / "collection.tsv.gz", b"5\tfive\n\n5\tagain\nbad\n7\tseven\n")
  skipped = []
  rows = list(formats.iter_collection(collection, skip_bad_lines=True, on_skip=skipped.append))
  assert rows == [(1, "5", "five"), (3, "5", "again"), (5, "7", "seven")]  # duplicates are the caller's
  assert [e.line for e in skipped] == [4]
  _expect_error(collection, 4, "the line has 1 tab-separated field;", lambda p: list(formats.iter_collection(p)))
  queries = _write_bytes(tmp_path / "queries.tsv", b"q1\twhat\nq2\twhy\n")
  assert list(formats.iter_queries(queries)) == [(1, "q1", "what"), (2, "q2", "why")]


@pytest.mark.parametrize("content, line, reason", [
    (b"1\ta\n2\n", 2, "the line has 1 tab-separated field; a collection line is id<TAB>text"),
    (b"1\ta\n2\tb\tc\td\n", 2, "the line has 4 tab-separated fields"),
    (b"1\ta\n2\tb\n1\tc\n", 3, "duplicate pid '1'"),
    (b"\ta\n", 1, "empty pid"),
    (b"", 1, "file is empty"),
])
def test_bad_collection(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "collection.tsv", content)
  _expect_error(path, line, reason, formats.read_collection)


def test_skip_bad_collection_lines(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"1\ta\n2\n3\tc\n1\tdup\n4\td\n")
  skipped = []
  passages = formats.read_collection(path, skip_bad_lines=True, on_skip=skipped.append)
  assert passages == {"1": "a", "3": "c", "4": "d"}
  assert [e.line for e in skipped] == [2, 4]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_queries_round_trip(tmp_path, suffix):
  queries = {"1048585": "what is paula deen's brother", "2": "Androgen receptor defines"}
  path = tmp_path / f"queries.tsv{suffix}"
  formats.write_queries(path, queries)
  assert _read_bytes(path) == b"1048585\twhat is paula deen's brother\n2\tAndrogen receptor defines\n"
  assert formats.read_queries(path) == queries


@pytest.mark.parametrize("content, line, reason", [
    (b"1\ta\n2\tb\tc\n", 2, "expected 2 tab-separated columns (qid, query), found 3"),
    (b"1\ta\n1\tb\n", 2, "duplicate qid '1'"),
    (b"\n\n", 2, "only blank lines"),
])
def test_bad_queries(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "queries.tsv", content)
  _expect_error(path, line, reason, formats.read_queries)


def test_skip_bad_query_lines(tmp_path):
  path = _write_bytes(tmp_path / "queries.tsv", b"1\ta\n2\n3\tc\n")
  skipped = []
  assert formats.read_queries(path, skip_bad_lines=True, on_skip=skipped.append) == {"1": "a", "3": "c"}
  assert [e.line for e in skipped] == [2]


# -------------------------------------------------------------------------------------------- BEIR


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_beir_corpus_and_queries(tmp_path, suffix):
  corpus = _write_bytes(tmp_path / f"corpus.jsonl{suffix}", (
      b'{"_id": "4983", "title": "Micro", "text": "Alterations of the architecture."}\n'
      b'{"_id": 12, "title": "", "text": "No title here."}\n'
      b'{"_id": "x", "text": "Title missing."}\n'))
  assert formats.read_beir_corpus(corpus) == {
      "4983": "Micro | Alterations of the architecture.", "12": "No title here.", "x": "Title missing."}
  queries = _write_bytes(tmp_path / f"queries.jsonl{suffix}",
                         b'{"_id": "0", "text": "0-dimensional biomaterials.", "metadata": {}}\n')
  assert formats.read_beir_queries(queries) == {"0": "0-dimensional biomaterials."}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_beir_writers_round_trip(tmp_path, suffix):
  corpus = tmp_path / f"corpus.jsonl{suffix}"
  data_helpers.write_beir_corpus(corpus, {"4983": {"title": "Micro", "text": "Alterations."},
                                     "12": {"text": "No title, caf\u00e9."}})
  assert _read_bytes(corpus) == (b'{"_id": "4983", "title": "Micro", "text": "Alterations."}\n'
                                 b'{"_id": "12", "title": "", "text": "No title, caf\\u00e9."}\n')
  assert formats.read_beir_corpus(corpus) == {"4983": "Micro | Alterations.", "12": "No title, caf\u00e9."}
  queries = tmp_path / f"queries.jsonl{suffix}"
  data_helpers.write_beir_queries(queries, {"0": "what?", "q1": "why\tnot"})
  assert formats.read_beir_queries(queries) == {"0": "what?", "q1": "why\tnot"}
  with pytest.raises(ValueError, match="document 'x' has no 'text'"):
    data_helpers.write_beir_corpus(tmp_path / "bad.jsonl", {"x": {"title": "t"}})
  assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.parametrize("content, line, reason", [
    (b'{"_id": "1", "text": "a"}\n{"text": "b"}\n', 2, "missing field '_id'"),
    (b'{"_id": "1", "text": "a"}\n{"_id": "2", "text": 5}\n', 2, "field 'text' must be a string"),
    (b'{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n', 2, "malformed JSON"),
    (b'{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n', 2, "duplicate document id '1'"),
    (b'["_id", "1"]\n', 1, "expected a JSON object"),
    (b'{"_id": "", "text": "a"}\n', 1, "empty _id"),
])
def test_bad_beir_corpus(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "corpus.jsonl", content)
  _expect_error(path, line, reason, formats.read_beir_corpus)


# ------------------------------------------------------------------------------------- qrels, runs


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_qrels_round_trip(tmp_path, suffix):
  qrels = {"1": {"31715818": 1, "7": 0}, "q2": {"d9": 2}}
  path = tmp_path / f"qrels.txt{suffix}"
  formats.write_qrels(path, qrels)
  assert _read_bytes(path) == b"1 0 31715818 1\n1 0 7 0\nq2 0 d9 2\n"
  assert formats.read_qrels(path) == qrels


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_beir_qrels_round_trip(tmp_path, suffix):
  qrels = {"1": {"31715818": 1, "7": 0}, "q2": {"d9": 2}}
  path = tmp_path / f"test.tsv{suffix}"
  formats.write_qrels(path, qrels, beir=True)
  assert _read_bytes(path) == b"query-id\tcorpus-id\tscore\n1\t31715818\t1\n1\t7\t0\nq2\td9\t2\n"
  assert formats.read_qrels(path) == qrels


def test_beir_and_trec_qrels_detected_per_file(tmp_path):
  beir = _write_bytes(tmp_path / "test.tsv",
                      b"query-id\tcorpus-id\tscore\n1\t31715818\t1\n3\t14717500\t1\n1\t2\t0\n")
  trec = _write_bytes(tmp_path / "qrels.dev.tsv", b"1102432\t0\t2026790\t1\n1102431 0 7066866 1\n")
  assert formats.read_qrels(beir) == {"1": {"31715818": 1, "2": 0}, "3": {"14717500": 1}}
  assert formats.read_qrels(trec) == {"1102432": {"2026790": 1}, "1102431": {"7066866": 1}}


@pytest.mark.parametrize("content, line, reason", [
    (b"query-id\tcorpus-id\tscore\n1\t2\n", 2,
     "expected 3 tab-separated columns (query-id, corpus-id, score), found 2"),
    (b"query-id\tcorpus-id\tscore\n1\t2\tyes\n", 2, "relevance 'yes' is not an integer"),
    (b"query-id\tcorpus-id\tscore\n", 1, "no judgments"),
    (b"1 0 d1 1\n1 0 d2\n", 2, "expected 4 columns (TREC qrels: qid 0 docid rel), found 3"),
    (b"1 0 d1 1\n1 0 d1 0\n", 2, "duplicate judgment for query '1', document 'd1'"),
])
def test_bad_qrels(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "qrels.tsv", content)
  _expect_error(path, line, reason, formats.read_qrels)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_run_round_trip_and_tie_order(tmp_path, suffix):
  run = {"q1": {"d2": 1.5, "d10": 1.5, "d3": 2.25, "d1": -0.1}, "q0": {"x": 0.30000000000000004}}
  path = tmp_path / f"run.trec{suffix}"
  formats.write_run(path, run, tag="colbert")
  assert _read_bytes(path) == (
      b"q1 Q0 d3 1 2.25 colbert\n"
      b"q1 Q0 d10 2 1.5 colbert\n"
      b"q1 Q0 d2 3 1.5 colbert\n"
      b"q1 Q0 d1 4 -0.1 colbert\n"
      b"q0 Q0 x 1 0.30000000000000004 colbert\n")
  assert formats.read_run(path) == run


def test_written_run_and_qrels_read_by_ir_measures(tmp_path):
  import ir_measures

  formats.write_run(tmp_path / "run.trec", {"q": {"a": 1.0, "b": 3.0}})
  formats.write_qrels(tmp_path / "qrels.txt", {"q": {"b": 1}})
  run = [(r.query_id, r.doc_id, r.score) for r in ir_measures.read_trec_run(str(tmp_path / "run.trec"))]
  assert sorted(run) == [("q", "a", 1.0), ("q", "b", 3.0)]
  qrels = ir_measures.read_trec_qrels(str(tmp_path / "qrels.txt"))
  assert [(r.query_id, r.doc_id, r.relevance) for r in qrels] == [("q", "b", 1)]


@pytest.mark.parametrize("content, line, reason", [
    (b"q Q0 d 1 0.5 t\nq Q0 e 2 0.5\n", 2,
     "expected 6 columns (TREC run: qid Q0 docid rank score tag), found 5"),
    (b"q Q0 d 1 nan t\n", 1, "non-finite score nan"),
    (b"q Q0 d 1 high t\n", 1, "score 'high' is not a number"),
    (b"q Q0 d first 0.5 t\n", 1, "rank 'first' is not an integer"),
    (b"q Q0 d 1 0.5 t\nq Q0 d 2 0.4 t\n", 2, "duplicate document 'd' for query 'q'"),
])
def test_bad_run(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "run.trec", content)
  _expect_error(path, line, reason, formats.read_run)


def test_write_run_rejects_bad_tag_and_scores(tmp_path):
  with pytest.raises(ValueError, match="run tag 'my run'"):
    formats.write_run(tmp_path / "run.trec", {"q": {"d": 1.0}}, tag="my run")
  with pytest.raises(ValueError, match="non-finite score inf for query 'q', document 'd'"):
    formats.write_run(tmp_path / "run.trec", {"q": {"d": float("inf")}})
  with pytest.raises(ValueError, match="document id 'd 1' must be non-empty and hold no whitespace"):
    formats.write_run(tmp_path / "run.trec", {"q": {"d 1": 1.0}})
  with pytest.raises(ValueError, match="query id '' must be non-empty"):
    formats.write_qrels(tmp_path / "qrels.txt", {"": {"d": 1}})
  assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------- sources: a TSV file or BEIR


def _beir_dir(root, *, splits=("train", "test")):
  """A BEIR directory: two titled documents, queries q1 (train), q2 (test), q3 (unjudged)."""
  (root / "qrels").mkdir(parents=True)
  (root / "corpus.jsonl").write_text('{"_id": "d1", "title": "Cats", "text": "They purr."}\n'
                                     '{"_id": "d2", "title": "", "text": "No title."}\n')
  (root / "queries.jsonl").write_text('{"_id": "q1", "text": "train query"}\n{"_id": "q2", "text": "test query"}\n'
                                      '{"_id": "q3", "text": "unjudged"}\n')
  judged = {"train": "q1\td1\t1\n", "test": "q2\td2\t1\n"}
  for split in splits:
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + judged[split])
  return root


@pytest.mark.parametrize("name, field, kind", [
    ("collection.tsv", "docs", "tsv"), ("collection.tsv.gz", "docs", "tsv"), ("queries.dev.tsv", "queries", "tsv"),
    ("corpus.jsonl", "docs", "beir"), ("corpus.jsonl.gz", "docs", "beir"), ("queries.jsonl", "queries", "beir"),
])
def test_text_source_detects_files(tmp_path, name, field, kind):
  path = _write_bytes(tmp_path / name, b"x\ty\n")
  source = formats.text_source(path, field)
  assert (source.format, source.records, source.split, source.files) == (kind, path, None, (path,))


def test_text_source_reads_a_beir_directory(tmp_path):
  root = _beir_dir(tmp_path / "beir")
  docs = formats.text_source(root, "docs", split="test")
  assert (docs.format, docs.records, docs.split) == ("beir", root / "corpus.jsonl", None)
  assert docs.read() == {"d1": "Cats | They purr.", "d2": "No title."}
  assert list(docs.iter()) == [(1, "d1", "Cats | They purr."), (2, "d2", "No title.")]
  queries = formats.text_source(root, "queries", split="train")
  assert queries.files == (root / "queries.jsonl", root / "qrels" / "train.tsv")
  assert queries.settings() == {"format": "beir", "split": "train"}


def test_beir_directory_queries_are_those_of_the_split(tmp_path):
  root = _beir_dir(tmp_path / "beir")
  train, test = (formats.text_source(root, "queries", split=split) for split in ("train", "test"))
  assert train.read() == {"q1": "train query"} and list(train.iter()) == [(1, "q1", "train query")]
  assert test.read() == {"q2": "test query"} and list(test.iter()) == [(2, "q2", "test query")]
  whole_file = formats.text_source(root / "queries.jsonl", "queries")  # a file is read whole
  assert whole_file.read() == {"q1": "train query", "q2": "test query", "q3": "unjudged"}
  (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td1\t1\n")
  with pytest.raises(ValueError, match=r"queries.jsonl: none of its 3 queries is judged in .*qrels/train.tsv"):
    train.read()


@pytest.mark.parametrize("make, field, message", [
    (lambda root: root / "missing.tsv", "docs", "missing.tsv does not exist; expected a collection .tsv file"),
    (lambda root: _write_bytes(root / "collection.csv", b"1,a\n"), "docs",
     "collection.csv: unknown collection format; expected a collection .tsv file (pid, text tab-separated; "
     "titles as a third column after the header line id, text, title), a BEIR corpus.jsonl file, or a BEIR "
     "directory holding corpus.jsonl"),
    (lambda root: _write_bytes(root / "queries.txt", b"1\ta\n"), "queries",
     "queries.txt: unknown queries format; expected a queries .tsv file"),
    (lambda root: root, "docs", ": a directory without corpus.jsonl; expected a collection .tsv file"),
    (lambda root: _beir_dir(root / "beir", splits=("test",)), "queries",
     "beir: no qrels/train.tsv to restrict its queries to split 'train' (splits here: test)"),
])
def test_text_source_names_a_bad_path_and_the_accepted_formats(tmp_path, make, field, message):
  path = make(tmp_path)
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    formats.text_source(path, field)
  assert str(info.value).startswith(str(path)) and message in str(info.value)
  assert "\n" not in str(info.value)


def test_title_separator_per_student_kind(tmp_path):
  assert students.title_separator("auto", "colbert") == " | "
  assert students.title_separator("auto", "dpr") == " "
  assert students.title_separator(" - ", "dpr") == " - "
  with pytest.raises(ValueError, match="model.kind='splade' is not a registered student kind"):
    students.title_separator("auto", "splade")
  tsv = _write_bytes(tmp_path / "collection.tsv", b"id\ttext\ttitle\n1\ttext one\tTitle\n2\ttext two\n")
  beir = _beir_dir(tmp_path / "beir")
  for separator, tsv_text, beir_text in ((" | ", "Title | text one", "Cats | They purr."),
                                         (" ", "Title text one", "Cats They purr.")):
    for path, expected in ((tsv, {"1": tsv_text, "2": "text two"}), (beir, {"d1": beir_text, "d2": "No title."})):
      source = formats.text_source(path, "docs", title_separator=separator)
      assert source.read() == expected and {k: t for _, k, t in source.iter()} == expected
      assert source.settings()["title_separator"] == separator


# ------------------------------------------------------------------------------------------ SciFact


@pytest.mark.slow
def test_scifact_counts(scifact_dir):
  corpus = formats.read_beir_corpus(scifact_dir / "corpus.jsonl")
  queries = formats.read_beir_queries(scifact_dir / "queries.jsonl")
  train = formats.read_qrels(scifact_dir / "qrels" / "train.tsv")
  test = formats.read_qrels(scifact_dir / "qrels" / "test.tsv")
  assert len(corpus) == 5183 and len(queries) == 1109
  assert len(train) == 809 and sum(map(len, train.values())) == 919
  assert len(test) == 300 and sum(map(len, test.values())) == 339
  assert corpus["4983"].startswith("Microstructural development of human newborn cerebral white matter")
  assert " | Alterations of the architecture of cerebral white matter" in corpus["4983"]
  judged = {d for q in (*train.values(), *test.values()) for d in q}
  assert judged <= corpus.keys() and (train.keys() | test.keys()) <= queries.keys()


def test_iter_run_streams_query_blocks_and_names_a_split_query(tmp_path):
  path = tmp_path / "run.trec"
  path.write_text("q1 Q0 d1 1 2.5 t\nq1 Q0 d2 2 1.0 t\nq2 Q0 d1 1 0.5 t\n")
  assert list(formats.iter_run(path)) == [("q1", {"d1": 2.5, "d2": 1.0}), ("q2", {"d1": 0.5})]
  path.write_text("q1 Q0 d1 1 2.5 t\nq2 Q0 d1 1 0.5 t\nq1 Q0 d2 2 1.0 t\n")
  with pytest.raises(formats.FormatError, match=r"run.trec:3: query 'q1' appears again after other queries"):
    list(formats.iter_run(path))
  path.write_text("q1 Q0 d1 1 2.5 t\nq1 Q0 d1 2 1.0 t\n")
  with pytest.raises(formats.FormatError, match=r"run.trec:2: duplicate document 'd1'"):
    list(formats.iter_run(path))


# ------------------------------------------------------------------------------ reliability of inputs

LONG_ID = "x" * 5000


@pytest.mark.parametrize("content, line, reason", [
    (f'[1, [2, 0.5]]\n["{LONG_ID}", [2, 0.5]]\n', 2, "qid is 5,000 characters long, longer than the limit of 1024"),
    (f'[1, [2, 0.5]]\n[1, ["{LONG_ID}", 0.5]]\n', 2, "pid of entry 0 is 5,000 characters long"),
    (f'[1, 2]\n[1, 3, "{LONG_ID}"]\n', 2, "pid 1 is 5,000 characters long"),
])
def test_over_long_training_id(tmp_path, content, line, reason):
  path = _write_bytes(tmp_path / "train.jsonl", content.encode())
  _expect_error(path, line, reason, lambda p: list(formats.read_training_lines(p)))
  skipped = []
  assert len(list(formats.read_training_lines(path, skip_bad_lines=True, on_skip=skipped.append))) == 1
  assert [e.line for e in skipped] == [line]


@pytest.mark.parametrize("name, content, read, reason", [
    ("collection.tsv", f"1\ta\n{LONG_ID}\tb\n", formats.read_collection, "pid is 5,000 characters long"),
    ("queries.tsv", f"1\ta\n{LONG_ID}\tb\n", formats.read_queries, "qid is 5,000 characters long"),
    ("corpus.jsonl", f'{{"_id": "1", "text": "a"}}\n{{"_id": "{LONG_ID}", "text": "b"}}\n', formats.read_beir_corpus,
     "_id is 5,000 characters long"),
    ("qrels.tsv", f"1 0 d 1\n1 0 {LONG_ID} 1\n", formats.read_qrels, "document id is 5,000 characters long"),
    ("qrels.tsv", f"query-id\tcorpus-id\tscore\n{LONG_ID}\td\t1\n", formats.read_qrels,
     "query id is 5,000 characters long"),
    ("run.trec", f"q Q0 d 1 0.5 t\n{LONG_ID} Q0 d 1 0.5 t\n", formats.read_run, "query id is 5,000 characters"),
    ("run.trec", f"q Q0 d 1 0.5 t\nq Q0 {LONG_ID} 2 0.5 t\n", formats.read_run, "document id is 5,000 characters"),
])
def test_over_long_id_in_every_reader(tmp_path, name, content, read, reason):
  path = _write_bytes(tmp_path / name, content.encode())
  _expect_error(path, 2, reason, read)


def test_id_of_the_limit_is_accepted(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", ("y" * 1024 + "\ttext\n").encode())
  assert formats.read_collection(path) == {"y" * 1024: "text"}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name, content, read, expected", [
    ("collection.tsv", b"p0\tfirst\np1\tsecond\n", formats.read_collection, {"p0": "first", "p1": "second"}),
    ("collection.tsv", b"id\ttext\ttitle\np0\tfirst\tT\n", formats.read_collection, {"p0": "T | first"}),
    ("queries.tsv", b"q0\twhat\n", formats.read_queries, {"q0": "what"}),
    ("corpus.jsonl", b'{"_id": "d0", "text": "x"}\n', formats.read_beir_corpus, {"d0": "x"}),
    ("train.jsonl", b'["q0", ["p0", 1.5]]\n', lambda p: list(formats.read_training_lines(p)),
     [TrainingExample("q0", ("p0",), (1.5,))]),
    ("qrels.tsv", b"query-id\tcorpus-id\tscore\nq0\tp0\t1\n", formats.read_qrels, {"q0": {"p0": 1}}),
    ("run.trec", b"q0 Q0 p0 1 0.5 t\n", formats.read_run, {"q0": {"p0": 0.5}}),
])
def test_utf8_byte_order_mark_is_stripped(tmp_path, suffix, name, content, read, expected):
  path = _write_bytes(tmp_path / f"{name}{suffix}", b"\xef\xbb\xbf" + content)
  assert read(path) == expected


def test_byte_order_mark_only_at_the_start(tmp_path):
  path = _write_bytes(tmp_path / "queries.tsv", b"q0\ta\n\xef\xbb\xbfq1\tb\n")
  assert formats.read_queries(path) == {"q0": "a", "\ufeffq1": "b"}


def test_skip_lines_that_are_not_utf8(tmp_path, caplog):
  path = _write_bytes(tmp_path / "train.jsonl", b'[1, [2, 0.5]]\n[3, ["\xff", 0.5]]\n[4, [5, 0.5]]\n\xc3(\n')
  _expect_error(path, 2, "not UTF-8 (invalid start byte at byte 6)", lambda p: list(formats.read_training_lines(p)))
  skipped = []
  with caplog.at_level(logging.WARNING, logger=formats.__name__):
    examples = list(formats.read_training_lines(path, skip_bad_lines=True, on_skip=skipped.append))
  assert [e.qid for e in examples] == ["1", "4"]
  assert [(e.line, e.reason.split(" (")[0]) for e in skipped] == [(2, "not UTF-8"), (4, "not UTF-8")]
  assert "skipped 2 bad lines" in caplog.text
  collection = _write_bytes(tmp_path / "collection.tsv", b"1\tgood\n2\tbad \xff\n3\tfine\n")
  skipped = []
  assert formats.read_collection(collection, skip_bad_lines=True, on_skip=skipped.append) == {"1": "good", "3": "fine"}
  assert [e.line for e in skipped] == [2]


def test_every_line_not_utf8_with_skip(tmp_path):
  path = _write_bytes(tmp_path / "queries.tsv", b"\xff\n\xfe\n")
  _expect_error(path, 2, "no valid lines (all 2 lines were bad)",
                lambda p: formats.read_queries(p, skip_bad_lines=True))


@pytest.mark.parametrize("content, line, fields", [
    (b"1\ta\n2\tb\tc\n", 2, 3),
    (b"1\ttext with\ta tab\tinside\n", 1, 4),
    (b"id\ttext\n1\tb\tc\n", 2, 3),
])
def test_collection_title_column_needs_the_header(tmp_path, content, line, fields):
  path = _write_bytes(tmp_path / "collection.tsv", content)
  error = _expect_error(path, line, f"the line has {fields} tab-separated fields; a collection line is id<TAB>text",
                        formats.read_collection)
  assert "start the file with the header line id<TAB>text<TAB>title" in error.reason
  skipped = []
  formats.read_collection(_write_bytes(tmp_path / "more.tsv", content + b"9\tz\n"), skip_bad_lines=True,
                          on_skip=skipped.append)
  assert [e.line for e in skipped] == [line]


def test_titled_collection_rejects_a_fourth_field(tmp_path):
  path = _write_bytes(tmp_path / "collection.tsv", b"id\ttext\ttitle\n1\ta\tT\n2\tb\tT\textra\n")
  _expect_error(path, 3, "the line has 4 tab-separated fields; a titled collection line is id<TAB>text<TAB>title",
                formats.read_collection)


def test_training_line_without_scores_when_scores_are_required(tmp_path):
  path = _write_bytes(tmp_path / "train.jsonl", b'["q0", ["p1", 1.0]]\n["q1", "p1", "p2"]\n')
  _expect_error(path, 2, "no teacher scores", lambda p: list(formats.iter_training_lines(p, require_scores=True)))
  skipped = []
  lines = list(formats.iter_training_lines(path, require_scores=True, skip_bad_lines=True, on_skip=skipped.append))
  assert [(n, ex.qid) for n, ex in lines] == [(1, "q0")] and [e.line for e in skipped] == [2]
  assert [ex.qid for ex in formats.read_training_lines(path)] == ["q0", "q1"]  # scores not required
