"""Per-video arrays of a feature release (I3D, CLIP, VGGish, VAD priors) -> a record's per-snippet fields.

  source = ArraySource("visual features", "/data/xd/i3d/{video}__{crop}.npy", clip_seconds=16 / 24)
  rows = load_rows(source, "Bad.Boys.1995__#00-26-51_00-27-53_label_B2-0-0")   # (N, D) float32, crops applied
  features = resample(rows, source.clip_seconds, times)                         # (T, D), times (T, 2) seconds

A pattern is a path with `{video}` (the dataset reader's video id, no extension), optionally `{crop}` (one
file per crop, numbered 0..C-1) and glob wildcards (class subfolders): `/data/ucf/clip/*/{video}__{crop}.npy`.
Arrays are .npy: features (N, D) or (N, C, D) with the crops inside; priors (N,) or (N, 1). Row i covers
[i S, (i+1) S] seconds. Every problem with an array is an `ArrayError` whose reason prep lists as a skip.
"""
import dataclasses
import fnmatch
import glob
import os
import re

import numpy as np

# An array must cover at least this share of the video (and at most its inverse): a larger gap means
# the clip length (--*-clip-seconds) or the file is wrong, and resampling would smear or stretch it.
MIN_COVERAGE = 0.5
# Values of a prior may stray this far outside [0, 1] (rounding in the release).
PRIOR_SLACK = 1e-3
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


def _read(path: str) -> np.ndarray:
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:   # truncated, not .npy, or an object array
    raise ArrayError(f"unreadable: {os.path.basename(path)}: {e}") from None
  if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.floating)
                                               or np.issubdtype(array.dtype, np.integer)):
    raise ArrayError(f"not numeric: {os.path.basename(path)} holds {getattr(array, 'dtype', type(array))}")
  if array.size == 0:
    raise ArrayError(f"empty: {os.path.basename(path)} has shape {array.shape}")
  bad = int(np.sum(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
  if bad:
    raise ArrayError(f"non-finite: {os.path.basename(path)} has {bad} NaN or inf values")
  return array


def _crops_axis(source: ArraySource, video: str) -> np.ndarray:
  """(N, C, D) float32 for features, (N, 1, 1) for a prior: the video's arrays with the crops on axis 1."""
  crop = int(source.crops) if source.whole_file_crop else None
  files = find_files(source.pattern, video, crop)
  arrays = []
  for _, path in files:
    array = _read(path)
    name = os.path.basename(path)
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


def load_rows(source: ArraySource, video: str) -> np.ndarray:
  """The video's rows with the crops applied: (N, D) float32 features, or (N,) float32 prior.

  ArrayError's reason starts with the source's name: "visual features missing: no file matches ...".
  """
  try:
    return _rows(source, video)
  except ArrayError as e:
    raise ArrayError(f"{source.name} {e.reason}") from None


def _rows(source: ArraySource, video: str) -> np.ndarray:
  array = _crops_axis(source, video)
  if source.is_prior:
    low, high = float(array.min()), float(array.max())
    if low < -PRIOR_SLACK or high > 1 + PRIOR_SLACK:
      raise ArrayError(f"out of range: values {low:.3g}..{high:.3g}, a prior is in [0, 1]")
    return np.clip(array[:, 0, 0], 0.0, 1.0)
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
      array = _crops_axis(open_source, video)
    except ArrayError:
      continue
    seen.append((array.shape[2], array.shape[1]))
    if len(seen) == PROBE_ARRAYS:
      break
  if not seen:
    return source
  width, crops = max(seen, key=seen.count)
  return dataclasses.replace(source, width=width, num_crops=crops)
