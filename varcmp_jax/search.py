"""`varcmp search`: rank a gallery or an on-disk index for a text or audio query, with key segments in seconds.

  varcmp search --workdir runs/demo --gallery data/records --text "a red car speeds across the lot"
  varcmp search --workdir runs/xd --gallery data/xd_records --audio clip.wav --top-k 5 --json
  varcmp search --workdir runs/demo --gallery data/records --text "..." --plot hits.png
  varcmp search --workdir runs/demo --gallery data/records --localization     # hit rate over the split
  varcmp search --index runs/demo/index --text "..." [--candidates 1000 | all]  # archive scale (varcmp index)

Videos are ranked by the combined score S = sum_g lambda_g S_g; each hit carries its key segments
(varcmp_jax.hits). `--gallery` holds the split's embeddings in memory, computed once per (workdir, checkpoint
step, config, records) and cached in RECORDS/.varcmp_cache/, so a later query costs one query-tower call and
the similarities: for galleries that fit in memory. `--index` searches an index built by `varcmp index`
(varcmp_jax.index.search: exact levels linear in the video over every video, the others for the K best); the
index knows its run, so --workdir is only needed when the run has moved. `--audio` takes the audio track of
any file PyAV opens (wav, flac, mp3, m4a, or a video).

Python (for a server: load the model and open the index once, then answer many queries):
  index = varcmp_jax.index.search.Index("runs/demo/index")
  encoder = QueryEncoder.for_index(index)                       # the index's run; towers jitted once
  hits = index.search(encoder.text("a red car"), top_k=10, candidates=1000)   # --json's "hits"
  body = index_output(index, encoder.audio_file("clip.wav"), top_k=10)          # --json, but "query"
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from varcmp_jax import evaluate
from varcmp_jax import hits as hits_lib
from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.data import pipeline
from varcmp_jax.hits import interval_iou, key_segments

CACHE_DIR = ".varcmp_cache"
VIDEO_FIELDS = ("frames", "regions", "mask", "anomaly", "external_prior")
DEFAULT_CANDIDATES = 1000
VGGISH_CLIP_SECONDS = 0.96   # the hop of a VGGish row: the XD-Violence release's audio features
# The most data a .npy query may hold: (N, 128) float32 VGGish rows of 0.96 s for 35 hours of audio.
QUERY_MAX_BYTES = 64 * 2**20


@dataclasses.dataclass
class Gallery:
  video: VideoEmbeddings          # host numpy, one row per record of the split, in record order
  metadata: list[dict]            # pipeline.load_split_metadata: video, caption, label, duration, times, event
  slot_times: np.ndarray          # (G, T, 2) start/end seconds of each snippet slot of the batches
  cache_path: str | None
  from_cache: bool


# --- gallery -------------------------------------------------------------------------------------------


def cache_key(run, records: str, split: str) -> str:
  """Hash of what the gallery embeddings depend on: workdir, checkpoint step, config and the records."""
  key = json.dumps({"workdir": os.path.realpath(run.workdir), "step": run.step, "split": split,
                    "config": json.loads(run.config.to_json_best_effort()),
                    "manifest": pipeline.manifest_sha256(records)},
                   sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def slot_times(metadata: list[dict], snippets: int) -> np.ndarray:
  """(G, T, 2) seconds of the record snippet behind each batch slot (the pipeline pads or subsamples)."""
  return np.stack([hits_lib.slot_times(meta["times"], snippets) for meta in metadata])


def load_gallery(run, records: str, split: str, use_cache: bool = True) -> Gallery:
  """The split's video embeddings, from the cache when it holds them, else computed (and cached)."""
  metadata = pipeline.load_split_metadata(records, split)
  times = slot_times(metadata, run.config.data.snippets)
  path = os.path.join(records, CACHE_DIR, f"{cache_key(run, records, split)}.npz")
  if use_cache and os.path.exists(path):
    with np.load(path) as cached:
      fields = {k: cached[k] if k in cached else None for k in VIDEO_FIELDS}
    return Gallery(VideoEmbeddings(**fields), metadata, times, path, True)
  video = evaluate.embed_split(run.trainer, run.params, split, pipeline.reading(run.config, records),
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


class QueryError(ValueError):
  """A query the model cannot take (blank text, the wrong kind of query, a bad or hostile file): one line, the
  user's fault (a server answers 4xx)."""


class QueryEncoder:
  """A trained run's query tower, jitted once: many queries cost one tower call each.

  text(...) -> TextEmbeddings for a text-task run; audio_file(path) -> AudioEmbeddings for an audio-task run
  (an audio or video file, or a .npy of pre-extracted features for a `features` tower). Errors are QueryErrors
  (ValueErrors) with a one-line message.
  """

  def __init__(self, run):
    self.run, self.config = run, run.config
    model = run.model
    self._encode = jax.jit(lambda params, batch: model.apply({"params": params}, batch, method=model.encode_query))

  @classmethod
  def for_index(cls, index, workdir: str | None = None) -> "QueryEncoder":
    """The run an index was built from (its config and checkpoint step, from the manifest); `workdir`
    overrides where the run lives when it has moved."""
    from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
    manifest = index.manifest
    if not manifest.get("run") or not manifest.get("config"):
      raise ValueError(f"{index.path}: the index records no trained run (it was written without a model), so "
                       "queries cannot be embedded for it")
    config = ml_collections.ConfigDict(manifest["config"])
    return cls(trained.restore(config, workdir or manifest["run"]["workdir"], manifest["run"]["step"]))

  def text(self, texts: str | list[str]) -> TextEmbeddings:
    from varcmp_jax import clip  # pylint: disable=g-import-not-at-top
    from varcmp_jax.clip.tokenizer import word_counts  # pylint: disable=g-import-not-at-top
    texts = [texts] if isinstance(texts, str) else list(texts)
    if self.config.task != "text":
      raise QueryError(f"{self.run.workdir} is an audio -> video model: query it with --audio FILE, not --text")
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
      raise QueryError("the text query is empty: give the words to search for")
    tokens = clip.tokenizer()(texts)
    budget = int(self.config.model.get("max_words", 0))
    longest = int(word_counts(tokens).max())
    if 0 < budget < longest:   # never silently: the model reads only its word budget (model.max_words)
      print(f"note: the query has {longest} words; this model reads the first {budget} (model.max_words)",
            file=sys.stderr)
    return jax.device_get(self._encode(self.run.params, {"tokens": tokens}))

  def audio_file(self, path: str, clip_seconds: float = VGGISH_CLIP_SECONDS, name: str | None = None
                 ) -> AudioEmbeddings:
    """The query of an audio-task run, on the model's snippet grid, through the audio tower: the audio track of
    `path` (data_prep.decode.decode_audio) for the spectrogram tower; for a tower on pre-extracted features
    (model.audio.kind='features', e.g. VGGish), a .npy array of them, (N, D) rows of `clip_seconds` each,
    resampled as `varcmp prep --audio-features` does, read safely (at most QUERY_MAX_BYTES; no pickles).

    `name`: what errors call the file (a server's upload name; default `path`), so they never show a temp path.
    """
    config, label = self.config, name or path
    if config.task != "audio":
      raise QueryError(f"{self.run.workdir} is a text -> video model: query it with --text, not --audio")
    snippets = config.data.snippets
    if config.model.audio.kind == "spectrogram":
      batch = {"mel": _log_mel(path, config, label)[None]}
    else:
      batch = {"audio_features": _audio_features(path, config, clip_seconds, label)[None]}
    query = jax.device_get(self._encode(self.run.params, {**batch, "mask": np.ones((1, snippets), bool)}))
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(query)):
      raise QueryError(f"{label}: the model's audio tower gives non-finite values for it (are its values "
                       "features of the kind the model was trained on?)")
    return query



def _log_mel(path: str, config, label: str) -> np.ndarray:
  from data_prep import decode  # pylint: disable=g-import-not-at-top
  audio = config.model.audio
  options = decode.DecodeOptions(snippets=config.data.snippets, audio="required", mel_bins=audio.mel_bins,
                                 mel_frames=audio.mel_frames)
  try:
    return decode.decode_audio(path, options)["mel"].astype(np.float32)
  except decode.DecodeError as e:   # FFmpeg's messages may quote the path: show the user's name instead
    raise QueryError(f"{label}: {' '.join(e.reason.replace(path, label).split())}") from None


def _audio_features(path: str, config, clip_seconds: float, label: str) -> np.ndarray:
  """(T, D) from a .npy of (N, D) pre-extracted audio features, with prep's checks and resampling."""
  from data_prep import decode, released  # pylint: disable=g-import-not-at-top
  width = config.model.audio.feature_dim
  if not (path.endswith(".npy") or label.endswith(".npy")):
    raise QueryError(f"the audio tower reads pre-extracted {width}-d features (model.audio.kind='features'): "
                     f"query it with a .npy array of them, (N, {width}) rows of --audio-clip-seconds each, not the "
                     f"raw audio of {label}")
  if not clip_seconds > 0:
    raise QueryError(f"--audio-clip-seconds must be > 0 (got {clip_seconds})")
  source = released.ArraySource("audio features", path, clip_seconds, crops=None)
  try:
    rows = released.load_file(source, path, label, QUERY_MAX_BYTES)
  except released.ArrayError as e:   # its reason names the file as `label`
    raise QueryError(e.reason) from None
  if rows.shape[1] != width:
    raise QueryError(f"{label}: {rows.shape[1]}-d audio features; the model's audio tower takes {width}-d ones "
                     "(model.audio.feature_dim)")
  times = decode.snippet_times(rows.shape[0] * clip_seconds, config.data.snippets)
  return released.resample(rows, clip_seconds, times)


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


def search(run, gallery: Gallery, query, top_k: int = 5, threshold: float = 0.5) -> list[dict]:
  """The top_k hits of one query (row 0 of `query`), each with its levels, key segments and per-snippet curves."""
  levels, weights = score(run.config, gallery.video, query)
  combined = levels["combined"][0]
  order = np.argsort(-combined, kind="stable")[:top_k]
  relevance = pair_relevance(gallery.video, weights, query, np.zeros(len(order), int), order)
  prior = np.asarray(weighting.prior(gallery.video, run.config.prior))
  return [hits_lib.hit(rank, g, combined[g], {name: value[0, g] for name, value in levels.items() if name != "combined"},
                       rel, prior[g], np.asarray(gallery.video.mask[g]), gallery.slot_times[g], gallery.metadata[g],
                       threshold)
          for rank, (g, rel) in enumerate(zip(order, relevance), start=1)]


def localization_hit_rate(run, gallery: Gallery, records: str, split: str, iou: float = 0.3,
                          threshold: float = 0.5) -> dict:
  """Every record's own caption (or audio) as the query. Among the queries whose own video is the top hit
  and has an event interval: the share whose strongest key segment overlaps the event with IoU > `iou`
  ("hit_rate"). The same over every video with an event, whatever its rank ("hit_rate_all_events")."""
  query = evaluate.embed_split(run.trainer, run.params, split, pipeline.reading(run.config, records),
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
  rate = lambda x: float(np.mean(x > iou)) if len(x) else None    # None: nothing to localize
  return {"queries": int(len(own)), "top1_correct": int(correct.sum()), "iou_threshold": iou,
          "evaluated": int(retrieved.sum()), "hits": int(np.sum(ious[retrieved] > iou)),
          "hit_rate": rate(ious[retrieved]),
          "mean_iou": float(ious[retrieved].mean()) if retrieved.any() else None,
          "all_events": int(len(rows)), "hits_all_events": int(np.sum(ious > iou)),
          "hit_rate_all_events": rate(ious)}


def format_localization(result: dict, records: str, split: str) -> str:
  head = f"localization on {records} ({split} split, key segment vs event, IoU > {result['iou_threshold']}):"
  if not result["all_events"]:
    return (f"{head}\n  no video of the split has an event interval (records field 'event'), so there is "
            f"nothing to localize; top-1 correct for {result['top1_correct']}/{result['queries']} queries")
  if result["evaluated"]:
    top1 = (f"{result['hits']}/{result['evaluated']} hit ({100 * result['hit_rate']:.1f}%, "
            f"mean IoU {result['mean_iou']:.2f})")
  else:
    top1 = "none of them is a video with an event"
  return (f"{head}\n  top-1 correct queries: {top1}; top-1 correct for {result['top1_correct']}/"
          f"{result['queries']} queries\n  every video with an event, own query: {result['hits_all_events']}/"
          f"{result['all_events']} hit ({100 * result['hit_rate_all_events']:.1f}%)")


# --- output --------------------------------------------------------------------------------------------


def format_table(hits: list[dict], query: str) -> str:
  """rank, score, video, key segments (the two strongest, in time order), caption; the video column is as wide
  as the longest name shown (XD-Violence ids run to 60 characters and more)."""
  width = max([28] + [len(hit["video"]) for hit in hits])
  lines = [f"query: {query}", f"{'rank':>4}  {'score':>7}  {'video':<{width}} {'key segments (s)':<28} caption"]
  for hit in hits:
    shown = [f"{s['start']:.1f}-{s['end']:.1f}" for s in sorted(hit["segments"][:2], key=lambda s: s["start"])]
    more = len(hit["segments"]) - len(shown)
    segments = ", ".join(shown) + (f" (+{more})" if more else "") or "-"
    caption = hit["caption"] if len(hit["caption"]) <= 60 else hit["caption"][:57] + "..."
    lines.append(f"{hit['rank']:>4}  {hit['score']:>7.3f}  {hit['video']:<{width}} {segments:<28} {caption}")
  return "\n".join(lines)


def plot(hits: list[dict], query: str, path: str, max_hits: int = 5):
  """Writes `hits_figure` of the top `max_hits` hits to `path` (png, pdf, svg, jpg by its extension)."""
  hits_figure(hits[:max_hits], query).savefig(path, dpi=100)


def hits_figure(hits: list[dict], query: str):
  """A matplotlib Figure: per hit, its per-snippet relevance (bars) and anomaly prior (line) over time, key
  segments shaded, the ground-truth event hatched; one legend for the marks drawn."""
  from matplotlib import figure, lines, patches  # pylint: disable=g-import-not-at-top
  relevance, prior = dict(color="tab:blue", alpha=0.8), dict(color="tab:green")
  segment, event = dict(color="tab:orange", alpha=0.25), dict(fill=False, hatch="//", edgecolor="tab:red")
  rows = max(len(hits), 1)     # no hits: one empty chart
  fig = figure.Figure(figsize=(9, 0.8 + 2.2 * rows), layout="constrained")   # no pyplot: no global state
  axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
  for ax, hit in zip(axes, hits):
    times = np.asarray(hit["snippet_times"]).reshape(-1, 2)
    ax.bar(times[:, 0], hit["relevance"], width=times[:, 1] - times[:, 0], align="edge", zorder=2, **relevance)
    for s in hit["segments"]:
      ax.axvspan(s["start"], s["end"], zorder=0, **segment)
    if hit["event"]:
      ax.axvspan(*hit["event"], zorder=1, **event)
    prior_ax = ax.twinx()
    prior_ax.plot(times.mean(axis=1), hit["prior"], **prior)
    prior_ax.set_ylim(0, 1)
    prior_ax.set_ylabel("prior")
    ax.set_xlim(0, hit["duration"])
    ax.set_ylabel("relevance")
    ax.set_title(f"#{hit['rank']} {hit['video']} (score {hit['score']:.3f})", fontsize=9)
  axes[-1].set_xlabel("time (s)")
  legend = [patches.Patch(label="relevance w_t cos(f_t, q)", **relevance),
            lines.Line2D([], [], label="anomaly prior", **prior)]
  if any(hit["segments"] for hit in hits):
    legend.append(patches.Patch(label="key segment", **segment))
  if any(hit["event"] for hit in hits):
    legend.append(patches.Patch(label="ground-truth event", **event))
  fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False)
  fig.suptitle(f"query: {query}", fontsize=10)
  return fig


def _check_plot_path(path: str) -> str | None:
  """Why `path` cannot take the plot, or None; checked before any search runs."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    return f"--plot {path}: folder {folder} does not exist"
  if not os.access(folder, os.W_OK):
    return f"--plot {path}: folder {folder} is not writable"
  if os.path.isdir(path):
    return f"--plot {path}: is a folder; give a file name such as {os.path.join(path, 'hits.png')}"
  extension = os.path.splitext(path)[1].lower().lstrip(".")
  if extension not in ("", "png", "pdf", "svg", "jpg", "jpeg"):
    return f"--plot {path}: unknown image type .{extension} (png, pdf, svg, jpg)"
  return None


def _candidates(value: str) -> int | None:
  if value == "all":
    return None
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise argparse.ArgumentTypeError(f"{value!r}: a number of videos >= 1, or 'all'")
  return number


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="varcmp search", description=__doc__.split("\n")[0])
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--gallery", help="records directory (`varcmp prep` output), embedded in memory")
  where.add_argument("--index", help="an index directory (`varcmp index` output), for archive-size galleries")
  parser.add_argument("--workdir", help="the `varcmp train` workdir (--gallery); with --index, where the index's "
                                        "run lives when it has moved")
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--text", help="text query (text task)")
  what.add_argument("--audio", help="a file whose audio track is the query (audio task): wav, flac, mp3, m4a, "
                                    "or a video; a .npy of (N, D) audio features for a model on pre-extracted "
                                    "ones (model.audio.kind='features', e.g. the XD-Violence VGGish release)")
  what.add_argument("--localization", action="store_true",
                    help="--gallery: each record's own query over the split, localization hit rate (IoU > --iou)")
  parser.add_argument("--audio-clip-seconds", type=float, default=VGGISH_CLIP_SECONDS,
                      help="--audio ARRAY.npy: the seconds one row covers (default %(default)s, VGGish)")
  parser.add_argument("--split", default=None, help="gallery split (default: config.data.eval_split)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--candidates", type=_candidates, default=DEFAULT_CANDIDATES,
                      help="--index: videos stage 1 passes to stage 2 (default %(default)s), or 'all' for the "
                           "exhaustive search")
  parser.add_argument("--threshold", type=float, default=0.5,
                      help="key snippets: relevance >= median + threshold x (max - median) of the video")
  parser.add_argument("--iou", type=float, default=0.3, help="--localization: IoU for a hit")
  parser.add_argument("--step", type=int, default=None, help="--gallery: checkpoint step (default: the latest)")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--plot", default=None, help="write a PNG of the top hits' relevance and prior")
  parser.add_argument("--no-cache", action="store_true", help="neither read nor write the gallery cache")
  args = parser.parse_args(argv)
  if args.top_k < 1 or not 0 <= args.threshold <= 1 or not 0 <= args.iou <= 1:
    parser.error("--top-k must be >= 1, --threshold and --iou in [0, 1]")
  if not 0 < args.audio_clip_seconds < float("inf"):
    parser.error(f"--audio-clip-seconds {args.audio_clip_seconds}: the seconds one row covers, > 0")
  if args.gallery is not None and not args.workdir:
    parser.error("--gallery needs --workdir (the run that embeds it)")
  if args.index is not None and (args.localization or args.step is not None or args.split or args.no_cache):
    parser.error("--index searches what the index holds: --localization, --step, --split and --no-cache are "
                 "--gallery options")
  if args.text is not None and not args.text.strip():
    parser.error("--text is empty: give the words to search for")
  if args.audio is not None and not os.path.isfile(args.audio):
    parser.error(f"--audio {args.audio}: file not found")
  if args.plot and (problem := _check_plot_path(args.plot)):
    parser.error(problem)
  label = args.text if args.text is not None else f"audio of {args.audio}"

  try:
    if args.index is not None:
      output = _search_index(args)
    else:
      output = _search_gallery(args)
  except (FileNotFoundError, KeyError, ValueError) as e:   # StoreError and DecodeError-derived messages too
    raise SystemExit(f"varcmp search: {e}") from None
  if args.localization:
    return 0
  hits = output["hits"]
  if (bad := next((hit for hit in hits if not hits_lib.finite(hit)), None)) is not None:
    held_by = f"the index {args.index}" if args.index else f"the embeddings of {args.gallery}"
    raise SystemExit(f"varcmp search: {bad['video']} scores a non-finite value: {held_by} hold non-finite values "
                     "(rebuild them)")
  if args.json:
    print(json.dumps({"query": label, **output}, indent=2))
  else:
    print(format_table(hits, label))
  if args.plot:
    plot(hits, label, args.plot)
    if not args.json:
      print(f"plot: {args.plot}")
  return 0


def _encode(encoder: QueryEncoder, args):
  if args.text is not None:
    return encoder.text(args.text)
  return encoder.audio_file(args.audio, args.audio_clip_seconds)


def _search_gallery(args) -> dict:
  from varcmp_jax import trained  # pylint: disable=g-import-not-at-top
  run = trained.load(args.workdir, args.step)
  split = args.split or run.config.data.eval_split
  gallery = load_gallery(run, args.gallery, split, use_cache=not args.no_cache)
  if args.localization:
    result = localization_hit_rate(run, gallery, args.gallery, split, args.iou, args.threshold)
    print(json.dumps(result, indent=2) if args.json else format_localization(result, args.gallery, split))
    return {}
  query = _encode(QueryEncoder(run), args)
  return {"split": split, "step": run.step, "gallery_cache": gallery.cache_path,
          "hits": search(run, gallery, query, args.top_k, args.threshold)}


def index_output(index, query, top_k: int = 5, candidates: int | None = DEFAULT_CANDIDATES,
                 threshold: float = 0.5) -> dict:
  """What `varcmp search --index ... --json` prints, but the "query" label: split, step, index, candidates, hits.

  index: varcmp_jax.index.search.Index; query: the QueryEncoder's embeddings. The web page answers the same.
  """
  splits = sorted({source["split"] for source in index.manifest["sources"]})
  run = index.manifest.get("run") or {}
  return {"split": ",".join(splits), "step": run.get("step"), "index": index.path,
          "candidates": "all" if candidates is None else candidates,
          "hits": index.search(query, top_k, candidates, threshold)}


def _search_index(args) -> dict:
  from varcmp_jax.index import search as index_search  # pylint: disable=g-import-not-at-top
  index = index_search.Index(args.index)
  query = _encode(QueryEncoder.for_index(index, args.workdir), args)
  return index_output(index, query, args.top_k, args.candidates, args.threshold)
