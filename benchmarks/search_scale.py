"""Archive-scale search: builds an index of N synthetic videos with planted ground truths, then times queries.

  python benchmarks/search_scale.py --videos 100000 --snippets 32 --dim 64 --regions 4 --words 8 \
      --queries 20 --candidates 1000 --out /tmp/scale --json /tmp/scale.json
  python benchmarks/search_scale.py ... --phase build     # only build (peak RSS of the build alone)
  python benchmarks/search_scale.py ... --phase query     # only query an index already at --out

No model: the videos' f_t, region tokens and anomaly prior are random, written through the index's own code
(index.levels.index_arrays -> index.store.IndexWriter) as `varcmp index` writes a trained model's embeddings.
Query q has a planted ground truth, video q * (N // Q): two of its snippets carry the query's sentence vector
(f_t) and word vectors (regions) under noise, with a high prior there; --related other videos per query carry
them more weakly (near misses, so the top 10 is contested, not the truth plus noise). Text task, levels video +
frame (stage 1) and spatial (stage 2), all weights 1.

JSON: index_build_s, index_bytes, query_p50_s, query_p95_s (two-stage `Index.search`, top 10, after one
untimed warm-up query that compiles), exhaustive_p50_s (`candidates=None`), recall_at_10 (two-stage top-10 vs
exhaustive top-10, averaged over the queries run both ways), planted_recall_at_1 / _at_10 (the planted video
ranked 1st / in the top 10 of the two-stage search), and this process's peak RSS (build_/query_peak_rss_bytes
with --phase).
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout, no install needed
import peak_memory  # benchmarks/peak_memory.py  # pylint: disable=g-import-not-at-top
from varcmp_jax.alignment.embeddings import TextEmbeddings, VideoEmbeddings
from varcmp_jax.index import levels, store
from varcmp_jax.index import search as index_search

LEVELS = {"video": 1.0, "frame": 1.0, "spatial": 1.0}
EVENT_SNIPPETS = 2
BATCH = 1024   # videos generated and written at a time


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--videos", type=int, default=100_000)
  parser.add_argument("--snippets", type=int, default=32)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--regions", type=int, default=4)
  parser.add_argument("--words", type=int, default=8)
  parser.add_argument("--queries", type=int, default=20)
  parser.add_argument("--candidates", type=int, default=1000)
  parser.add_argument("--related", type=int, default=20,
                      help="per query, videos carrying its vectors at 0.1-0.4 of the truth's strength")
  parser.add_argument("--exhaustive-queries", type=int, default=None,
                      help="queries also run exhaustively (default: all; 0 skips the exhaustive search)")
  parser.add_argument("--shard-size", type=int, default=4096)
  parser.add_argument("--chunk-mib", type=int, default=32, help="Index chunk_bytes, MiB")
  parser.add_argument("--phase", choices=("all", "build", "query"), default="all")
  parser.add_argument("--out", required=True, help="index directory (replaced by the build phase)")
  parser.add_argument("--json", default=None, help="write the figures here (merged into an existing file)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def queries(args) -> list[TextEmbeddings]:
  rng = np.random.default_rng(args.seed + 1)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return [TextEmbeddings(sentence=unit(rng.standard_normal((1, args.dim))).astype(np.float32),
                         words=unit(rng.standard_normal((1, args.words, args.dim))).astype(np.float32),
                         word_mask=np.ones((1, args.words), bool)) for _ in range(args.queries)]


def planted(args) -> dict[int, int]:
  """ground-truth video -> query."""
  return {q * (args.videos // args.queries): q for q in range(args.queries)}


def related(args) -> dict[int, tuple[int, float]]:
  """related video -> (query, strength in [0.1, 0.4]): near misses that contest the top 10 with the truth."""
  rng = np.random.default_rng(args.seed + 2)
  truth = planted(args)
  out = {}
  for q in range(args.queries):
    for g in rng.choice(args.videos, args.related, replace=False):
      if int(g) not in truth:
        out[int(g)] = (q, float(rng.uniform(0.1, 0.4)))
  return out


def build(args) -> dict:
  shutil.rmtree(args.out, ignore_errors=True)
  config = ml_collections.ConfigDict({"prior": {"source": "head"}, "weighting": {"beta": 0.5, "tau": 0.1},
                                      "eval": {"chunk_size": 64}})
  header = {"run": None, "config": config.to_dict(), "task": "text", "levels": LEVELS,
            "pooled_levels": list(levels.POOLED_LEVELS["text"])}
  t, d, r = args.snippets, args.dim, args.regions
  prepare = jax.jit(lambda video: levels.index_arrays(video, *levels.snippet_weights(video, config), "text"))
  qs = queries(args)
  strength = {**related(args), **{g: (q, 1.0) for g, q in planted(args).items()}}
  rng = np.random.default_rng(args.seed)
  times = np.stack([np.arange(t), np.arange(t) + 1], -1).astype(np.float32)
  start_time = time.perf_counter()
  with store.IndexWriter(args.out, header) as writer:
    source = writer.add_source({"records": "synthetic", "split": "test", "fingerprint": str(args.seed),
                                "videos": args.videos, "slices": -(-args.videos // args.shard_size)}, False)
    slices = writer.manifest["sources"][source]["slices"]
    for i in tqdm.tqdm(range(slices), desc="build", unit="shard"):
      lo, hi = store.slice_bounds(args.videos, slices, i)
      shard = writer.shard(source, i, lo, hi)
      for start in range(lo, hi, BATCH):     # memory: one batch of videos
        rows = range(start, min(hi, start + BATCH))
        n = len(rows)
        frames = rng.standard_normal((n, t, d), dtype=np.float32)
        regions = rng.standard_normal((n, t, r, d), dtype=np.float32)
        prior = rng.uniform(0.0, 0.3, (n, t)).astype(np.float32)
        events = rng.integers(0, t - EVENT_SNIPPETS + 1, n)
        for j, g in enumerate(rows):
          if g in strength:   # the query's vectors, times the strength, under noise of 0.3 times their norm
            (q, a), e = strength[g], slice(events[j], events[j] + EVENT_SNIPPETS)
            frames[j, e] = a * np.sqrt(d) * qs[q].sentence[0] + 0.3 * frames[j, e]
            regions[j, e] = a * np.sqrt(d) * qs[q].words[0][np.arange(r) % args.words] + 0.3 * regions[j, e]
            prior[j, e] = 0.9
        video = VideoEmbeddings(frames=frames, regions=regions, mask=np.ones((n, t), bool), anomaly=prior)
        arrays = jax.device_get(prepare(video))
        arrays["times"] = np.broadcast_to(times, (n, t, 2))
        shard.add(arrays, [{"video": f"synthetic_{g:07d}", "caption": "", "label": int(g in strength),
                            "duration": float(t),
                            "event": [float(events[j]), float(events[j] + EVENT_SNIPPETS)] if g in strength else [-1.0, -1.0]}
                           for j, g in enumerate(rows)])
      shard.commit()
  index_bytes = sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(args.out) for f in files)
  return {"index_build_s": time.perf_counter() - start_time, "index_bytes": index_bytes}


def query(args) -> dict:
  index = index_search.Index(args.out, chunk_bytes=args.chunk_mib << 20)
  qs, truth = queries(args), {q: g for g, q in planted(args).items()}
  index.search(qs[0], top_k=10, candidates=args.candidates)     # compiles stage 2 (untimed)
  times, tops = [], []
  for q in tqdm.tqdm(qs, desc="two-stage"):
    start = time.perf_counter()
    hits = index.search(q, top_k=10, candidates=args.candidates)
    times.append(time.perf_counter() - start)
    tops.append([h["index"] for h in hits])
  exhaustive = args.queries if args.exhaustive_queries is None else min(args.exhaustive_queries, args.queries)
  exhaustive_times, recalls = [], []
  for q in tqdm.tqdm(range(exhaustive), desc="exhaustive"):
    start = time.perf_counter()
    hits = index.search(qs[q], top_k=10, candidates=None)
    exhaustive_times.append(time.perf_counter() - start)
    recalls.append(len(set(tops[q]) & {h["index"] for h in hits}) / 10)
  return {"query_p50_s": float(np.percentile(times, 50)), "query_p95_s": float(np.percentile(times, 95)),
          "exhaustive_p50_s": float(np.percentile(exhaustive_times, 50)) if exhaustive_times else None,
          "recall_at_10": float(np.mean(recalls)) if recalls else None,
          "exhaustive_queries": exhaustive,
          "planted_recall_at_1": float(np.mean([top[0] == truth[q] for q, top in enumerate(tops)])),
          "planted_recall_at_10": float(np.mean([truth[q] in top for q, top in enumerate(tops)])),
          "stage1_window_rows": index.window_rows, "stage2_block_rows": index.block_rows}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.queries < 1 or args.videos < args.queries:
    raise SystemExit("--queries must be >= 1 and --videos >= --queries")
  result = {"videos": args.videos, "snippets": args.snippets, "dim": args.dim, "regions": args.regions,
            "words": args.words, "queries": args.queries, "candidates": args.candidates, "phase": args.phase}
  if args.phase in ("all", "build"):
    result.update(build(args))
  if args.phase in ("all", "query"):
    result.update(query(args))
  result[f"{args.phase}_peak_rss_bytes" if args.phase != "all" else "peak_rss_bytes"] = peak_memory.host_peak_bytes()
  print(json.dumps(result, indent=2))
  if args.json:
    previous = {}
    if os.path.exists(args.json):
      with open(args.json) as f:
        previous = json.load(f)
    with open(args.json, "w") as f:
      json.dump({**previous, **result}, f, indent=2)


if __name__ == "__main__":
  main()
