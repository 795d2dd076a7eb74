"""Times every similarity level plus the retrieval metrics on random embeddings, and reports peak memory.

  python benchmarks/eval_similarity.py --queries 800 --gallery 800 --snippets 256 --regions 4 --words 32
  python benchmarks/eval_similarity.py ... --compare 96    # chunked vs unchunked at Q = G = 96, same run

Peak memory: the process's peak resident set (VmHWM) on CPU, the device's peak_bytes_in_use on GPU.
`--compare N` reruns both the chunked path and the naive unchunked one (chunk 0: one block, the whole
Q x G x T x R x L cosine tensor at once) at Q = G = N, each in a fresh subprocess so each peak is its own.
Output (benchmarks/run_all.py's convention): phases as they happen (embeddings ready, compiled, each timed
run), a table row per run the moment it is measured, then the ratio line `chunked / unchunked ...: X.XXx time`.
"""
import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout, no install needed
import peak_memory  # benchmarks/peak_memory.py
from report import RESULT, Table, phase, run_child  # benchmarks/report.py
from varcmp_jax import config as config_lib
from varcmp_jax import metrics
from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings

GIB = 2.0**30
TABLE = Table("run", "task", "Q = G", "T", "R", "L", "D", "dtype", "chunk", "compile s", "levels s", "metrics s",
              "peak memory GiB", "embeddings GiB", "unchunked cosine tensor GiB")


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
  parser.add_argument("--json", action="store_true", help="print one RESULT JSON line (used by --compare)")
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


def run(args, label: str) -> dict:
  if args.queries != args.gallery:
    raise SystemExit("eval_similarity: the metrics need a square matrix, so --queries must equal --gallery")
  config = config_lib.default_config(args.task)
  start = time.perf_counter()
  video, query = random_embeddings(args)
  jax.block_until_ready((video, query))
  embedding_bytes = sum(x.nbytes for x in jax.tree.leaves((video, query)))
  phase(label, f"random embeddings ready ({embedding_bytes / GIB:.2f} GiB) in {time.perf_counter() - start:.1f} s")

  @jax.jit
  def all_levels(video, query):
    weights = weighting.snippet_weights(video.anomaly, video.mask, config.weighting.beta, config.weighting.tau)
    levels = similarity.level_similarities(video, weights, query, args.task, chunk_size=args.chunk or None)
    return levels | {"combined": similarity.combined_score(levels, config.loss.levels)}

  start = time.perf_counter()
  compiled = all_levels.lower(video, query).compile()
  compile_s = time.perf_counter() - start
  phase(label, f"compiled in {compile_s:.2f} s")
  times = []
  for i in range(args.repeats):
    start = time.perf_counter()
    sims = jax.block_until_ready(compiled(video, query))
    times.append(time.perf_counter() - start)
    phase(label, f"levels {i + 1}/{args.repeats}: {1e3 * times[-1]:.1f} ms")
  start = time.perf_counter()
  metrics.report({name: np.asarray(sim) for name, sim in sims.items()}, args.task)
  metrics_s = time.perf_counter() - start
  memory, memory_kind = peak_memory.jax_peak_bytes()
  naive_bytes = 4.0 * args.queries * args.gallery * args.snippets * args.regions * (
      args.words if args.task == "text" else 1)
  return dict(
      device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
      sizes=dict(Q=args.queries, G=args.gallery, T=args.snippets, R=args.regions, L=args.words, D=args.dim),
      task=args.task, chunk=args.chunk, dtype=args.dtype, repeats=args.repeats,
      compile_s=compile_s, levels_s=min(times), metrics_s=metrics_s,
      peak_memory_gib=memory / GIB, memory_kind=memory_kind, embeddings_gib=embedding_bytes / GIB,
      unchunked_cosine_tensor_gib=naive_bytes / GIB)


def compare(args, size: int) -> dict:
  """Chunked and unchunked at Q = G = size, each in its own process (its own peak RSS), each row printed."""
  runs = {}
  for name, chunk in (("chunked", args.chunk), ("unchunked", 0)):
    label = f"peer, chunk {chunk or 'none'}"
    phase(label, f"Q = G = {size}, {name}, in its own process")
    argv = [sys.executable, __file__, "--queries", str(size), "--gallery", str(size), "--snippets",
            str(args.snippets), "--regions", str(args.regions), "--words", str(args.words), "--dim", str(args.dim),
            "--task", args.task, "--chunk", str(chunk), "--dtype", args.dtype, "--repeats", str(max(1, args.repeats)),
            "--json"]
    runs[name] = run_child(argv, label)
    if runs[name] is None:
      raise SystemExit(f"eval_similarity: the {name} run at Q = G = {size} failed")
    print_row(f"peer: {name}", runs[name])
  return runs


def print_row(label: str, r: dict):
  s = r["sizes"]
  TABLE.row(label, r["task"], s["Q"], s["T"], s["R"], s["L"], s["D"], r["dtype"], r["chunk"] or "none",
            f"{r['compile_s']:.2f}", f"{r['levels_s']:.3f} (best of {r['repeats']})", f"{r['metrics_s']:.3f}",
            f"{r['peak_memory_gib']:.2f} ({r['memory_kind']})", f"{r['embeddings_gib']:.2f}",
            f"{r['unchunked_cosine_tensor_gib']:.2f}")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.repeats < 1:
    raise SystemExit("eval_similarity: --repeats must be >= 1")
  if not args.json:
    print(f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}): every {args.task} similarity level and the "
          f"metrics on random embeddings", flush=True)
  result = run(args, f"peer, chunk {args.chunk or 'none'}" if args.json else "main")
  if args.json:
    print(RESULT + json.dumps(result), flush=True)
    return 0
  print_row("main", result)
  if args.compare:
    runs = compare(args, args.compare)
    c, u = runs["chunked"], runs["unchunked"]
    print(f"chunked / unchunked at Q = G = {args.compare}: {c['levels_s'] / u['levels_s']:.2f}x time, "
          f"{c['peak_memory_gib'] / u['peak_memory_gib']:.2f}x peak memory", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
