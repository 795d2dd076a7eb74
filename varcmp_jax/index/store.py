"""The on-disk index (SPEC section 4b): written shard by shard and resumably, read by row, never loaded whole.

  INDEX/manifest.json    what the index holds and was built from: format, run (workdir, step), config, task,
                         level weights and which levels are pooled, layout (T, D, R, P, dtypes), sources (records
                         directory, split, fingerprint of its manifest.json), the committed shards, the video count G
  INDEX/pooled.npy       float16 (G, P, D): per video, the pooled vectors of the levels linear in the video
                         (text: normalized mean_t f_t and sum_t w_t f_t/|f_t|; audio: normalized mean_t f_t)
  INDEX/shards/NNNNNN/   the per-snippet tensors of consecutive videos, one .npy per field (FIELDS), plus
                         metadata.jsonl (video, caption, label, duration, event of each video, one JSON line
                         each) and metadata_offsets.npy (n + 1 byte offsets of its lines, so a line is one pread)

Plain .npy files: pooled.npy is one dense float16 matrix, the thing np.memmap streams at page-cache speed for
stage 1, and a video's row of a shard file is one pread at a computed offset for stage 2, with no dependency
beyond numpy and no chunk cache to size; `np.load(path, mmap_mode="r")` opens any of them. `--append` grows
pooled.npy in place (numpy pads the .npy header so its shape can grow).

Commits are journaled by the manifest: a shard is written under shards/NNNNNN.tmp, renamed when complete, its
pooled rows appended to pooled.npy, and only then listed in manifest.json (replaced atomically). Opening a
writer removes whatever lies past the manifest (a .tmp or unlisted shard, pooled rows past G), so a killed job
resumes from its last committed shard. One writer at a time: INDEX/.lock is held exclusively.
"""
import fcntl
import json
import os
import shutil

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
POOLED = "pooled.npy"
SHARDS = "shards"
# Per-snippet fields of a shard: dtype on disk. "regions" is absent for models without region tokens.
FIELDS = {"frames": np.float16, "regions": np.float16, "weights": np.float32, "prior": np.float32,
          "times": np.float32, "mask": np.bool_}
# Manifest fields a writer must agree with to resume or append: what the vectors mean.
HEADER_KEYS = ("run", "config", "task", "levels", "pooled_levels")


class StoreError(ValueError):
  """An index that cannot be opened, resumed or extended as asked; the message names the path."""


def _npy_header(dtype, shape) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": tuple(shape)})
  return buffer.getvalue()


def _npy_layout(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
  """(data offset, shape, dtype) of a .npy file, from its header."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
      raise StoreError(f"{path}: Fortran-ordered arrays are not index files")
    return f.tell(), shape, dtype


def _write_json(path: str, value) -> None:
  """Atomic: a reader sees the old file or the new one, never half of one."""
  partial = f"{path}.tmp{os.getpid()}"
  with open(partial, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)


def read_manifest(path: str) -> dict:
  file = os.path.join(path, MANIFEST)
  if not os.path.isfile(file):
    raise StoreError(f"{path}: not an index (no {MANIFEST}); build one with `varcmp index`")
  try:
    with open(file) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise StoreError(f"{file}: not an index manifest of format {FORMAT}")
  return manifest


def slice_bounds(total: int, count: int, index: int) -> tuple[int, int]:
  """[start, stop) of slice `index` of `count` near-equal contiguous slices of `total` rows, the first
  `total % count` one row longer: grain's split, as pipeline.IndexedSource slices a split."""
  per, remainder = divmod(total, count)
  start = index * per + min(index, remainder)
  return start, start + per + (index < remainder)


def check_out(path: str, append: bool) -> bool:
  """Whether `path` holds an index; StoreError when it cannot be written as asked (checked before any work)."""
  exists = os.path.isfile(os.path.join(path, MANIFEST))
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
  existing one must match it field for field (else StoreError naming the fields). Use as a context manager.
  """

  def __init__(self, path: str, header: dict, append: bool = False):
    self.path = os.fspath(path)
    exists = check_out(self.path, append)
    os.makedirs(os.path.join(self.path, SHARDS), exist_ok=True)
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
        self.manifest = read_manifest(self.path)
        differ = [k for k in HEADER_KEYS if self.manifest.get(k) != header.get(k)]
        if differ:
          raise StoreError(f"{self.path} was built from another model or config (differs in {differ}: "
                           f"built from {self.manifest.get('run')}); choose a new --out")
        self._recover()
      else:
        self.manifest = {"format": FORMAT, **{k: header.get(k) for k in HEADER_KEYS}, "layout": None,
                         "sources": [], "shards": [], "videos": 0}
        _write_json(os.path.join(self.path, MANIFEST), self.manifest)
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

  # --- recovery -------------------------------------------------------------------------------------

  def _recover(self):
    """Drops what a killed writer left past the manifest: .tmp and unlisted shards, pooled rows past G."""
    listed = {s["name"] for s in self.manifest["shards"]}
    shards = os.path.join(self.path, SHARDS)
    for name in os.listdir(shards):
      if name not in listed:
        shutil.rmtree(os.path.join(shards, name), ignore_errors=True)
    pooled = os.path.join(self.path, POOLED)
    if self.manifest["layout"] is None:
      if os.path.exists(pooled):
        os.remove(pooled)
      return
    offset, shape, _ = _npy_layout(pooled)
    rows = self.manifest["videos"]
    if shape[0] < rows or os.path.getsize(pooled) < offset + rows * self._row_bytes():
      raise StoreError(f"{pooled}: holds fewer rows than the {rows} videos of {MANIFEST}; the index is damaged")
    with open(pooled, "r+b") as f:
      f.truncate(offset + rows * self._row_bytes())
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
    _write_json(os.path.join(self.path, MANIFEST), self.manifest)
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

  def _set_layout(self, arrays: dict):
    pooled, frames = arrays["pooled"], arrays["frames"]
    layout = {"snippets": frames.shape[1], "dim": frames.shape[2], "pooled": pooled.shape[1],
              "regions": arrays["regions"].shape[2] if arrays.get("regions") is not None else 0,
              "dtypes": {"pooled": "float16", **{k: np.dtype(v).name for k, v in FIELDS.items()}}}
    if self.manifest["layout"] is None:
      self.manifest["layout"] = layout
      with open(os.path.join(self.path, POOLED), "wb") as f:
        f.write(_npy_header(np.float16, (0, layout["pooled"], layout["dim"])))
    elif layout != self.manifest["layout"]:
      raise StoreError(f"{self.path}: these videos have layout {layout}, the index {self.manifest['layout']}")

  def _row_bytes(self) -> int:
    layout = self.manifest["layout"]
    return layout["pooled"] * layout["dim"] * 2

  def _pooled_file(self):
    if self._pooled is None:
      self._pooled = open(os.path.join(self.path, POOLED), "r+b")
    self._pooled.seek(0, os.SEEK_END)
    return self._pooled

  def _set_pooled_rows(self, rows: int):
    layout = self.manifest["layout"]
    header = _npy_header(np.float16, (rows, layout["pooled"], layout["dim"]))
    offset = _npy_layout(os.path.join(self.path, POOLED))[0]
    if len(header) != offset:
      raise StoreError(f"{os.path.join(self.path, POOLED)}: header of {offset} bytes cannot hold shape {rows}")
    with open(os.path.join(self.path, POOLED), "r+b") as f:
      f.write(header)
      f.flush()
      os.fsync(f.fileno())

  def _commit(self, entry: dict, rows: int):
    os.fsync(self._pooled.fileno())
    self._set_pooled_rows(self.manifest["videos"] + rows)
    self.manifest["shards"].append({**entry, "count": rows})
    self.manifest["videos"] += rows
    _write_json(os.path.join(self.path, MANIFEST), self.manifest)


class ShardWriter:
  """Streams the rows of one shard to disk (memory: the rows of one `add`), then commits them."""

  def __init__(self, writer: IndexWriter, entry: dict):
    self.writer, self.entry = writer, entry
    self.count = entry["stop"] - entry["start"]
    self.final = os.path.join(writer.path, SHARDS, entry["name"])
    self.tmp = self.final + ".tmp"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.files, self.rows = {}, 0
    self.metadata = open(os.path.join(self.tmp, "metadata.jsonl"), "wb")
    self.line_offsets = [0]

  def add(self, arrays: dict, metadata: list[dict]):
    """The next rows: arrays {"pooled": (n, P, D), FIELDS...: (n, T, ...)} and their n metadata dicts."""
    n = len(metadata)
    if self.rows + n > self.count or any(len(v) != n for v in arrays.values() if v is not None):
      raise ValueError(f"shard {self.entry['name']}: {n} metadata rows, arrays of "
                       f"{ {k: len(v) for k, v in arrays.items() if v is not None} } rows, "
                       f"{self.count - self.rows} rows left")
    self.writer._set_layout(arrays)   # pylint: disable=protected-access
    pooled = self.writer._pooled_file()   # pylint: disable=protected-access
    pooled.write(np.ascontiguousarray(arrays["pooled"], np.float16).tobytes())
    pooled.flush()      # what a killed job wrote is on disk, for the next writer to cut back
    for field, dtype in FIELDS.items():
      if arrays.get(field) is None:
        continue
      value = np.ascontiguousarray(arrays[field], dtype)
      if field not in self.files:
        self.files[field] = open(os.path.join(self.tmp, f"{field}.npy"), "wb")
        self.files[field].write(_npy_header(dtype, (self.count, *value.shape[1:])))
      self.files[field].write(value.tobytes())
      self.files[field].flush()
    for entry in metadata:
      line = json.dumps(entry).encode() + b"\n"
      self.metadata.write(line)
      self.line_offsets.append(self.line_offsets[-1] + len(line))
    self.metadata.flush()
    self.rows += n

  def commit(self):
    if self.rows != self.count:
      raise ValueError(f"shard {self.entry['name']}: {self.rows} rows written, {self.count} expected")
    np.save(os.path.join(self.tmp, "metadata_offsets.npy"), np.asarray(self.line_offsets, np.int64))
    for f in [*self.files.values(), self.metadata]:
      os.fsync(f.fileno())
      f.close()
    os.rename(self.tmp, self.final)
    self.writer._commit(self.entry, self.rows)   # pylint: disable=protected-access


class IndexReader:
  """An index opened for reading: the manifest, pooled rows streamed in windows, per-snippet rows by index.

  Memory is what a call returns: nothing is loaded whole, and no mapping outlives the chunk it covers.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.manifest = read_manifest(self.path)
    self.videos = int(self.manifest["videos"])
    self.layout = self.manifest["layout"]
    if not self.videos or self.layout is None:
      raise StoreError(f"{self.path}: the index holds no videos yet (is `varcmp index` still running?)")
    shards = self.manifest["shards"]
    self._names = [s["name"] for s in shards]
    self._offsets = np.array([s["offset"] for s in shards], np.int64)
    self._pooled_path = os.path.join(self.path, POOLED)
    offset, shape, dtype = _npy_layout(self._pooled_path)
    # A writer may have appended rows since the manifest was read: only the first G count.
    if shape[0] < self.videos or tuple(shape[1:]) != (self.layout["pooled"], self.layout["dim"]) or dtype != np.float16:
      raise StoreError(f"{self._pooled_path}: float16 {shape} does not hold the {self.videos} x "
                       f"({self.layout['pooled']}, {self.layout['dim']}) rows of {MANIFEST}")
    self._pooled_offset = offset
    self._data_offsets = {}   # (shard, field) -> byte offset of row 0
    self.fields = [f for f in FIELDS if f != "regions" or self.layout["regions"]]

  def pooled_chunks(self, rows: int):
    """Yields (start, float16 (n, P, D)) windows of pooled.npy, each a memory map of n <= rows videos."""
    width = (self.layout["pooled"], self.layout["dim"])
    for start in range(0, self.videos, rows):
      n = min(rows, self.videos - start)
      yield start, np.memmap(self._pooled_path, np.float16, "r", self._pooled_offset + start * width[0] * width[1] * 2,
                             (n, *width))

  def row_shape(self, field: str) -> tuple[int, ...]:
    layout = self.layout
    t, d = layout["snippets"], layout["dim"]
    return {"frames": (t, d), "regions": (t, layout["regions"], d), "times": (t, 2)}.get(field, (t,))

  def locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(shard number, row within the shard) of each index row."""
    rows = np.asarray(rows, np.int64)
    shards = np.searchsorted(self._offsets, rows, side="right") - 1
    return shards, rows - self._offsets[shards]

  def read(self, rows: np.ndarray, fields) -> dict[str, np.ndarray]:
    """{field: (len(rows), ...) on-disk dtype} for the videos `rows` (any order), read by pread, run by run."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.videos):
      raise StoreError(f"{self.path}: rows outside [0, {self.videos})")
    out = {f: np.empty((len(rows), *self.row_shape(f)), FIELDS[f]) for f in fields}
    order = np.argsort(rows, kind="stable")
    shard_of, local_of = self.locate(rows[order])
    for shard in np.unique(shard_of):
      picked, local = order[shard_of == shard], local_of[shard_of == shard]
      runs = np.split(np.arange(len(local)), np.flatnonzero(np.diff(local) != 1) + 1)
      for field in fields:
        row_bytes = int(np.prod(self.row_shape(field))) * np.dtype(FIELDS[field]).itemsize
        path = os.path.join(self.path, SHARDS, self._names[shard], f"{field}.npy")
        offset = self._data_offset(shard, field, path)
        fd = os.open(path, os.O_RDONLY)
        try:
          for run in runs:
            data = os.pread(fd, row_bytes * len(run), offset + int(local[run[0]]) * row_bytes)
            if len(data) != row_bytes * len(run):
              raise StoreError(f"{path}: shorter than its header says; the index is damaged")
            out[field][picked[run]] = np.frombuffer(data, FIELDS[field]).reshape(len(run), *self.row_shape(field))
        finally:
          os.close(fd)
    return out

  def _data_offset(self, shard: int, field: str, path: str) -> int:
    key = (shard, field)
    if key not in self._data_offsets:
      self._data_offsets[key] = _npy_layout(path)[0]
    return self._data_offsets[key]

  def metadata(self, rows) -> list[dict]:
    """video, caption, label, duration, event of each row: one line of its shard's metadata.jsonl each."""
    out = []
    for shard, local in zip(*self.locate(rows)):
      folder = os.path.join(self.path, SHARDS, self._names[shard])
      index = os.path.join(folder, "metadata_offsets.npy")
      with open(index, "rb") as f:   # the line's start and end: two int64 at the row's place
        start, stop = np.frombuffer(os.pread(f.fileno(), 16, self._data_offset(int(shard), "metadata", index)
                                             + 8 * int(local)), np.int64)
      with open(os.path.join(folder, "metadata.jsonl"), "rb") as f:
        out.append(json.loads(os.pread(f.fileno(), int(stop - start), int(start))))
    return out
