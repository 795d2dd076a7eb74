"""`varcmp prep`: videos + captions table -> ArrayRecord shards (one record per video) + manifest.json.

Crash safety: the videos of each split are cut into fixed shards of --shard-size consecutive table rows,
so a shard's content depends on the table alone. A shard is written under a temp name, renamed when
complete, and then recorded in DIR/journal/<shard>.json (its record count, videos, skips). A rerun of the
same command skips journaled shards and redoes the rest, so every video lands in exactly one shard once.
Bad videos or captions are skipped with a reason (listed in the manifest); the job exits 0 when it ran to
the end, and non-zero only for bad arguments, an unreadable captions table or an unwritable output.
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from data_prep import datasets
from data_prep.decode import DecodeError, DecodeOptions, decode

JOB_FILE = "job.json"
JOURNAL_DIR = "journal"
# The arguments that decide what goes into the shards: a rerun must match them to resume.
JOB_KEYS = ("dataset", "videos", "captions", "task", "snippets", "image_size", "shard_size", "mel_bins",
            "mel_frames", "split_lists")


def check_caption(caption, task: str) -> tuple[str | None, str | None]:
  """(caption text, None) or (None, reason). The audio task does not need a caption (the query is audio)."""
  if task == "audio":
    return (caption.strip() if isinstance(caption, str) else ""), None
  if not isinstance(caption, str):
    return None, f"caption is not text ({type(caption).__name__}: {caption!r:.40})"
  if not caption.strip():
    return None, "empty caption"
  return caption.strip(), None


def make_record(item: datasets.Item, caption: str, options: DecodeOptions) -> dict:
  """Decodes one video into its record (without tokens); raises DecodeError."""
  decoded = decode(item.path, options)
  record = {
      "video": item.video, "caption": caption, "label": np.int32(item.label), "split": item.split,
      "duration": np.float32(decoded["duration"]), "times": decoded["times"],
      "event": datasets.event_seconds(item, decoded["fps"]), "frames": decoded["frames"],
  }
  if "mel" in decoded:
    record["mel"] = decoded["mel"]
  return record


def process(job) -> tuple[str, object]:
  """Worker: ("ok", record) or ("skip", reason). Never raises: bad input must not stop the job."""
  item, caption, options = job
  try:
    return "ok", make_record(item, caption, options)
  except DecodeError as e:
    return "skip", e.reason
  except Exception as e:   # a decoder or numpy failure on one odd file skips that file only
    return "skip", f"{type(e).__name__}: {e}"


def plan_shards(items: list[datasets.Item], shard_size: int) -> list[tuple[str, str, list[datasets.Item]]]:
  """[(split, shard file name, items)], in table order within each split."""
  by_split = {}
  for item in items:
    by_split.setdefault(item.split, []).append(item)
  shards = []
  for split in sorted(by_split):
    members = by_split[split]
    count = math.ceil(len(members) / shard_size)
    for k in range(count):
      name = f"{split}-{k:05d}-of-{count:05d}.array_record"
      shards.append((split, name, members[k * shard_size:(k + 1) * shard_size]))
  return shards


def write_json(path: str, value) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


def read_journal(out_dir: str) -> dict[str, dict]:
  journal_dir = os.path.join(out_dir, JOURNAL_DIR)
  done = {}
  for name in sorted(os.listdir(journal_dir)):
    if name.endswith(".json"):
      with open(os.path.join(journal_dir, name), encoding="utf-8") as f:
        entry = json.load(f)
      if entry["records"] == 0 or os.path.exists(os.path.join(out_dir, entry["shard"])):
        done[entry["shard"]] = entry
  return done


class ShardWriter:
  """Collects one shard's records in a temp ArrayRecord file and publishes it when complete."""

  def __init__(self, out_dir: str, split: str, name: str):
    self.out_dir, self.split, self.name = out_dir, split, name
    self.tmp = os.path.join(out_dir, name + ".tmp")
    self.writer = None
    self.videos, self.skipped, self.shapes, self.dtypes = [], [], {}, {}

  def add(self, record: dict, encoded: bytes):
    from array_record.python.array_record_module import ArrayRecordWriter
    if self.writer is None:
      self.writer = ArrayRecordWriter(self.tmp, "group_size:1")
    self.writer.write(encoded)
    self.videos.append(record["video"])
    for key, value in record.items():
      if isinstance(value, np.ndarray) or np.isscalar(value) and not isinstance(value, str):
        self.shapes.setdefault(key, list(np.shape(value)))
        self.dtypes.setdefault(key, str(np.asarray(value).dtype))

  def finish(self) -> dict:
    if self.writer is not None:
      self.writer.close()
      os.replace(self.tmp, os.path.join(self.out_dir, self.name))
    entry = {"shard": self.name, "split": self.split, "records": len(self.videos), "videos": self.videos,
             "skipped": self.skipped, "shapes": self.shapes, "dtypes": self.dtypes}
    write_json(os.path.join(self.out_dir, JOURNAL_DIR, self.name + ".json"), entry)
    return entry


def build_manifest(out_dir: str, job: dict, shards, done: dict[str, dict], early_skips: list[dict]) -> dict:
  splits, skipped = {}, list(early_skips)
  for split, name, _ in shards:
    entry = done[name]
    info = splits.setdefault(split, {"records": 0, "shards": [], "shapes": {}, "dtypes": {}, "mel_records": 0})
    info["records"] += entry["records"]
    if entry["records"]:
      info["shards"].append(name)
    for key, shape in entry["shapes"].items():
      info["shapes"].setdefault(key, shape)
      info["dtypes"].setdefault(key, entry["dtypes"][key])
    info["mel_records"] += entry["records"] if "mel" in entry["shapes"] else 0
    skipped += entry["skipped"]
  return {"splits": splits, "skipped": skipped, "format": "array_record", "record_codec": "varcmp_jax.data.records",
          **{k: job[k] for k in JOB_KEYS}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def parse_args(argv):
  p = argparse.ArgumentParser(prog="varcmp prep", description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, choices=sorted(datasets.READERS))
  p.add_argument("--videos", required=True, help="directory of the video files")
  p.add_argument("--captions", required=True,
                 help="folder: the csv; ucfcrime_ar: directory with the xlsx files (+ split lists); "
                      "xdviolence_ar: directory with audio.list / audio_test.list")
  p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
  p.add_argument("--task", default="text", choices=("text", "audio"),
                 help="audio: videos without an audio track are skipped; text: mel is stored when there is audio")
  p.add_argument("--snippets", type=int, default=32)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--mel-bins", type=int, default=64)
  p.add_argument("--mel-frames", type=int, default=96)
  p.add_argument("--split-lists", nargs="+", default=None,
                 help="split list files (name contains 'test' -> test split); default: the official lists next to --captions")
  p.add_argument("--shard-size", type=int, default=256, help="videos per shard")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes; 0 = in this process")
  p.add_argument("--overwrite", action="store_true", help="discard a previous job in --out instead of resuming it")
  args = p.parse_args(argv)
  if args.snippets < 1 or args.image_size < 8 or args.shard_size < 1 or args.workers < 0:
    p.error("--snippets >= 1, --image-size >= 8, --shard-size >= 1 and --workers >= 0 are required")
  if args.mel_bins < 1 or args.mel_frames < 1:
    p.error("--mel-bins and --mel-frames must be >= 1")
  if not os.path.isdir(args.videos):
    p.error(f"--videos {args.videos}: not a directory")
  return args


def prepare_out(args, job: dict) -> None:
  """Creates --out and its journal; refuses to mix a different job into existing shards."""
  os.makedirs(os.path.join(args.out, JOURNAL_DIR), exist_ok=True)
  job_path = os.path.join(args.out, JOB_FILE)
  if os.path.exists(job_path) and not args.overwrite:
    with open(job_path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous != job:
      differ = sorted(k for k in JOB_KEYS if previous.get(k) != job.get(k))
      raise ValueError(f"{args.out} holds a different prep job (differs in {differ}); use another --out or --overwrite")
  for name in os.listdir(args.out):   # unfinished shards of a killed run are redone from scratch
    if name.endswith(".array_record.tmp") or args.overwrite and (name.endswith(".array_record") or name == "manifest.json"):
      os.remove(os.path.join(args.out, name))
  if args.overwrite:
    for name in os.listdir(os.path.join(args.out, JOURNAL_DIR)):
      os.remove(os.path.join(args.out, JOURNAL_DIR, name))
  write_json(job_path, job)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  job = {"dataset": args.dataset, "videos": os.path.abspath(args.videos), "captions": os.path.abspath(args.captions),
         "task": args.task, "snippets": args.snippets, "image_size": args.image_size, "shard_size": args.shard_size,
         "mel_bins": args.mel_bins, "mel_frames": args.mel_frames,
         "split_lists": [os.path.abspath(p) for p in args.split_lists] if args.split_lists else None}
  try:
    items = datasets.read(args.dataset, args.videos, args.captions, args.split_lists)
  except datasets.TableError as e:
    print(f"varcmp prep: {e}", file=sys.stderr)
    return 2
  try:
    prepare_out(args, job)
  except ValueError as e:
    print(f"varcmp prep: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"varcmp prep: cannot write to --out {args.out}: {e}", file=sys.stderr)
    return 1

  # Duplicate names are dropped up front (deterministically), so the shard plan is a function of the table.
  unique, early_skips, seen = [], [], set()
  for item in items:
    key = (item.split, item.video)
    if key in seen:
      early_skips.append({"video": item.video, "reason": f"duplicate entry in the {item.split} split"})
      continue
    seen.add(key)
    unique.append(item)
  shards = plan_shards(unique, args.shard_size)
  done = read_journal(args.out)
  todo = [shard for shard in shards if shard[1] not in done]

  from varcmp_jax import clip                      # jax/flax only in the parent, not in decoding workers
  from varcmp_jax.data.records import encode_record
  tokenize = clip.tokenizer()
  options = DecodeOptions(snippets=args.snippets, image_size=args.image_size,
                          audio="required" if args.task == "audio" else "optional",
                          mel_bins=args.mel_bins, mel_frames=args.mel_frames)

  # One ordered stream of jobs over all pending shards; caption problems are settled here, not in workers.
  jobs, owners = [], []
  writers = {name: ShardWriter(args.out, split, name) for split, name, _ in todo}
  pending = {name: len(members) for _, name, members in todo}
  for split, name, members in todo:
    for item in members:
      caption, reason = check_caption(item.caption, args.task)
      if reason:
        writers[name].skipped.append({"video": item.video, "reason": reason})
        pending[name] -= 1
      else:
        jobs.append((item, caption, options))
        owners.append(name)

  total = sum(len(members) for *_, members in shards)
  progress = tqdm(total=total, initial=total - len(jobs), desc="prep", unit="video")
  for name in [n for n, left in pending.items() if left == 0]:
    done[name] = writers.pop(name).finish()

  def consume(results):
    for (item, caption, _), name, (status, value) in zip(jobs, owners, results):
      writer = writers[name]
      if status == "ok":
        value["tokens"] = tokenize([caption])[0].astype(np.int32)
        writer.add(value, encode_record(value))
      else:
        writer.skipped.append({"video": item.video, "reason": value})
      pending[name] -= 1
      if pending[name] == 0:
        done[name] = writers.pop(name).finish()
      progress.update()
      progress.set_postfix(skipped=sum(len(w.skipped) for w in writers.values())
                           + sum(len(e["skipped"]) for e in done.values()), refresh=False)

  if args.workers and jobs:
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
      consume(pool.imap(process, jobs, chunksize=1))
  else:
    consume(map(process, jobs))
  progress.close()

  manifest = build_manifest(args.out, job, shards, done, early_skips)
  write_json(os.path.join(args.out, "manifest.json"), manifest)
  records = sum(s["records"] for s in manifest["splits"].values())
  print(f"varcmp prep: wrote {records} records in "
        f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards to {args.out}; "
        f"skipped {len(manifest['skipped'])} videos (reasons in manifest.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
