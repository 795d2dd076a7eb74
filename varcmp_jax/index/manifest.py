"""An index's manifest.json: read (format, fields, its own CRC32), written atomically, and what rebuilds the index.

The manifest carries a CRC32 of its own content (the canonical JSON of every other field), so a byte changed in
it that leaves valid JSON (a level weight, a shard's row count) is refused like any other damage.
"""
import json
import os
import shlex

from varcmp_jax.index import checksum
from varcmp_jax.index.errors import StoreError, damaged, unreadable

FORMAT = 4         # 3: int4 codes in two 2-bit planes (index.codec); 4: CRC32 per file, per row and of the manifest
MANIFEST = "manifest.json"
CHECKSUM_KEY = "crc32"
_FIELDS = {"task": str, "levels": dict, "pooled_levels": list, "storage": str, "layout": (dict, type(None)),
           "sources": list, "shards": list, "videos": int}


def _canonical_crc32(manifest: dict) -> int:
  body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
  return checksum.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write(path: str, manifest: dict) -> None:
  """Writes INDEX/manifest.json with its CRC32. Atomic: a reader sees the old file or the new one, never half."""
  manifest = json.loads(json.dumps(manifest))       # the checksum is of what a reader loads (string keys)
  file = os.path.join(path, MANIFEST)
  partial = f"{file}.tmp{os.getpid()}"
  with open(partial, "w") as f:
    json.dump({**manifest, CHECKSUM_KEY: _canonical_crc32(manifest)}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, file)


def read(path: str) -> dict:
  """The manifest of the index at `path`, its CRC32 checked (and left out); StoreError (IndexDamaged,
  IndexUnreadable) naming the file otherwise."""
  file = os.path.join(path, MANIFEST)
  if not os.path.exists(file):
    raise StoreError(f"{path}: not an index (no {MANIFEST}); build one with `varcmp index`")
  try:
    with open(file, "rb") as f:
      manifest = json.loads(f.read())
  except OSError as e:
    raise unreadable(file, e, rebuild_command(path, {})) from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise damaged(file, f"not valid JSON, so nothing in {path} can be read", rebuild_command(path, {})) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    rebuild = rebuild_command(path, manifest if isinstance(manifest, dict) else {})
    raise StoreError(f"{file}: not an index manifest of format {FORMAT} (format {found}: written by another "
                     f"varcmp version); rebuild it: {rebuild}")
  if manifest.get(CHECKSUM_KEY) != _canonical_crc32(manifest):
    raise damaged(file, "its content does not match its checksum (it changed since it was written)",
                  rebuild_command(path, manifest))
  missing = [key for key, kind in _FIELDS.items() if not isinstance(manifest.get(key), kind)]
  if missing:
    raise damaged(file, f"fields {missing} missing or of the wrong type", rebuild_command(path, manifest))
  del manifest[CHECKSUM_KEY]
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
