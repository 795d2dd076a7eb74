"""The batch wall: the train step's FLOPs per sample against the global batch, and what bounding it costs in quality.

  python benchmarks/batch_scaling.py flops       # features step (T=256, R=4, D=512, <= 40 words, bf16), counted
  python benchmarks/batch_scaling.py quality     # the demo benchmark, exact loss vs loss.fine_candidates / _snippets
  python benchmarks/batch_scaling.py quality --seeds 0,1,2,3,4 --settings 0:0,16:0,8:0,16:8

flops: executed FLOPs per sample of the features train step (benchmarks/step_flops.py's config: ViT-B/16 text tower,
bf16, loss.chunk_size 64) as compiled for --platform (default tpu), counted by varcmp_jax.flops from the traced
program (never run, any machine), at global batch 128 ... 8,192, for the exact loss and for loss.fine_candidates
M in {32, 64, 128} x loss.fine_snippets k in {0, 64, 32}. A row per (batch, M, k) as it is counted.

quality: configs/synthetic.py (the demo: batch 32, T = 16) trained once per (setting, seed) on the same records
(the demo's benchmark, written once under --work); SumR and R@1 (text -> video) on the test split at evaluation's
exact precision, every setting paired with the exact loss of the same seed (same init, same batches). A setting
is M:k (0:0 = the exact loss). Closes with the mean and the standard deviation of each setting's paired
difference, against the seed-to-seed spread of the exact loss.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def count_flops(args) -> int:
  import jax
  from step_flops import count_step, features_config   # benchmarks/step_flops.py
  print(f"features train step, T={args.snippets}, R=4, D=512, ViT-B/16 text tower, <= {args.max_words} words, bf16, "
        f"chunk {args.chunk}; executed FLOPs as compiled for {args.platform}, counted from the trace on "
        f"{jax.devices()[0].device_kind}", flush=True)
  print("| global batch | loss.fine_candidates M | loss.fine_snippets k | TFLOP per step | GFLOP per sample | "
        "vs exact at this batch | traced in s |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
  settings = [(0, 0)] + [(m, k) for m in args.candidates for k in args.snippet_counts]
  for batch in args.batches:
    exact = None
    for m, k in settings:
      config = features_config(batch, args.snippets, args.max_words, "bf16", args.chunk)
      config.loss.fine_candidates, config.loss.fine_snippets = m, k
      count, seconds = count_step(config, args.platform)
      exact = exact or count.executed
      print(f"| {batch:,} | {m or 'all'} | {k or 'all'} | {count.executed / 1e12:.2f} | "
            f"{count.executed / batch / 1e9:.1f} | {count.executed / exact:.3f} | {seconds:.0f} |", flush=True)
  return 0


def train_and_score(records, run: pathlib.Path, seed: int, m: int, k: int, steps: int | None) -> tuple[dict, float]:
  from varcmp_jax import evaluate, metrics, trained
  from varcmp_jax.train import main as train_main_lib
  overrides = [f"--config.data.records={records}", f"--config.seed={seed}", f"--config.loss.fine_candidates={m}",
               f"--config.loss.fine_snippets={k}"]
  if steps:   # the warmup keeps its share of the schedule, as in `varcmp demo --steps`
    overrides += [f"--config.train.num_steps={steps}", f"--config.train.warmup_steps={steps // 10}"]
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):    # the training log; its progress bar stays on stderr
    code = train_main_lib.train_main(["--config", str(ROOT / "configs" / "synthetic.py"), "--workdir", str(run),
                                      *overrides])
  if code:
    raise SystemExit(f"batch_scaling: training {run} failed (exit {code})")
  seconds = time.perf_counter() - start
  state = trained.load(str(run))
  video, query = evaluate.embed_split(state.trainer, state.params, state.config.data.eval_split)
  sims = evaluate.level_and_combined_similarities(video, query, state.config)
  return metrics.report(sims, state.config.task), seconds


def quality(args) -> int:
  from varcmp_jax import command_flags
  from precision_quality import prepare   # benchmarks/precision_quality.py: the demo's records, written once
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  records = prepare(work, "text", command_flags.load_config_file(str(ROOT / "configs" / "synthetic.py")))
  settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
  if settings[0] != (0, 0):
    settings.insert(0, (0, 0))
  print(f"records: {records}; configs/synthetic.py (batch 32, T = 16), seeds {args.seeds}", flush=True)
  print("| M:k | seed | SumR | text_to_video R@1 | SumR - exact (same seed) | R@1 - exact | train s |\n"
        + "| --- " * 7 + "|", flush=True)
  results = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    for m, k in settings:
      run = work / f"run_M{m}_k{k}_seed{seed}"
      report, seconds = train_and_score(records, run, seed, m, k, args.steps)
      sumr, r1 = report["SumR"], report["text_to_video"]["R1"]
      results[(m, k, seed)] = (sumr, r1)
      base = results[(0, 0, seed)]
      print(f"| {m}:{k} | {seed} | {sumr:.1f} | {r1:.1f} | {sumr - base[0]:+.1f} | {r1 - base[1]:+.1f} | "
            f"{seconds:.0f} |", flush=True)
  seeds = sorted({s for _, _, s in results})
  exact = np.array([results[(0, 0, s)] for s in seeds])
  print(f"exact loss: SumR mean {exact[:, 0].mean():.1f}, seed-to-seed standard deviation {exact[:, 0].std(ddof=1):.1f}; "
        f"R@1 mean {exact[:, 1].mean():.1f} (sd {exact[:, 1].std(ddof=1):.1f}) over {len(seeds)} seeds", flush=True)
  for m, k in settings[1:]:
    diff = np.array([results[(m, k, s)] for s in seeds]) - exact
    se = diff.std(ddof=1, axis=0) / np.sqrt(len(seeds))
    print(f"M={m} k={k}: SumR {np.mean([results[(m, k, s)][0] for s in seeds]):.1f}, paired difference "
          f"{diff[:, 0].mean():+.1f} (sd {diff[:, 0].std(ddof=1):.1f}, standard error {se[0]:.1f}); R@1 paired "
          f"difference {diff[:, 1].mean():+.1f} (sd {diff[:, 1].std(ddof=1):.1f})", flush=True)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("part", choices=("flops", "quality"))
  p.add_argument("--batches", default="128,512,2048,8192", type=lambda s: [int(x) for x in s.split(",")])
  p.add_argument("--candidates", default="32,64,128", type=lambda s: [int(x) for x in s.split(",")],
                 help="loss.fine_candidates values (flops)")
  p.add_argument("--snippet-counts", default="0,64,32", type=lambda s: [int(x) for x in s.split(",")],
                 help="loss.fine_snippets values (flops)")
  p.add_argument("--snippets", type=int, default=256, help="T (flops)")
  p.add_argument("--max-words", type=int, default=40)
  p.add_argument("--chunk", type=int, default=64, help="loss.chunk_size (flops)")
  p.add_argument("--platform", default="tpu", help="count the program this platform compiles (tpu, cuda, cpu)")
  p.add_argument("--seeds", default="0,1,2,3,4", help="config.seed values (quality)")
  p.add_argument("--settings", default="0:0,16:0,8:0,16:8", help="M:k pairs (quality); 0:0 = the exact loss")
  p.add_argument("--steps", type=int, default=None, help="train steps (quality; default configs/synthetic.py's)")
  p.add_argument("--work", default=str(ROOT / "runs" / "batch_scaling"))
  args = p.parse_args(argv)
  return count_flops(args) if args.part == "flops" else quality(args)


if __name__ == "__main__":
  os.chdir(ROOT)
  sys.exit(main())
