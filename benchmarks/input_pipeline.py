"""Input pipeline throughput: `varcmp prep` records/s and Grain batches/s (workers 0, 2, 4); with --features,
Grain against device-resident data on the same feature records.

  python benchmarks/input_pipeline.py                       # full size: 200 videos, T=32, 224 px, batch 64
  python benchmarks/input_pipeline.py --videos 16 --snippets 8 --image-size 64 --batch 8 --batches 20
  python benchmarks/input_pipeline.py --features --snippets 256 --batch 128 [--json FILE]

prep: `varcmp synth` writes the videos (untimed), then `varcmp prep --dataset folder` is timed end to end
(decode, resize, log-mel, tokenize, write). Without data_prep.synth it preps the real clips of
../shared/data/xd_clips instead (--clips).
reader: the train iterator of varcmp_jax.data.pipeline over the prep output (or, when prep is not
available, over random frame records of the same shapes), timed over --batches batches after the first
one (which includes spawning the workers).
--features: random float16 feature records (T x D features, T x R x D regions; 2 x batch records unless
--videos says otherwise). Grain: the train iterator's next batch placed on the devices (what a train step
waits for), per worker count, the best of them reported as grain_batches_per_s. Resident: the split placed on
the devices once (resident_load_s), then per batch its row numbers placed and the on-device gather into the
buffers of the spent batch, blocked until ready (resident_batches_per_s). Both in one run, on the same
records and devices.

Output (benchmarks/run_all.py's convention): each phase printed as it happens, each figure a table row the
moment it is measured (| stage | workers | batches/s | records/s | ms/batch | start-up s |; start-up = the first
batch: Grain's worker start-up and first read, or the resident split placed on the devices plus the gather's
compilation), then the ratio line `resident / grain (best, workers=N): X.Xx`.
"""
import argparse
import csv
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from varcmp_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax.data import pipeline, records, resident  # pylint: disable=g-import-not-at-top,wrong-import-position
from varcmp_jax.train import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from report import Table  # pylint: disable=g-import-not-at-top,wrong-import-position  # benchmarks/report.py

DEFAULT_CLIPS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "xd_clips"
TABLE = Table("stage", "workers", "batches/s", "records/s", "ms/batch", "start-up s")


def real_clip_inputs(clips_dir: pathlib.Path, out: pathlib.Path) -> tuple[str, str]:
  """A folder-dataset captions csv over the real XD-Violence clips."""
  names = sorted(p.name for p in clips_dir.glob("*.mp4"))
  if not names:
    raise FileNotFoundError(f"{clips_dir}: no .mp4 clips")
  captions = out / "captions.csv"
  with open(captions, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "caption", "label", "split"])
    for name in names:
      writer.writerow([name, f"a clip of {name[:-4]}", int(not name.startswith("n")), "train"])
  return str(clips_dir), str(captions)


def bench_prep(args, work: pathlib.Path) -> tuple[str | None, dict]:
  """Returns (records dir or None, figures)."""
  try:
    from data_prep import prep  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"prep: skipped, data_prep.prep is not importable ({e})")
    return None, {}
  try:
    from data_prep import synth  # pylint: disable=g-import-not-at-top
  except ImportError:
    synth = None
  if synth is not None and not args.clips:
    videos = work / "videos"
    start = time.perf_counter()
    assert synth.main(["--out", str(videos), "--videos", str(args.videos), "--seed", "0"]) == 0
    print(f"synth: {args.videos} videos in {time.perf_counter() - start:.1f} s (untimed for prep)", flush=True)
    videos_dir, captions = str(videos), str(videos / "captions.csv")
    source = f"{args.videos} synthetic videos"
  else:
    videos_dir, captions = real_clip_inputs(pathlib.Path(args.clips or DEFAULT_CLIPS), work)
    source = f"the real clips of {args.clips or DEFAULT_CLIPS}"
  out = work / "records"
  start = time.perf_counter()
  rc = prep.main(["--dataset", "folder", "--videos", videos_dir, "--captions", captions, "--out", str(out),
                  "--task", "audio", "--snippets", str(args.snippets), "--image-size", str(args.image_size)])
  seconds = time.perf_counter() - start
  if rc != 0:
    raise RuntimeError(f"prep exited with {rc}")
  manifest = pipeline.read_manifest(str(out))
  written = sum(s["records"] for s in manifest["splits"].values())
  print(f"prep: {written} records from {source} in {seconds:.1f} s", flush=True)
  TABLE.row("varcmp prep", "prep's default", "-", f"{written / seconds:.2f}", "-", "-")
  return str(out), {"prep_records": written, "prep_seconds": seconds, "prep_records_per_s": written / seconds}


def random_frame_records(args, out: pathlib.Path) -> str:
  """Frame records with prep's shapes, for the reader benchmark when prep is not available."""
  rng = np.random.default_rng(0)
  out.mkdir(parents=True, exist_ok=True)
  writer = ArrayRecordWriter(str(out / "train-00000.array_record"), "group_size:1")
  for i in range(args.videos):
    t = args.snippets
    writer.write(records.encode_record(dict(
        video=f"v{i}.mp4", caption=f"caption {i}", tokens=np.zeros(77, np.int32), label=np.int32(i % 2),
        split="train", duration=np.float32(t), times=np.zeros((t, 2), np.float32),
        event=np.array([-1, -1], np.float32),
        frames=rng.integers(0, 256, (t, args.image_size, args.image_size, 3), dtype=np.uint8),
        mel=rng.normal(size=(t, 96, 64)).astype(np.float16))))
  writer.close()
  (out / "manifest.json").write_text(json.dumps(
      {"splits": {"train": {"records": args.videos, "shards": ["train-00000.array_record"]}}, "skipped": []}))
  return str(out)


def bench_reader(records_dir: str, args, workers: int) -> float:
  """Frame batches/s of the train iterator, after its first batch; the row printed."""
  config = config_lib.default_config("audio", "frames")
  config.data.records = records_dir
  config.data.snippets = args.snippets
  config.data.worker_count = workers
  config.model.clip.vision.image_size = args.image_size   # the records' frame size (the pipeline checks it)
  split = "train" if "train" in pipeline.read_manifest(records_dir)["splits"] else next(
      iter(pipeline.read_manifest(records_dir)["splits"]))
  config.data.train_split = split
  it = pipeline.make_train_iterator(config, args.batch, seed=0)
  start = time.perf_counter()
  next(it)   # worker start-up and the first read are not steady state
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["frames"].shape == (args.batch, args.snippets, args.image_size, args.image_size, 3)
  del it
  TABLE.row(f"reader (frames, T={args.snippets}, {args.image_size} px)", workers, f"{args.batches / seconds:.2f}",
            f"{args.batches * args.batch / seconds:.1f}", f"{1e3 * seconds / args.batches:.1f}", f"{first_s:.1f}")
  return args.batches / seconds


def features_config(args, records_dir: str, workers: int = 0):
  config = config_lib.default_config("text", "features")
  config.model.clip.projection_dim = args.dim
  config.model.region_grid = math.isqrt(args.regions)
  config.data.update(records=records_dir, snippets=args.snippets, worker_count=workers)
  config.train.batch_size = args.batch
  return config


def bench_features(args, work: pathlib.Path) -> dict:
  """Grain vs resident batches/s on the same feature records, in this process."""
  from train_step import write_random_records  # pylint: disable=g-import-not-at-top  # benchmarks/train_step.py
  import jax  # pylint: disable=g-import-not-at-top
  if math.isqrt(args.regions) ** 2 != args.regions:
    raise SystemExit(f"input_pipeline: --regions {args.regions} is not a square (a grid x grid of regions)")
  count = args.videos or 2 * args.batch
  records_dir = work / "feature_records"
  records_dir.mkdir()
  config = features_config(args, str(records_dir))
  start = time.perf_counter()
  write_random_records(str(records_dir), config, count)
  mesh = sharding.make_mesh(config.mesh)
  batch_bytes = args.batch * args.snippets * (1 + args.regions) * args.dim * 2
  figures = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "records": count,
             "batch": args.batch, "snippets": args.snippets, "dim": args.dim, "regions": args.regions,
             "float16_batch_mib": batch_bytes / 2 ** 20}
  print(f"features: {count} records of T={args.snippets} x (1 + R={args.regions}) x D={args.dim} float16 written in "
        f"{time.perf_counter() - start:.1f} s; batch {args.batch} ({batch_bytes / 2 ** 20:.0f} MiB in float16) on "
        f"{figures['device']}", flush=True)

  grain_rates = {}
  for workers in args.workers:
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(features_config(args, str(records_dir), workers), args.batch, seed=0)
    jax.block_until_ready(sharding.shard_batch(next(iterator), mesh))   # worker start-up, first read
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = jax.block_until_ready(sharding.shard_batch(next(iterator), mesh))
    grain_rates[workers] = args.batches / (time.perf_counter() - start)
    assert batch["features"].shape == (args.batch, args.snippets, args.dim)
    del iterator
    figures[f"grain_batches_per_s_workers_{workers}"] = grain_rates[workers]
    TABLE.row("grain (next batch placed on the devices)", workers, f"{grain_rates[workers]:.2f}",
              f"{grain_rates[workers] * args.batch:.1f}", f"{1e3 / grain_rates[workers]:.1f}", f"{first_s:.1f}")

  start = time.perf_counter()
  split = resident.load(config, "train", sharding.batch_sharding(mesh), train=True)
  jax.block_until_ready(split.arrays)
  figures["resident_load_s"] = time.perf_counter() - start
  print(f"resident: the split placed on the devices in {figures['resident_load_s']:.1f} s", flush=True)
  devices = mesh.size
  sampler = resident.EpochSampler(0, split.rows, args.batch // devices, split.blocks, devices)
  start = time.perf_counter()
  batch = jax.block_until_ready(split.gather(split.device_rows(sampler.next())))
  batch = jax.block_until_ready(split.gather(split.device_rows(sampler.next()), into=batch))  # compiles
  print(f"resident: gather compiled in {time.perf_counter() - start:.1f} s (first two batches)", flush=True)
  first_s = figures["resident_load_s"] + time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.resident_batches):   # each batch into the buffers of the spent one
    batch = jax.block_until_ready(split.gather(split.device_rows(sampler.next()), into=batch))
  figures["resident_batches_per_s"] = args.resident_batches / (time.perf_counter() - start)
  assert batch["features"].shape == (args.batch, args.snippets, args.dim) and batch["features"].dtype == np.float16
  best = max(grain_rates, key=grain_rates.get)
  figures["grain_batches_per_s"] = grain_rates[best]
  figures["resident_over_grain"] = figures["resident_batches_per_s"] / grain_rates[best]
  rate = figures["resident_batches_per_s"]
  TABLE.row("resident (row numbers placed + on-device gather)", "-", f"{rate:.1f}", f"{rate * args.batch:.1f}",
            f"{1e3 / rate:.2f}", f"{first_s:.1f}")
  print(f"resident / grain (best, workers={best}): {figures['resident_over_grain']:.1f}x", flush=True)
  return figures


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--videos", type=int, default=None, help="default 200; --features: 2 x batch records")
  parser.add_argument("--snippets", type=int, default=32)
  parser.add_argument("--features", action="store_true", help="Grain vs device-resident data on feature records")
  parser.add_argument("--dim", type=int, default=512, help="--features: width D")
  parser.add_argument("--regions", type=int, default=4, help="--features: region tokens R (a square)")
  parser.add_argument("--resident-batches", type=int, default=200, help="--features: timed resident batches")
  parser.add_argument("--json", default=None, help="also write the figures here")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
  parser.add_argument("--clips", default="", help="prep these real clips instead of synthetic videos")
  parser.add_argument("--skip-prep", action="store_true", help="reader only, on random frame records")
  args = parser.parse_args(argv)

  print(f"host: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
  if args.features:
    with tempfile.TemporaryDirectory() as tmp:
      figures = bench_features(args, pathlib.Path(tmp))
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
  args.videos = args.videos or 200
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    records_dir, figures = (None, {}) if args.skip_prep else bench_prep(args, work)
    if records_dir is None:
      records_dir = random_frame_records(args, work / "random_records")
      print(f"reader: over {args.videos} random frame records", flush=True)
    for workers in args.workers:
      figures[f"reader_batches_per_s_workers_{workers}"] = bench_reader(records_dir, args, workers)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=2))
  return 0


if __name__ == "__main__":   # Grain spawns its workers: they re-import this module.
  sys.exit(main(sys.argv[1:]))
