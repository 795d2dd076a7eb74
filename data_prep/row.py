"""One table row -> one record: the per-row work of `varcmp prep` (and of any runner that distributes it).

  status, value = build_record(item, options)     # ("ok", record) or ("skip", reason); never raises

`build_record` is a pure module-level function of picklable arguments, so a multiprocessing pool or an
Apache Beam DoFn can run it. The record has every field but `tokens`: the CLIP tokenizer imports jax, which
the decoding workers do not load, so the caller tokenizes `record["caption"]` (data_prep.prep.caption_tokens:
the row's check_caption text).

A record is built from the video file (frames, log-mel), from per-video arrays of a feature release
(data_prep.released: `features`, `audio_features`, `prior`), or both. Without a video its duration is the
visual rows' span (N x S) and its event interval is converted from frames with the dataset's nominal fps.
"""
import dataclasses

import numpy as np

from data_prep import datasets, released
from data_prep.decode import DecodeError, DecodeOptions, decode, snippet_times


@dataclasses.dataclass(frozen=True)
class RowOptions:
  task: str                                     # "text" | "audio"
  snippets: int
  decode: DecodeOptions | None = None           # None: no video files (records from arrays only)
  visual: released.ArraySource | None = None    # -> features (T, D_v) float16
  audio: released.ArraySource | None = None     # -> audio_features (T, D_a) float32
  prior: released.ArraySource | None = None     # -> prior (T,) float32
  nominal_fps: float = 30.0                     # frames -> seconds for events when no video is decoded


def check_caption(caption, task: str) -> tuple[str | None, str | None]:
  """(caption text, None) or (None, reason). The audio task does not need a caption (the query is audio)."""
  if task == "audio":
    return (caption.strip() if isinstance(caption, str) else ""), None
  if not isinstance(caption, str):
    return None, f"caption is not text ({type(caption).__name__}: {caption!r:.40})"
  if not caption.strip():
    return None, "empty caption"
  return caption.strip(), None


def _record(item: datasets.Item, caption: str, options: RowOptions) -> dict:
  """Raises DecodeError / released.ArrayError; see build_record. Arrays are read first: they are cheap."""
  arrays = {}
  for field, source in (("features", options.visual), ("audio_features", options.audio), ("prior", options.prior)):
    if source is not None:
      arrays[field] = (source, released.load_rows(source, item.array_id))
  if options.decode is not None:
    decoded = decode(item.path, options.decode)
    duration, times, fps = float(decoded["duration"]), decoded["times"], decoded["fps"]
  else:
    source, rows = arrays["features"]
    duration, fps = rows.shape[0] * source.clip_seconds, options.nominal_fps
    times = snippet_times(duration, options.snippets)
  record = {"video": item.video, "caption": caption, "label": np.int32(item.label), "split": item.split,
            "duration": np.float32(duration), "times": times, "event": datasets.event_seconds(item, fps)}
  if options.decode is not None:
    record["frames"] = decoded["frames"]
    if "mel" in decoded:
      record["mel"] = decoded["mel"]
  for field, (source, rows) in arrays.items():
    released.check_coverage(source, rows, duration)
    values = released.resample(rows, source.clip_seconds, times)
    if field == "features":   # stored in float16 (load_rows refused values beyond it), the release's width kept
      values = values.astype(np.float16)
    record[field] = values
  return record


def build_record(item: datasets.Item, options: RowOptions) -> tuple[str, object]:
  """("ok", record without tokens) or ("skip", reason). Never raises: bad input must not stop a job."""
  caption, reason = check_caption(item.caption, options.task)
  if reason:
    return "skip", reason
  try:
    return "ok", _record(item, caption, options)
  except (DecodeError, released.ArrayError) as e:
    return "skip", e.reason
  except Exception as e:   # a decoder or numpy failure on one odd file skips that file only
    return "skip", f"{type(e).__name__}: {e}"
