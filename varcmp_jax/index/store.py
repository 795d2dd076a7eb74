"""The on-disk index (SPEC section 4b): written shard by shard and resumably, read by row, checked when opened.

  INDEX/manifest.json    what the index holds and was built from: format, run (workdir, step), config, task,
                         level weights and which levels are pooled, storage of the per-snippet vectors (codec),
                         layout (T, D, R, P), sources (records directory, split, fingerprint of its manifest.json),
                         the committed shards with the size and SHA-256 of each of their files and of their rows
                         of pooled.npy, the video count G
  INDEX/pooled.npy       float32 (G, P, D): per video, the pooled vectors of the levels linear in the video
                         (text: normalized mean_t f_t and sum_t w_t f_t/|f_t|; audio: normalized mean_t f_t)
  INDEX/shards/NNNNNN/   the per-snippet arrays of consecutive videos, one .npy per entry of `files(layout)`
                         (frames and regions encoded by codec: codes, their _scale arrays when quantized, int4's
                         _low planes; weights, prior, times, mask), plus metadata.jsonl (video, caption, label,
                         duration, event, one JSON line each) and metadata_offsets.npy (n + 1 byte offsets of its
                         lines: a line is one pread)

Plain .npy files: pooled.npy is one dense float32 matrix that np.memmap streams at page-cache speed for stage 1,
and a video's row of a shard file is one pread at a computed offset for stage 2, with no dependency beyond numpy
and no chunk cache to size. `--append` grows pooled.npy in place (numpy pads the .npy header so its shape can
grow). Shards hold as many videos as fit in a byte budget (`video_bytes`), and a shard's files are streamed to
disk as its rows arrive, so writing costs the memory of one batch of rows whatever the shard or split size.

Commits are journaled by the manifest: a shard is written under shards/NNNNNN.tmp, renamed when complete, its
pooled rows appended to pooled.npy, and only then listed in manifest.json (replaced atomically). Opening a
writer removes whatever lies past the manifest (a .tmp or unlisted shard, pooled rows past G), so a killed job
resumes from its last committed shard. One writer at a time: INDEX/.lock is held exclusively.

Checks (`check`): opening an index for reading compares every file's size with its .npy header and with the
manifest (cheap: a stat and a header read per file); `varcmp index --verify` also recomputes every checksum and
looks for non-finite rows. Each problem is one line naming the file and the command that rebuilds the index.
"""
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil

import numpy as np
import tqdm

from varcmp_jax.index import codec

FORMAT = 3         # 3: int4 codes in two 2-bit planes (index.codec)
MANIFEST = "manifest.json"
POOLED = "pooled.npy"
SHARDS = "shards"
METADATA = "metadata.jsonl"
METADATA_OFFSETS = "metadata_offsets.npy"
POOLED_DTYPE = np.dtype(np.float32)
DEFAULT_SHARD_BYTES = 256 << 20
METADATA_BYTES = 256      # a generous estimate of one video's metadata line, for sizing shards
# Manifest fields a writer must agree with to resume or append: what the vectors mean.
HEADER_KEYS = ("run", "config", "task", "levels", "pooled_levels")
_READ_BYTES = 16 << 20    # verification reads files in pieces of about this size
_MANIFEST_FIELDS = {"task": str, "levels": dict, "pooled_levels": list, "storage": str, "layout": (dict, type(None)),
                    "sources": list, "shards": list, "videos": int}


class StoreError(ValueError):
  """An index that cannot be opened, resumed or extended as asked; the message names the path."""


# --- layout -----------------------------------------------------------------------------------------------


def layout_of(snippets: int, dim: int, pooled: int, regions: int, storage: str) -> dict:
  """The manifest's layout: T, D, P pooled vectors, R regions (0: none), the storage of frames and regions."""
  return {"snippets": int(snippets), "dim": int(dim), "pooled": int(pooled), "regions": int(regions),
          "storage": storage}


def files(layout: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  """{name: (dtype, shape of one video's row)} of the .npy files of a shard (name.npy)."""
  t, d, r, storage = layout["snippets"], layout["dim"], layout["regions"], layout["storage"]
  out = {}
  for field, shape in (("frames", (t,)), ("regions", (t, r))):
    if field == "regions" and not r:
      continue
    for suffix, (dtype, width) in codec.arrays(storage, d).items():
      out[field + suffix] = (dtype, shape if width is None else (*shape, width))
  out.update({"weights": (np.dtype(np.float32), (t,)), "prior": (np.dtype(np.float32), (t,)),
              "times": (np.dtype(np.float32), (t, 2)), "mask": (np.dtype(np.bool_), (t,))})
  return out


def _row_bytes(dtype, shape) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def pooled_row_bytes(layout: dict) -> int:
  return _row_bytes(POOLED_DTYPE, (layout["pooled"], layout["dim"]))


def video_bytes(layout: dict) -> int:
  """Bytes one video takes on disk: its pooled row, its rows of every shard file, its metadata (estimated)."""
  return (pooled_row_bytes(layout) + sum(_row_bytes(*spec) for spec in files(layout).values()) + 8
          + METADATA_BYTES)


def videos_per_shard(layout: dict, shard_bytes: int) -> int:
  """The videos a shard of at most `shard_bytes` (its pooled rows included) holds, at least 1."""
  headers = sum(len(_npy_header(dtype, (10**12, *shape))) for dtype, shape in files(layout).values())
  headers += len(_npy_header(np.int64, (10**12,)))                # metadata_offsets.npy
  return max(1, (int(shard_bytes) - headers) // video_bytes(layout))


# --- .npy headers and small files -------------------------------------------------------------------------


def _aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
  """np.empty on a 64-byte boundary: JAX on a CPU then uses the array in place instead of copying it."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(size + alignment, np.uint8)
  start = -raw.ctypes.data % alignment
  return raw[start:start + size].view(dtype).reshape(shape)


def _npy_header(dtype, shape) -> bytes:
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": tuple(shape)})
  return buffer.getvalue()


def _npy_layout(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
  """(data offset, shape, dtype) of a .npy file, from its header; StoreError naming the file if unreadable."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read(f, max_header_size=1 << 20)
      offset = f.tell()
  except FileNotFoundError:
    raise StoreError(f"{path}: missing") from None
  except (OSError, ValueError, SyntaxError, TypeError):
    raise StoreError(f"{path}: not a readable .npy file (its header is damaged or truncated)") from None
  if fortran:
    raise StoreError(f"{path}: Fortran-ordered arrays are not index files")
  return offset, tuple(shape), dtype


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
    with open(file, "rb") as f:
      manifest = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise StoreError(f"{file}: damaged (not valid JSON), so nothing in {path} can be read; rebuild the index "
                     "with `varcmp index --workdir RUN --records RECORDS --out NEW_INDEX`") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    rebuild = rebuild_command(path, manifest if isinstance(manifest, dict) else {})
    raise StoreError(f"{file}: not an index manifest of format {FORMAT} (format {found}: written by another "
                     f"varcmp version); rebuild it: {rebuild}")
  missing = [key for key, kind in _MANIFEST_FIELDS.items() if not isinstance(manifest.get(key), kind)]
  if missing:
    raise StoreError(f"{file}: damaged (fields {missing} missing or of the wrong type); rebuild it: "
                     f"{rebuild_command(path, manifest)}")
  return manifest


def rebuild_command(path: str, manifest: dict) -> str:
  """The `varcmp index` commands that rebuild the index at `path` from what its manifest says it was built from."""
  run, sources = manifest.get("run"), manifest.get("sources")
  sources = [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
  if not isinstance(run, dict) or not sources:
    return f"`varcmp index --workdir RUN --records RECORDS --out NEW_INDEX` with the run and records of {path}"
  new = shlex.quote(os.path.normpath(path) + ".rebuilt")
  storage = f" --storage {manifest['storage']}" if manifest.get("storage") else ""
  commands = [f"varcmp index --workdir {shlex.quote(str(run.get('workdir')))} --step {run.get('step')} "
              f"--records {shlex.quote(str(s.get('records')))} --split {shlex.quote(str(s.get('split')))} "
              f"--out {new}{storage}" + (" --append" if i else "") for i, s in enumerate(sources)]
  return "`" + " && ".join(commands) + "`"


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


class _HashedFile:
  """A file written front to back whose SHA-256 and size are kept as it is written."""

  def __init__(self, path: str):
    self.file, self.sha256, self.bytes = open(path, "wb"), hashlib.sha256(), 0

  def write(self, data: bytes):
    self.file.write(data)
    self.sha256.update(data)
    self.bytes += len(data)

  def close(self) -> dict:
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    return {"bytes": self.bytes, "sha256": self.sha256.hexdigest()}


# --- writing ----------------------------------------------------------------------------------------------


class IndexWriter:
  """Creates, resumes or extends the index at `path`.

  header: the HEADER_KEYS of the manifest (run, config, task, levels, pooled_levels). A new index takes it; an
  existing one must match it field for field (else StoreError naming the fields). storage: of the per-snippet
  vectors (codec.STORAGES, or None / "auto": codec.resolve at width `dim`); an existing index keeps its own
  and refuses another. Use as a context manager.
  """

  def __init__(self, path: str, header: dict, append: bool = False, storage: str | None = None,
               dim: int | None = None):
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
        if storage not in (None, "auto") and storage != self.manifest["storage"]:
          raise StoreError(f"{self.path} stores its vectors as {self.manifest['storage']}, not {storage}: leave "
                           "out --storage to add to it, or choose a new --out")
        self._recover()
      else:
        if storage in (None, "auto") and dim is None:
          raise ValueError("IndexWriter: storage 'auto' needs the vector width `dim`")
        self.manifest = {"format": FORMAT, **{k: header.get(k) for k in HEADER_KEYS},
                         "storage": codec.resolve(storage, dim or 0), "layout": None, "sources": [], "shards": [],
                         "videos": 0}
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

  @property
  def storage(self) -> str:
    return self.manifest["storage"]

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
    rows, row_bytes = self.manifest["videos"], pooled_row_bytes(self.manifest["layout"])
    if shape[0] < rows or os.path.getsize(pooled) < offset + rows * row_bytes:
      raise StoreError(f"{pooled}: holds fewer rows than the {rows} videos of {MANIFEST}; the index is damaged: "
                       f"rebuild it: {rebuild_command(self.path, self.manifest)}")
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

  def _set_layout(self, arrays: dict) -> dict:
    """The index's layout, set from the first rows written; StoreError if `arrays` do not fit it."""
    pooled, weights, regions = arrays["pooled"], arrays["weights"], arrays.get("regions")
    layout = layout_of(weights.shape[1], pooled.shape[2], pooled.shape[1],
                       regions.shape[2] if regions is not None else 0, self.storage)
    if self.manifest["layout"] is None:
      self.manifest["layout"] = layout
      with open(os.path.join(self.path, POOLED), "wb") as f:
        f.write(_npy_header(POOLED_DTYPE, (0, layout["pooled"], layout["dim"])))
    elif layout != self.manifest["layout"]:
      raise StoreError(f"{self.path}: these videos have layout {layout}, the index {self.manifest['layout']}")
    return layout

  def _pooled_file(self):
    if self._pooled is None:
      self._pooled = open(os.path.join(self.path, POOLED), "r+b")
    self._pooled.seek(0, os.SEEK_END)
    return self._pooled

  def _set_pooled_rows(self, rows: int):
    layout = self.manifest["layout"]
    header = _npy_header(POOLED_DTYPE, (rows, layout["pooled"], layout["dim"]))
    path = os.path.join(self.path, POOLED)
    offset = _npy_layout(path)[0]
    if len(header) != offset:
      raise StoreError(f"{path}: header of {offset} bytes cannot hold shape {rows}")
    with open(path, "r+b") as f:
      f.write(header)
      f.flush()
      os.fsync(f.fileno())

  def _commit(self, entry: dict):
    os.fsync(self._pooled.fileno())
    self._set_pooled_rows(self.manifest["videos"] + entry["count"])
    self.manifest["shards"].append(entry)
    self.manifest["videos"] += entry["count"]
    _write_json(os.path.join(self.path, MANIFEST), self.manifest)


class ShardWriter:
  """Streams the rows of one shard to disk as they arrive (memory: the rows of one `add`), then commits them."""

  def __init__(self, writer: IndexWriter, entry: dict):
    self.writer, self.entry = writer, entry
    self.count = entry["stop"] - entry["start"]
    self.final = os.path.join(writer.path, SHARDS, entry["name"])
    self.tmp = self.final + ".tmp"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.files, self.rows = None, 0
    self.metadata = _HashedFile(os.path.join(self.tmp, METADATA))
    self.line_offsets = [0]
    self.pooled_sha256 = hashlib.sha256()

  def add(self, arrays: dict, metadata: list[dict]):
    """The next rows: arrays {"pooled": (n, P, D), each of files(layout): (n, ...)} and their n metadata dicts
    (codec-encoded frames and regions, as levels.index_arrays gives them, and times)."""
    n = len(metadata)
    present = {k: v for k, v in arrays.items() if v is not None}
    if self.rows + n > self.count or any(len(v) != n for v in present.values()):
      raise ValueError(f"shard {self.entry['name']}: {n} metadata rows, arrays of "
                       f"{ {k: len(v) for k, v in present.items()} } rows, {self.count - self.rows} rows left")
    layout = self.writer._set_layout(arrays)   # pylint: disable=protected-access
    expected = {"pooled": (POOLED_DTYPE, (layout["pooled"], layout["dim"])), **files(layout)}
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
    data = values.pop("pooled").tobytes()
    pooled.write(data)
    pooled.flush()      # what a killed job wrote is on disk, for the next writer to cut back
    self.pooled_sha256.update(data)
    if self.files is None:
      self.files = {}
      for name, (dtype, shape) in files(layout).items():
        self.files[name] = _HashedFile(os.path.join(self.tmp, f"{name}.npy"))
        self.files[name].write(_npy_header(dtype, (self.count, *shape)))
    for name, value in values.items():
      self.files[name].write(value.tobytes())
    for entry in metadata:
      line = json.dumps(entry).encode() + b"\n"
      self.metadata.write(line)
      self.line_offsets.append(self.line_offsets[-1] + len(line))
    self.rows += n

  def commit(self):
    if self.rows != self.count:
      raise ValueError(f"shard {self.entry['name']}: {self.rows} rows written, {self.count} expected")
    offsets = _HashedFile(os.path.join(self.tmp, METADATA_OFFSETS))
    offsets.write(_npy_header(np.int64, (self.count + 1,)))
    offsets.write(np.asarray(self.line_offsets, np.int64).tobytes())
    written = {f"{name}.npy": f.close() for name, f in (self.files or {}).items()}
    written[METADATA], written[METADATA_OFFSETS] = self.metadata.close(), offsets.close()
    os.rename(self.tmp, self.final)
    self.writer._commit({**self.entry, "count": self.rows, "files": written,   # pylint: disable=protected-access
                         "pooled_sha256": self.pooled_sha256.hexdigest()})


# --- checking ---------------------------------------------------------------------------------------------


def check(path: str, manifest: dict, full: bool = False, progress: bool = False) -> list[str]:
  """Problems of the index at `path`, one line each (empty: none).

  Always: every file of every committed shard and pooled.npy exists, its .npy header gives the dtype and shape
  the layout and the manifest say, and its size is what the header and the manifest say. full: also every
  file's SHA-256 (and that of each shard's rows of pooled.npy) against the one written at build time, and
  every float array for non-finite rows. Memory: one piece of a file at a time. progress: a bar over shards.
  """
  layout, rebuild = manifest["layout"], rebuild_command(path, manifest)
  if layout is None:
    return []
  problems = []
  fail = lambda file, problem: problems.append(f"{file}: {problem}; the index is damaged: rebuild it: {rebuild}")
  specs = files(layout)
  pooled_path, videos = os.path.join(path, POOLED), int(manifest["videos"])
  pooled_shape = (layout["pooled"], layout["dim"])
  pooled_offset = _check_npy(pooled_path, POOLED_DTYPE, pooled_shape, videos, None, fail, grows=True)
  for shard in tqdm.tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
    folder, count = os.path.join(path, SHARDS, shard["name"]), int(shard["count"])
    if not os.path.isdir(folder):
      fail(folder, "missing")
      continue
    for name in sorted(({f"{n}.npy" for n in specs} | {METADATA, METADATA_OFFSETS}) - set(shard["files"])):
      fail(os.path.join(folder, name), f"not listed in {MANIFEST}")
    for name, written in shard["files"].items():
      file = os.path.join(folder, name)
      if name == METADATA:
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != written["bytes"]:
          fail(file, "missing" if size is None else f"{size} bytes, {MANIFEST} says {written['bytes']}")
          continue
        offset = 0
      elif name == METADATA_OFFSETS:
        offset = _check_npy(file, np.int64, (), count + 1, written["bytes"], fail)
      elif name[:-len(".npy")] in specs:
        dtype, shape = specs[name[:-len(".npy")]]
        offset = _check_npy(file, dtype, shape, count, written["bytes"], fail)
      else:
        fail(file, f"not a file of an index of layout {layout}")
        continue
      if full and offset is not None:
        kind = None if name in (METADATA, METADATA_OFFSETS) else specs[name[:-len(".npy")]]
        _check_content(file, 0, written["bytes"], offset, kind, written["sha256"], shard, fail)
    if full and pooled_offset is not None:
      start = pooled_offset + int(shard["offset"]) * pooled_row_bytes(layout)
      _check_content(pooled_path, start, start + count * pooled_row_bytes(layout), start,
                     (POOLED_DTYPE, pooled_shape), shard["pooled_sha256"], shard, fail,
                     what=f"rows {shard['offset']}-{shard['offset'] + count - 1} (shard {shard['name']})")
  return problems


def _check_npy(file, dtype, row_shape, rows, manifest_bytes, fail, grows=False) -> int | None:
  """The data offset of a .npy file that holds `rows` rows of dtype row_shape (at least, when it `grows`: a
  writer may be appending), else None after reporting why not."""
  try:
    offset, shape, found = _npy_layout(file)
  except StoreError as e:
    fail(file, str(e)[len(file) + 2:])     # the message is "{file}: {problem}"
    return None
  size = os.path.getsize(file)
  expected = offset + rows * _row_bytes(dtype, row_shape)
  if found != dtype or shape[1:] != tuple(row_shape) or (shape[0] < rows if grows else shape[0] != rows):
    fail(file, f"holds {found} {shape}, the index needs {np.dtype(dtype)} {(rows, *row_shape)}")
  elif size < expected or (not grows and size != expected):
    fail(file, f"{size} bytes, its header says {expected}" + (" (truncated)" if size < expected else ""))
  elif manifest_bytes is not None and size != manifest_bytes:
    fail(file, f"{size} bytes, {MANIFEST} says {manifest_bytes}")
  else:
    return offset
  return None


def _check_content(file, start, stop, data_start, kind, sha256, shard, fail, what=None):
  """SHA-256 of bytes [start, stop) of `file` against `sha256`; with kind (dtype, row shape), its rows from
  data_start for non-finite values (float dtypes)."""
  digest, dtype, row_bytes = hashlib.sha256(), None, 1
  if kind is not None and np.dtype(kind[0]).kind == "f":
    dtype, row_bytes = np.dtype(kind[0]), _row_bytes(*kind)
  piece = max(row_bytes, _READ_BYTES // row_bytes * row_bytes)
  bad_row, position = None, start
  with open(file, "rb") as f:
    f.seek(start)
    if data_start > start:                                # the header: hashed, not scanned
      digest.update(f.read(data_start - start))
      position = data_start
    while position < stop:
      data = f.read(min(piece, stop - position))
      if not data:
        break
      digest.update(data)
      if dtype is not None and bad_row is None and len(data) % row_bytes == 0:
        rows = np.frombuffer(data, dtype).reshape(len(data) // row_bytes, -1)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
          bad_row = (position - data_start) // row_bytes + int(np.argmin(finite))
      position += len(data)
  label = f"{file} {what}" if what else file
  if digest.hexdigest() != sha256:
    fail(label, "its checksum differs from the one written at build time (the bytes changed)")
  if bad_row is not None:
    fail(label, f"row {bad_row} of shard {shard['name']} (index row {int(shard['offset']) + bad_row}) holds "
                "non-finite values (NaN or inf)")


# --- reading ----------------------------------------------------------------------------------------------


class IndexReader:
  """An index opened for reading: the manifest, pooled rows streamed in windows, per-snippet rows by index.

  Opening checks every file's size against its header and the manifest (`check`, cheap part); StoreError with
  the first problem. Memory is what a call returns: nothing is loaded whole, and no mapping outlives the chunk
  it covers.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.manifest = read_manifest(self.path)
    self.videos = int(self.manifest["videos"])
    self.layout = self.manifest["layout"]
    if not self.videos or self.layout is None:
      raise StoreError(f"{self.path}: the index holds no videos yet (is `varcmp index` still running?)")
    problems = check(self.path, self.manifest)
    if problems:
      more = f" (and {len(problems) - 1} more problems: `varcmp index --verify {self.path}` lists them)"
      raise StoreError(problems[0] + (more if len(problems) > 1 else ""))
    self.files = files(self.layout)
    shards = self.manifest["shards"]
    self._names = [s["name"] for s in shards]
    self._offsets = np.array([s["offset"] for s in shards], np.int64)
    self.pooled_path = os.path.join(self.path, POOLED)
    self._pooled_offset = _npy_layout(self.pooled_path)[0]
    self._data_offsets = {}   # (shard, file) -> byte offset of row 0

  @property
  def storage(self) -> str:
    return self.layout["storage"]

  def damaged(self, file: str, problem: str) -> StoreError:
    """The one-line error for a problem met while reading `file`."""
    return StoreError(f"{file}: {problem}; the index is damaged: rebuild it: "
                      f"{rebuild_command(self.path, self.manifest)}")

  def pooled_chunks(self, rows: int):
    """Yields (start, float32 (n, P, D)) windows of pooled.npy, each a memory map of n <= rows videos."""
    width = (self.layout["pooled"], self.layout["dim"])
    row_bytes = pooled_row_bytes(self.layout)
    for start in range(0, self.videos, rows):
      n = min(rows, self.videos - start)
      try:
        window = np.memmap(self.pooled_path, POOLED_DTYPE, "r", self._pooled_offset + start * row_bytes, (n, *width))
      except (OSError, ValueError):
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
    ascending order each run of consecutive rows is one pread straight into the result)."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.videos):
      raise StoreError(f"{self.path}: rows outside [0, {self.videos})")
    out = {name: _aligned_empty((len(rows), *self.row_shape(name)), self.files[name][0]) for name in names}
    order = np.argsort(rows, kind="stable")
    shard_of, local_of = self.locate(rows[order])
    for shard in np.unique(shard_of):
      picked, local = order[shard_of == shard], local_of[shard_of == shard]
      runs = np.split(np.arange(len(local)), np.flatnonzero((np.diff(local) != 1) | (np.diff(picked) != 1)) + 1)
      for name in names:
        path = os.path.join(self.path, SHARDS, self._names[shard], f"{name}.npy")
        row_bytes = _row_bytes(*self.files[name])
        offset = self._data_offset(shard, name, path)
        fd = os.open(path, os.O_RDONLY)
        try:
          for run in runs:
            target = out[name][picked[run[0]]:picked[run[0]] + len(run)]
            got = os.preadv(fd, [memoryview(target).cast("B")], offset + int(local[run[0]]) * row_bytes)
            if got != target.nbytes:
              raise self.damaged(path, "shorter than its header says (truncated)")
        finally:
          os.close(fd)
    return out

  def _data_offset(self, shard: int, name: str, path: str) -> int:
    key = (shard, name)
    if key not in self._data_offsets:
      self._data_offsets[key] = _npy_layout(path)[0]
    return self._data_offsets[key]

  def metadata(self, rows) -> list[dict]:
    """video, caption, label, duration, event of each row: one line of its shard's metadata.jsonl each."""
    out = []
    for shard, local in zip(*self.locate(rows)):
      folder = os.path.join(self.path, SHARDS, self._names[shard])
      index, lines = os.path.join(folder, METADATA_OFFSETS), os.path.join(folder, METADATA)
      with open(index, "rb") as f:   # the line's start and end: two int64 at the row's place
        start, stop = np.frombuffer(os.pread(f.fileno(), 16, self._data_offset(int(shard), "metadata", index)
                                             + 8 * int(local)), np.int64)
      try:
        with open(lines, "rb") as f:
          line = os.pread(f.fileno(), int(stop - start), int(start))
        out.append(json.loads(line))
      except (OSError, ValueError):
        raise self.damaged(lines, f"line {int(local) + 1} is not the JSON written at build time") from None
    return out
