"""`varcmp demo`: synth -> prep -> train -> eval -> a text search, on the embedded default, on a CPU.

  varcmp demo [--workdir varcmp_demo] [--videos 200] [--steps N]

Every stage resumes: a second call reuses the videos, the records and the trained checkpoints.
"""
import argparse
import json
import pathlib
import time

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "synthetic.py"


def parse_args(argv):
  p = argparse.ArgumentParser(prog="varcmp demo", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="varcmp_demo", help="videos/, records/ and run/ go here")
  p.add_argument("--videos", type=int, default=200, help="synthetic videos (a quarter of them are the test split)")
  p.add_argument("--steps", type=int, default=None, help="train steps (default: configs/synthetic.py)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--top-k", type=int, default=5, help="hits shown by the search example")
  args = p.parse_args(argv)
  if args.videos < 8:
    p.error("--videos must be >= 8")
  return args


def search_example(run, records_dir: str, split: str, top_k: int) -> str:
  """`varcmp search` for the caption of the first anomalous test video; returns its printable table."""
  from varcmp_jax import search
  from varcmp_jax.data import pipeline

  metadata = pipeline.load_split_metadata(records_dir, split)
  target = next((i for i, m in enumerate(metadata) if m["label"] == 1), 0)
  caption = metadata[target]["caption"]
  gallery = search.load_gallery(run, records_dir, split)
  hits = search.search(run, gallery, search.encode_text(run, [caption]), top_k)
  event = metadata[target]["event"]
  return (search.format_table(hits, caption) +
          f"\nground truth: {metadata[target]['video']}, event {event[0]:.1f}-{event[1]:.1f} s")


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  root = pathlib.Path(args.workdir).resolve()
  videos, records_dir, run = root / "videos", root / "records", root / "run"
  timings = {}
  start = time.time()

  from data_prep import prep, synth
  if not (videos / "captions.csv").exists():
    t = time.time()
    print(f"[1/4] synth: {args.videos} videos -> {videos}", flush=True)
    if synth.main(["--out", str(videos), "--videos", str(args.videos), "--seed", str(args.seed)]):
      return 1
    timings["synth"] = time.time() - t
  t = time.time()
  print(f"[2/4] prep: -> {records_dir}", flush=True)
  from varcmp_jax import command_flags
  from varcmp_jax.train import main as train_main_lib
  config = command_flags.load_config_file(str(CONFIG))
  size = config.model.clip.vision.image_size
  if prep.main(["--dataset", "folder", "--videos", str(videos), "--captions", str(videos / "captions.csv"),
                "--out", str(records_dir), "--snippets", str(config.data.snippets), "--image-size", str(size)]):
    return 1
  timings["prep"] = time.time() - t

  overrides = [f"--config.data.records={records_dir}"]
  if args.steps is not None:
    # The warmup keeps its share of the default schedule (it may not exceed the steps).
    warmup = config.train.warmup_steps * args.steps // config.train.num_steps
    overrides += [f"--config.train.num_steps={args.steps}", f"--config.train.warmup_steps={warmup}"]
  common = ["--config", str(CONFIG), "--workdir", str(run), *overrides]
  t = time.time()
  print(f"[3/4] train: -> {run}", flush=True)
  train_main_lib.train_main(common)
  timings["train"] = time.time() - t

  t = time.time()
  print("[4/4] eval", flush=True)
  from varcmp_jax import metrics
  from varcmp_jax.data import pipeline
  from varcmp_jax import evaluate, trained
  config = command_flags.load_config_file(str(CONFIG), overrides)
  run_state = trained.restore(config, str(run))
  result = evaluate.evaluate_params(run_state.trainer, run_state.params)
  with open(run / "eval.json", "w") as f:
    json.dump(result, f, indent=2)
  timings["eval"] = time.time() - t
  print()
  print(search_example(run_state, str(records_dir), config.data.eval_split, args.top_k))
  gallery = pipeline.split_size(str(records_dir), config.data.eval_split)
  print()
  print(f"eval on the synthetic test split ({gallery} videos, chance R@1 = {100 / gallery:.1f}%), step {run_state.step}:")
  print(metrics.format_table(result))
  print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {time.time() - start:.0f}s")
  print(f"workdir: {root} (eval.json, metrics.jsonl, tensorboard/ under {run})")
  return 0
