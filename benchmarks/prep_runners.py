"""`varcmp prep` local multiprocessing vs `--runner beam` (FnApiRunner, multi_processing), same videos and workers.

  python benchmarks/prep_runners.py                          # 200 synthetic videos, 2 workers, T=32, 96 px
  python benchmarks/prep_runners.py --videos 16 --workers 2 --image-size 224

`varcmp synth` writes the videos (untimed; --videos-dir reuses a folder). Each prep runs as its own
command (`python -m data_prep.prep ...`, imports and worker start-up included, as a user runs it), the
local one first; wall time and the CPU time of the command and its worker processes are printed, with the
ratio beam / local, and the two outputs are checked to hold the same record bytes in the same shards.
Output (benchmarks/run_all.py's convention): each phase as it happens, each runner's table row the moment it is
measured, then the ratio line `beam / local: X.XXx wall, X.XXx cpu`.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from array_record.python.array_record_module import ArrayRecordReader

from report import Table  # benchmarks/report.py

REPO = pathlib.Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> tuple[float, float]:
  """(wall s, CPU s of the command and its children) of one command that must succeed."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if result.returncode != 0:
    sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return wall, cpu


def shard_bytes(out: pathlib.Path) -> dict[str, list[bytes]]:
  manifest = json.loads((out / "manifest.json").read_text())
  shards = {}
  for info in manifest["splits"].values():
    for name in info["shards"]:
      reader = ArrayRecordReader(str(out / name))
      shards[name] = reader.read_all()
      reader.close()
  return shards


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--videos", type=int, default=200)
  p.add_argument("--videos-dir", default=None, help="a `varcmp synth` folder to reuse instead of writing one")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--snippets", type=int, default=32)
  p.add_argument("--image-size", type=int, default=96)
  p.add_argument("--shard-size", type=int, default=256)
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    videos = pathlib.Path(args.videos_dir) if args.videos_dir else work / "videos"
    if not args.videos_dir:
      start = time.perf_counter()
      subprocess.run([sys.executable, "-m", "data_prep.synth", "--out", str(videos), "--videos",
                      str(args.videos), "--seed", "0", "--workers", str(args.workers)],
                     cwd=REPO, check=True, capture_output=True)
      print(f"synth: {args.videos} videos written in {time.perf_counter() - start:.1f} s (untimed)", flush=True)
    count = sum(1 for _ in videos.glob("*.mp4"))
    print(f"{count} videos, T={args.snippets}, {args.image_size} px, {args.workers} workers, shard size "
          f"{args.shard_size}, load average {os.getloadavg()[0]:.1f}", flush=True)
    common = [sys.executable, "-m", "data_prep.prep", "--dataset", "folder", "--videos", str(videos),
              "--captions", str(videos / "captions.csv"), "--snippets", str(args.snippets), "--image-size",
              str(args.image_size), "--shard-size", str(args.shard_size), "--workers", str(args.workers)]
    figures, table = {}, Table("runner", "wall s", "cpu s", "videos/s")
    for runner in ("local", "beam"):
      print(f"  {runner}: prep started", flush=True)
      wall, cpu = figures[runner] = timed(common + ["--out", str(work / runner), "--runner", runner])
      table.row(runner, f"{wall:.1f}", f"{cpu:.1f}", f"{count / wall:.2f}")
    (local_wall, local_cpu), (beam_wall, beam_cpu) = figures["local"], figures["beam"]
    print(f"beam / local: {beam_wall / local_wall:.2f}x wall, {beam_cpu / local_cpu:.2f}x cpu", flush=True)
    print(f"same records in the same shards: {shard_bytes(work / 'local') == shard_bytes(work / 'beam')}", flush=True)


if __name__ == "__main__":
  main()
