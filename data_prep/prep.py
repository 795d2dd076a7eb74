"""`varcmp prep`: videos and/or a feature release + captions table -> ArrayRecord shards + manifest.json.

  varcmp prep --dataset folder --videos DIR --captions captions.csv --out RECORDS
  varcmp prep --dataset xdviolence_ar --captions LISTS_DIR --out RECORDS \
      --visual-features '/xd/i3d/{video}__{crop}.npy' --visual-clip-seconds 0.6667 \
      --audio-features '/xd/vggish/{video}__vggish.npy' --audio-clip-seconds 0.96

One record per table row (data_prep.row.build_record); the per-array work is data_prep.released. The rows
are decoded by a multiprocessing pool (run_local), or by an Apache Beam pipeline with --runner beam
(data_prep.beam_prep): the same job (start_job), shards (ShardWriter) and manifest (finish_job).
Crash safety: the videos of each split are cut into fixed shards of --shard-size consecutive table rows,
so a shard's content depends on the table alone. A shard is written under a temp name, renamed when
complete, and then recorded in DIR/journal/<shard>.json (its record count, videos, skips). A rerun of the
same command (same arguments, same table content) skips journaled shards and redoes the rest, so every
video lands in exactly one shard once. Bad videos, arrays or captions are skipped with a reason (listed in
the manifest, counted by reason on screen). Exit status: 0 when the job ran to the end and wrote records;
1 when it wrote none, could not write, or was interrupted (temp shards removed; rerun to resume); 2 for bad
arguments or an unreadable captions table.
"""
import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import uuid

import numpy as np
from tqdm import tqdm

from data_prep import datasets, released, row
from varcmp_jax.data import records_check
from data_prep.decode import DecodeOptions

JOB_FILE = "job.json"
JOURNAL_DIR = "journal"
# The arguments that decide what goes into the shards: a rerun must match them to resume. `table_sha256`
# is the content of the captions table as read (an edited table is a different job).
JOB_KEYS = ("dataset", "videos", "captions", "table_sha256", "task", "snippets", "image_size", "shard_size",
            "mel_bins", "mel_frames", "split_lists", "visual_features", "visual_clip_seconds", "audio_features",
            "audio_clip_seconds", "prior", "prior_clip_seconds", "crops")
# The fields whose presence varies by record: the manifest counts the records holding each.
COUNTED_FIELDS = ("frames", "mel", "features", "audio_features", "prior")
# (kind, the argument holding its pattern, its name in skip reasons); `--<kind>-clip-seconds` goes with each.
ARRAYS = (("visual", "visual_features", "visual features"), ("audio", "audio_features", "audio features"),
          ("prior", "prior", "prior"))


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


def write_atomic(path: str, data: bytes) -> None:
  """A reader sees the old file or the whole new one (a temp name per writer: two attempts at one shard, as
  a retrying runner may make, never share one)."""
  tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8"))


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
    self.tmp = os.path.join(out_dir, f"{name}.{uuid.uuid4().hex[:8]}.tmp")
    self.writer = None
    self.videos, self.skipped, self.shapes, self.dtypes = [], [], {}, {}
    self.fields = collections.Counter()
    self.caption_words = collections.Counter()    # words per caption (tokens between <BOS> and <EOS>)

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
    self.fields.update([k for k in COUNTED_FIELDS if k in record] + (["caption"] if record["caption"] else []))
    if record["caption"] and "tokens" in record:
      from varcmp_jax.clip.tokenizer import word_counts   # jax/flax: in the writer, not in decoding workers
      self.caption_words[int(word_counts(record["tokens"]))] += 1

  def put(self, video: str, status: str, value):
    """One row's build_record result, tokens included: a record is encoded and written, a skip listed."""
    if status == "ok":
      from varcmp_jax.data.records import encode_record   # flax: in the writer, not in decoding workers
      self.add(value, encode_record(value))
    else:
      self.skipped.append({"video": video, "reason": value})

  def finish(self) -> dict:
    if self.writer is not None:
      self.writer.close()
      os.replace(self.tmp, os.path.join(self.out_dir, self.name))
    entry = {"shard": self.name, "split": self.split, "records": len(self.videos), "videos": self.videos,
             "skipped": self.skipped, "shapes": self.shapes, "dtypes": self.dtypes,
             "fields": {"caption": 0, **self.fields}, "caption_words": {str(k): n for k, n in self.caption_words.items()}}
    write_json(os.path.join(self.out_dir, JOURNAL_DIR, self.name + ".json"), entry)
    return entry

  def discard(self):
    """An unfinished shard of a failed job: its temp file goes (the rerun writes it again)."""
    if self.writer is not None:
      self.writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def build_manifest(job: dict, shards, done: dict[str, dict], early_skips: list[dict], runner: str) -> dict:
  """Per split: records, shards, the shape and dtype of every field (from its first record) and `fields`,
  the number of records holding each optional field ("caption": those with a non-empty caption)."""
  splits, skipped = {}, list(early_skips)
  for split, name, _ in shards:
    entry = done[name]
    info = splits.setdefault(split, {"records": 0, "shards": [], "shapes": {}, "dtypes": {}, "fields": {},
                                     "mel_records": 0})
    info["records"] += entry["records"]
    if entry["records"]:
      info["shards"].append(name)
    for key, shape in entry["shapes"].items():
      info["shapes"].setdefault(key, shape)
      info["dtypes"].setdefault(key, entry["dtypes"][key])
    for key, count in entry.get("fields", {}).items():
      info["fields"][key] = info["fields"].get(key, 0) + count
    info["mel_records"] += entry.get("fields", {}).get("mel", 0)
    for words, n in entry.get("caption_words", {}).items():
      histogram = info.setdefault("caption_words", {})
      histogram[words] = histogram.get(words, 0) + n
    skipped += entry["skipped"]
  return {"splits": splits, "skipped": skipped, "format": "array_record", "record_codec": "varcmp_jax.data.records",
          **{k: job[k] for k in JOB_KEYS}, "runner": runner, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def reason_kind(reason: str) -> str:
  """A skip reason without its particulars (names, paths, numbers), to count skips by kind."""
  kind = re.split(r":| \(", reason, maxsplit=1)[0].strip()
  return re.sub(r"\d+(\.\d+)?", "N", kind) or reason


def skip_summary(skipped: list[dict], limit: int = 12) -> str:
  """Lines `count  kind  (e.g. video: reason)`, the most common kind first."""
  groups = collections.defaultdict(list)
  for skip in skipped:
    groups[reason_kind(skip["reason"])].append(skip)
  ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
  lines = [f"  {len(entries):6d}  {kind}  (e.g. {entries[0]['video']}: {entries[0]['reason']})"
           for kind, entries in ordered[:limit]]
  if len(ordered) > limit:
    lines.append(f"  {sum(len(e) for _, e in ordered[limit:]):6d}  other reasons (see manifest.json)")
  return "\n".join(lines)


def table_hash(items: list[datasets.Item]) -> str:
  """sha256 of the table as read: every row's name, caption, label, split, event and file."""
  rows = [[i.video, i.path, i.array_id, repr(i.caption), i.label, i.split, i.event, i.event_frames] for i in items]
  return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()


def parse_args(argv):
  p = argparse.ArgumentParser(prog="varcmp prep", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--dataset", required=True, choices=sorted(datasets.READERS))
  p.add_argument("--videos", default=None,
                 help="directory of the video files (optional with --visual-features: records without frames)")
  p.add_argument("--captions", required=True,
                 help="folder: the csv; ucfcrime_ar: directory with the xlsx files (+ split lists); "
                      "xdviolence_ar: directory with audio.list / audio_test.list")
  p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
  p.add_argument("--task", default=None, choices=("text", "audio"),
                 help="audio: videos without an audio track are skipped; text: mel is stored when there is audio. "
                      "Default: audio for xdviolence_ar (it has no captions), text otherwise")
  arrays = p.add_argument_group("feature releases", "per-video .npy arrays; row i covers [i S, (i+1) S] seconds")
  arrays.add_argument("--visual-features", metavar="PATTERN",
                      help="(N, D), (N, C, D) or one (N, D) file per {crop}: a path with {video} (the video id, no "
                           "extension) and optionally {crop} and glob wildcards, e.g. '/ucf/clip/*/{video}__{crop}.npy'")
  arrays.add_argument("--visual-clip-seconds", type=float, metavar="S", help="e.g. 16 frames at 24 fps: 0.666667")
  arrays.add_argument("--audio-features", metavar="PATTERN", help="(N, D), e.g. '/xd/vggish/*/{video}__vggish.npy'")
  arrays.add_argument("--audio-clip-seconds", type=float, metavar="S", help="VGGish: 0.96")
  arrays.add_argument("--prior", metavar="PATTERN", help="external per-clip anomaly scores in [0, 1], (N,) or (N, 1)")
  arrays.add_argument("--prior-clip-seconds", type=float, metavar="S")
  arrays.add_argument("--crops", default="mean",
                      help="visual features with crops ((N, C, D) or one file per {crop}): 'mean' averages them, a "
                           "number K keeps crop K only")
  p.add_argument("--snippets", type=int, default=32)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--mel-bins", type=int, default=64)
  p.add_argument("--mel-frames", type=int, default=96)
  p.add_argument("--split-lists", nargs="+", default=None,
                 help="split list files (name contains 'test' -> test split); default: the official lists next to --captions")
  p.add_argument("--shard-size", type=int, default=256, help="videos per shard")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="decoding processes; 0 = in this process (with --runner beam: the FnApiRunner's workers)")
  p.add_argument("--runner", default="local", choices=("local", "beam"),
                 help="local: a multiprocessing pool; beam: an Apache Beam pipeline (pip install 'varcmp-jax[beam]')")
  p.add_argument("--beam-options", default=None, metavar="FLAGS",
                 help="Beam pipeline options, given with '=': --beam-options='--runner=FnApiRunner "
                      "--direct_num_workers=4 --direct_running_mode=multi_processing' (the default, with --workers); "
                      "Dataflow, Flink or Spark options (README)")
  p.add_argument("--overwrite", action="store_true", help="discard a previous job in --out instead of resuming it")
  args = p.parse_args(argv)
  if args.snippets < 1 or args.image_size < 8 or args.shard_size < 1 or args.workers < 0:
    p.error("--snippets >= 1, --image-size >= 8, --shard-size >= 1 and --workers >= 0 are required")
  if args.beam_options is not None and args.runner != "beam":
    p.error("--beam-options goes with --runner beam")
  if args.mel_bins < 1 or args.mel_frames < 1:
    p.error("--mel-bins and --mel-frames must be >= 1")
  if args.videos is not None and not os.path.isdir(args.videos):
    p.error(f"--videos {args.videos}: not a directory")
  for kind, attribute, _ in ARRAYS:
    flag = attribute.replace("_", "-")
    pattern, seconds = getattr(args, attribute), getattr(args, f"{kind}_clip_seconds")
    if pattern is not None and "{video}" not in pattern:
      p.error(f"--{flag} {pattern}: the pattern needs {{video}} (the video id, no extension)")
    if pattern is not None and kind != "visual" and "{crop}" in pattern:
      p.error(f"--{flag} {pattern}: only visual features have crops")
    if (pattern is None) != (seconds is None):
      p.error(f"--{flag} and --{kind}-clip-seconds go together")
    if seconds is not None and not seconds > 0:
      p.error(f"--{kind}-clip-seconds {seconds}: must be > 0")
  if args.crops != "mean" and not (args.crops.isdigit()):
    p.error(f"--crops {args.crops}: 'mean' or a crop number (0, 1, ...)")
  if args.videos is None and args.visual_features is None:
    p.error("give --videos, --visual-features, or both: a record needs frames or visual features")
  allowed = datasets.TASKS[args.dataset]
  if args.task is None:
    args.task = allowed[0]
  elif args.task not in allowed:
    p.error(f"--task {args.task}: {args.dataset} supports {allowed} only (XD-Violence has no captions; its "
            "queries are the videos' audio)")
  if args.task == "audio" and args.videos is None and args.audio_features is None:
    p.error("--task audio without --videos needs --audio-features (the audio side of every record)")
  return args


def remove_temp_shards(out_dir: str) -> None:
  """Deletes the temp files of unfinished shards (`<shard>.array_record.<attempt>.tmp`)."""
  for name in os.listdir(out_dir):
    if ".array_record" in name and name.endswith(".tmp"):
      os.remove(os.path.join(out_dir, name))


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
  remove_temp_shards(args.out)   # unfinished shards of a killed run are redone from scratch
  for name in os.listdir(args.out) if args.overwrite else ():
    if name.endswith(".array_record") or name == "manifest.json":
      os.remove(os.path.join(args.out, name))
  if args.overwrite:
    for name in os.listdir(os.path.join(args.out, JOURNAL_DIR)):
      os.remove(os.path.join(args.out, JOURNAL_DIR, name))
  write_json(job_path, job)


def row_options(args, items: list[datasets.Item]) -> row.RowOptions:
  """What every row needs; the release's widths and crop counts probed from the first readable arrays."""
  sources = {}
  for kind, attribute, name in ARRAYS:
    pattern = getattr(args, attribute)
    if pattern is not None:
      source = released.ArraySource(name, pattern, getattr(args, f"{kind}_clip_seconds"),
                                    crops=args.crops if kind == "visual" else None, is_prior=kind == "prior")
      sources[kind] = released.probe(source, [i.array_id for i in items])
  decode = None
  if args.videos is not None:
    # Released audio features make the audio track optional even for the audio task.
    audio = "required" if args.task == "audio" and "audio" not in sources else "optional"
    decode = DecodeOptions(snippets=args.snippets, image_size=args.image_size, audio=audio,
                           mel_bins=args.mel_bins, mel_frames=args.mel_frames)
  return row.RowOptions(task=args.task, snippets=args.snippets, decode=decode, nominal_fps=datasets.NOMINAL_FPS[args.dataset],
                        **sources)


def run_row(job) -> tuple[str, object]:
  """Pool worker: row.build_record on one (item, options) pair."""
  return row.build_record(*job)


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_unwinds():
  """SIGTERM unwinds like Ctrl-C, so unfinished temp shards are removed (SIGKILL leaves them to the rerun)."""
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
  try:
    yield
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous_handler)


class JobError(Exception):
  """A job that cannot start: the message for the user and the exit status."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Job:
  """A planned prep job: its arguments, job.json, the shard plan and the shards already journaled."""
  args: argparse.Namespace
  spec: dict                                    # job.json
  shards: list[tuple[str, str, list[datasets.Item]]]
  done: dict[str, dict]                         # shard name -> journal entry
  options: row.RowOptions
  early_skips: list[dict]                       # duplicate table rows

  def todo(self) -> list[tuple[str, str, list[datasets.Item]]]:
    return [shard for shard in self.shards if shard[1] not in self.done]

  def stopped(self, what: str) -> int:
    """Reports a job that did not run to the end (temp shards removed, journaled ones kept); exit status 1."""
    self.done = read_journal(self.args.out)
    remove_temp_shards(self.args.out)
    print(f"varcmp prep: {what}; {len(self.done)} of {len(self.shards)} shards finished and kept, unfinished ones "
          "removed; run the same command again to resume", file=sys.stderr)
    return 1


def start_job(args) -> Job:
  """Reads the table, claims --out (job.json) and plans the shards. Raises JobError."""
  try:
    items = datasets.read(args.dataset, args.videos, args.captions, args.split_lists)
  except datasets.TableError as e:
    raise JobError(str(e), 2) from None
  # Every key of JOB_KEYS, in its order: the argument as given, but for the paths (absolute) and the table.
  derived = {"videos": os.path.abspath(args.videos) if args.videos else None,
             "captions": os.path.abspath(args.captions), "table_sha256": table_hash(items),
             "split_lists": [os.path.abspath(p) for p in args.split_lists] if args.split_lists else None}
  spec = {k: derived[k] if k in derived else getattr(args, k) for k in JOB_KEYS}
  try:
    prepare_out(args, spec)
  except ValueError as e:
    raise JobError(str(e), 2) from None
  except OSError as e:
    raise JobError(f"cannot write to --out {args.out}: {e}", 1) from None
  # Duplicate names are dropped up front (deterministically), so the shard plan is a function of the table.
  unique, early_skips, seen = [], [], set()
  for item in items:
    key = (item.split, item.video)
    if key in seen:
      early_skips.append({"video": item.video, "reason": f"duplicate entry in the {item.split} split"})
      continue
    seen.add(key)
    unique.append(item)
  return Job(args, spec, plan_shards(unique, args.shard_size), read_journal(args.out), row_options(args, unique),
             early_skips)


def tokenizer():
  from varcmp_jax import clip                      # jax/flax only in the parent, not in decoding workers
  return clip.tokenizer()


def caption_tokens(items: list[datasets.Item], task: str) -> list[np.ndarray | None]:
  """Each row's record tokens, of its checked caption (row.check_caption: the caption build_record stores),
  int32 (77,); None for a row whose caption is rejected (the row is skipped). Every runner tokenizes here, in
  its own process: the decoding workers load no tokenizer."""
  captions = [row.check_caption(item.caption, task)[0] for item in items]
  texts = [c for c in captions if c is not None]
  ids = iter(tokenizer()(texts).astype(np.int32) if texts else [])
  return [None if c is None else next(ids) for c in captions]


def run_local(job: Job) -> int:
  """Decodes the pending shards' rows in a multiprocessing pool, in table order; writes and journals each
  shard as its last row arrives. 0, or 1 when interrupted or unable to write."""
  todo, done = job.todo(), job.done
  # One ordered stream of rows over all pending shards.
  jobs = [(item, job.options) for _, _, members in todo for item in members]
  owners = [name for _, name, members in todo for _ in members]
  writers = {name: ShardWriter(job.args.out, split, name) for split, name, _ in todo}
  pending = {name: len(members) for _, name, members in todo}
  total = sum(len(members) for *_, members in job.shards)
  progress = tqdm(total=total, initial=total - len(jobs), desc="prep", unit="video")

  def consume(results):
    for (item, _), name, row_tokens, (status, value) in zip(jobs, owners, tokens, results):
      if status == "ok":
        value["tokens"] = row_tokens
      writers[name].put(item.video, status, value)
      pending[name] -= 1
      if pending[name] == 0:
        done[name] = writers.pop(name).finish()
      progress.update()
      progress.set_postfix(skipped=sum(len(w.skipped) for w in writers.values())
                           + sum(len(e["skipped"]) for e in done.values()), refresh=False)

  try:
    with sigterm_unwinds():
      tokens = caption_tokens([item for item, _ in jobs], job.args.task)   # here: Ctrl-C stops it cleanly
      if job.args.workers and jobs:
        with multiprocessing.get_context("spawn").Pool(job.args.workers) as pool:
          consume(pool.imap(run_row, jobs, chunksize=1))
      else:
        consume(map(run_row, jobs))
  except (KeyboardInterrupt, OSError) as e:
    progress.close()
    for writer in writers.values():
      writer.discard()
    return job.stopped("interrupted" if isinstance(e, KeyboardInterrupt) else f"cannot write to {job.args.out}: {e}")
  progress.close()
  return 0


def finish_job(job: Job) -> int:
  """Writes manifest.json (last: its presence means the job is complete) and prints the summary."""
  manifest = build_manifest(job.spec, job.shards, job.done, job.early_skips, job.args.runner)
  out = job.args.out
  write_json(os.path.join(out, "manifest.json"), manifest)
  records = sum(s["records"] for s in manifest["splits"].values())
  counts = ", ".join(f"{split} {info['records']}" for split, info in sorted(manifest["splits"].items()))
  print(f"varcmp prep: wrote {records} records ({counts}) in "
        f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards to {out}; "
        f"skipped {len(manifest['skipped'])} videos" + (":" if manifest["skipped"] else ""))
  if manifest["skipped"]:
    print(skip_summary(manifest["skipped"]))
  # What sizes the text tower's word budget (config.model.max_words).
  words = [f"{split} {records_check.describe_words(histogram)}" for split, info in sorted(manifest["splits"].items())
           if (histogram := records_check.caption_words(info))]
  if words:
    print("caption words: " + "; ".join(words))
  if records == 0:
    print(f"varcmp prep: no records written: every row was skipped (reasons above and in "
          f"{os.path.join(out, 'manifest.json')})", file=sys.stderr)
    return 1
  return 0


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  run = run_local
  if args.runner == "beam":
    try:
      from data_prep import beam_prep
    except ModuleNotFoundError as e:
      if not (e.name or "").startswith("apache_beam"):
        raise
      print("varcmp prep: --runner beam needs Apache Beam: pip install 'varcmp-jax[beam]'", file=sys.stderr)
      return 2
    run = beam_prep.run
  try:
    job = start_job(args)
  except JobError as e:
    print(f"varcmp prep: {e}", file=sys.stderr)
    return e.status
  return run(job) or finish_job(job)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
