"""Times every similarity level plus the retrieval metrics on random embeddings, and reports peak memory.

  python benchmarks/eval_similarity.py --queries 800 --gallery 800 --snippets 256 --regions 4 --words 32
  python benchmarks/eval_similarity.py ... --compare 96    # chunked vs unchunked at Q = G = 96, same run

Peak memory: the process's peak resident set (VmHWM) on CPU, the device's peak_bytes_in_use on GPU.
`--compare N` reruns both the chunked path and the naive unchunked one (chunk 0: one block, the whole
Q x G x T x R x L cosine tensor at once) at Q = G = N, each in a fresh subprocess so each peak is its own.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout, no install needed
import peak_memory  # benchmarks/peak_memory.py
from varcmp_jax import config as config_lib
from varcmp_jax import metrics
from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings

GIB = 2.0**30


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=800)
  parser.add_argument("--gallery", type=int, default=800)
  parser.add_argument("--snippets", type=int, default=256)
  parser.add_argument("--regions", type=int, default=4)
  parser.add_argument("--words", type=int, default=32)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--task", choices=tuple(config_lib.TASK_LEVELS), default="text")
  parser.add_argument("--chunk", type=int, default=16, help="block side of the spatial level; 0 = unchunked")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="embedding storage")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs (the best is reported)")
  parser.add_argument("--compare", type=int, default=0, help="also run chunked vs unchunked at Q = G = this")
  parser.add_argument("--json", action="store_true", help="print one JSON line (used by --compare)")
  return parser.parse_args(argv)


def random_normal(key, shape, dtype):
  """N(0, 1) array built block by block (lax.map), so generating it never holds a second full copy."""
  block = max(d for d in range(1, 33) if shape[0] % d == 0)
  keys = jax.random.split(key, shape[0] // block)
  make = lambda k: jax.random.normal(k, (block,) + tuple(shape[1:]), jnp.float32).astype(dtype)
  return jax.jit(lambda keys: jax.lax.map(make, keys).reshape(shape))(keys)


def random_embeddings(args):
  dtype = jnp.dtype(args.dtype)
  keys = iter(jax.random.split(jax.random.key(0), 8))
  rng = np.random.default_rng(0)
  g, q, t = args.gallery, args.queries, args.snippets
  # Realistic padding: every video has between T/2 and T valid snippets, every caption L/4..L words.
  mask = np.arange(t)[None, :] < rng.integers(max(1, t // 2), t + 1, size=(g, 1))
  video = VideoEmbeddings(frames=random_normal(next(keys), (g, t, args.dim), dtype),
                          regions=random_normal(next(keys), (g, t, args.regions, args.dim), dtype),
                          mask=jnp.asarray(mask), anomaly=jax.random.uniform(next(keys), (g, t)))
  if args.task == "text":
    word_mask = np.arange(args.words)[None, :] < rng.integers(max(1, args.words // 4), args.words + 1, size=(q, 1))
    query = TextEmbeddings(sentence=random_normal(next(keys), (q, args.dim), dtype),
                           words=random_normal(next(keys), (q, args.words, args.dim), dtype),
                           word_mask=jnp.asarray(word_mask))
  else:
    audio_mask = np.arange(t)[None, :] < rng.integers(max(1, t // 2), t + 1, size=(q, 1))
    query = AudioEmbeddings(segments=random_normal(next(keys), (q, t, args.dim), dtype), mask=jnp.asarray(audio_mask))
  return video, query


def run(args) -> dict:
  if args.queries != args.gallery:
    raise SystemExit("eval_similarity: the metrics need a square matrix, so --queries must equal --gallery")
  config = config_lib.default_config(args.task)
  video, query = random_embeddings(args)
  jax.block_until_ready((video, query))
  embedding_bytes = sum(x.nbytes for x in jax.tree.leaves((video, query)))

  @jax.jit
  def all_levels(video, query):
    weights = weighting.snippet_weights(video.anomaly, video.mask, config.weighting.beta, config.weighting.tau)
    levels = similarity.level_similarities(video, weights, query, args.task, chunk_size=args.chunk or None)
    return levels | {"combined": similarity.combined_score(levels, config.loss.levels)}

  start = time.perf_counter()
  compiled = all_levels.lower(video, query).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    sims = jax.block_until_ready(compiled(video, query))
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  result = metrics.report({name: np.asarray(sim) for name, sim in sims.items()}, args.task)
  metrics_s = time.perf_counter() - start
  naive_bytes = 4.0 * args.queries * args.gallery * args.snippets * args.regions * (
      args.words if args.task == "text" else 1)
  return dict(
      device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
      sizes=dict(Q=args.queries, G=args.gallery, T=args.snippets, R=args.regions, L=args.words, D=args.dim),
      task=args.task, chunk=args.chunk, dtype=args.dtype, repeats=args.repeats,
      compile_s=compile_s, levels_s=min(times), metrics_s=metrics_s,
      peak_memory_gib=peak_memory.jax_peak_bytes()[0] / GIB, embeddings_gib=embedding_bytes / GIB,
      unchunked_cosine_tensor_gib=naive_bytes / GIB, SumR=result["SumR"], table=metrics.format_table(result))


def compare(args, size: int) -> dict:
  """Chunked and unchunked at Q = G = size, each in its own process (its own peak RSS)."""
  runs = {}
  for name, chunk in (("chunked", args.chunk), ("unchunked", 0)):
    argv = [sys.executable, __file__, "--queries", str(size), "--gallery", str(size), "--snippets",
            str(args.snippets), "--regions", str(args.regions), "--words", str(args.words), "--dim", str(args.dim),
            "--task", args.task, "--chunk", str(chunk), "--dtype", args.dtype, "--repeats", str(max(1, args.repeats)),
            "--json"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    runs[name] = json.loads(out.strip().splitlines()[-1])
  return runs


def describe(r: dict) -> str:
  s = r["sizes"]
  return (f"{r['task']} Q={s['Q']} G={s['G']} T={s['T']} R={s['R']} L={s['L']} D={s['D']} {r['dtype']} "
          f"chunk={r['chunk'] or 'none'} on {r['platform']} ({r['device']}): levels {r['levels_s']:.2f} s "
          f"(compile {r['compile_s']:.2f} s, best of {r['repeats']}), metrics {r['metrics_s']:.3f} s, "
          f"peak memory {r['peak_memory_gib']:.2f} GiB (embeddings {r['embeddings_gib']:.2f} GiB; "
          f"an unchunked cosine tensor would be {r['unchunked_cosine_tensor_gib']:.2f} GiB)")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.repeats < 1:
    raise SystemExit("eval_similarity: --repeats must be >= 1")
  result = run(args)
  if args.json:
    print(json.dumps({k: v for k, v in result.items() if k != "table"}))
    return 0
  print(result["table"])
  print(describe(result))
  if args.compare:
    runs = compare(args, args.compare)
    for r in runs.values():
      print("peer:", describe(r))
    c, u = runs["chunked"], runs["unchunked"]
    print(f"chunked / unchunked at Q = G = {args.compare}: time {c['levels_s'] / u['levels_s']:.2f}x, "
          f"peak memory {c['peak_memory_gib'] / u['peak_memory_gib']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
