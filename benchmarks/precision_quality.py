"""What the precision of the similarity contractions costs in retrieval quality, on the synthetic demo.

  python benchmarks/precision_quality.py                          # seeds 0,1,2; loss.precision bf16 and highest
  python benchmarks/precision_quality.py --seeds 0,1,2,3,4 --precisions bf16,tf32,highest --task text

The demo's benchmark (`varcmp synth`, seed 0) is written and prepped once under --work; then configs/synthetic.py
trains once per (loss.precision, config.seed) on the same records. Each trained model is evaluated on the test
split at eval.precision "highest" (what `varcmp eval` does) and at "bf16", from the same embeddings: the
rows give SumR and R@1 (query -> video) of both, the share of queries whose ground truth keeps its rank, and
the mean overlap of the top-10 lists. Every row is printed as soon as it is measured; a summary of SumR per
training precision (mean and range over the seeds) closes the run.
"""
import argparse
import contextlib
import io
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthetic.py")


def prepare(work: pathlib.Path, task: str, config) -> pathlib.Path:
  from data_prep import prep, synth   # pylint: disable=g-import-not-at-top
  videos, records = work / "videos", work / f"records_{task}"
  if not (videos / "captions.csv").exists():
    synth.main(["--out", str(videos), "--videos", "200", "--seed", "0"])
  if not (records / "manifest.json").exists():
    audio = config.model.audio
    prep.main(["--dataset", "folder", "--videos", str(videos), "--captions", str(videos / "captions.csv"),
               "--out", str(records), "--task", task, "--snippets", str(config.data.snippets),
               "--image-size", str(config.model.clip.vision.image_size), "--mel-bins", str(audio.mel_bins),
               "--mel-frames", str(audio.mel_frames)])
  return records


def ranks(sims: np.ndarray) -> np.ndarray:
  """The ground truth's 0-based rank per query (strictly better items above it)."""
  return np.sum(sims > np.diagonal(sims)[:, None], axis=1)


def top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
  top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :10]
  return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top(a), top(b))]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2", help="config.seed values (model init and data order)")
  p.add_argument("--precisions", default="bf16,highest", help="loss.precision values to train with")
  p.add_argument("--task", choices=("text", "audio"), default="text")
  p.add_argument("--steps", type=int, default=None, help="train steps (default: configs/synthetic.py's)")
  p.add_argument("--work", default=str(ROOT / "runs" / "precision_quality"))
  args = p.parse_args(argv)

  from varcmp_jax import command_flags, evaluate, metrics, trained   # pylint: disable=g-import-not-at-top
  from varcmp_jax.train import main as train_main_lib                # pylint: disable=g-import-not-at-top
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  config_file = f"{CONFIG}:{args.task}"
  start = time.perf_counter()
  records = prepare(work, args.task, command_flags.load_config_file(config_file))
  print(f"records: {records} ({time.perf_counter() - start:.0f} s)", flush=True)
  forward = f"{args.task}_to_video"
  print(f"| loss.precision | seed | SumR (eval highest) | {forward} R@1 | SumR (eval bf16) | R@1 (eval bf16) | "
        "ground-truth rank unchanged | top-10 overlap | train s |\n" + "| --- " * 9 + "|", flush=True)
  sums = {}
  for precision in args.precisions.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      run = work / f"run_{args.task}_{precision}_{seed}"
      overrides = [f"--config.data.records={records}", f"--config.seed={seed}", f"--config.loss.precision={precision}"]
      if args.steps:   # the warmup keeps its share of the schedule, as in `varcmp demo --steps`
        overrides += [f"--config.train.num_steps={args.steps}", f"--config.train.warmup_steps={args.steps // 10}"]
      start = time.perf_counter()
      with contextlib.redirect_stdout(io.StringIO()):    # the training log; its progress bar stays on stderr
        train_main_lib.train_main(["--config", config_file, "--workdir", str(run), *overrides])
      seconds = time.perf_counter() - start
      state = trained.load(str(run))
      video, query = evaluate.embed_split(state.trainer, state.params, state.config.data.eval_split)
      results, combined = {}, {}
      for eval_precision in ("highest", "bf16"):
        config = state.config.copy_and_resolve_references()
        config.eval.precision = eval_precision
        sims = evaluate.level_and_combined_similarities(video, query, config)
        results[eval_precision], combined[eval_precision] = metrics.report(sims, config.task), sims["combined"]
      exact, low = results["highest"], results["bf16"]
      same_rank = float(np.mean(ranks(combined["highest"]) == ranks(combined["bf16"])))
      sums.setdefault(precision, []).append(exact["SumR"])
      print(f"| {precision} | {seed} | {exact['SumR']:.1f} | {exact[forward]['R1']:.1f} | {low['SumR']:.1f} | "
            f"{low[forward]['R1']:.1f} | {100 * same_rank:.1f}% | {top10_overlap(combined['highest'], combined['bf16']):.3f} "
            f"| {seconds:.0f} |", flush=True)
  for precision, values in sums.items():
    print(f"loss.precision={precision}: SumR mean {np.mean(values):.1f} (min {min(values):.1f}, max {max(values):.1f}) "
          f"over seeds {args.seeds}", flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  os.chdir(ROOT)
  sys.exit(main())
