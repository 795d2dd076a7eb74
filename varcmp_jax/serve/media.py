"""What the search page shows of a video besides its scores: keyframes and the video file itself.

Keyframes come from the records the index was built from (manifest.json names each shard's records directory,
split and position), the frame the model saw for that snippet slot. Records without frames (released features),
or records moved or rewritten since indexing, fall back to decoding the video under --videos at the slot's
centre, the frame prep would have kept (the last one at or before the centre). Only media files (video and audio
containers, by extension) inside the --videos folder are served: `VideoFolder.resolve` refuses any name that
leaves it, by `..`, an absolute path or a symlink, and finds nothing that is not media (a captions.csv).
"""
import functools
import io
import os
import threading

import av
import numpy as np
from PIL import Image

from data_prep.datasets import VIDEO_SUFFIXES
from varcmp_jax.data import pipeline, records as records_lib

THUMBNAIL_SIZE = 160     # longest side of a keyframe decoded from a video, pixels
# What /videos serves, by the extension of the file itself (a symlink's target): video and audio containers.
MEDIA_SUFFIXES = frozenset(VIDEO_SUFFIXES) | {".ogv", ".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga",
                                              ".opus"}


class OutsideFolder(ValueError):
  """A requested path that resolves outside the --videos folder."""


class VideoFolder:
  """The --videos folder: record names and request paths -> media files inside it, never outside."""

  def __init__(self, root: str):
    self.root = os.path.realpath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"{root}: --videos is not a directory")

  def resolve(self, name: str) -> str | None:
    """The media file for `name` (a path relative to the folder), or None when there is none (or it is no media).

    OutsideFolder when `name` points outside the folder (`..`, absolute, a symlink out, a NUL byte).
    """
    if "\0" in name or os.path.isabs(name):
      raise OutsideFolder(f"{name!r} is not a path inside the videos folder")
    path = os.path.realpath(os.path.join(self.root, name))
    if os.path.commonpath([self.root, path]) != self.root:
      raise OutsideFolder(f"{name!r} is not a path inside the videos folder")
    return path if os.path.splitext(path)[1].lower() in MEDIA_SUFFIXES and os.path.isfile(path) else None

  def find(self, video: str) -> str | None:
    """The file of a record's video name, looked up as prep looks it up (data_prep.datasets.resolve): the name
    as a relative path, its base name, or, for ids without an extension (XD-Violence), the id plus a suffix."""
    names = [video, os.path.basename(video)]
    if os.path.splitext(video)[1].lower() not in VIDEO_SUFFIXES:
      names += [video + suffix for suffix in VIDEO_SUFFIXES]
    for name in names:
      try:
        path = self.resolve(name)
      except OutsideFolder:
        continue
      if path:
        return path
    return None


def png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
  return buffer.getvalue()


def frame_at(path: str, seconds: float, size: int = THUMBNAIL_SIZE) -> np.ndarray:
  """(H, W, 3) uint8: the last frame of `path` at or before `seconds`, longest side scaled to <= `size`."""
  with av.open(path, metadata_errors="ignore") as container:
    if not container.streams.video:
      raise ValueError(f"{os.path.basename(path)}: no video stream")
    stream = container.streams.video[0]
    start = container.start_time / av.time_base if container.start_time is not None else 0.0
    if stream.time_base is not None:
      container.seek(max(0, int((seconds + start) / stream.time_base)), stream=stream, backward=True)
    chosen = None
    for frame in container.decode(stream):
      if chosen is not None and frame.time is not None and frame.time - start > seconds:
        break
      chosen = frame
    if chosen is None:
      raise ValueError(f"{os.path.basename(path)}: no decodable frame at {seconds:.2f} s")
    scale = min(1.0, size / max(chosen.width, chosen.height))
    return chosen.reformat(width=max(1, round(chosen.width * scale)), height=max(1, round(chosen.height * scale)),
                           format="rgb24", interpolation="AREA").to_ndarray()


class Keyframes:
  """PNG keyframes of index rows by snippet slot: `png(row, slot)`; LookupError with a message when there is none.
  `available`: whether any can exist (--videos given, or the records hold frames), so the page asks for none of an
  index built from released features without --videos.

  index: varcmp_jax.index.search.Index (its store gives the shard table, times, masks and names); videos:
  VideoFolder or None. Encoded keyframes are cached (a page shows a few per hit); record sources open lazily.
  """

  def __init__(self, index, videos: VideoFolder | None, cache: int = 4096):
    self.store, self.videos = index.store, videos
    manifest = index.manifest
    self.sources, self._shards = manifest["sources"], manifest["shards"]
    self._open_sources, self._lock = {}, threading.Lock()
    self.png = functools.lru_cache(maxsize=cache)(self._png)
    self.available = videos is not None or any(map(self._holds_frames, range(len(self.sources))))

  def _holds_frames(self, source: int) -> bool:
    """Whether the records of a source hold frames (prep keeps them for every record of a split or for none),
    judged by its first indexed record; False when they are gone or no longer the ones indexed."""
    first = next((s["offset"] for s in self._shards if s["source"] == source and s["count"]), None)
    try:
      record = self._record(first) if first is not None else None
    except (OSError, ValueError, KeyError, IndexError):
      return False
    return record is not None and "frames" in record

  def _record(self, row: int) -> dict | None:
    """The record behind an index row, or None when its records directory is gone, unreadable or no longer the
    one indexed (its manifest.json changed)."""
    number, local = self.store.locate([row])
    shard = self._shards[int(number[0])]
    source = self.sources[shard["source"]]
    with self._lock:
      if shard["source"] not in self._open_sources:
        try:
          same = pipeline.manifest_sha256(source["records"]) == source["fingerprint"]
          records = pipeline.IndexedSource(source["records"], source["split"]) if same else None
        except (OSError, ValueError, KeyError):
          records = None
        self._open_sources[shard["source"]] = records
      records = self._open_sources[shard["source"]]
    if records is None:
      return None
    return records_lib.decode_record(records[shard["start"] + int(local[0])][1])

  def _png(self, row: int, slot: int) -> bytes:
    if not 0 <= row < self.store.videos:
      raise LookupError(f"no video {row} in this index ({self.store.videos} videos)")
    data = self.store.read(np.array([row]), ("times", "mask"))
    times, mask = data["times"][0], data["mask"][0]
    if not 0 <= slot < len(mask) or not mask[slot]:
      raise LookupError(f"video {row} has no snippet {slot} (it has {int(mask.sum())})")
    record = self._record(row)
    if record is not None and "frames" in record:
      frames = record["frames"]
      # The slot's record snippet, as the pipeline picked it (pad or uniform subsample).
      return png(frames[pipeline.snippet_indices(len(frames), len(mask))[slot]])
    name = str(record["video"]) if record is not None else self.store.metadata([row])[0]["video"]
    if self.videos is None:
      raise LookupError(f"{name}: its records hold no frames; start the server with --videos to show keyframes")
    path = self.videos.find(name)
    if path is None:
      raise LookupError(f"{name}: not found under the --videos folder")
    try:
      return png(frame_at(path, float(times[slot].mean())))
    except (av.FFmpegError, ValueError) as e:
      raise LookupError(f"{name}: cannot decode a keyframe ({e})") from None
