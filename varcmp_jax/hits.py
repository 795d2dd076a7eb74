"""The hit records of a search: what `varcmp search --json` prints and the search page shows.

A hit is one retrieved video: its rank, combined and per-level scores, its key segments in seconds and the
per-snippet curves behind them. Both searches build hits here, the in-memory gallery (varcmp_jax.search) and the
on-disk index (varcmp_jax.index.search), so their output is identical in form.

Key segments come from the per-snippet anomaly-biased contributions w_t cos(f_t, q) (SPEC section 2,
localization): snippets whose contribution reaches `threshold` of the way from the video's median contribution
to its largest one, merged when adjacent, reported with the snippet times.
"""
import numpy as np

from varcmp_jax.data import pipeline

# A relevance curve needs a peak this many times its median to have key segments (see key_segments).
MIN_PEAK_OVER_MEDIAN = 1.5


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


def finite(hit: dict) -> bool:
  """Whether every number of a hit is finite: JSON has no NaN or infinity, and a search must not rank by them."""
  numbers = [hit["score"], hit["duration"], *hit["levels"].values(), *hit["relevance"], *hit["prior"],
             *np.ravel(hit["snippet_times"]), *(s[key] for s in hit["segments"] for key in ("start", "end", "peak"))]
  return bool(np.isfinite(np.asarray(numbers, np.float64)).all())


def slot_times(times: np.ndarray, snippets: int) -> np.ndarray:
  """(snippets, 2) seconds of the record snippet behind each batch slot of one record (the pipeline pads or
  subsamples its stored snippets, times (N, 2)); zero on padding slots."""
  out = np.zeros((snippets, 2), np.float32)
  picked = pipeline.snippet_indices(len(times), snippets)
  out[:len(picked)] = np.asarray(times)[picked]
  return out


def interval_iou(a, b) -> float:
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  union = (a[1] - a[0]) + (b[1] - b[0]) - inter
  return inter / union if union > 0 else 0.0


def hit(rank: int, index: int, score: float, levels: dict[str, float], relevance: np.ndarray, prior: np.ndarray,
        mask: np.ndarray, times: np.ndarray, metadata: dict, threshold: float) -> dict:
  """One hit. relevance, prior, mask: (T,) over the video's snippet slots; times (T, 2) seconds;
  metadata: video, caption, label, duration, event ([-1, -1] when the video has no event interval)."""
  relevance, prior, mask, times = (np.asarray(x) for x in (relevance, prior, mask, times))
  mask = mask.astype(bool)
  event = [float(x) for x in metadata["event"]]
  return {
      "rank": int(rank), "index": int(index), "video": metadata["video"], "score": float(score),
      "levels": {name: float(value) for name, value in levels.items()},
      "segments": key_segments(relevance, mask, times, threshold),
      "caption": metadata["caption"], "label": int(metadata["label"]), "duration": float(metadata["duration"]),
      "event": event if event[0] >= 0 else None,
      "snippet_times": times[mask].tolist(), "relevance": relevance[mask].tolist(), "prior": prior[mask].tolist()}
