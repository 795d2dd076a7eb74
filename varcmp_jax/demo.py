"""`varcmp demo`: synth -> prep -> train -> eval -> search on the embedded default, on a CPU.

  varcmp demo [--task text|audio] [--workdir varcmp_demo] [--videos 200] [--steps N]

--task text (default) trains text -> video and searches with a caption; --task audio trains audio -> video
(configs/synthetic.py:audio) and searches with the soundtrack of a test video. Both tasks share the videos;
each has its own records and run directory. Every stage resumes: a second call reuses the videos, the records
and the trained checkpoints. A small --videos trains on batches of as many videos as the train split holds.
A rerun repeats every figure bit for bit on the same machine with the same number of cores; other core counts and
machines round differently (README, "The demo").

The commands it suggests at the end run as printed: they name the `varcmp` that is running by its path when the
shell would not find it (`.venv/bin/varcmp` after `make demo`, where the environment is not activated).
"""
import argparse
import os
import pathlib
import shlex
import shutil
import sys
import time

CONFIG = "synthetic"   # the bundled configs/synthetic.py, found from any directory (command_flags.resolve_config)
STAGES = 5


def parse_args(argv):
  p = argparse.ArgumentParser(prog="varcmp demo", description=__doc__.split("\n")[0])
  p.add_argument("--task", default="text", choices=("text", "audio"),
                 help="text -> video (captions) or audio -> video (the video's own soundtrack)")
  p.add_argument("--workdir", default="varcmp_demo", help="videos/, records*/ and run*/ go here")
  p.add_argument("--videos", type=int, default=200, help="synthetic videos (a quarter of them are the test split)")
  p.add_argument("--steps", type=int, default=None, help="train steps (default: configs/synthetic.py)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--top-k", type=int, default=5, help="hits shown by the search example")
  args = p.parse_args(argv)
  if args.videos < 8:
    p.error("--videos must be >= 8")
  return args


def stage(number: int, text: str):
  print(f"[{number}/{STAGES}] {text}", flush=True)


def search_example(run, videos: pathlib.Path, records_dir: str, split: str, metadata: list[dict], top_k: int) -> str:
  """`varcmp search` for the first anomalous test video (`metadata`: the split's): its caption (text task) or
  its soundtrack (audio task) as the query; returns the printable table and the ground truth."""
  from varcmp_jax import search

  target = next((i for i, m in enumerate(metadata) if m["label"] == 1), 0)
  gallery = search.load_gallery(run, records_dir, split)
  encoder = search.QueryEncoder(run)
  if run.config.task == "text":
    label = metadata[target]["caption"]
    query = encoder.text([label])
  else:
    path = videos / metadata[target]["video"]
    label = f"audio of {path.name}"
    query = encoder.audio_file(str(path))
  hits = search.search(run, gallery, query, top_k)
  event = metadata[target]["event"]
  return (search.format_table(hits, label) +
          f"\nground truth: {metadata[target]['video']}, event {event[0]:.1f}-{event[1]:.1f} s")


def as_typed(path: str) -> str:
  """`path` as one types it to run it from here: relative to the current directory when under it (with a slash,
  so that the shell does not search PATH), else absolute."""
  shown = os.path.relpath(path)
  if shown.startswith(os.pardir):
    return os.path.abspath(path)
  return shown if os.sep in shown else os.path.join(os.curdir, shown)


def environment_bin() -> str | None:
  """Where the running `varcmp` and its environment's programs (pip) are, as a prefix to type before their names:
  "" when PATH finds that varcmp, else its folder (".venv/bin/" after `make demo`); None where no `varcmp` entry
  point is installed. The running one is sys.argv[0] (the command line), else the one beside this Python
  (demo.main called from Python)."""
  running = [sys.argv[0]] if os.path.basename(sys.argv[0]) == "varcmp" else []
  for candidate in running + [os.path.join(os.path.dirname(sys.executable), "varcmp")]:
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
      on_path = shutil.which("varcmp")
      if on_path and os.path.samefile(on_path, candidate):
        return ""
      return os.path.join(os.path.dirname(as_typed(candidate)), "")
  return None


def commands(bin_prefix: str | None) -> dict[str, str]:
  """How to type varcmp, pip and tensorboard of this environment (`bin_prefix`: environment_bin())."""
  if bin_prefix is None:
    python = shlex.quote(as_typed(sys.executable))
    return {"varcmp": f"{python} -m varcmp_jax.cli", "pip": f"{python} -m pip",
            "tensorboard": f"{python} -m tensorboard.main"}
  return {name: shlex.quote(bin_prefix + name) for name in ("varcmp", "pip", "tensorboard")}


def next_steps(task: str, root: pathlib.Path, records: pathlib.Path, run: pathlib.Path, videos: pathlib.Path,
               example_video: str, typed: dict[str, str] | None = None) -> list[str]:
  """The commands to try next, as printed at the end of the demo; `typed`: how to type each program
  (commands(); default: their names). TensorBoard is not a dependency: its line installs it first."""
  q = lambda p: shlex.quote(str(p))
  typed = typed or commands("")
  varcmp = typed["varcmp"]
  if task == "text":
    query = "--text 'a red circle grows in the top left corner' --plot hits.png"
  else:
    query = f"--audio {q(videos / example_video)}"
  lines = [f"{varcmp} search --workdir {q(run)} --gallery {q(records)} {query}",
           f"{varcmp} search --workdir {q(run)} --gallery {q(records)} --localization",
           f"{varcmp} eval --workdir {q(run)}",
           f"{varcmp} export --workdir {q(run)} --out {q(root / ('export' if task == 'text' else 'export_audio'))}",
           f"{typed['pip']} install tensorboard && {typed['tensorboard']} --logdir {q(run / 'tensorboard')}"]
  other = "audio" if task == "text" else "text"
  lines.append(f"{varcmp} demo --task {other} --workdir {q(root)}      # the {other} -> video half")
  index = root / ("index" if task == "text" else "index_audio")
  lines += [f"{varcmp} index --workdir {q(run)} --records {q(records)} --out {q(index)}",
            f"{varcmp} serve --index {q(index)} --videos {q(videos)}      # the search page: http://127.0.0.1:8000"]
  return lines


def next_heading(bin_prefix: str | None) -> str:
  """"next:", and how to put varcmp on PATH when the commands name it by its path (a virtual environment's)."""
  if bin_prefix and os.path.isfile(os.path.join(bin_prefix, "activate")):
    return f"next (or `source {shlex.quote(os.path.join(bin_prefix, 'activate'))}` first, then plain `varcmp ...`):"
  return "next:"


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  root = pathlib.Path(args.workdir).resolve()
  suffix = "" if args.task == "text" else "_audio"
  videos, records_dir, run = root / "videos", root / f"records{suffix}", root / f"run{suffix}"
  timings = {}
  start = time.time()

  from data_prep import prep, synth
  if not (videos / "captions.csv").exists():
    t = time.time()
    stage(1, f"synth: {args.videos} videos -> {videos}")
    if synth.main(["--out", str(videos), "--videos", str(args.videos), "--seed", str(args.seed)]):
      return 1
    timings["synth"] = time.time() - t
  t = time.time()
  stage(2, f"prep ({args.task} task): -> {records_dir}")
  from varcmp_jax import command_flags
  config_file = f"{CONFIG}:{args.task}"
  config = command_flags.load_config_file(config_file)
  audio = config.model.audio
  if prep.main(["--dataset", "folder", "--videos", str(videos), "--captions", str(videos / "captions.csv"),
                "--out", str(records_dir), "--task", args.task, "--snippets", str(config.data.snippets),
                "--image-size", str(config.model.clip.vision.image_size), "--mel-bins", str(audio.mel_bins),
                "--mel-frames", str(audio.mel_frames)]):
    return 1
  timings["prep"] = time.time() - t

  overrides = [f"--config.data.records={records_dir}"]
  if args.steps is not None:
    # The warmup keeps its share of the default schedule (it may not exceed the steps).
    warmup = config.train.warmup_steps * args.steps // config.train.num_steps
    overrides += [f"--config.train.num_steps={args.steps}", f"--config.train.warmup_steps={warmup}"]
  import jax
  from varcmp_jax.data import pipeline
  train_records = pipeline.split_size(str(records_dir), config.data.train_split)
  if train_records < config.train.batch_size:   # a small --videos: batches of distinct videos, as many as there are
    overrides.append(f"--config.train.batch_size={train_records - train_records % jax.device_count()}")
  t = time.time()
  stage(3, f"train: -> {run}")
  from varcmp_jax.train import main as train_main_lib
  train_main_lib.train_main(["--config", config_file, "--workdir", str(run), *overrides])
  timings["train"] = time.time() - t

  t = time.time()
  stage(4, "eval")
  from varcmp_jax import evaluate, metrics, trained
  config = command_flags.load_config_file(config_file, overrides)
  run_state = trained.restore(config, str(run))
  result = evaluate.evaluate_run(run_state, show=False)
  timings["eval"] = time.time() - t

  stage(5, "search")
  split = config.data.eval_split
  print()
  metadata = pipeline.load_split_metadata(str(records_dir), split)
  print(search_example(run_state, videos, str(records_dir), split, metadata, args.top_k))
  gallery = len(metadata)
  forward = next(iter(metrics.directions(result)))
  chance = 100 / gallery
  print()
  print(f"eval on the synthetic {split} split ({gallery} videos, chance R@1 = {chance:.1f}%), step {result['step']}:")
  print(metrics.format_table(result))
  print(f"{forward} R@1 = {result[forward]['R1']:.1f}%, {result[forward]['R1'] / chance:.1f} times chance")
  print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {time.time() - start:.0f}s")
  print(f"workdir: {root} (eval.json, metrics.jsonl, tensorboard/ under {run})")
  bin_prefix = environment_bin()
  lines = next_steps(args.task, root, records_dir, run, videos, metadata[0]["video"], commands(bin_prefix))
  print(f"\n{next_heading(bin_prefix)}\n" + "\n".join(f"  {line}" for line in lines))
  return 0
