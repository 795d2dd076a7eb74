"""Checking an index's files against its manifest: when it opens (search, serve, a writer) and `varcmp index --verify`.

Opening (`check`): every file of every committed shard and pooled.npy exists, its .npy header gives the dtype and
shape the layout and the manifest say, and its size is what the header and the manifest say; the small files
(everything but the vectors' codes: weights, prior, times, mask, scales, metadata, its offsets, the row checksums)
and pooled.npy match their CRC32. That is O(G) bytes read once (about 1.1 GB at 10^5 real-size videos, of 34 GB):
stage 1 then streams pooled.npy unchecked (a CRC32 of every window would cost 11% of a query), and stage 2 checks
each row of the codes it reads (index.reader).
Full (`--verify`, and a writer about to resume or extend an index): every file's CRC32, and every float array for
non-finite rows. Each problem is one IndexDamaged / IndexUnreadable naming the file and the rebuild.
"""
import os

import numpy as np
import tqdm

from varcmp_jax.index import checksum, errors
from varcmp_jax.index import layout as layout_lib
from varcmp_jax.index.manifest import MANIFEST, rebuild_command


def check(path: str, manifest: dict, full: bool = False, progress: bool = False) -> list[errors.StoreError]:
  """The problems of the index at `path` (empty: none), each an IndexDamaged or IndexUnreadable whose message is
  one line. full: every file's checksum and non-finite rows too (see the module). Memory: one piece of a file at a
  time. progress: a bar over shards."""
  layout, rebuild = manifest["layout"], rebuild_command(path, manifest)
  if layout is None:
    return []
  problems = []

  def fail(file, problem):
    problems.append(problem if isinstance(problem, errors.StoreError) else errors.damaged(file, problem, rebuild))

  specs, small = layout_lib.files(layout), set(layout_lib.files(layout)) - layout_lib.code_files(layout)
  pooled_path, videos = os.path.join(path, layout_lib.POOLED), int(manifest["videos"])
  pooled_kind = (layout_lib.POOLED_DTYPE, (layout["pooled"], layout["dim"]))
  pooled_offset = _check_npy(pooled_path, *pooled_kind, videos, None, fail, rebuild, grows=True)
  for shard in tqdm.tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
    folder, count = os.path.join(path, layout_lib.SHARDS, shard["name"]), int(shard["count"])
    if not os.path.isdir(folder):
      fail(folder, errors.unreadable(folder, FileNotFoundError(folder), rebuild))
      continue
    needed = {f"{n}.npy" for n in specs} | {layout_lib.METADATA, layout_lib.METADATA_OFFSETS, layout_lib.ROW_CHECKSUMS}
    for name in sorted(needed - set(shard["files"])):
      fail(os.path.join(folder, name), f"not listed in {MANIFEST}")
    for name, written in shard["files"].items():
      file, array = os.path.join(folder, name), name.removesuffix(".npy")
      kind = None
      if name == layout_lib.METADATA:
        try:
          size = os.path.getsize(file)
        except OSError as e:
          fail(file, errors.unreadable(file, e, rebuild))
          continue
        if size != written["bytes"]:
          fail(file, f"{size} bytes, {MANIFEST} says {written['bytes']}")
          continue
        offset = 0
      elif name == layout_lib.METADATA_OFFSETS:
        offset = _check_npy(file, np.int64, (), count + 1, written["bytes"], fail, rebuild)
      elif name == layout_lib.ROW_CHECKSUMS:
        columns = (len(layout_lib.row_checksum_columns(layout)),)
        offset = _check_npy(file, layout_lib.CHECKSUM_DTYPE, columns, count, written["bytes"], fail, rebuild)
      elif name.endswith(".npy") and array in specs:
        kind = specs[array]
        offset = _check_npy(file, *kind, count, written["bytes"], fail, rebuild)
      else:
        fail(file, f"not a file of an index of layout {layout}")
        continue
      if offset is not None and (full or array not in specs or array in small):
        _check_content(file, 0, written["bytes"], offset, kind if full else None, written["crc32"], shard, fail,
                       rebuild)
    if pooled_offset is not None:
      start = pooled_offset + int(shard["offset"]) * layout_lib.pooled_row_bytes(layout)
      _check_content(pooled_path, start, start + count * layout_lib.pooled_row_bytes(layout), start,
                     pooled_kind if full else None, shard["pooled_crc32"], shard, fail, rebuild,
                     what=f"rows {shard['offset']}-{shard['offset'] + count - 1} (shard {shard['name']})")
  return problems


def _check_npy(file, dtype, row_shape, rows, manifest_bytes, fail, rebuild, grows=False) -> int | None:
  """The data offset of a .npy file that holds `rows` rows of dtype row_shape (at least, when it `grows`: a
  writer may be appending), else None after reporting why not."""
  try:
    offset, shape, found = layout_lib.npy_layout(file)
    size = os.path.getsize(file)
  except OSError as e:
    fail(file, errors.unreadable(file, e, rebuild))
    return None
  except ValueError as e:
    fail(file, str(e))
    return None
  expected = offset + rows * layout_lib.row_bytes(dtype, row_shape)
  if found != dtype or shape[1:] != tuple(row_shape) or (shape[0] < rows if grows else shape[0] != rows):
    fail(file, f"holds {found} {shape}, the index needs {np.dtype(dtype)} {(rows, *row_shape)}")
  elif size < expected or (not grows and size != expected):
    fail(file, f"{size} bytes, its header says {expected}" + (" (truncated)" if size < expected else ""))
  elif manifest_bytes is not None and size != manifest_bytes:
    fail(file, f"{size} bytes, {MANIFEST} says {manifest_bytes}")
  else:
    return offset
  return None


def _check_content(file, start, stop, data_start, kind, crc32, shard, fail, rebuild, what=None):
  """CRC32 of bytes [start, stop) of `file` against `crc32`; with kind (dtype, row shape), its rows from
  data_start for non-finite values (float dtypes)."""
  crc, dtype, row_bytes = 0, None, 1
  if kind is not None and np.dtype(kind[0]).kind == "f":
    dtype, row_bytes = np.dtype(kind[0]), layout_lib.row_bytes(*kind)
  piece = max(row_bytes, checksum.READ_BYTES // row_bytes * row_bytes)
  bad_row, position = None, start
  try:
    with open(file, "rb") as f:
      f.seek(start)
      if data_start > start:                                # the header: checksummed, not scanned
        crc = checksum.crc32(f.read(data_start - start), crc)
        position = data_start
      while position < stop:
        data = f.read(min(piece, stop - position))
        if not data:
          break
        crc = checksum.crc32(data, crc)
        if dtype is not None and bad_row is None and len(data) % row_bytes == 0:
          rows = np.frombuffer(data, dtype).reshape(len(data) // row_bytes, -1)
          finite = np.isfinite(rows).all(axis=1)
          if not finite.all():
            bad_row = (position - data_start) // row_bytes + int(np.argmin(finite))
        position += len(data)
  except OSError as e:
    fail(file, errors.unreadable(file, e, rebuild))
    return
  label = f"{file} {what}" if what else file
  if crc != crc32:
    fail(label, "its checksum differs from the one written at build time (the bytes changed)")
  if bad_row is not None:
    fail(label, f"row {bad_row} of shard {shard['name']} (index row {int(shard['offset']) + bad_row}) holds "
                "non-finite values (NaN or inf)")
