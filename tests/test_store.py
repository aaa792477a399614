"""The pre-tokenised store: contents equal the tokenizer's, id index, reuse and rebuild, atomic builds."""

import gzip
import logging
import os
import tracemalloc

import numpy as np
import pytest

from pairdistill_jax.data import array_cache, demo, formats, row_index, store
from pairdistill_jax.data.formats import FormatError
from pairdistill_jax.data.tokenization import ColBERTTokenizer, DPRTokenizer, load_tokenizer

import data_helpers

WORDS = "the cat sat on a mat , while proteins fold ; water ( boils ) at 100 degrees ! why ? café".split()


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir):
  return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def colbert(hf_tokenizer):
  return ColBERTTokenizer(hf_tokenizer, query_maxlen=8, doc_maxlen=16)


def _texts(count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, int(rng.integers(1, 20)))) for _ in range(count)]


def _collection(path, ids, seed=0):
  passages = dict(zip(ids, _texts(len(ids), seed)))
  formats.write_collection(path, passages)
  return passages


def _open(source, tmp_path, tokenizer, field="docs", **kwargs):
  kwargs.setdefault("num_workers", 0)
  return store.open_store(source, tmp_path / "stores", tokenizer, field, progress=False, **kwargs)


def _assert_rows_equal(st, rows, expected):
  got = st.gather(np.asarray(rows))
  for key in ("ids", "mask"):
    assert got[key].dtype == np.int32
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_passage_store_holds_the_tokenizer_encoding(tmp_path, colbert):
  passages = _collection(tmp_path / "collection.tsv", [str(i) for i in range(30)])
  st = _open(tmp_path / "collection.tsv", tmp_path, colbert)
  assert len(st) == 30 and st.ids.dtype == np.uint16 and isinstance(st.ids, np.memmap)
  assert st.index.layout == "dense"
  _assert_rows_equal(st, np.arange(30), colbert.encode_docs(list(passages.values())))
  _assert_rows_equal(st, [st.pad_row], colbert.encode_docs([""]))
  np.testing.assert_array_equal(st.rows(["7", "0", "29"]), [7, 0, 29])


@pytest.mark.parametrize("attend", [False, True])
def test_query_store_holds_the_tokenizer_encoding(tmp_path, hf_tokenizer, attend):
  tokenizer = ColBERTTokenizer(hf_tokenizer, query_maxlen=8, doc_maxlen=16, attend_to_mask_tokens=attend)
  queries = dict(zip(["q1", "q2", "q3"], ["what boils ?", "why do proteins fold at 100 degrees and more", "x"]))
  formats.write_queries(tmp_path / "queries.tsv", queries)
  st = _open(tmp_path / "queries.tsv", tmp_path, tokenizer, "queries")
  assert st.index.layout == "str" and st.what == "qid"
  _assert_rows_equal(st, st.rows(["q1", "q2", "q3"]), tokenizer.encode_queries(list(queries.values())))


def test_dpr_store_and_large_vocabulary_int32(tmp_path):
  words = [f"w{i}" for i in range(66_000)]
  demo.write_tokenizer(tmp_path / "tok", words)
  tokenizer = DPRTokenizer(load_tokenizer(tmp_path / "tok"), query_maxlen=6, doc_maxlen=10)
  passages = {"a": "w65999 w3 ,", "b": "w65535 w65536 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"}
  formats.write_collection(tmp_path / "collection.tsv", passages)
  st = _open(tmp_path / "collection.tsv", tmp_path, tokenizer)
  assert st.ids.dtype == np.int32
  _assert_rows_equal(st, st.rows(["a", "b"]), tokenizer.encode_docs(list(passages.values())))
  assert st.ids.max() == tokenizer.tokenizer.get_vocab()["w65999"]


@pytest.mark.parametrize("ids, layout", [
    (["5", "3", "10", "0"], "int"),  # integers, not in row order
    (["1", "0"], "int"),
    (["doc-3", "a", "Z", "café"], "str"),
    (["7", "007", "70"], "str"),  # '007' is not the integer 7
])
def test_index_layouts(tmp_path, colbert, ids, layout):
  _collection(tmp_path / "collection.tsv", ids)
  st = _open(tmp_path / "collection.tsv", tmp_path, colbert)
  assert st.index.layout == layout
  np.testing.assert_array_equal(st.rows(ids[::-1]), np.arange(len(ids))[::-1])
  for missing in ("4", "-1", "07", "doc-4", "", "99999999999999999999999"):
    assert missing not in st.index
    assert st.index.find([missing])[0] == -1
  with pytest.raises(KeyError, match="pid 'nope' is not in the store"):
    st.rows([ids[0], "nope"])


def test_reused_when_unchanged_rebuilt_when_changed(tmp_path, colbert, monkeypatch):
  source = tmp_path / "collection.tsv"
  _collection(source, ["0", "1", "2"], seed=1)
  first = _open(source, tmp_path, colbert)

  def no_build(*args, **kwargs):
    raise AssertionError("the store was rebuilt")

  with monkeypatch.context() as patched:
    patched.setattr(store, "_build", no_build)
    assert _open(source, tmp_path, colbert).digest == first.digest
    os.utime(source, ns=(1, 1))  # a copy elsewhere: new mtime, same bytes
    assert _open(source, tmp_path, colbert).digest == first.digest

  passages = _collection(source, ["0", "1", "2"], seed=2)
  rebuilt = _open(source, tmp_path, colbert)
  assert rebuilt.directory == first.directory and rebuilt.digest != first.digest
  _assert_rows_equal(rebuilt, [0, 1, 2], colbert.encode_docs(list(passages.values())))

  longer = ColBERTTokenizer(colbert.tokenizer, query_maxlen=8, doc_maxlen=20)
  other = _open(source, tmp_path, longer)
  assert other.directory != rebuilt.directory and other.ids.shape[1] == 20
  assert _open(source, tmp_path, colbert).ids.shape[1] == 16  # both settings stay available


def test_failed_build_leaves_old_store_and_no_temporaries(tmp_path, colbert):
  source = tmp_path / "collection.tsv"
  passages = _collection(source, ["0", "1"])
  good = _open(source, tmp_path, colbert)
  source.write_text("0\tnew text\n1\tbad\tline\tfour columns\n")
  with pytest.raises(FormatError, match=r"collection.tsv:2: the line has 4 tab-separated fields"):
    _open(source, tmp_path, colbert)
  assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == [good.directory.name]
  _assert_rows_equal(store.load_store(good.directory), [0, 1], colbert.encode_docs(list(passages.values())))


def test_duplicate_ids(tmp_path, colbert):
  source = tmp_path / "collection.tsv"
  source.write_text("a\tfirst\nb\tsecond\n\na\tthird\nc\tfourth\na\tfifth\n")
  with pytest.raises(FormatError) as info:
    _open(source, tmp_path, colbert)
  assert str(info.value) == f"{source}:4: duplicate pid 'a' (first on line 1)"
  skipped = []
  st = _open(source, tmp_path, colbert, skip_bad_lines=True, on_skip=skipped.append)
  assert [e.line for e in skipped] == [4, 6]
  _assert_rows_equal(st, st.rows(["a", "b", "c"]), colbert.encode_docs(["first", "second", "fourth"]))


def test_gzip_source_with_header_and_titles(tmp_path, colbert):
  source = tmp_path / "collection.tsv.gz"
  source.write_bytes(gzip.compress(b"id\ttext\ttitle\n10\tbody one\tTitle\n11\tbody two\t\n"))
  st = _open(source, tmp_path, colbert)
  assert len(st) == 2
  _assert_rows_equal(st, st.rows(["10", "11"]), colbert.encode_docs(["Title | body one", "body two"]))


def _beir(root, docs, queries, qrels):
  """A BEIR directory: docs {id: (title, text)}, queries {id: text}, qrels {split: [qid, ...]}."""
  (root / "qrels").mkdir(parents=True, exist_ok=True)
  data_helpers.write_beir_corpus(root / "corpus.jsonl", {i: {"title": t, "text": x} for i, (t, x) in docs.items()})
  data_helpers.write_beir_queries(root / "queries.jsonl", queries)
  for split, qids in qrels.items():
    formats.write_qrels(root / "qrels" / f"{split}.tsv", {q: {"4983": 1} for q in qids}, beir=True)
  return root


def test_beir_stores_key_on_split_and_title_separator(tmp_path, colbert, monkeypatch):
  root = _beir(tmp_path / "beir", {"4983": ("Micro", "white matter"), "MED-10": ("", "statins"), "12": ("T", "x")},
               {"0": "why ?", "2": "what boils", "5": "test query"}, {"train": ["0", "2"], "test": ["5"]})
  bar = formats.text_source(root, "docs", title_separator=" | ")
  docs = _open(bar, tmp_path, colbert)
  assert docs.index.layout == "str" and len(docs) == 3  # BEIR ids, not integers in row order
  _assert_rows_equal(docs, docs.rows(["MED-10", "4983", "12"]),
                     colbert.encode_docs(["statins", "Micro | white matter", "T | x"]))
  spaced = _open(formats.text_source(root, "docs", title_separator=" "), tmp_path, colbert)
  assert spaced.directory != docs.directory and spaced.digest != docs.digest
  _assert_rows_equal(spaced, spaced.rows(["4983"]), colbert.encode_docs(["Micro white matter"]))

  train = _open(formats.text_source(root, "queries", split="train"), tmp_path, colbert, "queries")
  test = _open(formats.text_source(root, "queries", split="test"), tmp_path, colbert, "queries")
  assert train.index.layout == "int" and train.directory != test.directory
  assert len(train) == 2 and "0" in train.index and "2" in train.index and "5" not in train.index
  assert len(test) == 1 and "5" in test.index
  _assert_rows_equal(train, train.rows(["2"]), colbert.encode_queries(["what boils"]))

  with monkeypatch.context() as patched:
    patched.setattr(store, "_build", lambda *args, **kwargs: pytest.fail("the store was rebuilt"))
    assert _open(bar, tmp_path, colbert).digest == docs.digest
    assert _open(root, tmp_path, colbert, "queries").digest == train.digest  # a path: split 'train'
  formats.write_qrels(root / "qrels" / "train.tsv", {"5": {"4983": 1}}, beir=True)  # the split changed
  rebuilt = _open(formats.text_source(root, "queries", split="train"), tmp_path, colbert, "queries")
  assert rebuilt.directory == train.directory and list(rebuilt.index.find(["5", "0"])) == [0, -1]


def test_beir_duplicate_id_names_corpus_line(tmp_path, colbert):
  root = tmp_path / "beir"
  root.mkdir()
  (root / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n'
                                     '{"_id": "a", "text": "z"}\n')
  with pytest.raises(FormatError) as info:
    _open(root, tmp_path, colbert)
  assert str(info.value) == f"{root / 'corpus.jsonl'}:3: duplicate pid 'a' (first on line 1)"


def test_worker_processes_build_the_same_store(tmp_path, colbert):
  ids = [f"p{i}" for i in range(45)]
  _collection(tmp_path / "collection.tsv", ids)
  serial = _open(tmp_path / "collection.tsv", tmp_path / "serial", colbert, chunk_size=8)
  parallel = _open(tmp_path / "collection.tsv", tmp_path / "parallel", colbert, chunk_size=8, num_workers=2)
  np.testing.assert_array_equal(parallel.ids, serial.ids)
  np.testing.assert_array_equal(parallel.lengths, serial.lengths)
  np.testing.assert_array_equal(parallel.rows(ids), np.arange(45))


def test_ensure_built_keeps_a_store_another_process_installed_first(tmp_path):
  target = tmp_path / "cached"

  def build_with(value):
    def build(tmp):
      writer = array_cache.ArrayWriter(tmp)
      writer.append(x=np.array([value]))
      return {"value": value, "arrays": writer.finish()}
    return build

  def racing_build(tmp):  # another process finishes while this one builds
    array_cache.ensure_built(target, lambda meta: True, build_with(1))
    return build_with(2)(tmp)

  meta = array_cache.ensure_built(target, lambda meta: True, racing_build)
  assert meta["value"] == 1
  assert array_cache.open_arrays(target, meta["arrays"])["x"].tolist() == [1]
  assert [p.name for p in tmp_path.iterdir()] == ["cached"]


def test_encode_keys_is_utf8_per_id_and_agrees_with_the_index(tmp_path, colbert):
  keys = row_index.encode_keys(["café", "p1", "日本", ""])
  assert keys.dtype == np.dtype("S6") and keys.tolist() == [b"caf\xc3\xa9", b"p1", b"\xe6\x97\xa5\xe6\x9c\xac", b""]
  ids = ["日本", "café", "cafe", "Z", "é" * 1024]
  _collection(tmp_path / "collection.tsv", ids)
  st = _open(tmp_path / "collection.tsv", tmp_path, colbert)
  assert st.index.layout == "str"
  np.testing.assert_array_equal(st.rows(ids[::-1]), [4, 3, 2, 1, 0])
  assert list(st.index.find(["cafè", "日", "é" * 1023])) == [-1, -1, -1]


def test_encode_keys_memory_is_that_of_the_utf8_bytes():
  ids = [str(i) for i in range(2000)] + ["é" * 1024]  # one long id: 2048 UTF-8 bytes
  tracemalloc.start()
  try:
    keys = row_index.encode_keys(ids)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert keys.dtype == np.dtype("S2048")
  assert peak < 1.5 * 2001 * 2048  # no 4-bytes-per-character unicode array of every id at the longest's width


def test_over_long_pid_names_its_line(tmp_path, colbert):
  source = tmp_path / "collection.tsv"
  source.write_text("a\tfirst\n" + "b" * 5000 + "\tsecond\nc\tthird\n")
  with pytest.raises(FormatError, match=r"collection.tsv:2: pid is 5,000 characters long, longer than the limit "
                                        r"of 1024"):
    _open(source, tmp_path, colbert)
  st = _open(source, tmp_path, colbert, skip_bad_lines=True)
  _assert_rows_equal(st, st.rows(["a", "c"]), colbert.encode_docs(["first", "third"]))


def test_byte_order_mark_on_a_collection(tmp_path, colbert):
  source = tmp_path / "collection.tsv"
  source.write_bytes("\ufeffp0\tfirst\np1\tsecond\n".encode())
  st = _open(source, tmp_path, colbert)
  _assert_rows_equal(st, st.rows(["p0", "p1"]), colbert.encode_docs(["first", "second"]))


def test_damaged_store_is_rebuilt(tmp_path, colbert, caplog):
  source = tmp_path / "collection.tsv"
  passages = _collection(source, [f"p{i}" for i in range(40)])
  first = _open(source, tmp_path, colbert)
  ids_file = first.directory / "ids.bin"
  original = ids_file.read_bytes()
  middle = len(original) // 2
  with open(ids_file, "r+b") as f:
    f.seek(middle)
    f.write(bytes(255 - b for b in original[middle:middle + 4]))
  with caplog.at_level(logging.WARNING, logger=array_cache.__name__):
    rebuilt = _open(source, tmp_path, colbert)
  assert caplog.text.count(f"{ids_file} does not match the checksum recorded when it was built") == 1
  assert rebuilt.directory == first.directory and ids_file.read_bytes() == original
  _assert_rows_equal(rebuilt, rebuilt.rows(list(passages)), colbert.encode_docs(list(passages.values())))


def test_fingerprint_samples_a_large_file(tmp_path):
  mib = 1 << 20
  path = tmp_path / "big.bin"
  data = bytearray(np.random.default_rng(0).integers(0, 256, 8 * mib, np.uint8).tobytes())
  path.write_bytes(data)
  recorded = array_cache.fingerprint(path)
  block_20 = 20 * ((8 * mib - 4096) // 63)  # the 21st of 64 evenly spaced 4 KiB blocks
  for offset in (0, 4 * mib - 1, 8 * mib - 1, block_20 + 100):  # first, middle and last MiB, a block
    changed = bytearray(data)
    changed[offset] ^= 1
    path.write_bytes(changed)
    assert array_cache.fingerprint(path) != recorded, offset
  path.write_bytes(data + b"\0")
  assert array_cache.fingerprint(path) != recorded
  changed = bytearray(data)
  changed[2 * mib] ^= 1  # between samples: the check is sampled, as the module docstring says
  path.write_bytes(changed)
  assert array_cache.fingerprint(path) == recorded
