"""Archive-scale search (SPEC section 4b): `varcmp index` writes an on-disk index, `Index` searches it.

  layout.py    the files of an index, their shapes and sizes
  manifest.py  manifest.json: read and written (with its own CRC32), and the commands that rebuild an index
  checksum.py  the CRC32 of files, of each video's rows and of the manifest
  writer.py    the resumable writer, shard by shard
  verify.py    an index's files against its manifest: the check at open, and in full (`varcmp index --verify`)
  reader.py    the row reader: pooled windows, shard rows checked as they are read (no whole-index load)
  errors.py    StoreError, IndexDamaged, IndexUnreadable: what the commands and the page report
  store.py     the public names of the six above, in one place
  codec.py     how the per-snippet vectors are stored (float16, int8, int4)
  levels.py    the levels linear in the video and their pooled vectors (video and query side)
  search.py    Index: exact two-stage search (stage 1 over every pooled row, stage 2 for the K best)
  build.py     `varcmp index`: embeds a records split slice by slice into the store
"""
