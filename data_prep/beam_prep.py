"""`varcmp prep --runner beam`: the prep job as an Apache Beam pipeline (this machine, Dataflow, Flink, Spark).

  varcmp prep --dataset folder --videos DIR --captions captions.csv --out RECORDS --runner beam \
      --beam-options="--runner=FnApiRunner --direct_num_workers=4 --direct_running_mode=multi_processing"

On this machine the default is Beam's FnApiRunner, named directly: the DirectRunner (2.77) first fetches
the Prism runner, a Go binary, from GitHub and runs the job there, which offline fails after a try (leaving
a beam-temp folder in /tmp each time) and online runs an engine these tests never ran.

The job is prep's (data_prep.prep.start_job: job.json, the shard plan, the journal; finish_job: the
manifest, written last by this process once the pipeline is done). The pipeline covers the shards not yet
journaled:

  Create(shards)           (split, shard name): the graph stays small whatever the table's length
    | FlatMap(shard_rows)  one element per table row, (shard, index, Item, caption tokens), read from the
                           shard's rows file (--out/journal/<shard>.rows.pkl, written by this process)
    | Reshuffle            rows, not shards, spread over the workers
    | Map(decode_row)      row.build_record -> (shard, (index, video, status, record or skip reason))
    | GroupByKey           the shard's rows, in any order
    | Map(write_shard)     sorted back into table order -> temp file, renamed, journaled (prep.ShardWriter)

so the records equal the local prep's. Captions are tokenized here, before launching: the workers need no
tokenizer (transformers, its BPE vocabulary); they import flax only to encode records. A batch runner
writes shards only after every row is decoded (the GroupByKey), so the progress bar, which counts journaled
shards, moves at the end, and a writer holds one shard's records in memory (lower --shard-size for big
frames). Rerunning a failed or killed pipeline skips the journaled shards.
"""
import os
import pickle
import shlex
import sys
import threading

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from tqdm import tqdm

from data_prep import prep, row

LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "direct", "SwitchingDirectRunner", "BundleBasedDirectRunner")


def pipeline_options(args) -> PipelineOptions:
  """--beam-options as given, else the FnApiRunner with --workers processes (0: in this process)."""
  if args.beam_options is not None:
    flags = shlex.split(args.beam_options)
  elif args.workers:
    flags = ["--runner=FnApiRunner", f"--direct_num_workers={args.workers}",
             "--direct_running_mode=multi_processing", "--default_sdk_harness_log_level=WARNING"]
  else:
    flags = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]
  return PipelineOptions(flags)


def relative_paths(args) -> list[str]:
  """The path arguments a remote worker could not resolve (relative to this machine's working directory)."""
  paths = {"--videos": args.videos, "--out": args.out, "--visual-features": args.visual_features,
           "--audio-features": args.audio_features, "--prior": args.prior}
  return [f"{flag} {path}" for flag, path in paths.items() if path is not None and not os.path.isabs(path)]


def rows_file(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, prep.JOURNAL_DIR, f"{name}.rows.pkl")


def shard_rows(shard: tuple[str, str], out_dir: str):
  """(split, shard name) -> one element per row of the shard: (shard, index, Item, tokens), from its rows file."""
  with open(rows_file(out_dir, shard[1]), "rb") as f:
    members = pickle.load(f)
  for index, (item, tokens) in enumerate(members):
    yield shard, index, item, tokens


def decode_row(element, options: row.RowOptions):
  """(shard key, index, item, tokens) -> (shard key, (index, video, status, record with tokens | reason))."""
  key, index, item, tokens = element
  status, value = row.build_record(item, options)
  if status == "ok":
    value["tokens"] = tokens
  return key, (index, item.video, status, value)


def write_shard(element, out_dir: str) -> int:
  """(shard key, rows) -> the shard written in table order, renamed and journaled; its record count."""
  (split, name), rows = element
  writer = prep.ShardWriter(out_dir, split, name)
  try:
    for _, video, status, value in sorted(rows, key=lambda r: r[0]):
      writer.put(video, status, value)
    return writer.finish()["records"]
  except BaseException:
    writer.discard()
    raise


def build(pipeline: beam.Pipeline, shards: list[tuple[str, str]], options: row.RowOptions, out_dir: str):
  return (pipeline
          | "Shards" >> beam.Create(shards)         # the rows travel in files, not in the pipeline graph
          | "Rows" >> beam.FlatMap(shard_rows, out_dir)
          | "Spread" >> beam.Reshuffle()            # rows, not shards, over the workers
          | "Decode" >> beam.Map(decode_row, options)
          | "ByShard" >> beam.GroupByKey()
          | "Write" >> beam.Map(write_shard, out_dir))


def _watch_journal(out_dir: str, sizes: dict[str, int], progress: tqdm, stop: threading.Event):
  """Advances the progress bar by each shard's rows as its journal entry appears."""
  seen = set()
  while True:
    stopping = stop.wait(0.5)
    for name in os.listdir(os.path.join(out_dir, prep.JOURNAL_DIR)):
      shard = name.removesuffix(".json")
      if shard in sizes and shard not in seen:
        seen.add(shard)
        progress.update(sizes[shard])
    if stopping:
      return


def run(job: prep.Job) -> int:
  """Runs the pending shards through Beam; 0, or 1 when the pipeline failed or was interrupted."""
  options = pipeline_options(job.args)
  runner = options.view_as(StandardOptions).runner or "FnApiRunner"
  relative = relative_paths(job.args)
  if runner not in LOCAL_RUNNERS and relative:
    print(f"varcmp prep: --runner beam on {runner}: workers on other machines need absolute paths on a filesystem "
          f"they all mount (relative: {', '.join(relative)})", file=sys.stderr)
    return 2
  todo = job.todo()
  if not todo:
    return 0
  tokens = iter(prep.caption_tokens([item for _, _, members in todo for item in members], job.args.task))
  try:
    for _, name, members in todo:
      prep.write_atomic(rows_file(job.args.out, name), pickle.dumps([(item, next(tokens)) for item in members]))
  except OSError as e:
    return job.stopped(f"cannot write to {job.args.out}: {e}")
  total = sum(len(members) for *_, members in job.shards)
  progress = tqdm(total=total, initial=total - sum(len(members) for *_, members in todo), desc=f"prep ({runner})",
                  unit="video")
  stop = threading.Event()
  watcher = threading.Thread(target=_watch_journal, daemon=True,
                             args=(job.args.out, {name: len(members) for _, name, members in todo}, progress, stop))
  watcher.start()
  failure = None
  try:
    with prep.sigterm_unwinds(), beam.Pipeline(options=options) as pipeline:
      build(pipeline, [(split, name) for split, name, _ in todo], job.options, job.args.out)
  except KeyboardInterrupt:
    failure = "interrupted"
  except Exception as e:  # pylint: disable=broad-except
    # A worker's exception comes back wrapped in the runner's context: its last line names it.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    failure = f"the Beam pipeline failed: {lines[-1] if lines else type(e).__name__}"
  finally:
    stop.set()
    watcher.join()
    progress.close()
  if failure:
    return job.stopped(failure)
  job.done = prep.read_journal(job.args.out)
  missing = [name for _, name, _ in todo if name not in job.done]
  if missing:
    return job.stopped(f"the Beam pipeline ended without writing {len(missing)} shards ({missing[0]}, ...)")
  journal = os.path.join(job.args.out, prep.JOURNAL_DIR)
  for name in os.listdir(journal):   # this run's and a failed run's
    if name.endswith(".rows.pkl"):
      os.remove(os.path.join(journal, name))
  return 0
