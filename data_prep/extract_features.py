"""`varcmp extract-features`: frame records -> features records with the project's jitted image tower.

  varcmp extract-features --records DIR --clip CKPT --out DIR [--batch 512] [--dtype float16|bfloat16]
                          [--region-grid 2] [--compute-dtype bfloat16|float32]

For every snippet frame: g_t = the projected CLS token (`encode_image`) and r_{t,k} = the projected patch
tokens average-pooled onto a region_grid x region_grid layout, exactly what the frames regime of VarCMP
computes (`VarCMP.image_features`, same pooling function). Frames of consecutive videos share tower
batches of `--batch` frames (the last one zero-padded, so the tower compiles once).

Output records keep every field of the frame record except "frames" and add "features" (T, D) and
"regions" (T, R, D), stored as float16 or as bfloat16 (ml_dtypes.bfloat16 numpy arrays: flax msgpack
keeps the dtype name, the Grain pipeline casts either to float32). Each input shard becomes one output
shard of the same name, written under a temporary name and renamed when complete, so a killed job leaves
only complete shards and a rerun skips them. The manifest is written last.
"""
import argparse
import collections
import copy
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from varcmp_jax import clip
from varcmp_jax.data import pipeline, records
from varcmp_jax.model.regions import pool_regions

STORAGE_DTYPES = {"float16": np.float16, "bfloat16": jnp.bfloat16}


def make_embed_fn(model: clip.CLIP, params, region_grid: int, storage_dtype) -> Callable:
  """A jitted (N, S, S, 3) uint8 -> (g (N, D), r (N, R, D)) in `storage_dtype`."""
  grid = model.config.vision.grid

  @jax.jit
  def embed(params, frames):
    pixels = clip.normalize_pixels(frames).astype(model.config.dtype)
    cls, patches = model.apply({"params": params}, pixels, method=model.image_tokens)
    regions = pool_regions(patches, grid, region_grid)
    return cls.astype(storage_dtype), regions.astype(storage_dtype)

  return lambda frames: embed(params, frames)


def embed_videos(embed: Callable, videos: Iterable[tuple[Any, np.ndarray]], batch_size: int
                 ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """(key, frames (T, S, S, 3)) in order -> (key, g (T, D), r (T, R, D)) in the same order.

  Frames of consecutive videos are packed into full batches; one batch stays in flight on the device
  while the host decodes the next videos.
  """
  waiting = collections.deque()   # (key, T) whose outputs are not all computed yet
  queued, num_queued = [], 0      # frames not yet sent to the device
  in_flight = None                # (device outputs, number of real rows)
  done_g, done_r, num_done = [], [], 0

  def dispatch(final: bool):
    nonlocal queued, num_queued, in_flight, num_done
    chunk = np.concatenate(queued)
    rows = min(batch_size, len(chunk))
    batch = chunk[:rows]
    if rows < batch_size:   # zero-pad the last batch: one compiled shape
      batch = np.concatenate([batch, np.zeros((batch_size - rows,) + batch.shape[1:], batch.dtype)])
    queued, num_queued = [chunk[rows:]], len(chunk) - rows
    previous, in_flight = in_flight, (embed(batch), rows)
    if previous is not None:
      collect(previous)
    if final:
      collect(in_flight)
      in_flight = None

  def collect(outputs):
    nonlocal num_done
    (g, r), rows = outputs
    done_g.append(np.asarray(g)[:rows])
    done_r.append(np.asarray(r)[:rows])
    num_done += rows

  def finished():
    nonlocal done_g, done_r, num_done
    while waiting and waiting[0][1] <= num_done:
      key, length = waiting.popleft()
      g, r = np.concatenate(done_g), np.concatenate(done_r)
      done_g, done_r, num_done = [g[length:]], [r[length:]], num_done - length
      yield key, g[:length], r[:length]

  for key, frames in videos:
    waiting.append((key, len(frames)))
    queued.append(frames)
    num_queued += len(frames)
    while num_queued >= batch_size:
      dispatch(final=False)
      yield from finished()
  while num_queued > 0 or in_flight is not None:
    if num_queued > 0:
      dispatch(final=num_queued <= batch_size)
    else:
      collect(in_flight)
      in_flight = None
    yield from finished()


def _num_records(path: str) -> int:
  reader = ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def _read_shard(path: str, image_size: tuple[int, int]) -> Iterator[tuple[dict, np.ndarray]]:
  reader = ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      record = records.decode_record(reader.read([i])[0])
      frames = record.pop("frames", None)
      if frames is None:
        raise ValueError(f"{path}: record {i} ({record.get('video', '?')!r}) has no 'frames'; "
                         "extract-features reads frame records written by `varcmp prep`")
      if (frames.ndim != 4 or not len(frames) or tuple(frames.shape[1:]) != (*image_size, 3)
          or frames.dtype != np.uint8):
        raise ValueError(f"{path}: record {i} ({record.get('video', '?')!r}) has frames {frames.dtype}"
                         f"{list(frames.shape)}; the CLIP tower needs uint8 (T>0, {image_size[0]}, {image_size[1]}, 3)")
      yield record, frames
  finally:
    reader.close()


def _write_json(path: pathlib.Path, value: Any):
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


def extract(records_dir: str, clip_dir: str, out_dir: str, batch_size: int = 512, dtype: str = "float16",
            region_grid: int = 2, compute_dtype: str = "bfloat16") -> dict[str, Any]:
  """Writes the features records and manifest into `out_dir`; returns the manifest."""
  if batch_size < 1:
    raise ValueError(f"--batch must be >= 1, got {batch_size}")
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
  manifest_in = pipeline.read_manifest(records_dir)
  shards = {split: pipeline.shard_paths(records_dir, split) for split in manifest_in["splits"]}
  model, params = clip.load(clip_dir, dtype=compute_dtype)
  vision = model.config.vision
  image_size = ((vision.image_size, vision.image_size) if isinstance(vision.image_size, int)
                else tuple(vision.image_size))
  embed = make_embed_fn(model, params, region_grid, STORAGE_DTYPES[dtype])
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)

  # Shards already complete from an earlier run are kept; anything else is (re)written.
  todo = []
  for split, paths in shards.items():
    for path, name in zip(paths, manifest_in["splits"][split]["shards"]):
      target = out / name
      if target.is_file() and _num_records(str(target)) == _num_records(path):
        continue
      todo.append((path, target))
  total = sum(_num_records(p) for p, _ in todo)

  with tqdm.tqdm(total=total, unit="video", desc="extract-features") as bar:
    for path, target in todo:
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(target.name + ".tmp")
      writer = ArrayRecordWriter(str(tmp), "group_size:1")
      for record, g, r in embed_videos(embed, _read_shard(path, image_size), batch_size):
        writer.write(records.encode_record({**record, "features": g, "regions": r}))
        bar.update(1)
      writer.close()
      os.replace(tmp, target)

  manifest = copy.deepcopy(manifest_in)
  manifest["regime"] = "features"
  manifest["features"] = dict(
      source=str(records_dir), clip=str(clip_dir), dtype=dtype, compute_dtype=compute_dtype,
      dim=model.config.projection_dim, region_grid=region_grid, regions=region_grid ** 2)
  for split, entry in manifest["splits"].items():
    entry["records"] = sum(_num_records(str(out / name)) for name in entry["shards"])
    # prep's per-split shape/dtype summaries describe "frames": describe the new fields instead.
    shapes, dtypes = entry.get("shapes"), entry.get("dtypes")
    if isinstance(shapes, dict) and isinstance(dtypes, dict):
      snippets = (shapes.pop("frames", None) or ["T"])[0]
      dtypes.pop("frames", None)
      shapes["features"] = [snippets, model.config.projection_dim]
      shapes["regions"] = [snippets, region_grid ** 2, model.config.projection_dim]
      dtypes["features"] = dtypes["regions"] = dtype
  _write_json(out / "manifest.json", manifest)
  return manifest


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="varcmp extract-features",
      description="Run the jitted CLIP image tower over frame records and write features records.")
  parser.add_argument("--records", required=True, help="frame records directory (written by `varcmp prep`)")
  parser.add_argument("--clip", required=True, help="HF CLIPModel directory or `varcmp import-clip` output")
  parser.add_argument("--out", required=True, help="output directory for the features records")
  parser.add_argument("--batch", type=int, default=512, help="frames per tower call")
  parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16",
                      help="storage dtype of features/regions")
  parser.add_argument("--region-grid", type=int, default=2, help="patch tokens pooled on a GxG grid: R = G**2")
  parser.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="tower compute dtype")
  args = parser.parse_args(argv)
  try:
    manifest = extract(args.records, args.clip, args.out, args.batch, args.dtype, args.region_grid,
                       args.compute_dtype)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"varcmp extract-features: error: {e}", file=sys.stderr)
    return 1
  counts = ", ".join(f"{split} {entry['records']}" for split, entry in manifest["splits"].items())
  print(f"Wrote features records ({counts}; D={manifest['features']['dim']}, R={manifest['features']['regions']}, "
        f"{args.dtype}) to {args.out}")
  return 0
