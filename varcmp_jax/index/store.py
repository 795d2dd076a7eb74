"""The on-disk index's public names in one place, for the code that imports them from here.

The index is written and read by modules with one job each:
  layout.py    the files of an index, their shapes and sizes, .npy headers
  manifest.py  manifest.json: read, written atomically, its CRC32, the commands that rebuild an index
  checksum.py  the CRC32 of files, rows and the manifest
  writer.py    IndexWriter and ShardWriter: created, resumed, extended shard by shard
  verify.py    check: an index's files against its manifest (at open, and in full for --verify)
  reader.py    IndexReader: pooled windows and rows, each row checked as it is read
  errors.py    StoreError, IndexDamaged, IndexUnreadable
"""
# pylint: disable=unused-import
from varcmp_jax.index.errors import IndexDamaged, IndexUnreadable, StoreError  # noqa: F401
from varcmp_jax.index.layout import (DEFAULT_SHARD_BYTES, METADATA, METADATA_BYTES, METADATA_OFFSETS,  # noqa: F401
                                     POOLED, POOLED_DTYPE, ROW_CHECKSUMS, SHARDS, files, layout_of, npy_header,
                                     npy_layout, pooled_row_bytes, video_bytes, videos_per_shard)
from varcmp_jax.index.manifest import FORMAT, MANIFEST, rebuild_command  # noqa: F401
from varcmp_jax.index.manifest import read as read_manifest  # noqa: F401
from varcmp_jax.index.reader import IndexReader  # noqa: F401
from varcmp_jax.index.verify import check  # noqa: F401
from varcmp_jax.index.writer import HEADER_KEYS, IndexWriter, ShardWriter, check_out, slice_bounds  # noqa: F401
