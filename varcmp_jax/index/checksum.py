"""The CRC32 an index keeps of what it wrote: of each file, of each video's row of each shard file, of the manifest.

CRC32 (the zlib polynomial) as RocksDB keeps one per block and Parquet per page: it catches every burst error up to
32 bits and any other change but one in 2^32, which is what a damaged disk, a torn copy or a stray write does; it
is no defence against someone who rewrites the checksums too. ISA-L's (the `isal` package) computes it at about
13 GB/s here, 9x zlib's 1.5 GB/s, which is what keeps checking every row a query reads within a few percent of the
query's time (BENCHMARKS.md, issue 29). zlib computes the same values, so an index does not depend on which
one wrote it.
"""
import os

try:
  from isal.isal_zlib import crc32     # pylint: disable=g-import-not-at-top
except ImportError:                     # the same CRC, 9x slower
  from zlib import crc32               # pylint: disable=g-import-not-at-top

READ_BYTES = 16 << 20    # files are checked in pieces of about this size


class ChecksummedFile:
  """A file written front to back whose CRC32 and size are kept as it is written."""

  def __init__(self, path: str):
    self.file, self.crc, self.bytes = open(path, "wb"), 0, 0

  def write(self, data) -> None:
    self.file.write(data)
    self.crc = crc32(data, self.crc)
    self.bytes += memoryview(data).nbytes

  def close(self) -> dict:
    """Flushes to disk; {"bytes", "crc32"}: the manifest's entry for the file."""
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    return {"bytes": self.bytes, "crc32": self.crc}


def rows(array) -> list[int]:
  """The CRC32 of each row (first axis) of a C-contiguous array."""
  return [crc32(row) for row in array]
