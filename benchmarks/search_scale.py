"""Archive-scale search: builds an index of N synthetic videos with planted ground truths, then times queries.

  python benchmarks/search_scale.py --videos 100000 --snippets 256 --dim 512 --regions 4 --words 32 \
      --queries 20 --candidates 1000 --out /tmp/scale --json /tmp/scale.json
  python benchmarks/search_scale.py ... --phase build       # only build (peak RSS of the build alone)
  python benchmarks/search_scale.py ... --phase reference   # only the float32 reference ranking
  python benchmarks/search_scale.py ... --phase query       # only query an index already at --out

No model: the videos' f_t, region tokens and anomaly prior are random (each video from its own seed, so every
phase regenerates the same videos), written through the index's own code (index.levels.index_arrays ->
index.store.IndexWriter) as `varcmp index` writes a trained model's embeddings, with its defaults: shards of
--shard-mb (store.DEFAULT_SHARD_BYTES), --storage auto (index.codec), --batch videos at a time (the CLI's eval
batch). Query q has a planted ground truth, video q * (N // Q): two of its snippets carry the query's sentence
vector (f_t) and word vectors (regions) under noise, with a high prior there; --related other videos per query
carry them more weakly (near misses, so the top 10 is contested, not the truth plus noise). Text task, levels
video + frame (stage 1) and spatial (stage 2), all weights 1.

The reference phase ranks every video for every query exhaustively from the uncompressed float32 embeddings,
with NumPy written from the formulas of SPEC section 2 (not the index's code), and keeps each query's top 10
in OUT.fp32_top10.json beside the index.

JSON: index_build_s (build phase wall time, generation included; generate_s of it), index_bytes,
bytes_per_video, storage, query_p50_s, query_p95_s (two-stage `Index.search`, top 10, after one untimed warm-up
query that compiles), exhaustive_p50_s (`candidates=None` on the index), recall_at_10 (two-stage top-10 vs the
index's exhaustive top-10, averaged over the queries run both ways), recall_at_10_vs_fp32 (two-stage top-10 vs
the float32 reference top-10, over the --reference-queries), planted_recall_at_1 / _at_10 (the planted video
ranked 1st / in the top 10 of the two-stage search), query_cpu_p50_s (CPU time of a query, both cores: steadier
than wall time on a shared machine), load_average (1 min, at the end), and this process's peak RSS
(build_/reference_/query_peak_rss_bytes with --phase). Every phase prints its progress and each result as it comes.

What checking reads costs (issue 29): --verify-reads off opens the index with stage 2's row checksums off; even
(odd) interleaves the two in one run: queries 0, 2, 4, ... (1, 3, 5, ...) check the rows they read, the others do
not, each query run once, so both halves read their candidates cold and meet the same machine load. It adds
verified_p50_s, unverified_p50_s, their ratio, and per_query (seconds, verified or not); a run with even and one
with odd on a cold page cache give every query both ways. open_s: opening the index (with its checks).
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
from varcmp_jax.index import codec, levels, store
from varcmp_jax.index import search as index_search

LEVELS = {"video": 1.0, "frame": 1.0, "spatial": 1.0}
BETA, TAU = 0.5, 0.1
EVENT_SNIPPETS = 2


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
                      help="queries also run exhaustively on the index (default: all; 0 skips it)")
  parser.add_argument("--reference-queries", type=int, default=None,
                      help="queries the float32 reference ranks (the first ones; default: all; 0: none, and the query "
                           "phase reports no recall against it)")
  parser.add_argument("--storage", choices=("auto",) + codec.STORAGES, default="auto")
  parser.add_argument("--shard-mb", type=float, default=store.DEFAULT_SHARD_BYTES / 2**20)
  parser.add_argument("--shard-size", type=int, default=None, help="videos per shard (instead of --shard-mb)")
  parser.add_argument("--batch", type=int, default=32, help="videos generated and written at a time")
  parser.add_argument("--chunk-mib", type=int, default=32, help="Index chunk_bytes, MiB")
  parser.add_argument("--verify-reads", choices=("on", "off", "even", "odd"), default="on",
                      help="stage 2 checks each row it reads against its checksum: on, off, or on for the even "
                           "(odd) queries only, to measure what it costs")
  parser.add_argument("--phase", choices=("all", "build", "reference", "query"), default="all")
  parser.add_argument("--out", required=True, help="index directory (replaced by the build phase)")
  parser.add_argument("--json", default=None, help="write the figures here (merged into an existing file)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def say(*parts):
  print(*parts, flush=True)


def reference_queries(args) -> int:
  return args.queries if args.reference_queries is None else min(args.reference_queries, args.queries)


def reference_path(args) -> str:
  return os.path.normpath(args.out) + ".fp32_top10.json"


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


def generate(args, rows, qs, strength) -> dict:
  """frames (n, T, D), regions (n, T, R, D), prior (n, T) float32 and event starts (n,) of the videos `rows`,
  each from its own seed (any batching gives the same videos)."""
  t, d, r = args.snippets, args.dim, args.regions
  out = {"frames": np.empty((len(rows), t, d), np.float32), "regions": np.empty((len(rows), t, r, d), np.float32),
         "prior": np.empty((len(rows), t), np.float32), "events": np.empty(len(rows), np.int64)}
  for j, g in enumerate(rows):
    rng = np.random.default_rng([args.seed, g])
    frames, regions = out["frames"][j], out["regions"][j]
    frames[:] = rng.standard_normal((t, d), dtype=np.float32)
    regions[:] = rng.standard_normal((t, r, d), dtype=np.float32)
    out["prior"][j] = rng.uniform(0.0, 0.3, t)
    out["events"][j] = event = rng.integers(0, t - EVENT_SNIPPETS + 1)
    if g in strength:   # the query's vectors, times the strength, under noise of 0.3 times their norm
      (q, a), e = strength[g], slice(event, event + EVENT_SNIPPETS)
      frames[e] = a * np.sqrt(d) * qs[q].sentence[0] + 0.3 * frames[e]
      regions[e] = a * np.sqrt(d) * qs[q].words[0][np.arange(r) % args.words] + 0.3 * regions[e]
      out["prior"][j, e] = 0.9
  return out


def batches(args):
  for start in range(0, args.videos, args.batch):
    yield range(start, min(args.videos, start + args.batch))


def build(args) -> dict:
  shutil.rmtree(args.out, ignore_errors=True)
  config = ml_collections.ConfigDict({"prior": {"source": "head"}, "weighting": {"beta": BETA, "tau": TAU},
                                      "eval": {"chunk_size": 64}})
  header = {"run": None, "config": config.to_dict(), "task": "text", "levels": LEVELS,
            "pooled_levels": list(levels.POOLED_LEVELS["text"])}
  t = args.snippets
  qs = queries(args)
  strength = {**related(args), **{g: (q, 1.0) for g, q in planted(args).items()}}
  times = np.stack([np.arange(t), np.arange(t) + 1], -1).astype(np.float32)
  start_time, generate_s = time.perf_counter(), 0.0
  with store.IndexWriter(args.out, header, storage=args.storage, dim=args.dim) as writer:
    storage = writer.storage
    prepare = jax.jit(lambda video: levels.index_arrays(video, *levels.snippet_weights(video, config), "text", storage))
    layout = store.layout_of(t, args.dim, len(levels.POOLED_LEVELS["text"]), args.regions, storage)
    per_shard = args.shard_size or store.videos_per_shard(layout, int(args.shard_mb * 2**20))
    slices = -(-args.videos // per_shard)
    say(f"build: {args.videos} videos, {storage} vectors, {store.video_bytes(layout)} bytes a video, "
        f"{slices} shards of about {per_shard} videos, {args.batch} videos at a time")
    source = writer.add_source({"records": "synthetic", "split": "test", "fingerprint": str(args.seed),
                                "videos": args.videos, "slices": slices}, False)
    with tqdm.tqdm(total=args.videos, desc="build", unit="video", mininterval=5) as bar:
      for i in range(slices):
        lo, hi = store.slice_bounds(args.videos, slices, i)
        shard = writer.shard(source, i, lo, hi)
        for start in range(lo, hi, args.batch):     # memory: one batch of videos
          rows = range(start, min(hi, start + args.batch))
          began = time.perf_counter()
          data = generate(args, rows, qs, strength)
          generate_s += time.perf_counter() - began
          video = VideoEmbeddings(frames=data["frames"], regions=data["regions"],
                                  mask=np.ones((len(rows), t), bool), anomaly=data["prior"])
          arrays = jax.device_get(prepare(video))
          arrays["times"] = np.broadcast_to(times, (len(rows), t, 2))
          events = data["events"]
          shard.add(arrays, [{"video": f"synthetic_{g:07d}", "caption": "", "label": int(g in strength),
                              "duration": float(t), "event": [float(events[j]), float(events[j] + EVENT_SNIPPETS)]
                              if g in strength else [-1.0, -1.0]} for j, g in enumerate(rows)])
          bar.update(len(rows))
        shard.commit()
        if i % max(1, slices // 20) == 0 or i == slices - 1:
          bar.write(f"build: shard {i + 1}/{slices} committed, {writer.videos} videos, "
                    f"{time.perf_counter() - start_time:.0f} s")
          sys.stdout.flush()
  index_bytes = sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(args.out) for f in files)
  result = {"index_build_s": time.perf_counter() - start_time, "generate_s": generate_s, "index_bytes": index_bytes,
            "bytes_per_video": index_bytes / args.videos, "storage": storage, "videos_per_shard": per_shard,
            "shards": slices}
  say("build:", json.dumps(result))
  return result


def reference_scores(frames, regions, prior, sentences, words) -> np.ndarray:
  """(Q, n) combined score (levels video + frame + spatial, weights 1) of n videos for Q queries, float32 NumPy
  from the formulas (SPEC section 2): every snippet valid, words all real."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  n, t, r, d = regions.shape
  q, num_words = words.shape[:2]
  soft = np.exp((prior - prior.max(1, keepdims=True)) / TAU)
  w = (1 - BETA) / t + BETA * soft / soft.sum(1, keepdims=True)                           # (n, T)
  s = unit(sentences)                                                                     # (Q, D)
  video = unit(frames.mean(1)) @ s.T                                                      # (n, Q)
  frame = np.einsum("nt,ntq->nq", w, unit(frames) @ s.T)
  cos = (unit(regions).reshape(-1, d) @ unit(words).reshape(-1, d).T).reshape(n, t, r, q, num_words)
  per_snippet = 0.5 * (cos.max(2).mean(-1) + cos.max(-1).mean(2))                         # (n, T, Q)
  spatial = np.einsum("nt,ntq->nq", w, per_snippet)
  return (video + frame + spatial).T


def reference(args) -> dict:
  """The float32 reference: each query's top 10 over every video, from the uncompressed embeddings."""
  qs = queries(args)
  strength = {**related(args), **{g: (q, 1.0) for g, q in planted(args).items()}}
  ranked = reference_queries(args)
  sentences = np.concatenate([q.sentence for q in qs[:ranked]])
  words = np.concatenate([q.words for q in qs[:ranked]])
  best_rows = np.zeros((ranked, 0), np.int64)
  best_scores = np.zeros((ranked, 0), np.float32)
  start_time = time.perf_counter()
  say(f"reference: float32 scores of {args.videos} videos x {ranked} queries, NumPy")
  for rows in tqdm.tqdm(list(batches(args)), desc="reference", unit="batch", mininterval=5):
    data = generate(args, rows, qs, strength)
    scores = reference_scores(data["frames"], data["regions"], data["prior"], sentences, words)
    all_rows = np.concatenate([best_rows, np.broadcast_to(np.asarray(rows), (ranked, len(rows)))], 1)
    all_scores = np.concatenate([best_scores, scores.astype(np.float32)], 1)
    keep = np.argsort(-all_scores, axis=1, kind="stable")[:, :10]
    best_rows, best_scores = np.take_along_axis(all_rows, keep, 1), np.take_along_axis(all_scores, keep, 1)
  with open(reference_path(args), "w") as f:
    json.dump({"videos": args.videos, "seed": args.seed, "top10": best_rows.tolist(),
               "scores": best_scores.tolist()}, f)
  result = {"reference_s": time.perf_counter() - start_time}
  say("reference:", json.dumps(result), "->", reference_path(args))
  return result


def verified(args, q: int) -> bool:
  """Whether query q checks the rows it reads (--verify-reads)."""
  return {"on": True, "off": False, "even": q % 2 == 0, "odd": q % 2 == 1}[args.verify_reads]


def query(args) -> dict:
  qs, truth = queries(args), {q: g for g, q in planted(args).items()}
  fp32 = {"top10": []}
  if reference_queries(args):
    with open(reference_path(args)) as f:
      fp32 = json.load(f)
    if fp32["videos"] != args.videos or fp32["seed"] != args.seed or len(fp32["top10"]) != reference_queries(args):
      raise SystemExit(f"{reference_path(args)}: made for other videos or queries; run --phase reference")
  indexes, open_s = {}, {}
  for verify in sorted({verified(args, q) for q in range(args.queries)}, reverse=True):
    start = time.perf_counter()
    indexes[verify] = index_search.Index(args.out, chunk_bytes=args.chunk_mib << 20, verify_reads=verify)
    open_s[verify] = time.perf_counter() - start
    say(f"query: opened in {open_s[verify]:.2f} s, row checks {'on' if verify else 'off'}")
  index = next(iter(indexes.values()))
  say(f"query: {len(index)} videos, {index.storage} vectors, K = {args.candidates}, stage-2 blocks of "
      f"{index.block_rows} videos")
  for each in indexes.values():
    each.search(qs[0], top_k=10, candidates=args.candidates)     # compiles stage 2 (untimed)
  times, cpu_times, tops, vs_fp32 = [], [], [], []
  for q in range(args.queries):
    start, cpu_start = time.perf_counter(), time.process_time()
    hits = indexes[verified(args, q)].search(qs[q], top_k=10, candidates=args.candidates)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    tops.append([h["index"] for h in hits])
    if q < len(fp32["top10"]):
      vs_fp32.append(len(set(tops[q]) & set(fp32["top10"][q])) / 10)
    say(f"query {q + 1}/{args.queries}: {times[-1]:.3f} s ({cpu_times[-1]:.2f} CPU-s), rows checked "
        f"{'yes' if verified(args, q) else 'no'}, recall@10 vs float32 {vs_fp32[q] if q < len(vs_fp32) else '-'}, "
        f"planted truth at rank {tops[q].index(truth[q]) + 1 if truth[q] in tops[q] else '>10'}")
  exhaustive = args.queries if args.exhaustive_queries is None else min(args.exhaustive_queries, args.queries)
  exhaustive_times, recalls = [], []
  for q in range(exhaustive):
    start = time.perf_counter()
    hits = index.search(qs[q], top_k=10, candidates=None)
    exhaustive_times.append(time.perf_counter() - start)
    recalls.append(len(set(tops[q]) & {h["index"] for h in hits}) / 10)
    say(f"exhaustive {q + 1}/{exhaustive}: {exhaustive_times[-1]:.2f} s, recall@10 of the two-stage {recalls[-1]:.1f}")
  split = {v: [t for q, t in enumerate(times) if verified(args, q) == v] for v in (True, False)}
  checks = {}
  if split[True] and split[False]:
    checks = {"verified_p50_s": float(np.percentile(split[True], 50)),
              "unverified_p50_s": float(np.percentile(split[False], 50)),
              "verified_over_unverified_p50": float(np.percentile(split[True], 50) / np.percentile(split[False], 50)),
              "per_query": [[t, verified(args, q)] for q, t in enumerate(times)]}
  return {**checks, "open_s": open_s.get(True, open_s.get(False)), "verify_reads": args.verify_reads,
          "query_p50_s": float(np.percentile(times, 50)), "query_p95_s": float(np.percentile(times, 95)),
          "query_cpu_p50_s": float(np.percentile(cpu_times, 50)), "load_average": os.getloadavg()[0],
          "exhaustive_p50_s": float(np.percentile(exhaustive_times, 50)) if exhaustive_times else None,
          "recall_at_10": float(np.mean(recalls)) if recalls else None,
          "recall_at_10_vs_fp32": float(np.mean(vs_fp32)) if vs_fp32 else None, "reference_queries": len(vs_fp32),
          "exhaustive_queries": exhaustive,
          "planted_recall_at_1": float(np.mean([top[0] == truth[q] for q, top in enumerate(tops)])),
          "planted_recall_at_10": float(np.mean([truth[q] in top for q, top in enumerate(tops)])),
          "stage1_window_rows": index.window_rows, "stage2_block_rows": index.block_rows}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.queries < 1 or args.videos < args.queries or args.batch < 1:
    raise SystemExit("--queries and --batch must be >= 1 and --videos >= --queries")
  result = {"videos": args.videos, "snippets": args.snippets, "dim": args.dim, "regions": args.regions,
            "words": args.words, "queries": args.queries, "candidates": args.candidates, "phase": args.phase}
  if args.phase in ("all", "build"):
    result.update(build(args))
  if args.phase in ("all", "reference") and reference_queries(args):
    result.update(reference(args))
  if args.phase in ("all", "query"):
    result.update(query(args))
  result[f"{args.phase}_peak_rss_bytes" if args.phase != "all" else "peak_rss_bytes"] = peak_memory.host_peak_bytes()
  say(json.dumps(result, indent=2))
  if args.json:
    previous = {}
    if os.path.exists(args.json):
      with open(args.json) as f:
        previous = json.load(f)
    with open(args.json, "w") as f:
      json.dump({**previous, **result}, f, indent=2)


if __name__ == "__main__":
  main()
