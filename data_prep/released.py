"""Per-video arrays of a feature release (I3D, CLIP, VGGish, VAD priors) -> a record's per-snippet fields.

  source = ArraySource("visual features", "/data/xd/i3d/{video}__{crop}.npy", clip_seconds=16 / 24)
  rows = load_rows(source, "Bad.Boys.1995__#00-26-51_00-27-53_label_B2-0-0")   # (N, D) float32, crops applied
  features = resample(rows, source.clip_seconds, times)                         # (T, D), times (T, 2) seconds

A pattern is a path with `{video}` (the dataset reader's video id, no extension), optionally `{crop}` (one
file per crop, numbered 0..C-1) and glob wildcards (class subfolders): `/data/ucf/clip/*/{video}__{crop}.npy`.
Arrays are .npy: features (N, D) or (N, C, D) with the crops inside; priors (N,) or (N, 1). Row i covers
[i S, (i+1) S] seconds. Every problem with an array is an `ArrayError` whose reason prep lists as a skip:
not a .npy file, a header claiming more data than the file holds (checked before anything is allocated), an
object (pickled) array, non-numeric, empty, non-finite or beyond float16, misshapen, of another width or crop
count than the release's, or covering far less or more time than the video.
"""
import contextlib
import dataclasses
import fnmatch
import glob
import os
import re

import numpy as np

from varcmp_jax.data import npy_file

# An array must cover at least this share of the video (and at most its inverse): a larger gap means
# the clip length (--*-clip-seconds) or the file is wrong, and resampling would smear or stretch it (100 VGGish
# rows of 0.96 s for a 13 s video). Not tighter: releases round the last clip differently (dropped, padded,
# VGGish's 0.96 s windows beside I3D's 16 frames), and for a video a few rows long one row is a large share.
MIN_COVERAGE = 0.5
# Values of a prior may stray this far outside [0, 1] (rounding in the release).
PRIOR_SLACK = 1e-3
# Feature values beyond float16's range: a record stores visual features in float16, and values this large in
# any feature (1e38 in an array) overflow the towers' LayerNorm into NaN, so such an array is refused.
FEATURE_MAX = float(np.finfo(np.float16).max)
# A per-video array this large is no release's ((N, 10, 512) float32 at UCF's 0.533 s rows: 31 hours of
# video): it is refused before it is read, instead of exhausting memory.
MAX_ARRAY_BYTES = 4 * 2**30
# How many readable arrays `probe` reads to find the release's width and crop count.
PROBE_ARRAYS = 8


class ArrayError(Exception):
  """An array that cannot give a record its field; `reason` goes into the manifest."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """One kind of per-video array. `width` / `num_crops` are the release's (`probe`); None accepts any."""
  name: str                    # "visual features" | "audio features" | "prior": the start of every reason
  pattern: str
  clip_seconds: float
  crops: str | None = "mean"   # "mean" (average over the crops), the number of the one crop to keep, or None:
                               # no crops (audio features are (N, D))
  is_prior: bool = False       # (N,) / (N, 1) scores in [0, 1] instead of (N, D) / (N, C, D) features
  width: int | None = None
  num_crops: int | None = None

  @property
  def whole_file_crop(self) -> bool:
    """One crop kept (--crops K) from a pattern with {crop}: only crop K's file is read, (N, D)."""
    return self.crops not in ("mean", None) and "{crop}" in self.pattern


def _pattern_regex(pattern: str, video: str) -> re.Pattern:
  """The pattern as a regex over whole paths: `{video}` literal, `{crop}` a captured number, glob wildcards."""
  parts = re.split(r"(\{video\}|\{crop\})", pattern)
  return re.compile("".join(
      re.escape(video) if part == "{video}" else r"(\d+)" if part == "{crop}"
      else fnmatch.translate(part).removesuffix(r"\Z") for part in parts if part))


def find_files(pattern: str, video: str, crop: int | None = None) -> list[tuple[int | None, str]]:
  """[(crop number or None, path)] of the files `pattern` names for `video`, in crop order.

  `crop`: only that crop's file. Raises ArrayError when no file matches or a crop has several files.
  """
  if crop is not None:
    pattern = pattern.replace("{crop}", str(crop))
  regex = _pattern_regex(pattern, video)
  found = {}
  for path in sorted(glob.glob(pattern.replace("{video}", glob.escape(video)).replace("{crop}", "*"),
                               recursive=True)):
    match = regex.fullmatch(path)
    if match is not None:
      found.setdefault(int(match.group(1)) if match.groups() else None, []).append(path)
  shown = pattern.replace("{video}", video)
  if not found:
    raise ArrayError(f"missing: no file matches {shown}")
  for paths in found.values():
    if len(paths) > 1:
      raise ArrayError(f"ambiguous: {len(paths)} files match {shown} ({paths[0]}, {paths[1]})")
  return [(number, paths[0]) for number, paths in sorted(found.items(), key=lambda kv: kv[0] or 0)]


def _read(path: str, label: str, max_bytes: int) -> np.ndarray:
  """The numeric, non-empty, finite array of a .npy file; its header is checked before anything is allocated
  (varcmp_jax.data.npy_file), so a lying header or a pickle costs nothing. ArrayErrors name `label`."""
  try:
    array = npy_file.load(path, max_bytes=max_bytes, name=label)
  except npy_file.NpyError as e:
    raise ArrayError(f"unreadable: {e}") from None
  except MemoryError:
    raise ArrayError(f"unreadable: {label}: no memory for its {os.path.getsize(path):,} bytes") from None
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ArrayError(f"not numeric: {label} holds {array.dtype}")
  if array.size == 0:
    raise ArrayError(f"empty: {label} has shape {array.shape}")
  bad = int(np.sum(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
  if bad:
    raise ArrayError(f"non-finite: {label} has {bad} NaN or inf values")
  return array


def _crops_axis(source: ArraySource, files: list[tuple[str, str]], max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
  """(N, C, D) float32 for features, (N, 1, 1) for a prior: the arrays of [(path, label)] with the crops on axis 1."""
  arrays = []
  for path, name in files:
    array = _read(path, name, max_bytes)
    if source.is_prior:
      if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
      if array.ndim != 1:
        raise ArrayError(f"misshapen: {name} has shape {array.shape}, a prior is (N,) or (N, 1)")
      array = array[:, None, None]
    elif array.ndim == 2:
      array = array[:, None, :]
    elif source.crops is None:
      raise ArrayError(f"misshapen: {name} has shape {array.shape}; {source.name} are (N, D)")
    elif array.ndim != 3 or len(files) > 1:
      raise ArrayError(f"misshapen: {name} has shape {array.shape}; {source.name} are (N, D), (N, C, D) or one "
                       f"(N, D) file per crop")
    arrays.append(array)
  lengths = {a.shape[0] for a in arrays}
  if len(lengths) > 1:
    raise ArrayError(f"misshapen: its {len(arrays)} crop files have different lengths {sorted(lengths)}")
  widths = {a.shape[2] for a in arrays}
  if len(widths) > 1:
    raise ArrayError(f"misshapen: its {len(arrays)} crop files have different widths {sorted(widths)}")
  return np.concatenate(arrays, axis=1).astype(np.float32)


def _video_files(source: ArraySource, video: str) -> list[tuple[str, str]]:
  """[(path, its name in reasons)] of the video's files, in crop order (only crop K's for --crops K with {crop})."""
  crop = int(source.crops) if source.whole_file_crop else None
  return [(path, os.path.basename(path)) for _, path in find_files(source.pattern, video, crop)]


def load_rows(source: ArraySource, video: str) -> np.ndarray:
  """The video's rows with the crops applied: (N, D) float32 features, or (N,) float32 prior.

  ArrayError's reason starts with the source's name: "visual features missing: no file matches ...".
  """
  with _reasons_named(source):
    return _checked_rows(source, _video_files(source, video))


def load_file(source: ArraySource, path: str, label: str, max_bytes: int) -> np.ndarray:
  """The rows of one given file (a query; `source.pattern` is not used), checked as load_rows checks a video's,
  reading at most `max_bytes` of data. Every reason names the file as `label` (the user's name for it)."""
  with _reasons_named(source):
    return _checked_rows(source, [(path, label)], max_bytes)


@contextlib.contextmanager
def _reasons_named(source: ArraySource):
  """ArrayErrors leave with the source's name in front: "visual features missing: no file matches ..."."""
  try:
    yield
  except ArrayError as e:
    raise ArrayError(f"{source.name} {e.reason}") from None


def _checked_rows(source: ArraySource, files: list[tuple[str, str]], max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
  what = files[0][1] if len(files) == 1 else f"its {len(files)} crop files"
  return _rows(source, _crops_axis(source, files, max_bytes), what)


def _rows(source: ArraySource, array: np.ndarray, what: str) -> np.ndarray:
  """(N, C, D) -> the source's rows, checked against its width, crops and range; `what` names the file(s)."""
  if source.is_prior:
    low, high = float(array.min()), float(array.max())
    if low < -PRIOR_SLACK or high > 1 + PRIOR_SLACK:
      raise ArrayError(f"out of range: values {low:.3g}..{high:.3g} in {what}, a prior is in [0, 1]")
    return np.clip(array[:, 0, 0], 0.0, 1.0)
  if np.abs(array).max() > FEATURE_MAX:
    raise ArrayError(f"out of range: values beyond float16 (|x| > {FEATURE_MAX:g}) in {what}")
  crops = array.shape[1]
  if source.width is not None and array.shape[2] != source.width:
    raise ArrayError(f"width: {array.shape[2]}, the release's width is {source.width}")
  if source.num_crops is not None and crops != source.num_crops and not source.whole_file_crop:
    raise ArrayError(f"crops: {crops}, the release has {source.num_crops}")
  if source.crops in ("mean", None):
    return array.mean(axis=1)
  if source.whole_file_crop:
    return array[:, 0]
  k = int(source.crops)
  if k >= crops:
    raise ArrayError(f"no crop {k}: the array has {crops} crop(s) (--crops)")
  return array[:, k]


def resample(rows: np.ndarray, clip_seconds: float, times: np.ndarray) -> np.ndarray:
  """(N, ...) rows, row i over [i S, (i+1) S] -> (T, ...): per snippet [a, b] of `times`, the mean of the rows
  weighted by their overlap with it.

  The rows are a piecewise-constant signal; a snippet's value is its integral over [a, b] / (b - a), read off
  the running integral at a and b. A snippet (or its part) past the last row takes the last row, so an
  array slightly shorter than the video fills the tail instead of leaving zeros.
  """
  rows = np.asarray(rows, np.float64)
  n = rows.shape[0]
  end = n * clip_seconds
  flat = rows.reshape(n, -1)
  integral = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat, axis=0) * clip_seconds])   # at i S

  def at(t):   # the running integral at times t (T,), t within [0, end]
    i = np.minimum((t // clip_seconds).astype(np.int64), n - 1)
    return integral[i] + (t - i * clip_seconds)[:, None] * flat[i]

  start = np.clip(times[:, 0].astype(np.float64), 0.0, end)
  stop = np.clip(times[:, 1].astype(np.float64), 0.0, end)
  length = stop - start
  covered = length > 1e-9 * max(clip_seconds, 1.0)
  mean = (at(stop) - at(start)) / np.where(covered, length, 1.0)[:, None]
  # A snippet with no overlap (past the end) takes the row at its start, i.e. the last row.
  nearest = flat[np.minimum((start // clip_seconds).astype(np.int64), n - 1)]
  out = np.where(covered[:, None], mean, nearest)
  return out.reshape((times.shape[0],) + rows.shape[1:]).astype(np.float32)


def check_coverage(source: ArraySource, rows: np.ndarray, duration: float) -> None:
  """ArrayError when the rows cover much less or much more than the video (a wrong clip length or file)."""
  covered = rows.shape[0] * source.clip_seconds
  if covered < MIN_COVERAGE * duration or covered > duration / MIN_COVERAGE:
    raise ArrayError(f"{source.name} length: {rows.shape[0]} rows x {source.clip_seconds:g} s cover {covered:.2f} s of a "
                     f"{duration:.2f} s video (check --{source.name.split()[0]}-clip-seconds)")


def probe(source: ArraySource, videos: list[str]) -> ArraySource:
  """The source with the release's width and crop count: the most common among the first readable arrays
  in table order (deterministic, so a resumed job agrees; one broken file cannot set them)."""
  if source.is_prior:
    return source
  seen, open_source = [], dataclasses.replace(source, crops=None if source.crops is None else "mean")
  for video in videos:
    try:
      array = _crops_axis(open_source, _video_files(open_source, video))
    except ArrayError:   # an odd file is skipped here; its row, when built, gives the reason
      continue
    seen.append((array.shape[2], array.shape[1]))
    if len(seen) == PROBE_ARRAYS:
      break
  if not seen:
    return source
  width, crops = max(seen, key=seen.count)
  return dataclasses.replace(source, width=width, num_crops=crops)
