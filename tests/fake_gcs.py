"""A gs:// test double backed by a local directory, so bucket workdirs are tested without a bucket.

`install(root)` makes gs://BUCKET/PATH mean ROOT/BUCKET/PATH for every client the project uses: etils.epath
(through an fsspec filesystem registered for "gs"/"gcs", as gcsfs is) and Orbax (whose arrays go through
TensorStore's GCS driver, redirected to its file driver; Orbax's bucket-layout query answers "flat", as for an
ordinary bucket). GCS semantics kept: no append mode (gcsfs has none), Orbax commits by commit_success.txt
files (it takes gs:// paths for GCS), a rename is a copy and a delete.

`python tests/fake_gcs.py ROOT ARGS...` runs `python -m pairdistill_jax.main ARGS...` with the double installed.
"""

import os
import runpy
import sys

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeGCS(DirFileSystem):
  """gs://bucket/path -> ROOT/bucket/path."""

  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, **kwargs):  # fsspec passes gcsfs's options (e.g. finalize_on_close)
    super().__init__(path=type(self).root, fs=LocalFileSystem(auto_mkdir=True))  # no directories in GCS

  @property
  def path(self):  # the root of the latest install (fsspec and etils cache filesystem instances)
    return type(self).root

  @path.setter
  def path(self, value):
    pass

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return path[len(prefix):]
    return path

  def open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super().open(path, mode, **kwargs)


def install(root: str) -> None:
  FakeGCS.root = str(root)
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  from orbax.checkpoint._src.path import gcs_utils  # noqa: PLC0415

  def file_kvstore(path: str) -> dict:
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, bucket, key)}

  gcs_utils.get_kvstore_for_gcs = file_kvstore
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


if __name__ == "__main__":
  install(sys.argv[1])
  sys.argv = ["pairdistill_jax.main", *sys.argv[2:]]
  runpy.run_module("pairdistill_jax.main", run_name="__main__", alter_sys=True)
