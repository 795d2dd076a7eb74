"""`varcmp search`: rank a gallery for a text or audio query, with each hit's key segments in seconds.

  varcmp search --workdir runs/demo --gallery data/records --text "a red car speeds across the lot"
  varcmp search --workdir runs/xd --gallery data/xd_records --audio clip.mp4 --top-k 5 --json
  varcmp search --workdir runs/demo --gallery data/records --text "..." --plot hits.png
  varcmp search --workdir runs/demo --gallery data/records --localization     # hit rate over the split

Videos are ranked by the combined score S = sum_g lambda_g S_g. Key segments come from the per-snippet
anomaly-biased contributions w_t cos(f_t, q) (SPEC section 2, localization): snippets whose contribution
reaches `--threshold` of the way from the video's median contribution to its largest one, merged when
adjacent, reported with the records' snippet "times". The gallery embeddings are computed once per (workdir, checkpoint step, config, records)
and cached in RECORDS/.varcmp_cache/, so a later query costs one query-tower call and the similarities.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys

import jax
import numpy as np

from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.data import pipeline
from varcmp_jax import evaluate

CACHE_DIR = ".varcmp_cache"
VIDEO_FIELDS = ("frames", "regions", "mask", "anomaly", "external_prior")
# A relevance curve needs a peak this many times its median to have key segments (see key_segments).
MIN_PEAK_OVER_MEDIAN = 1.5


@dataclasses.dataclass
class Gallery:
  video: VideoEmbeddings          # host numpy, one row per record of the split, in record order
  metadata: list[dict]            # pipeline.load_split_metadata: video, caption, label, duration, times, event
  slot_times: np.ndarray          # (G, T, 2) start/end seconds of each snippet slot of the batches
  cache_path: str | None
  from_cache: bool


# --- gallery -------------------------------------------------------------------------------------------


def _with_records(config, records: str):
  config = copy.deepcopy(config)
  config.data.records = records
  config.data.worker_count = 0
  return config


def cache_key(run, records: str, split: str) -> str:
  """Hash of what the gallery embeddings depend on: workdir, checkpoint step, config and the records."""
  manifest = os.path.join(records, "manifest.json")
  with open(manifest, "rb") as f:
    manifest_hash = hashlib.sha256(f.read()).hexdigest()
  key = json.dumps({"workdir": os.path.realpath(run.workdir), "step": run.step, "split": split,
                    "config": json.loads(run.config.to_json_best_effort()), "manifest": manifest_hash},
                   sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def slot_times(metadata: list[dict], snippets: int) -> np.ndarray:
  """(G, T, 2) seconds of the record snippet behind each batch slot (the pipeline pads or subsamples)."""
  out = np.zeros((len(metadata), snippets, 2), np.float32)
  for g, meta in enumerate(metadata):
    picked = pipeline.snippet_indices(len(meta["times"]), snippets)
    out[g, :len(picked)] = meta["times"][picked]
  return out


def _encoder(run, method: str):
  model = run.model
  inputs = lambda batch: {k: v for k, v in batch.items() if k not in ("index", "valid")}
  return jax.jit(lambda params, batch: model.apply({"params": params}, inputs(batch), method=getattr(model, method)))


def load_gallery(run, records: str, split: str, use_cache: bool = True) -> Gallery:
  """The split's video embeddings, from the cache when it holds them, else computed (and cached)."""
  metadata = pipeline.load_split_metadata(records, split)
  times = slot_times(metadata, run.config.data.snippets)
  path = os.path.join(records, CACHE_DIR, f"{cache_key(run, records, split)}.npz")
  if use_cache and os.path.exists(path):
    with np.load(path) as cached:
      fields = {k: cached[k] if k in cached else None for k in VIDEO_FIELDS}
    return Gallery(VideoEmbeddings(**fields), metadata, times, path, True)
  video = evaluate.embed_split(run.trainer, run.params, split, _with_records(run.config, records),
                               "encode_video")
  if not use_cache:
    return Gallery(video, metadata, times, None, False)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + f".tmp{os.getpid()}.npz"
    np.savez(partial, **{k: getattr(video, k) for k in VIDEO_FIELDS if getattr(video, k) is not None})
    os.replace(partial, path)       # atomic: a concurrent search never reads half a file
  except OSError as e:
    print(f"note: cannot cache the gallery embeddings in {os.path.dirname(path)} ({e})", file=sys.stderr)
    path = None
  return Gallery(video, metadata, times, path, False)


# --- queries -------------------------------------------------------------------------------------------


def encode_text(run, texts: list[str]) -> TextEmbeddings:
  from varcmp_jax import clip  # pylint: disable=g-import-not-at-top
  if run.config.task != "text":
    raise ValueError(f"{run.workdir} is a {run.config.task!r} model: query it with --audio, not --text")
  tokens = clip.tokenizer()(texts)
  return jax.device_get(_encoder(run, "encode_query")(run.params, {"tokens": tokens}))


def encode_audio_file(run, path: str) -> AudioEmbeddings:
  """The audio track of `path`, decoded on the model's snippet grid (data_prep.decode), through the audio tower."""
  from data_prep import decode  # pylint: disable=g-import-not-at-top
  config = run.config
  if config.task != "audio":
    raise ValueError(f"{run.workdir} is a {config.task!r} model: query it with --text, not --audio")
  audio = config.model.audio
  if audio.kind != "spectrogram":
    raise ValueError(f"{run.workdir}: the audio tower reads pre-extracted features (model.audio.kind="
                     f"{audio.kind!r}), so it cannot embed the raw audio of {path}")
  options = decode.DecodeOptions(snippets=config.data.snippets, image_size=config.model.clip.vision.image_size,
                                 audio="required", mel_bins=audio.mel_bins, mel_frames=audio.mel_frames)
  try:
    decoded = decode.decode(path, options)
  except decode.DecodeError as e:
    raise ValueError(str(e)) from None
  batch = {"mel": decoded["mel"][None].astype(np.float32), "mask": np.ones((1, config.data.snippets), bool)}
  return jax.device_get(_encoder(run, "encode_query")(run.params, batch))


# --- scoring and key segments --------------------------------------------------------------------------


def score(config, video: VideoEmbeddings, query) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """({level: (Q, G), "combined": (Q, G)} as `varcmp eval` scores them, snippet weights w_t (G, T))."""
  prior = weighting.prior(video, config.prior)
  weights = weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)
  return evaluate.level_and_combined_similarities(video, query, config), np.asarray(weights)


def pair_relevance(video: VideoEmbeddings, weights: np.ndarray, query, query_rows, video_rows) -> np.ndarray:
  """w_t cos(f_t, q) (P, T) for the pairs (query_rows[p], video_rows[p])."""
  take = lambda tree, rows: jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], tree)   # None leaves stay None
  return np.asarray(similarity.snippet_relevance(take(video, video_rows), np.asarray(weights)[video_rows],
                                                 take(query, query_rows)))


def key_segments(relevance: np.ndarray, mask: np.ndarray, times: np.ndarray, threshold: float) -> list[dict]:
  """Runs of adjacent valid snippets whose relevance stands out, as seconds, strongest first.

  A snippet is key when its relevance reaches `threshold` of the way from the video's median to its
  maximum: rel >= median + threshold * (max - median), with max > 0. Measured from the median, not from
  zero, because w_t cos(f_t, q) has a floor ((1 - beta) / T times the background similarity) that would
  otherwise make a whole video "key". A curve whose peak is under MIN_PEAK_OVER_MEDIAN times its median is
  flat (the weights found no anomaly, as in a normal video): it has no key segment rather than noise ones.
  relevance, mask: (T,); times: (T, 2).
  """
  valid = relevance[mask]
  if not valid.size or not valid.max() > 0:
    return []
  top, floor = valid.max(), np.median(valid)
  if top < MIN_PEAK_OVER_MEDIAN * floor:
    return []
  key = mask & (relevance >= floor + threshold * (top - floor))
  segments, t = [], 0
  while t < len(key):
    if not key[t]:
      t += 1
      continue
    end = t
    while end + 1 < len(key) and key[end + 1]:
      end += 1
    peak = int(t + np.argmax(relevance[t:end + 1]))
    segments.append({"start": float(times[t, 0]), "end": float(times[end, 1]), "peak": float(relevance[peak]),
                     "peak_snippet": peak})
    t = end + 1
  return sorted(segments, key=lambda s: -s["peak"])


def search(run, gallery: Gallery, query, top_k: int = 5, threshold: float = 0.5) -> list[dict]:
  """The top_k hits of one query (row 0 of `query`), each with its levels, key segments and per-snippet curves."""
  levels, weights = score(run.config, gallery.video, query)
  combined = levels["combined"][0]
  order = np.argsort(-combined, kind="stable")[:top_k]
  relevance = pair_relevance(gallery.video, weights, query, np.zeros(len(order), int), order)
  prior = np.asarray(weighting.prior(gallery.video, run.config.prior))
  hits = []
  for rank, (g, rel) in enumerate(zip(order, relevance), start=1):
    meta, mask = gallery.metadata[g], np.asarray(gallery.video.mask[g])
    hits.append({
        "rank": rank, "index": int(g), "video": meta["video"], "score": float(combined[g]),
        "levels": {name: float(value[0, g]) for name, value in levels.items() if name != "combined"},
        "segments": key_segments(rel, mask, gallery.slot_times[g], threshold),
        "caption": meta["caption"], "label": meta["label"], "duration": meta["duration"],
        "event": [float(x) for x in meta["event"]] if meta["event"][0] >= 0 else None,
        "snippet_times": gallery.slot_times[g][mask].tolist(),
        "relevance": rel[mask].tolist(), "prior": prior[g][mask].tolist()})
  return hits


def interval_iou(a, b) -> float:
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  union = (a[1] - a[0]) + (b[1] - b[0]) - inter
  return inter / union if union > 0 else 0.0


def localization_hit_rate(run, gallery: Gallery, records: str, split: str, iou: float = 0.3,
                          threshold: float = 0.5) -> dict:
  """Every record's own caption (or audio) as the query. Among the queries whose own video is the top hit
  and has an event interval: the share whose strongest key segment overlaps the event with IoU > `iou`
  ("hit_rate"). The same over every video with an event, whatever its rank ("hit_rate_all_events")."""
  query = evaluate.embed_split(run.trainer, run.params, split, _with_records(run.config, records),
                               "encode_query")
  levels, weights = score(run.config, gallery.video, query)
  own = np.arange(len(gallery.metadata))
  correct = np.argmax(levels["combined"], axis=1) == own
  rows = own[np.array([m["event"][0] >= 0 for m in gallery.metadata], bool)]
  ious = []
  for g, rel in zip(rows, pair_relevance(gallery.video, weights, query, rows, rows)):
    segments = key_segments(rel, np.asarray(gallery.video.mask[g]), gallery.slot_times[g], threshold)
    ious.append(interval_iou((segments[0]["start"], segments[0]["end"]), gallery.metadata[g]["event"])
                if segments else 0.0)
  ious = np.asarray(ious, np.float64)
  retrieved = correct[rows]
  rate = lambda x: float(np.mean(x > iou)) if len(x) else float("nan")
  return {"queries": int(len(own)), "top1_correct": int(correct.sum()), "iou_threshold": iou,
          "evaluated": int(retrieved.sum()), "hits": int(np.sum(ious[retrieved] > iou)),
          "hit_rate": rate(ious[retrieved]),
          "mean_iou": float(ious[retrieved].mean()) if retrieved.any() else float("nan"),
          "all_events": int(len(rows)), "hits_all_events": int(np.sum(ious > iou)),
          "hit_rate_all_events": rate(ious)}


# --- output --------------------------------------------------------------------------------------------


def format_table(hits: list[dict], query: str) -> str:
  lines = [f"query: {query}", f"{'rank':>4}  {'score':>7}  {'video':<28} {'key segments (s)':<28} caption"]
  for hit in hits:
    shown = [f"{s['start']:.1f}-{s['end']:.1f}" for s in hit["segments"][:2]]
    more = len(hit["segments"]) - len(shown)
    segments = ", ".join(shown) + (f" (+{more})" if more else "") or "-"
    caption = hit["caption"] if len(hit["caption"]) <= 60 else hit["caption"][:57] + "..."
    lines.append(f"{hit['rank']:>4}  {hit['score']:>7.3f}  {hit['video']:<28} {segments:<28} {caption}")
  return "\n".join(lines)


def plot(hits: list[dict], query: str, path: str, max_hits: int = 5):
  """Per-snippet relevance (bars) and anomaly prior (line) of the top hits over time; key segments shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  hits = hits[:max_hits]
  fig, axes = plt.subplots(len(hits), 1, figsize=(9, 2.2 * len(hits)), squeeze=False)
  for ax, hit in zip(axes[:, 0], hits):
    times = np.asarray(hit["snippet_times"]).reshape(-1, 2)
    ax.bar(times[:, 0], hit["relevance"], width=times[:, 1] - times[:, 0], align="edge", color="tab:blue",
           alpha=0.8, zorder=2, label="relevance w_t cos(f_t, q)")
    for s in hit["segments"]:
      ax.axvspan(s["start"], s["end"], color="tab:orange", alpha=0.25, zorder=0)
    if hit["event"]:
      ax.axvspan(*hit["event"], fill=False, hatch="//", edgecolor="tab:red", label="ground-truth event")
    prior_ax = ax.twinx()
    prior_ax.plot(times.mean(axis=1), hit["prior"], color="tab:green", label="anomaly prior")
    prior_ax.set_ylim(0, 1)
    prior_ax.set_ylabel("prior")
    ax.set_xlim(0, hit["duration"])
    ax.set_ylabel("relevance")
    ax.set_title(f"#{hit['rank']} {hit['video']} (score {hit['score']:.3f})", fontsize=9)
    if ax is axes[0, 0]:
      handles = [h for a in (ax, prior_ax) for h in a.get_legend_handles_labels()[0]]
      ax.legend(handles=handles, loc="upper left", fontsize=7)
  axes[-1, 0].set_xlabel("time (s)")
  fig.suptitle(f"query: {query}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="varcmp search", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a `varcmp train` workdir")
  parser.add_argument("--gallery", required=True, help="records directory (`varcmp prep` output)")
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--text", help="text query (text task)")
  what.add_argument("--audio", help="a file whose audio track is the query (audio task)")
  what.add_argument("--localization", action="store_true",
                    help="each record's own query over the split: localization hit rate (IoU > --iou)")
  parser.add_argument("--split", default=None, help="gallery split (default: config.data.eval_split)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--threshold", type=float, default=0.5,
                      help="key snippets: relevance >= median + threshold x (max - median) of the video")
  parser.add_argument("--iou", type=float, default=0.3, help="--localization: IoU for a hit")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--plot", default=None, help="write a PNG of the top hits' relevance and prior")
  parser.add_argument("--no-cache", action="store_true", help="neither read nor write the gallery cache")
  args = parser.parse_args(argv)
  if args.top_k < 1 or not 0 <= args.threshold <= 1:
    parser.error("--top-k must be >= 1 and --threshold in [0, 1]")

  from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
  try:
    run = trained.load(args.workdir, args.step)
    split = args.split or run.config.data.eval_split
    gallery = load_gallery(run, args.gallery, split, use_cache=not args.no_cache)
    if args.localization:
      result = localization_hit_rate(run, gallery, args.gallery, split, args.iou, args.threshold)
      print(json.dumps(result, indent=2) if args.json else
            f"localization on {args.gallery} ({split} split, key segment vs event, IoU > {args.iou}):\n"
            f"  top-1 correct queries: {result['hits']}/{result['evaluated']} hit "
            f"({100 * result['hit_rate']:.1f}%, mean IoU {result['mean_iou']:.2f}); top-1 correct for "
            f"{result['top1_correct']}/{result['queries']} queries\n"
            f"  every video with an event, own query: {result['hits_all_events']}/{result['all_events']} hit "
            f"({100 * result['hit_rate_all_events']:.1f}%)")
      return 0
    query = encode_text(run, [args.text]) if args.text is not None else encode_audio_file(run, args.audio)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise SystemExit(f"varcmp search: {e}") from None
  hits = search(run, gallery, query, args.top_k, args.threshold)
  label = args.text if args.text is not None else f"audio of {args.audio}"
  if args.json:
    print(json.dumps({"query": label, "split": split, "step": run.step, "gallery_cache": gallery.cache_path,
                      "hits": hits}, indent=2))
  else:
    print(format_table(hits, label))
  if args.plot:
    plot(hits, label, args.plot)
    if not args.json:
      print(f"plot: {args.plot}")
  return 0
