"""Archive-scale search (SPEC section 4b): `varcmp index` writes an on-disk index, `Index` searches it.

  store.py    the on-disk format: resumable writer, row reader (no whole-index load)
  levels.py   the levels linear in the video and their pooled vectors (video and query side)
  search.py   Index: exact two-stage search (stage 1 over every pooled row, stage 2 for the K best)
  build.py    `varcmp index`: embeds a records split slice by slice into the store
"""
