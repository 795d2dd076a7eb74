"""The features train step's FLOPs and operand dtypes, counted (traced, never run): any machine, in seconds.

  python benchmarks/step_flops.py      # B=128, T=256, D=512, R=4, ViT-B/16 text tower, captions <= 40 words

Rows: the step as it ran before loss.precision and model.max_words ("highest", all 77 token positions), and
with the training defaults ("bf16", the word budget), as an accelerator compiles it (--platform; a CPU runs
the bf16 contractions on bf16-rounded float32 operands); then the ratio of executed FLOPs, the bf16 share, and
the costliest contraction sites. The counter is varcmp_jax.flops (the jaxpr: loop trip counts, rematerialization,
shard_map and every backend's GEMMs alike). Issue 19's CPU targets: ratio <= 0.75, bf16 share >= 80%.
"""
import argparse
import sys
import time

import jax

from varcmp_jax import config as config_lib
from varcmp_jax import flops
from varcmp_jax.model.varcmp import VarCMP
from varcmp_jax.train import sharding
from varcmp_jax.train.step import Trainer, example_batch


def features_config(batch: int, snippets: int, max_words: int, precision: str, chunk: int):
  c = config_lib.default_config(task="text", regime="features")
  c.model.clip = config_lib.clip_b16()
  c.model.dtype = "bfloat16"
  c.model.max_words = max_words
  c.loss.precision = precision
  c.loss.chunk_size = chunk
  c.data.snippets = snippets
  c.train.batch_size = batch
  c.train.lr_mult.image = 0.0
  return c


def count_step(config, platform: str) -> tuple[flops.Count, float]:
  trainer = Trainer(VarCMP(config.model, task=config.task, regime=config.regime), config,
                    sharding.make_mesh(config.mesh))
  batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 example_batch(config, config.train.batch_size))
  start = time.perf_counter()
  count = flops.count(trainer.train_step, trainer.abstract_state, batch, platform=platform)
  return count, time.perf_counter() - start


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--snippets", type=int, default=256)
  p.add_argument("--max-words", type=int, default=40, help="the word budget of the new step (captions <= this)")
  p.add_argument("--chunk", type=int, default=64, help="loss.chunk_size")
  p.add_argument("--platform", default="cuda", help="count the program this platform compiles (cuda, tpu, cpu): a "
                 "CPU contracts bf16-rounded operands in float32 (alignment/similarity.py)")
  args = p.parse_args(argv)
  rows = {}
  print(f"features step, B={args.batch} T={args.snippets} D=512 R=4, ViT-B/16 text tower (bf16), as compiled for "
        f"{args.platform}; traced on {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  print("| step | TFLOP executed | TFLOP model | bf16 share | traced in s |\n| --- | --- | --- | --- | --- |", flush=True)
  for name, max_words, precision in (("before: highest, 77 positions", config_lib.MAX_WORDS, "highest"),
                                     (f"now: bf16, {args.max_words} words", args.max_words, "bf16")):
    count, seconds = count_step(features_config(args.batch, args.snippets, max_words, precision, args.chunk),
                                args.platform)
    rows[name] = count
    print(f"| {name} | {count.executed / 1e12:.3f} | {count.model / 1e12:.3f} | {100 * count.bf16_share:.1f}% | "
          f"{seconds:.1f} |", flush=True)
  before, now = rows.values()
  print(f"executed FLOPs now / before: {now.executed / before.executed:.3f}x (target <= 0.75x); "
        f"bf16 share now: {100 * now.bf16_share:.1f}% (target >= 80%)", flush=True)
  print("costliest contractions now (site: operand dtype, shapes; executions per step; TFLOP):")
  for site, runs, total in now.top(8):
    print(f"  {site}: x{runs:g}, {total / 1e12:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
