"""The files of an on-disk index (SPEC section 4b), their shapes and sizes.

  INDEX/manifest.json    what the index holds and was built from (index.manifest): format, run (workdir, step),
                         config, task, level weights and which levels are pooled, storage of the per-snippet vectors
                         (codec), layout (T, D, R, P), sources (records directory, split, fingerprint of its
                         manifest.json), the committed shards with the size and CRC32 of each of their files and of
                         their rows of pooled.npy, the video count G, and a CRC32 of the manifest itself
  INDEX/pooled.npy       float32 (G, P, D): per video, the pooled vectors of the levels linear in the video
                         (text: normalized mean_t f_t and sum_t w_t f_t/|f_t|; audio: normalized mean_t f_t)
  INDEX/shards/NNNNNN/   the per-snippet arrays of consecutive videos, one .npy per entry of `files(layout)`
                         (frames and regions encoded by codec: codes, their _scale arrays when quantized, int4's
                         _low planes; weights, prior, times, mask), plus metadata.jsonl (video, caption, label,
                         duration, event, one JSON line each), metadata_offsets.npy (n + 1 byte offsets of its
                         lines: a line is one pread) and rows_crc32.npy (uint32 (n, C): the CRC32 of each video's
                         row of each file, columns `row_checksum_columns(layout)`, the last one its metadata line)

Plain .npy files: pooled.npy is one dense float32 matrix that np.memmap streams at page-cache speed for stage 1,
and a video's row of a shard file is one pread at a computed offset for stage 2 (checked against its CRC32 as
it is read), with no dependency beyond numpy and no chunk cache to size.
"""
import io

import numpy as np

from varcmp_jax.index import codec

POOLED = "pooled.npy"
SHARDS = "shards"
METADATA = "metadata.jsonl"
METADATA_OFFSETS = "metadata_offsets.npy"
ROW_CHECKSUMS = "rows_crc32.npy"
POOLED_DTYPE = np.dtype(np.float32)
CHECKSUM_DTYPE = np.dtype(np.uint32)
DEFAULT_SHARD_BYTES = 256 << 20
METADATA_BYTES = 256      # a generous estimate of one video's metadata line, for sizing shards
METADATA_COLUMN = "metadata"
VECTOR_FIELDS = ("frames", "regions")


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


def code_files(layout: dict) -> set[str]:
  """The shard files (by array name) that hold the vectors' values, D per vector: the bulk of an index, checked row
  by row as stage 2 reads them. Every other file is small (O(T) a video) and is checked whole when an index opens."""
  arrays = codec.arrays(layout["storage"], layout["dim"])
  return {name for name in files(layout)
          if any(name == field + suffix for field in VECTOR_FIELDS for suffix, (_, width) in arrays.items()
                 if width is not None)}


def row_checksum_columns(layout: dict) -> list[str]:
  """The columns of rows_crc32.npy: the array files in sorted order, then the metadata line."""
  return sorted(files(layout)) + [METADATA_COLUMN]


def row_bytes(dtype, shape) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def pooled_row_bytes(layout: dict) -> int:
  return row_bytes(POOLED_DTYPE, (layout["pooled"], layout["dim"]))


def video_bytes(layout: dict) -> int:
  """Bytes one video takes on disk: its pooled row, its rows of every shard file and of the row checksums, its
  metadata offset and line (estimated)."""
  return (pooled_row_bytes(layout) + sum(row_bytes(*spec) for spec in files(layout).values()) + 8
          + CHECKSUM_DTYPE.itemsize * len(row_checksum_columns(layout)) + METADATA_BYTES)


def videos_per_shard(layout: dict, shard_bytes: int) -> int:
  """The videos a shard of at most `shard_bytes` (its pooled rows included) holds, at least 1."""
  big = 10**12
  headers = sum(len(npy_header(dtype, (big, *shape))) for dtype, shape in files(layout).values())
  headers += len(npy_header(np.int64, (big,)))                                    # metadata_offsets.npy
  headers += len(npy_header(CHECKSUM_DTYPE, (big, len(row_checksum_columns(layout)))))    # rows_crc32.npy
  return max(1, (int(shard_bytes) - headers) // video_bytes(layout))


def npy_header(dtype, shape) -> bytes:
  """The .npy (version 1.0) header of a C-ordered array of `dtype` and `shape`."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": tuple(shape)})
  return buffer.getvalue()


def npy_layout(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
  """(data offset, shape, dtype) of a .npy file, from its header.

  OSError when the file cannot be read (missing, permission denied); ValueError, its message the problem, when
  its header is not one of a C-ordered .npy array.
  """
  with open(path, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read(f, max_header_size=1 << 20)
    except (ValueError, SyntaxError, TypeError, EOFError):
      raise ValueError("not a readable .npy file (its header is damaged or truncated)") from None
    offset = f.tell()
  if fortran:
    raise ValueError("Fortran-ordered arrays are not index files")
  return offset, tuple(shape), dtype
