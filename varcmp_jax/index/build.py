"""`varcmp index`: embed a split of records into an on-disk index for archive-scale search (SPEC section 4b).

  varcmp index --workdir runs/demo/run --records runs/demo/records --out runs/demo/index
  varcmp index --workdir runs/demo/run --records data/new_records --out runs/demo/index --append
  varcmp index --verify runs/demo/index
  varcmp search --index runs/demo/index --text "a red triangle shakes in the top left corner"

The split is embedded slice by slice, a slice being as many videos as fit in --shard-mb on disk (within a slice,
eval batches, so memory is one batch whatever the shard or split size), and each slice becomes one shard of the
index (varcmp_jax.index.writer), streamed to disk as its batches arrive. --storage says how the per-snippet
vectors are kept (index.codec: int4 by default for vectors at least 256 wide). Running the same command again
after a kill resumes at the first slice not committed; --append adds another records directory or split,
embedded by the same run and checkpoint. --verify checks an index's files, checksums and rows. Runs in one
process on its local devices.
"""
import argparse
import json
import math
import os
import sys

import jax
import tqdm

from varcmp_jax import evaluate, hits
from varcmp_jax.data import pipeline
from varcmp_jax.index import codec, verify as verify_lib, writer as writer_lib
from varcmp_jax.index import layout as layout_lib
from varcmp_jax.index import levels as levels_lib
from varcmp_jax.index import manifest as manifest_lib
from varcmp_jax.index.errors import StoreError


def header(run) -> dict:
  """The manifest fields that say what the index's vectors mean: run, config, task, levels."""
  config = run.config
  return {"run": {"workdir": os.path.realpath(run.workdir), "step": int(run.step)},
          "config": json.loads(config.to_json_best_effort()), "task": config.task,
          "levels": {name: float(weight) for name, weight in config.loss.levels.items()},
          "pooled_levels": list(levels_lib.POOLED_LEVELS[config.task])}


def slice_metadata(records: str, split: str, start: int, stop: int, snippets: int) -> list[dict]:
  """video, caption, label, duration, event and slot times of the records [start, stop) of the split."""
  return [{**meta, "event": [float(x) for x in meta["event"]], "times": hits.slot_times(meta["times"], snippets)}
          for meta in pipeline.load_split_metadata(records, split, start, stop)]


def planned_layout(config, storage: str) -> dict:
  """The layout of an index of `config`'s videos, as far as the config tells it (regions assumed present)."""
  return layout_lib.layout_of(config.data.snippets, config.model.clip.projection_dim,
                              len(levels_lib.POOLED_LEVELS[config.task]), config.model.region_grid ** 2, storage)


def build(run, records: str, out: str, split: str, append: bool = False, shard_size: int | None = None,
          shard_bytes: int = layout_lib.DEFAULT_SHARD_BYTES, storage: str | None = None) -> dict:
  """Embeds `split` of `records` with `run` into the index `out` (created, resumed or appended to).

  shard_size: videos per shard; None: as many as fit in shard_bytes. storage: codec.STORAGES or "auto" (None:
  the index's own, auto for a new one).
  """
  if jax.process_count() > 1:
    raise ValueError("varcmp index runs in one process (it uses every local device); start it on one host")
  config = pipeline.reading(run.config, records)
  total = pipeline.split_size(records, split)
  if not total:
    raise ValueError(f"{records}: split {split!r} has no records")

  with writer_lib.IndexWriter(out, header(run), append, storage, config.model.clip.projection_dim,
                              progress=True) as writer:
    prepare = jax.jit(lambda video: levels_lib.index_arrays(video, *levels_lib.snippet_weights(video, config),
                                                            config.task, writer.storage))
    per_shard = shard_size or layout_lib.videos_per_shard(planned_layout(config, writer.storage), shard_bytes)
    before = writer.videos
    source = writer.add_source({"records": os.path.realpath(records), "split": split,
                                "fingerprint": pipeline.manifest_sha256(records), "videos": total,
                                "slices": math.ceil(total / per_shard)}, append)
    slices = writer.manifest["sources"][source]["slices"]     # as first written, when resuming
    pending = writer.pending_slices(source)
    todo = sum(stop - start for start, stop in (writer_lib.slice_bounds(total, slices, i) for i in pending))
    with tqdm.tqdm(total=total, initial=total - todo, desc=f"index {split}", unit="video") as bar:
      for i in pending:
        start, stop = writer_lib.slice_bounds(total, slices, i)
        metadata = slice_metadata(records, split, start, stop, config.data.snippets)
        shard = writer.shard(source, i, start, stop)
        expected = start
        for rows, video in evaluate.embed_batches(run.trainer, run.params, split, config, "encode_video",
                                                  shard_index=i, shard_count=slices, progress=False):
          if list(rows) != list(range(expected, expected + len(rows))):
            raise RuntimeError(f"slice {i} of {records} came back as records {rows}, expected from {expected}")
          arrays = jax.device_get(prepare(video))
          _check_levels(writer.manifest, arrays)
          arrays["times"] = [metadata[r - start].pop("times") for r in rows]
          shard.add(arrays, [metadata[r - start] for r in rows])
          expected += len(rows)
          bar.update(len(rows))
        shard.commit()
    return {"index": out, "videos": writer.videos, "added": writer.videos - before, "records": records,
            "split": split, "bytes": _size(out), "storage": writer.storage}


def _check_levels(manifest: dict, arrays: dict):
  missing = levels_lib.unscorable(manifest["levels"], manifest["task"], manifest["pooled_levels"],
                                  "regions" in arrays)
  if missing:
    raise ValueError(f"the model gives no region tokens, so levels {missing} cannot be indexed; they need "
                     "loss.levels.<level>=0")


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def verify(path: str) -> int:
  """`varcmp index --verify INDEX`: every problem on its own line (stderr), exit status 1 if any."""
  try:
    manifest = manifest_lib.read(path)
    problems = verify_lib.check(path, manifest, full=True, progress=True)
  except StoreError as e:
    problems = [e]
  if problems:
    print("\n".join(f"varcmp index: {problem}" for problem in problems), file=sys.stderr)
    return 1
  print(f"index {path}: {manifest['videos']} videos in {len(manifest['shards'])} shards, every file's size, "
        "checksum and rows checked: no problem")
  return 0


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="varcmp index", description=__doc__.split("\n")[0])
  parser.add_argument("--verify", metavar="INDEX", help="check an index (sizes, checksums, non-finite rows) and exit")
  parser.add_argument("--workdir", help="a `varcmp train` workdir")
  parser.add_argument("--records", help="records directory (`varcmp prep` output)")
  parser.add_argument("--out", help="index directory (created, resumed, or appended to)")
  parser.add_argument("--split", default=None, help="split to index (default: the run's config.data.eval_split)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--append", action="store_true", help="add these records to an existing index")
  parser.add_argument("--storage", choices=("auto",) + codec.STORAGES, default=None,
                      help="per-snippet vectors: int4/int8 codes with a scale each, or float16 (default: the "
                           f"index's own; auto for a new one: int4 at widths >= {codec.AUTO_INT4_DIM}, else float16)")
  parser.add_argument("--shard-mb", type=float, default=layout_lib.DEFAULT_SHARD_BYTES / 2**20,
                      help="disk size of a shard, MiB (default %(default)g; a resume re-embeds one)")
  parser.add_argument("--shard-size", type=int, default=None, help="videos per shard (instead of --shard-mb)")
  args = parser.parse_args(argv)
  if args.verify is not None:
    if any(v is not None for v in (args.workdir, args.records, args.out)):
      parser.error("--verify INDEX takes no --workdir, --records or --out")
    return verify(args.verify)
  missing = [f"--{name}" for name in ("workdir", "records", "out") if getattr(args, name) is None]
  if missing:
    parser.error(f"the following arguments are required: {', '.join(missing)} (or --verify INDEX)")
  if (args.shard_size is not None and args.shard_size < 1) or not args.shard_mb > 0:
    parser.error("--shard-size must be >= 1 and --shard-mb > 0")

  from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
  try:
    writer_lib.check_out(args.out, args.append)      # before the model loads
    run = trained.load(args.workdir, args.step)
    result = build(run, args.records, args.out, args.split or run.config.data.eval_split, args.append,
                   args.shard_size, int(args.shard_mb * 2**20), args.storage)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise SystemExit(f"varcmp index: {e}") from None
  except OSError as e:
    raise SystemExit(f"varcmp index: cannot write {args.out}: {e} (what was committed is kept; run the same "
                     "command again to resume)") from None
  print(f"index {result['index']}: {result['videos']} videos ({result['added']} added from {result['records']}, "
        f"split {result['split']}), {result['storage']} vectors, {result['bytes'] / 2**20:.1f} MiB\n"
        f"search it: varcmp search --index {result['index']} "
        + ("--text \"...\"" if run.config.task == "text" else "--audio FILE"))
  return 0
