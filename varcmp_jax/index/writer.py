"""Writing an index (index.layout): created, resumed after a kill, or extended, shard by shard.

Shards hold as many videos as fit in a byte budget (layout.videos_per_shard), and a shard's files are streamed
to disk as its rows arrive, each with its CRC32 and the CRC32 of each row (rows_crc32.npy), so writing costs the
memory of one batch of rows whatever the shard or split size. `--append` grows pooled.npy in place (numpy pads the
.npy header so its shape can grow).

Commits are journaled by the manifest: a shard is written under shards/NNNNNN.tmp, renamed when complete, its
pooled rows appended to pooled.npy, and only then listed in manifest.json (replaced atomically). Opening an
existing index first checks all of it (verify.check, full: what `--verify` checks), so a resume or an --append
never builds on damage, then removes whatever lies past the manifest (a .tmp or unlisted shard, pooled rows past
G), so a killed job resumes from its last committed shard. One writer at a time: INDEX/.lock is held exclusively.
"""
import fcntl
import json
import os
import shutil

import numpy as np

from varcmp_jax.index import checksum, codec, verify
from varcmp_jax.index import layout as layout_lib
from varcmp_jax.index import manifest as manifest_lib
from varcmp_jax.index.errors import IndexDamaged, StoreError

# Manifest fields a writer must agree with to resume or append: what the vectors mean.
HEADER_KEYS = ("run", "config", "task", "levels", "pooled_levels")


def slice_bounds(total: int, count: int, index: int) -> tuple[int, int]:
  """[start, stop) of slice `index` of `count` near-equal contiguous slices of `total` rows, the first
  `total % count` one row longer: grain's split, as pipeline.IndexedSource slices a split."""
  per, remainder = divmod(total, count)
  start = index * per + min(index, remainder)
  return start, start + per + (index < remainder)


def check_out(path: str, append: bool) -> bool:
  """Whether `path` holds an index; StoreError when it cannot be written as asked (checked before any work)."""
  exists = os.path.isfile(os.path.join(path, manifest_lib.MANIFEST))
  if append and not exists:
    raise StoreError(f"{path}: no index to append to; leave out --append to create it")
  if not exists and os.path.isdir(path) and os.listdir(path):
    raise StoreError(f"{path}: exists and is not an index; choose a new --out")
  if os.path.exists(path) and not os.path.isdir(path):
    raise StoreError(f"{path}: is a file; --out must be a directory")
  return exists


class IndexWriter:
  """Creates, resumes or extends the index at `path`.

  header: the HEADER_KEYS of the manifest (run, config, task, levels, pooled_levels). A new index takes it; an
  existing one must match it field for field (else StoreError naming the fields) and pass a full check (else its
  first problem, IndexDamaged or IndexUnreadable, before anything is written). storage: of the per-snippet
  vectors (codec.STORAGES, or None / "auto": codec.resolve at width `dim`); an existing index keeps its own
  and refuses another. progress: a bar over the check of an existing index. Use as a context manager.
  """

  def __init__(self, path: str, header: dict, append: bool = False, storage: str | None = None,
               dim: int | None = None, progress: bool = False):
    self.path = os.fspath(path)
    exists = check_out(self.path, append)
    os.makedirs(self.path, exist_ok=True)
    self._lock = open(os.path.join(self.path, ".lock"), "a+")
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock.seek(0)
      holder = self._lock.read().strip() or "?"
      self._lock.close()
      raise StoreError(f"{self.path}: another `varcmp index` (pid {holder}) is writing this index") from None
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(str(os.getpid()))
    self._lock.flush()
    self._pooled = None
    try:
      if exists:
        self.manifest = manifest_lib.read(self.path)
        differ = [k for k in HEADER_KEYS if self.manifest.get(k) != header.get(k)]
        if differ:
          raise StoreError(f"{self.path} was built from another model or config (differs in {differ}: "
                           f"built from {self.manifest.get('run')}); choose a new --out")
        if storage not in (None, "auto") and storage != self.manifest["storage"]:
          raise StoreError(f"{self.path} stores its vectors as {self.manifest['storage']}, not {storage}: leave "
                           "out --storage to add to it, or choose a new --out")
        problems = verify.check(self.path, self.manifest, full=True, progress=progress)
        if problems:
          more = f" (and {len(problems) - 1} more: `varcmp index --verify {self.path}` lists them)"
          raise type(problems[0])(f"{problems[0]}{more if len(problems) > 1 else ''}; nothing was written")
        os.makedirs(os.path.join(self.path, layout_lib.SHARDS), exist_ok=True)
        self._recover()
      else:
        if storage in (None, "auto") and dim is None:
          raise ValueError("IndexWriter: storage 'auto' needs the vector width `dim`")
        os.makedirs(os.path.join(self.path, layout_lib.SHARDS), exist_ok=True)
        self.manifest = {"format": manifest_lib.FORMAT, **{k: header.get(k) for k in HEADER_KEYS},
                         "storage": codec.resolve(storage, dim or 0), "layout": None, "sources": [], "shards": [],
                         "videos": 0}
        manifest_lib.write(self.path, self.manifest)
    except BaseException:
      self.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    if self._pooled is not None:
      self._pooled.close()
      self._pooled = None
    if not self._lock.closed:
      self._lock.close()   # releases the flock

  @property
  def videos(self) -> int:
    return self.manifest["videos"]

  @property
  def storage(self) -> str:
    return self.manifest["storage"]

  # --- recovery -------------------------------------------------------------------------------------

  def _recover(self):
    """Drops what a killed writer left past the manifest: .tmp and unlisted shards, pooled rows past G."""
    listed = {s["name"] for s in self.manifest["shards"]}
    shards = os.path.join(self.path, layout_lib.SHARDS)
    for name in os.listdir(shards):
      if name not in listed:
        shutil.rmtree(os.path.join(shards, name), ignore_errors=True)
    pooled = os.path.join(self.path, layout_lib.POOLED)
    if self.manifest["layout"] is None:
      if os.path.exists(pooled):
        os.remove(pooled)
      return
    offset = layout_lib.npy_layout(pooled)[0]      # checked above: readable, rows >= G
    rows, row_bytes = self.manifest["videos"], layout_lib.pooled_row_bytes(self.manifest["layout"])
    with open(pooled, "r+b") as f:
      f.truncate(offset + rows * row_bytes)
    self._set_pooled_rows(rows)

  # --- sources --------------------------------------------------------------------------------------

  def add_source(self, source: dict, append: bool) -> int:
    """The position of `source` (records, split, fingerprint, videos, slices) in the manifest, added if new.

    The same records and split again: its position (to resume it), unless its records changed. New
    records: added with `append`, else StoreError (an index holds what it was built from unless told).
    """
    for i, known in enumerate(self.manifest["sources"]):
      if (known["records"], known["split"]) == (source["records"], source["split"]):
        if known["fingerprint"] != source["fingerprint"]:
          raise StoreError(f"{source['records']}: its manifest.json changed since {self.path} indexed its "
                           f"{source['split']!r} split; build a new index")
        return i
    if self.manifest["sources"] and not append:
      held = ", ".join(f"{s['records']} ({s['split']})" for s in self.manifest["sources"])
      raise StoreError(f"{self.path} already holds {held}; add {source['records']} ({source['split']}) with "
                       "--append, or choose a new --out")
    self.manifest["sources"].append(dict(source))
    manifest_lib.write(self.path, self.manifest)
    return len(self.manifest["sources"]) - 1

  def pending_slices(self, source: int) -> list[int]:
    done = {s["slice"] for s in self.manifest["shards"] if s["source"] == source}
    return [i for i in range(self.manifest["sources"][source]["slices"]) if i not in done]

  # --- shards ---------------------------------------------------------------------------------------

  def shard(self, source: int, slice_index: int, start: int, stop: int) -> "ShardWriter":
    """A writer for the videos [start, stop) of `source` (its slice `slice_index`); `commit()` it when full."""
    name = f"{len(self.manifest['shards']):06d}"
    entry = {"name": name, "source": source, "slice": slice_index, "start": start, "stop": stop,
             "offset": self.manifest["videos"]}
    return ShardWriter(self, entry)

  def _set_layout(self, arrays: dict) -> dict:
    """The index's layout, set from the first rows written; StoreError if `arrays` do not fit it."""
    pooled, weights, regions = arrays["pooled"], arrays["weights"], arrays.get("regions")
    layout = layout_lib.layout_of(weights.shape[1], pooled.shape[2], pooled.shape[1],
                                  regions.shape[2] if regions is not None else 0, self.storage)
    if self.manifest["layout"] is None:
      self.manifest["layout"] = layout
      with open(os.path.join(self.path, layout_lib.POOLED), "wb") as f:
        f.write(layout_lib.npy_header(layout_lib.POOLED_DTYPE, (0, layout["pooled"], layout["dim"])))
    elif layout != self.manifest["layout"]:
      raise StoreError(f"{self.path}: these videos have layout {layout}, the index {self.manifest['layout']}")
    return layout

  def _pooled_file(self):
    if self._pooled is None:
      self._pooled = open(os.path.join(self.path, layout_lib.POOLED), "r+b")
    self._pooled.seek(0, os.SEEK_END)
    return self._pooled

  def _set_pooled_rows(self, rows: int):
    layout = self.manifest["layout"]
    header = layout_lib.npy_header(layout_lib.POOLED_DTYPE, (rows, layout["pooled"], layout["dim"]))
    path = os.path.join(self.path, layout_lib.POOLED)
    offset = layout_lib.npy_layout(path)[0]
    if len(header) != offset:
      raise IndexDamaged(f"{path}: header of {offset} bytes cannot hold shape {rows}")
    with open(path, "r+b") as f:
      f.write(header)
      f.flush()
      os.fsync(f.fileno())

  def _commit(self, entry: dict):
    os.fsync(self._pooled.fileno())
    self._set_pooled_rows(self.manifest["videos"] + entry["count"])
    self.manifest["shards"].append(entry)
    self.manifest["videos"] += entry["count"]
    manifest_lib.write(self.path, self.manifest)


class ShardWriter:
  """Streams the rows of one shard to disk as they arrive (memory: the rows of one `add`), then commits them."""

  def __init__(self, writer: IndexWriter, entry: dict):
    self.writer, self.entry = writer, entry
    self.count = entry["stop"] - entry["start"]
    self.final = os.path.join(writer.path, layout_lib.SHARDS, entry["name"])
    self.tmp = self.final + ".tmp"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.files, self.row_checksums, self.rows = None, None, 0
    self.metadata = checksum.ChecksummedFile(os.path.join(self.tmp, layout_lib.METADATA))
    self.line_offsets = [0]
    self.pooled_crc32 = 0

  def add(self, arrays: dict, metadata: list[dict]):
    """The next rows: arrays {"pooled": (n, P, D), each of files(layout): (n, ...)} and their n metadata dicts
    (codec-encoded frames and regions, as levels.index_arrays gives them, and times)."""
    n = len(metadata)
    present = {k: v for k, v in arrays.items() if v is not None}
    if self.rows + n > self.count or any(len(v) != n for v in present.values()):
      raise ValueError(f"shard {self.entry['name']}: {n} metadata rows, arrays of "
                       f"{ {k: len(v) for k, v in present.items()} } rows, {self.count - self.rows} rows left")
    layout = self.writer._set_layout(arrays)   # pylint: disable=protected-access
    files = layout_lib.files(layout)
    expected = {"pooled": (layout_lib.POOLED_DTYPE, (layout["pooled"], layout["dim"])), **files}
    if set(present) != set(expected):
      raise StoreError(f"{self.writer.path}: rows with arrays {sorted(present)}, the index stores {sorted(expected)}")
    values = {}
    for name, (dtype, shape) in expected.items():
      value = np.asarray(present[name])
      if value.shape[1:] != shape or value.dtype != dtype:
        raise StoreError(f"{self.writer.path}: {name} rows of {value.dtype} {value.shape[1:]}, the index stores "
                         f"{dtype} {shape}")
      if value.dtype.kind == "f":
        bad = ~np.isfinite(value.reshape(n, -1)).all(axis=1)
        if bad.any():
          raise StoreError(f"video {metadata[int(np.argmax(bad))].get('video')}: non-finite values (NaN or inf) in "
                           f"its {name.removesuffix('_scale')}; an index never stores them: fix or leave out its "
                           "record")
      values[name] = np.ascontiguousarray(value)
    pooled = self.writer._pooled_file()   # pylint: disable=protected-access
    data = values.pop("pooled")
    pooled.write(data.tobytes())
    pooled.flush()      # what a killed job wrote is on disk, for the next writer to cut back
    self.pooled_crc32 = checksum.crc32(data, self.pooled_crc32)
    columns = layout_lib.row_checksum_columns(layout)
    if self.files is None:
      self.files = {}
      for name, (dtype, shape) in files.items():
        self.files[name] = checksum.ChecksummedFile(os.path.join(self.tmp, f"{name}.npy"))
        self.files[name].write(layout_lib.npy_header(dtype, (self.count, *shape)))
      self.row_checksums = checksum.ChecksummedFile(os.path.join(self.tmp, layout_lib.ROW_CHECKSUMS))
      self.row_checksums.write(layout_lib.npy_header(layout_lib.CHECKSUM_DTYPE, (self.count, len(columns))))
    row_crcs = {}
    for name, value in values.items():
      self.files[name].write(value.tobytes())
      row_crcs[name] = checksum.rows(value)
    lines = [json.dumps(entry).encode() + b"\n" for entry in metadata]
    for line in lines:
      self.metadata.write(line)
      self.line_offsets.append(self.line_offsets[-1] + len(line))
    row_crcs[layout_lib.METADATA_COLUMN] = [checksum.crc32(line) for line in lines]
    self.row_checksums.write(np.array([row_crcs[c] for c in columns], layout_lib.CHECKSUM_DTYPE).T.copy())
    self.rows += n

  def commit(self):
    if self.rows != self.count:
      raise ValueError(f"shard {self.entry['name']}: {self.rows} rows written, {self.count} expected")
    offsets = checksum.ChecksummedFile(os.path.join(self.tmp, layout_lib.METADATA_OFFSETS))
    offsets.write(layout_lib.npy_header(np.int64, (self.count + 1,)))
    offsets.write(np.asarray(self.line_offsets, np.int64).tobytes())
    written = {f"{name}.npy": f.close() for name, f in (self.files or {}).items()}
    if self.row_checksums is not None:
      written[layout_lib.ROW_CHECKSUMS] = self.row_checksums.close()
    written[layout_lib.METADATA], written[layout_lib.METADATA_OFFSETS] = self.metadata.close(), offsets.close()
    os.rename(self.tmp, self.final)
    self.writer._commit({**self.entry, "count": self.rows, "files": written,   # pylint: disable=protected-access
                         "pooled_crc32": self.pooled_crc32})
