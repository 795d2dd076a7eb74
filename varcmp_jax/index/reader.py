"""Reading an index (index.layout): the manifest, pooled rows streamed in windows, per-snippet rows by index.

Opening checks the index (verify.check: every file's size and header, the small files' and pooled.npy's CRC32).
Then each row of a shard file that a query reads is checked against its CRC32 (rows_crc32.npy) as it is read, as
is each metadata line; a file that cannot be opened or read at any point is IndexUnreadable, bytes that are not
what was written IndexDamaged, each one line naming the file.
"""
import json
import os

import numpy as np

from varcmp_jax.index import checksum, errors, verify
from varcmp_jax.index import layout as layout_lib
from varcmp_jax.index import manifest as manifest_lib


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
  """np.empty on a 64-byte boundary: JAX on a CPU then uses the array in place instead of copying it."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(size + alignment, np.uint8)
  start = -raw.ctypes.data % alignment
  return raw[start:start + size].view(dtype).reshape(shape)


class IndexReader:
  """An index opened for reading. Memory is what a call returns: nothing is loaded whole, and no mapping outlives
  the chunk it covers.

  verify_rows: check each row read against its CRC32 (on by default; off only to measure what the check costs).
  """

  def __init__(self, path: str, verify_rows: bool = True):
    self.path = os.fspath(path)
    self.manifest = manifest_lib.read(self.path)
    self.videos = int(self.manifest["videos"])
    self.layout = self.manifest["layout"]
    if not self.videos or self.layout is None:
      raise errors.StoreError(f"{self.path}: the index holds no videos yet (is `varcmp index` still running?)")
    self.rebuild = manifest_lib.rebuild_command(self.path, self.manifest)
    problems = verify.check(self.path, self.manifest)
    if problems:
      more = f" (and {len(problems) - 1} more problems: `varcmp index --verify {self.path}` lists them)"
      raise type(problems[0])(f"{problems[0]}{more if len(problems) > 1 else ''}")
    self.verify_rows = verify_rows
    self.files = layout_lib.files(self.layout)
    columns = layout_lib.row_checksum_columns(self.layout)
    self._column = {name: i for i, name in enumerate(columns)}
    self._row_checksum_bytes = layout_lib.CHECKSUM_DTYPE.itemsize * len(columns)
    shards = self.manifest["shards"]
    self._names = [s["name"] for s in shards]
    self._offsets = np.array([s["offset"] for s in shards], np.int64)
    self._data_offsets = {}   # (shard, file) -> byte offset of row 0
    self.pooled_path = os.path.join(self.path, layout_lib.POOLED)
    self._pooled_offset = self._data_offset(-1, "pooled", self.pooled_path)

  @property
  def storage(self) -> str:
    return self.layout["storage"]

  def damaged(self, file: str, problem: str) -> errors.IndexDamaged:
    """The one-line error for bytes of `file` that are not what was written (`problem`)."""
    return errors.damaged(file, problem, self.rebuild)

  def unreadable(self, file: str, error: OSError) -> errors.IndexUnreadable:
    """The one-line error for a file that cannot be opened or read."""
    return errors.unreadable(file, error, self.rebuild)

  def pooled_chunks(self, rows: int):
    """Yields (start, float32 (n, P, D)) windows of pooled.npy, each a memory map of n <= rows videos."""
    width = (self.layout["pooled"], self.layout["dim"])
    row_bytes = layout_lib.pooled_row_bytes(self.layout)
    for start in range(0, self.videos, rows):
      n = min(rows, self.videos - start)
      try:
        window = np.memmap(self.pooled_path, layout_lib.POOLED_DTYPE, "r", self._pooled_offset + start * row_bytes,
                           (n, *width))
      except OSError as e:
        raise self.unreadable(self.pooled_path, e) from None
      except ValueError:
        raise self.damaged(self.pooled_path, f"cannot map rows {start}-{start + n - 1} (truncated?)") from None
      yield start, window

  def row_shape(self, name: str) -> tuple[int, ...]:
    return self.files[name][1]

  def locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(shard number, row within the shard) of each index row."""
    rows = np.asarray(rows, np.int64)
    shards = np.searchsorted(self._offsets, rows, side="right") - 1
    return shards, rows - self._offsets[shards]

  def read(self, rows, names) -> dict[str, np.ndarray]:
    """{name: (len(rows), ...) on-disk dtype} of the shard files `names` for the videos `rows` (any order; in
    ascending order each run of consecutive rows is one pread straight into the result), each row checked against
    its CRC32."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.videos):
      raise errors.StoreError(f"{self.path}: rows outside [0, {self.videos})")
    out = {name: aligned_empty((len(rows), *self.row_shape(name)), self.files[name][0]) for name in names}
    order = np.argsort(rows, kind="stable")
    shard_of, local_of = self.locate(rows[order])
    for shard in np.unique(shard_of):
      picked, local = order[shard_of == shard], local_of[shard_of == shard]
      runs = np.split(np.arange(len(local)), np.flatnonzero((np.diff(local) != 1) | (np.diff(picked) != 1)) + 1)
      expected = self._row_checksums(int(shard), int(local[0]), int(local[-1])) if self.verify_rows else None
      for name in names:
        path = self._shard_file(shard, f"{name}.npy")
        row_bytes = layout_lib.row_bytes(*self.files[name])
        offset = self._data_offset(shard, name, path)
        found = []
        try:
          fd = os.open(path, os.O_RDONLY)
          try:
            for run in runs:
              target = out[name][picked[run[0]]:picked[run[0]] + len(run)]
              got = os.preadv(fd, [memoryview(target).cast("B")], offset + int(local[run[0]]) * row_bytes)
              if got != target.nbytes:
                raise self.damaged(path, "shorter than its header says (truncated)")
              if expected is not None:
                found += checksum.rows(target)
          finally:
            os.close(fd)
        except OSError as e:
          raise self.unreadable(path, e) from None
        if expected is not None:
          self._check_rows(path, found, expected[local - local[0], self._column[name]].tolist(), shard, local)
    return out

  def _check_rows(self, path: str, found: list[int], expected: list[int], shard: int, local: np.ndarray):
    """IndexDamaged naming the first of the rows `local` of `shard` whose CRC32 `found` is not the one `expected`."""
    if found != expected:
      bad = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
      raise self.damaged(path, f"row {int(local[bad])} (index row {int(self._offsets[shard] + local[bad])}) does "
                               f"not match its checksum in {layout_lib.ROW_CHECKSUMS} (the bytes changed)")

  def _row_checksums(self, shard: int, first: int, last: int) -> np.ndarray:
    """uint32 (last - first + 1, C): the CRC32 of rows first..last of the shard's files."""
    path = self._shard_file(shard, layout_lib.ROW_CHECKSUMS)
    offset = self._data_offset(shard, "rows_crc32", path)
    data = self._pread(path, (last - first + 1) * self._row_checksum_bytes, offset + first * self._row_checksum_bytes)
    return np.frombuffer(data, layout_lib.CHECKSUM_DTYPE).reshape(last - first + 1, -1)

  def _pread(self, path: str, size: int, offset: int) -> bytes:
    """`size` bytes of `path` at `offset`: IndexUnreadable if it cannot be read, IndexDamaged if it is too short."""
    try:    # os.open, not open(): a query reads a few hundred of these, and a file object costs more than the read
      fd = os.open(path, os.O_RDONLY)
      try:
        data = os.pread(fd, size, offset)
      finally:
        os.close(fd)
    except OSError as e:
      raise self.unreadable(path, e) from None
    if len(data) != size:
      raise self.damaged(path, "shorter than its header says (truncated)")
    return data

  def _shard_file(self, shard: int, name: str) -> str:
    return os.path.join(self.path, layout_lib.SHARDS, self._names[shard], name)

  def _data_offset(self, shard: int, name: str, path: str) -> int:
    key = (shard, name)
    if key not in self._data_offsets:
      try:
        self._data_offsets[key] = layout_lib.npy_layout(path)[0]
      except OSError as e:
        raise self.unreadable(path, e) from None
      except ValueError as e:
        raise self.damaged(path, str(e)) from None
    return self._data_offsets[key]

  def metadata(self, rows) -> list[dict]:
    """video, caption, label, duration, event of each row: one line of its shard's metadata.jsonl each."""
    out = []
    for shard, local in zip(*self.locate(rows)):
      index = self._shard_file(shard, layout_lib.METADATA_OFFSETS)
      lines = self._shard_file(shard, layout_lib.METADATA)
      offset = self._data_offset(int(shard), "metadata", index)
      # The line's start and end: two int64 at the row's place.
      start, stop = np.frombuffer(self._pread(index, 16, offset + 8 * int(local)), np.int64)
      if not 0 <= start <= stop <= start + (1 << 20):
        raise self.damaged(index, f"row {int(local)} holds line offsets {int(start)}-{int(stop)}")
      line = self._pread(lines, int(stop - start), int(start))
      problem = f"line {int(local) + 1} is not the JSON written at build time"
      if self.verify_rows:
        expected = self._row_checksums(int(shard), int(local), int(local))[0, self._column[layout_lib.METADATA_COLUMN]]
        if checksum.crc32(line) != expected:
          raise self.damaged(lines, f"{problem} (it does not match its checksum in {layout_lib.ROW_CHECKSUMS})")
      try:
        out.append(json.loads(line))
      except ValueError:
        raise self.damaged(lines, problem) from None
    return out
