"""Does the train step's work scale with devices? The same global batch on 1 and on N fake CPU devices.

  python benchmarks/pod_scaling.py                      # B=256, T=32, R=4, L=77, chunk 32 and unchunked, text + audio
  python benchmarks/pod_scaling.py --devices 8 --tasks text --chunks 32 --repeats 5 --json out.json

On one CPU, N fake devices share the same cores, so a step that splits its work over the devices takes
about as long as on one device (total-work ratio = N-device step time / 1-device step time = 1.0), and a
step that every device computes in full takes N times as long (ratio N). Each (task, chunk, devices)
runs in its own process (the device count is fixed when XLA starts; each peak memory is its own).

Besides time (median over --repeats steps after a warmup step), each run reads its compiled per-device
HLO: the similarity dots (einsum, operand and result shapes, how many times each runs per step: the
product of the trip counts of the loops around it) and the executed dot FLOPs per device, for the whole
step and for the similarity dots (XLA's cost_analysis() counts a loop body once, so it cannot show this).
Memory: XLA's per-device buffer sizes (memory_analysis) and the process's peak RSS (all fake devices).
Features regime with a tiny text tower (width --dim, --depth layers) so the similarity levels dominate.

Why hlo_flops here and not varcmp_jax.flops (the project's FLOP counter, which every other benchmark uses): this
benchmark checks how XLA partitioned the step, so it must read what each device runs after SPMD partitioning,
the compiled per-device HLO; the jaxpr that varcmp_jax.flops reads is the program before partitioning (all
devices together), where a step that every device computes in full looks the same as one split over them. On
the CPU the compiled HLO keeps its dots as `dot` instructions, so counting them there is complete.

Output (benchmarks/run_all.py's convention): each run's phases as they happen (compiled, each timed step),
streamed from its process, a table row per (task, chunk) the moment both of its runs are done.
"""
import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout, no install needed
import peak_memory  # benchmarks/peak_memory.py
from hlo_flops import dot_report  # benchmarks/hlo_flops.py
from report import RESULT, phase, run_child  # benchmarks/report.py

GIB = 2.0 ** 30


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8, help="N, compared with 1 device")
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--snippets", type=int, default=32, help="T")
  p.add_argument("--region-grid", type=int, default=2, help="R = grid**2 region tokens")
  p.add_argument("--dim", type=int, default=64, help="tower width = joint space D")
  p.add_argument("--depth", type=int, default=2, help="text tower layers")
  p.add_argument("--tasks", default="text,audio")
  p.add_argument("--chunks", default="32,0", help="loss.chunk_size values; 0 = unchunked")
  p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
  p.add_argument("--json", default=None, help="write all runs here")
  p.add_argument("--run", default=None, help=argparse.SUPPRESS)    # internal: one run, "task,chunk"
  return p.parse_args(argv)


# ---- one run (in its own process) -------------------------------------------------------------------


def make_config(args, task: str, chunk: int, devices: int):
  from varcmp_jax import config as config_lib
  c = config_lib.default_config(task=task, regime="features")
  c.model.clip = config_lib.clip_tiny(image_size=32, patch_size=8, width=args.dim, depth=args.depth)
  c.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=4, max_len=max(64, args.snippets))
  c.model.anomaly_head = dict(hidden=64)
  c.model.dtype = "float32"
  c.model.region_grid = args.region_grid
  c.model.audio.kind = "features"
  c.data.snippets = args.snippets
  c.train.batch_size = args.batch
  c.train.lr_mult.image = 0.0
  c.loss.chunk_size = chunk
  c.mesh.data, c.mesh.fsdp = devices, 1
  return c


def random_batch(config, rng):
  from varcmp_jax.train.step import example_batch
  batch = example_batch(config, config.train.batch_size)
  n, t = batch["mask"].shape
  for key in ("features", "regions", "audio_features"):
    if key in batch:
      batch[key] = rng.normal(size=batch[key].shape).astype(np.float32)
  lengths = rng.integers(5, 77, n)
  batch["tokens"][:] = 0
  for i, length in enumerate(lengths):
    batch["tokens"][i, 0], batch["tokens"][i, 1:length] = 49406, rng.integers(300, 40000, length - 1)
    batch["tokens"][i, length] = 49407
  batch["mask"] = np.arange(t)[None] < rng.integers(t // 2, t + 1, n)[:, None]
  batch["label"] = rng.integers(0, 2, n).astype(np.int32)
  return batch


def run_one(args, task: str, chunk: int) -> dict:
  import jax
  from varcmp_jax.model.varcmp import VarCMP
  from varcmp_jax.train import sharding
  from varcmp_jax.train.step import Trainer
  devices = jax.device_count()
  config = make_config(args, task, chunk, devices)
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh))
  state = trainer.init_state(seed=0)
  rng = np.random.default_rng(0)
  batches = [trainer.shard_batch(random_batch(config, rng)) for _ in range(2)]
  label = f"{task}, chunk {chunk or 'none'}, {devices} device(s)"
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  phase(label, f"compiled in {compile_s:.1f} s")
  memory = compiled.memory_analysis()
  report = dot_report(compiled.as_text())
  state, metrics = compiled(state, batches[0])             # warmup
  losses, times = [float(metrics["loss"])], []
  for i in range(args.repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[(i + 1) % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
    phase(label, f"step {i + 1}/{args.repeats}: {1e3 * times[-1]:.1f} ms")
  return dict(task=task, chunk=chunk, devices=devices, batch=args.batch, T=args.snippets, R=args.region_grid ** 2,
              L=77, D=args.dim, step_s=float(np.median(times)), step_times_s=times, compile_s=compile_s,
              losses=losses, device_temp_gib=memory.temp_size_in_bytes / GIB if memory else None,
              device_argument_gib=memory.argument_size_in_bytes / GIB if memory else None,
              peak_rss_gib=peak_memory.host_peak_bytes() / GIB, **report)


# ---- the driver ---------------------------------------------------------------------------------------


def spawn(argv, task: str, chunk: int, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
  result = run_child([sys.executable, __file__, *argv, "--run", f"{task},{chunk}"], f"{task}, chunk {chunk}", env)
  if result is None:
    raise SystemExit(f"pod_scaling: the {task} chunk={chunk} run on {devices} devices failed")
  return result


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.run:
    task, chunk = args.run.split(",")
    print(RESULT + json.dumps(run_one(args, task, int(chunk))), flush=True)
    return 0
  if args.batch % args.devices:
    raise SystemExit(f"pod_scaling: --batch {args.batch} does not split over --devices {args.devices}")
  rows = []
  print(f"| task | chunk | step s, 1 device | step s, {args.devices} devices | total-work ratio (time) | "
        f"ratio (executed dot FLOPs) | similarity GFLOP/device, 1 / {args.devices} | per-device temp GiB, 1 / "
        f"{args.devices} | peak RSS GiB, 1 / {args.devices} | loss 1 / {args.devices} |")
  print("| --- " * 10 + "|", flush=True)
  for task in args.tasks.split(","):
    for chunk in (int(c) for c in args.chunks.split(",")):
      one, many = (spawn(argv, task, chunk, n) for n in (1, args.devices))
      ratio = many["step_s"] / one["step_s"]
      flops_ratio = args.devices * many["dot_flops"] / one["dot_flops"]
      rows.append(dict(one=one, many=many, time_ratio=ratio, flops_ratio=flops_ratio))
      print(f"| {task} | {chunk or 'none'} | {one['step_s']:.2f} | {many['step_s']:.2f} | {ratio:.2f} | "
            f"{flops_ratio:.2f} | {one['similarity_dot_flops'] / 1e9:.1f} / {many['similarity_dot_flops'] / 1e9:.1f} | "
            f"{one['device_temp_gib']:.3f} / {many['device_temp_gib']:.3f} | {one['peak_rss_gib']:.2f} / "
            f"{many['peak_rss_gib']:.2f} | {one['losses'][-1]:.5f} / {many['losses'][-1]:.5f} |", flush=True)
  for row in rows:
    for run in (row["one"], row["many"]):
      print(f"\n{run['task']}, chunk {run['chunk'] or 'none'}, {run['devices']} device(s): similarity dots per device")
      for d in run["similarity_dots"]:
        print(f"  {d['runs_per_step']:>5} x  {d['dot']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), rows=rows), f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
