"""The VarCMP train step in both regimes: samples/s, MFU, peak memory, and whether the input keeps up.

  python benchmarks/train_step.py                   # full size (GPU): frames T=16 ViT-B/16 batch 64,
                                                    #   features T=256 batch 256, bf16; features fed by
                                                    #   Grain and by resident data
  python benchmarks/train_step.py --small           # tiny sizes that run on a CPU in a minute
  python benchmarks/train_step.py --regime features --resident on --batch 128 --steps 20
  python benchmarks/train_step.py --regime features --steps 0   # full size on a CPU: input vs H100 step only

The feeds are the trainer's own (train/feed.py) over ArrayRecord shards of random records written to a temp
dir: Grain ("input" = the next host batch placed on the mesh) or device-resident data (features regime;
"input" = the batch's row numbers on the devices, the gather runs inside the step). "step" is the compiled
step alone until its outputs are ready (medians over the timed steps).

FLOPs per step: XLA's cost analysis (compiled.cost_analysis(), which counts a loop body once: the chunked
similarity levels run in lax.map loops) and the executed dot FLOPs with loop trip counts applied
(hlo_flops.dot_report), both for all devices. MFU uses the executed count. "input share at H100" = input
time / (executed FLOPs / (0.5 x 989 TFLOP/s)): the input's time against the step's time on one H100 at half
its dense bf16 peak, so a CPU run already says whether a GPU would wait for its input (> 1: it would).
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

import peak_memory  # benchmarks/peak_memory.py
from hlo_flops import dot_report  # benchmarks/hlo_flops.py
from varcmp_jax import config as config_lib
from varcmp_jax.data import records
from varcmp_jax.model.varcmp import VarCMP
from varcmp_jax.train import feed as feed_lib
from varcmp_jax.train import sharding
from varcmp_jax.train.step import Trainer

# Dense bf16 peak FLOP/s by jax device_kind (vendor datasheets, no sparsity).
PEAK_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5p": 459e12}
H100_HALF_PEAK = 0.5 * 989e12     # the step-time yardstick of "input share at H100"


def make_config(regime: str, small: bool, batch: int | None, snippets: int | None):
  c = config_lib.default_config(task="text", regime=regime)
  if small:
    c.model.clip = config_lib.clip_tiny(image_size=32, patch_size=8, width=64, depth=2)
    c.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=4, max_len=64)
    c.model.anomaly_head = dict(hidden=64)
    c.model.dtype = "float32"
    c.data.snippets = 4 if regime == "frames" else 32
    c.train.batch_size = 8 if regime == "frames" else 16
  else:
    c.model.clip = config_lib.clip_b16()
    c.model.dtype = "bfloat16"
    c.data.snippets = 16 if regime == "frames" else 256
    c.train.batch_size = 64 if regime == "frames" else 256
  c.data.snippets = snippets or c.data.snippets
  c.model.temporal.max_len = max(c.model.temporal.max_len, c.data.snippets)
  c.train.batch_size = batch or c.train.batch_size
  c.train.warmup_steps, c.train.num_steps = 10, 1000
  if regime == "features":
    c.train.lr_mult.image = 0.0
  return c


def write_random_records(out: str, config, count: int):
  """`count` records with the shapes of `config`: enough for one pass of the benchmark's batches."""
  rng = np.random.default_rng(0)
  t, m = config.data.snippets, config.model
  name = "train-00000-of-00001.array_record"
  writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
  for i in range(count):
    tokens = np.zeros(77, np.int32)
    tokens[0], tokens[1:12], tokens[12] = 49406, rng.integers(300, 40000, 11), 49407
    record = dict(video=f"v{i}", caption="random", tokens=tokens, label=np.int32(i % 2), split="train",
                  duration=np.float32(t), times=np.zeros((t, 2), np.float32), event=np.array([-1, -1], np.float32))
    if config.regime == "frames":
      size = m.clip.vision.image_size
      record["frames"] = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
    else:
      d = m.clip.projection_dim
      record["features"] = rng.normal(size=(t, d)).astype(np.float16)
      record["regions"] = rng.normal(size=(t, m.region_grid ** 2, d)).astype(np.float16)
    writer.write(records.encode_record(record))
  writer.close()
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump({"splits": {"train": {"records": count, "shards": [name]}}, "skipped": []}, f)


def bench(regime: str, resident: str, args) -> dict:
  config = make_config(regime, args.small, args.batch, args.snippets)
  with tempfile.TemporaryDirectory() as tmp:
    write_random_records(tmp, config, count=config.train.batch_size * 2)
    config.data.records = tmp
    config.data.worker_count = args.workers
    config.data.resident = resident
    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config, mesh)
    state = trainer.init_state(seed=0)
    feed = feed_lib.ResidentFeed(trainer, config) if resident == "on" else feed_lib.GrainFeed(trainer, config)

    t = time.perf_counter()
    step_fn, compiled = feed.compile(state, feed.next())
    compile_s = time.perf_counter() - t
    xla_flops = feed_lib.xla_flops(compiled, mesh.size)
    executed_flops = dot_report(compiled.as_text())["dot_flops"] * mesh.size

    input_s, step_s, metrics = [], [], {}
    if args.steps:
      for _ in range(args.warmup):
        state, metrics = step_fn(state, feed.next())
      jax.block_until_ready(metrics)
    for _ in range(args.steps or args.input_batches):    # --steps 0: the input alone (full size on a CPU)
      t = time.perf_counter()
      inputs = jax.block_until_ready(feed.next())
      t1 = time.perf_counter()
      input_s.append(t1 - t)
      if args.steps:
        state, metrics = step_fn(state, inputs)
        jax.block_until_ready(metrics)
        step_s.append(time.perf_counter() - t1)
  step = float(np.median(step_s)) if step_s else math.nan
  inputs = float(np.median(input_s))
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else PEAK_BF16.get(device.device_kind)
  memory, memory_kind = peak_memory.jax_peak_bytes()
  h100_step = executed_flops / H100_HALF_PEAK
  return dict(
      regime=regime, feed=feed.kind, device=f"{jax.device_count()} x {device.device_kind}",
      batch=config.train.batch_size, snippets=config.data.snippets,
      image_size=config.model.clip.vision.image_size if regime == "frames" else None,
      dtype=config.model.dtype, compile_s=compile_s, step_ms=1e3 * step, input_ms=1e3 * inputs,
      samples_per_s=config.train.batch_size / step, tflops_per_step=xla_flops / 1e12,
      executed_tflops_per_step=executed_flops / 1e12, achieved_tflops=executed_flops / step / 1e12,
      mfu=(executed_flops / step / peak) if peak and step_s else None, h100_step_ms=1e3 * h100_step,
      input_share_at_h100=inputs / h100_step, peak_memory_gib=memory / 2 ** 30, memory_kind=memory_kind,
      loss=float(metrics["loss"]) if metrics else None)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--regime", choices=("frames", "features", "both"), default="both")
  p.add_argument("--small", action="store_true", help="tiny model and batch: a CPU smoke run")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--snippets", type=int, default=None)
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps (median reported); 0: compile, count FLOPs and time the input only")
  p.add_argument("--input-batches", type=int, default=5, help="timed inputs with --steps 0")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
  p.add_argument("--resident", choices=("off", "on", "both"), default="both",
                 help="features regime: Grain (off), device-resident data (on), or both rows")
  p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU if not in the table")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  regimes = ("frames", "features") if args.regime == "both" else (args.regime,)
  feeds = ("off", "on") if args.resident == "both" else (args.resident,)
  # Frames stay on the Grain pipeline (SPEC section 3).
  results = [bench(r, f, args) for r in regimes for f in (feeds if r == "features" else ("off",))]
  print("| regime | feed | device | batch | T | dtype | step ms | input ms | samples/s | TFLOP/step XLA / executed | "
        "TFLOP/s | MFU | input share at the step's H100 time | peak mem GiB |")
  print("| --- " * 14 + "|")
  for r in results:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {r['regime']} | {r['feed']} | {r['device']} | {r['batch']} | {r['snippets']} | {r['dtype']} | "
          f"{r['step_ms']:.1f} | {r['input_ms']:.2f} | {r['samples_per_s']:.1f} | {r['tflops_per_step']:.4g} / "
          f"{r['executed_tflops_per_step']:.4g} | {r['achieved_tflops']:.3g} | {mfu} | "
          f"{r['input_share_at_h100']:.3g} ({r['input_ms']:.2f} / {r['h100_step_ms']:.3g} ms) | "
          f"{r['peak_memory_gib']:.2f} ({r['memory_kind']}) |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
