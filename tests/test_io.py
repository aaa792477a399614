"""The I/O layer: atomic writes, JSON records, the resumable chunk directory, bad-line accounting."""

import gzip
import json
import logging
import os

import numpy as np
import pytest

from pairdistill_jax import io


# ------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("mode, payload", [("w", "text\n"), ("wb", b"bytes")])
def test_atomic_write_leaves_nothing_behind_on_an_exception(tmp_path, mode, payload):
  with pytest.raises(RuntimeError, match="crashed"):
    with io.atomic_write(tmp_path / "out.bin", mode) as f:
      f.write(payload)
      raise RuntimeError("crashed")
  assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_on_an_exception(tmp_path):
  path = tmp_path / "record.json"
  path.write_text('{"old": 1}')
  with pytest.raises(RuntimeError):
    with io.atomic_write(path) as f:
      f.write('{"new": ')
      raise RuntimeError("crashed")
  assert os.listdir(tmp_path) == ["record.json"] and path.read_text() == '{"old": 1}'


def test_atomic_write_text_gz_and_binary(tmp_path):
  with io.atomic_write(tmp_path / "a.txt.gz") as f:
    f.write("é\n")
  assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == b"\xc3\xa9\n"
  with io.atomic_write(tmp_path / "b.gz", "wb") as f:  # bytes are written as given, never compressed
    f.write(b"\x00\x01")
  assert (tmp_path / "b.gz").read_bytes() == b"\x00\x01"
  with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
    with io.atomic_write(tmp_path / "c", "a"):
      pass


def test_json_records(tmp_path):
  io.write_json(tmp_path / "m.json", {"b": [1, 2], "a": "x"})
  assert json.loads((tmp_path / "m.json").read_text()) == {"b": [1, 2], "a": "x"}
  assert io.read_json(tmp_path / "m.json") == {"b": [1, 2], "a": "x"}
  (tmp_path / "broken.json").write_bytes(b'{"a": \xff')
  assert io.read_json(tmp_path / "broken.json") is None and io.read_json(tmp_path / "missing.json") is None
  assert io.sidecar(tmp_path / "run.trec") == tmp_path / "run.trec.json"


def test_save_npy(tmp_path):
  io.save_npy(tmp_path / "x.npy", np.arange(3, dtype=np.int32))
  assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["x.npy"]


# ---------------------------------------------------------------------------------- chunk directories


def _chunk_dir(directory, manifest):
  return io.ChunkDir(directory, manifest, chunk_glob="*.part", done_name="{:03d}.part", remedy="pick another one")


def test_chunk_dir_resumes_with_the_same_manifest(tmp_path):
  chunks = _chunk_dir(tmp_path / "c", {"model": "m1", "size": 4})
  chunks.open()
  assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == {"model": "m1", "size": 4}
  chunks.path("{:03d}.part", 1).write_text("done")
  again = _chunk_dir(tmp_path / "c", {"size": 4, "model": "m1"})
  again.open()
  assert again.done(3).tolist() == [False, True, False]


def test_chunk_dir_refuses_another_manifest_naming_the_field(tmp_path):
  _chunk_dir(tmp_path / "c", {"model": "m1", "size": 4}).open()
  (tmp_path / "c" / "000.part").write_text("done")
  with pytest.raises(ValueError) as info:
    _chunk_dir(tmp_path / "c", {"model": "m2", "size": 4}).open()
  assert str(info.value) == (f"{tmp_path / 'c'} holds chunks computed with other settings (differing: model); "
                             f"delete it to start over, or pick another one")
  assert (tmp_path / "c" / "000.part").exists()  # refused: nothing deleted


def test_chunk_dir_rebuild_clears_the_chunks_and_says_why(tmp_path, caplog):
  _chunk_dir(tmp_path / "c", {"model": "m1", "size": 4}).open()
  for name in ("000.part", "001.part", "notes.txt"):
    (tmp_path / "c" / name).write_text("x")
  chunks = _chunk_dir(tmp_path / "c", {"model": "m2", "size": 5})
  with caplog.at_level(logging.INFO, logger=io.__name__):
    chunks.open(rebuild=True)
  assert f"Rebuilding {tmp_path / 'c'} because its chunks were computed with other settings (differing: model, " \
         "size)" in caplog.text
  assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "notes.txt"]  # only the chunks go
  assert chunks.done(2).tolist() == [False, False]
  assert io.read_json(tmp_path / "c" / "manifest.json") == {"model": "m2", "size": 5}


def test_chunk_dir_deletes_chunks_without_a_manifest(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "000.part").write_text("left by an interrupted clean-up")
  chunks = _chunk_dir(tmp_path / "c", {"model": "m1"})
  chunks.open()
  assert chunks.done(1).tolist() == [False]
  chunks.remove()
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- bad lines


def test_bad_lines_counts_every_one_and_logs_only_the_first_few(tmp_path, caplog):
  reported = []
  bad = io.BadLines(tmp_path / "f.tsv", skip=True, on_skip=reported.append)
  with caplog.at_level(logging.WARNING, logger=io.__name__):
    for line in range(1, 8):
      bad.handle(io.FormatError(tmp_path / "f.tsv", line, "broken"))
    bad.finish(n_good=3)
  assert bad.count == 7 and [e.line for e in reported] == [1, 2, 3, 4, 5, 6, 7]
  messages = [r.getMessage() for r in caplog.records]
  assert messages == [f"skipping bad line: {tmp_path / 'f.tsv'}:{n}: broken" for n in range(1, 6)] + [
      f"skipped 7 bad lines of {tmp_path / 'f.tsv'}"]


def test_bad_lines_raise_unless_skipped_and_all_bad_is_an_error(tmp_path):
  error = io.FormatError(tmp_path / "f.tsv", 2, "broken")
  with pytest.raises(io.FormatError, match="f.tsv:2: broken"):
    io.BadLines(tmp_path / "f.tsv", skip=False).handle(error)
  bad = io.BadLines(tmp_path / "f.tsv", skip=True)
  bad.handle(error)
  bad.handle(io.FormatError(tmp_path / "f.tsv", 4, "broken"))
  with pytest.raises(io.FormatError) as info:
    bad.finish(n_good=0)
  assert str(info.value) == f"{tmp_path / 'f.tsv'}:4: no valid lines (all 2 lines were bad)"
  io.BadLines(tmp_path / "f.tsv", skip=True).finish(n_good=0)  # nothing skipped: the reader reports emptiness
