"""The VarCMP train step in both regimes: step time, MFU, a roofline, compile time, and whether the input keeps up.

  python benchmarks/train_step.py                   # full size (GPU/TPU): features T=256 B=128 (resident, then
                                                    #   Grain), then frames T=16 ViT-B/16 B=64; bf16
  python benchmarks/train_step.py --small           # tiny sizes that run on a CPU in a minute
  python benchmarks/train_step.py --regime features --resident on --batch 128 --steps 6
  python benchmarks/train_step.py --regime features --steps 0   # full size on a CPU: input vs the step's GPU time

Every phase is printed as it happens (records written, trainer built, compile seconds, each timed step) and
each result row the moment it is measured, so a run stopped by a time budget keeps what it measured.

The feeds are the trainer's own (train/feed.py) over ArrayRecord shards of random records written to a temp
dir: Grain ("input" = the next host batch placed on the mesh) or device-resident data (features regime;
"input" = the batch's row numbers on the devices, the gather runs inside the step). Captions have 8 to
--max-words words, and model.max_words = --max-words. "step" is the compiled step alone until its outputs are
ready (median over the timed steps); "compile" is the first step's lowering and compilation.

FLOPs: varcmp_jax.flops (from the step's jaxpr: every backend's GEMMs, loop trip counts, rematerialization),
model (MFU's numerator) and executed, all devices. MFU is against the device's datasheet dense bf16 peak.
"roofline" = max(executed FLOPs / peak, the bytes the step must read and write (state, batch) / HBM bandwidth):
a lower bound on the step time. "input share" = input time / the step's roofline time on one H100 (on a CPU:
would a GPU wait for this input? > 1: it would).
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
from varcmp_jax import config as config_lib
from varcmp_jax import flops
from varcmp_jax.data import records
from varcmp_jax.model.varcmp import VarCMP
from varcmp_jax.train import feed as feed_lib
from varcmp_jax.train import sharding
from varcmp_jax.train.step import Trainer

H100 = next(peak for pattern, peak in flops.PEAKS if pattern == "H100")
COLUMNS = ("regime", "feed", "device", "batch", "T", "words", "precision", "compile s", "step ms", "samples/s",
           "TFLOP/step model / executed", "bf16 share", "TFLOP/s (model)", "MFU", "roofline ms", "input ms",
           "input share at H100", "peak mem GiB")


def log(message: str):
  print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_config(regime: str, small: bool = False, batch: int | None = None, snippets: int | None = None,
                max_words: int = 40, precision: str = "bf16"):
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
    c.train.batch_size = 64 if regime == "frames" else 128
  c.data.snippets = snippets or c.data.snippets
  c.model.temporal.max_len = max(c.model.temporal.max_len, c.data.snippets)
  c.train.batch_size = batch or c.train.batch_size
  c.model.max_words = max_words
  c.loss.precision = precision
  c.train.warmup_steps, c.train.num_steps = 10, 1000
  if regime == "features":
    c.train.lr_mult.image = 0.0
  return c


def write_random_records(out: str, config, count: int):
  """`count` records with the shapes of `config`, captions of 8 to config.model.max_words words."""
  rng = np.random.default_rng(0)
  t, m = config.data.snippets, config.model
  name = "train-00000-of-00001.array_record"
  writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
  for i in range(count):
    words = int(rng.integers(min(8, m.max_words), m.max_words + 1))
    tokens = np.zeros(77, np.int32)
    tokens[0], tokens[1:1 + words], tokens[1 + words] = 49406, rng.integers(300, 40000, words), 49407
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
  config = make_config(regime, args.small, args.batch, args.snippets, args.max_words, args.precision)
  feed_name = "resident" if resident == "on" else "grain"
  print(f"{regime} / {feed_name}: B={config.train.batch_size} T={config.data.snippets} "
        f"max_words={config.model.max_words} loss.precision={config.loss.precision} dtype={config.model.dtype}",
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    write_random_records(tmp, config, count=config.train.batch_size * 2)
    log(f"{config.train.batch_size * 2} random records written in {time.perf_counter() - start:.1f} s")
    config.data.records = tmp
    config.data.worker_count = args.workers
    config.data.resident = resident
    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config, mesh)
    state = trainer.init_state(seed=0)
    feed = feed_lib.ResidentFeed(trainer, config, progress=False) if resident == "on" else feed_lib.GrainFeed(trainer, config)
    first = feed.next()
    log("trainer, state and feed ready")

    start = time.perf_counter()
    step_fn, count = feed.compile(state, first)
    compile_s = time.perf_counter() - start
    log(f"compiled in {compile_s:.1f} s: {count.model / 1e12:.4g} TFLOP model, {count.executed / 1e12:.4g} "
        f"executed, {100 * count.bf16_share:.1f}% on bf16 operands")

    input_s, step_s, metrics = [], [], {}
    if args.steps:
      for _ in range(args.warmup):
        state, metrics = step_fn(state, feed.next())
      jax.block_until_ready(metrics)
      log(f"{args.warmup} warmup steps done")
    for i in range(args.steps or args.input_batches):    # --steps 0: the input alone (full size on a CPU)
      t = time.perf_counter()
      inputs = jax.block_until_ready(feed.next())
      t1 = time.perf_counter()
      input_s.append(t1 - t)
      if args.steps:
        state, metrics = step_fn(state, inputs)
        jax.block_until_ready(metrics)
        step_s.append(time.perf_counter() - t1)
        log(f"step {i + 1}/{args.steps}: {1e3 * step_s[-1]:.1f} ms (input {1e3 * input_s[-1]:.2f} ms)")
  step = float(np.median(step_s)) if step_s else math.nan
  inputs = float(np.median(input_s))
  device, devices = jax.devices()[0], jax.device_count()
  peak = flops.Peak(args.peak_tflops * 1e12, args.peak_hbm_gbs * 1e9) if args.peak_tflops else flops.device_peak(device)
  memory, memory_kind = peak_memory.jax_peak_bytes()
  h100_step = flops.roofline_seconds(count, H100)
  return dict(
      regime=regime, feed=feed.kind, device=f"{devices} x {device.device_kind}",
      batch=config.train.batch_size, snippets=config.data.snippets, max_words=config.model.max_words,
      precision=config.loss.precision, dtype=config.model.dtype, compile_s=compile_s, step_ms=1e3 * step,
      input_ms=1e3 * inputs, samples_per_s=config.train.batch_size / step,
      model_tflops_per_step=count.model / 1e12, executed_tflops_per_step=count.executed / 1e12,
      bf16_share=count.bf16_share, model_tflops_per_s=count.model / step / 1e12,
      mfu=flops.mfu(count.model, step, peak, devices) if step_s else None,
      roofline_ms=1e3 * flops.roofline_seconds(count, peak, devices) if peak else None,
      h100_step_ms=1e3 * h100_step, input_share_at_h100=inputs / h100_step,
      peak_memory_gib=memory / 2 ** 30, memory_kind=memory_kind,
      loss=float(metrics["loss"]) if metrics else None)


def row(r: dict) -> str:
  optional = lambda value, fmt: "n/a" if value is None or value != value else format(value, fmt)
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  cells = (r["regime"], r["feed"], r["device"], r["batch"], r["snippets"], r["max_words"], r["precision"],
           f"{r['compile_s']:.1f}", optional(r["step_ms"], ".1f"), optional(r["samples_per_s"], ".1f"),
           f"{r['model_tflops_per_step']:.4g} / {r['executed_tflops_per_step']:.4g}", f"{100 * r['bf16_share']:.0f}%",
           optional(r["model_tflops_per_s"], ".3g"), mfu, optional(r["roofline_ms"], ".2f"), f"{r['input_ms']:.2f}",
           f"{r['input_share_at_h100']:.3g} ({r['input_ms']:.2f} / {r['h100_step_ms']:.3g} ms)",
           f"{r['peak_memory_gib']:.2f} ({r['memory_kind']})")
  return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--regime", choices=("frames", "features", "both"), default="both")
  p.add_argument("--small", action="store_true", help="tiny model and batch: a CPU smoke run")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--snippets", type=int, default=None)
  p.add_argument("--max-words", type=int, default=40, help="model.max_words; captions have 8 to this many words")
  p.add_argument("--precision", choices=config_lib.LOSS_PRECISIONS, default="bf16", help="loss.precision")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps (median reported); 0: compile, count FLOPs and time the input only")
  p.add_argument("--input-batches", type=int, default=5, help="timed inputs with --steps 0")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
  p.add_argument("--resident", choices=("off", "on", "both"), default="both",
                 help="features regime: Grain (off), device-resident data (on), or both rows")
  p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU if not in flops.PEAKS")
  p.add_argument("--peak-hbm-gbs", type=float, default=1000.0, help="with --peak-tflops: HBM GB/s for the roofline")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  regimes = ("features", "frames") if args.regime == "both" else (args.regime,)
  feeds = ("on", "off") if args.resident == "both" else (args.resident,)
  runs = [(r, f) for r in regimes for f in (feeds if r == "features" else ("off",))]   # frames: Grain (SPEC 3)
  peak = flops.device_peak()
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; datasheet peak: "
        + (f"{peak.flops / 1e12:.0f} TFLOP/s bf16, {peak.hbm_bytes / 1e12:.2f} TB/s" if peak else "unknown (no MFU)"),
        flush=True)
  results = []
  for regime, resident in runs:
    results.append(bench(regime, resident, args))
    if len(results) == 1:
      print("| " + " | ".join(COLUMNS) + " |\n" + "| --- " * len(COLUMNS) + "|", flush=True)
    print(row(results[-1]), flush=True)
    if args.json:   # rewritten after every row: a run stopped by a time budget keeps what it measured
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
