"""Input pipeline throughput: `varcmp prep` records/s and Grain reader batches/s (workers 0, 2, 4).

  python benchmarks/input_pipeline.py                       # full size: 200 videos, T=32, 224 px, batch 64
  python benchmarks/input_pipeline.py --videos 16 --snippets 8 --image-size 64 --batch 8 --batches 20

prep: `varcmp synth` writes the videos (untimed), then `varcmp prep --dataset folder` is timed end to end
(decode, resize, log-mel, tokenize, write). Without data_prep.synth it preps the real clips of
../shared/data/xd_clips instead (--clips).
reader: the train iterator of varcmp_jax.data.pipeline over the prep output (or, when prep is not
available, over random frame records of the same shapes), timed over --batches batches after the first
one (which includes spawning the workers).
"""
import argparse
import csv
import json
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
from varcmp_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CLIPS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "xd_clips"


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
    print(f"synth: {args.videos} videos in {time.perf_counter() - start:.1f} s (untimed for prep)")
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
  print(f"prep: {written} records from {source} in {seconds:.1f} s = {written / seconds:.2f} records/s")
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
  config = config_lib.default_config("audio", "frames")
  config.data.records = records_dir
  config.data.snippets = args.snippets
  config.data.worker_count = workers
  split = "train" if "train" in pipeline.read_manifest(records_dir)["splits"] else next(
      iter(pipeline.read_manifest(records_dir)["splits"]))
  config.data.train_split = split
  it = pipeline.make_train_iterator(config, args.batch, seed=0)
  next(it)   # worker start-up and the first read are not steady state
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["frames"].shape == (args.batch, args.snippets, args.image_size, args.image_size, 3)
  del it
  return args.batches / seconds


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--videos", type=int, default=200)
  parser.add_argument("--snippets", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
  parser.add_argument("--clips", default="", help="prep these real clips instead of synthetic videos")
  parser.add_argument("--skip-prep", action="store_true", help="reader only, on random frame records")
  args = parser.parse_args(argv)

  print(f"host: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    records_dir, figures = (None, {}) if args.skip_prep else bench_prep(args, work)
    if records_dir is None:
      records_dir = random_frame_records(args, work / "random_records")
      print(f"reader: over {args.videos} random frame records")
    for workers in args.workers:
      rate = bench_reader(records_dir, args, workers)
      figures[f"reader_batches_per_s_workers_{workers}"] = rate
      print(f"reader: workers={workers}: {rate:.2f} batches/s = {rate * args.batch:.1f} records/s "
            f"(batch {args.batch}, T={args.snippets}, {args.image_size} px)")
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":   # Grain spawns its workers: they re-import this module.
  sys.exit(main(sys.argv[1:]))
