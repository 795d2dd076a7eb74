"""Caption-table readers: each turns a benchmark's release files into a list of `Item`s (one per video).

Readers only read tables; they never open videos, so a bad video is found (and skipped) later by prep.
A bad table (missing file, missing column) raises `TableError`: prep cannot run without it.
"""
import csv
import dataclasses
import os
import re

import numpy as np


class TableError(Exception):
  """The captions table or a split list cannot be read; the message names the file and the problem."""


@dataclasses.dataclass
class Item:
  video: str                 # the name stored in the record (relative path as written in the release)
  path: str                  # where the file is on disk
  caption: object            # usually str; anything else is rejected by prep with a reason
  label: int                 # 0 normal, 1 anomalous
  split: str
  event: tuple[float, float] | None = None          # seconds
  event_frames: tuple[int, int] | None = None       # frame numbers (converted with the decoded fps)
  # `{video}` in the patterns of a feature release: the name without extension (ucfcrime_ar: the file
  # stem, as releases name their arrays; xdviolence_ar: the id of the official lists).
  array_id: str = ""

  def __post_init__(self):
    self.array_id = self.array_id or strip_video_suffix(self.video)


VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")


def strip_video_suffix(name: str) -> str:
  """The name without a video file extension; other dots stay (XD ids read `Bad.Boys.1995__#...`)."""
  stem, suffix = os.path.splitext(name)
  return stem if suffix.lower() in VIDEO_SUFFIXES else name


def resolve(videos_dir: str | None, name: str) -> str:
  """The file for a release name: the name as a relative path, else its base name directly in videos_dir.

  Without videos_dir (records from feature arrays only) the name itself.
  """
  if not videos_dir:
    return name
  direct = os.path.join(videos_dir, name)
  if os.path.exists(direct):
    return direct
  flat = os.path.join(videos_dir, os.path.basename(name))
  return flat if os.path.exists(flat) else direct


# --- folder: a generic csv -----------------------------------------------------------------------------

def read_folder(videos_dir: str, captions_path: str) -> list[Item]:
  """csv `video,caption[,label][,split][,event_start,event_end]`; label defaults to 0, split to "train"."""
  try:
    with open(captions_path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise TableError(f"{captions_path}: cannot read the captions csv: {e}") from e
  if not rows:
    raise TableError(f"{captions_path}: no rows (expected a header video,caption[,label][,split])")
  missing = {"video", "caption"} - set(rows[0])
  if missing:
    raise TableError(f"{captions_path}: missing column(s) {sorted(missing)}; columns are {list(rows[0])}")
  items = []
  for line, row in enumerate(rows, start=2):
    name = (row["video"] or "").strip()
    try:
      label = int(row.get("label") or 0)
      event = None
      if row.get("event_start") not in (None, ""):
        event = (float(row["event_start"]), float(row["event_end"]))
        event = None if event[0] < 0 else event
    except ValueError as e:
      raise TableError(f"{captions_path}:{line}: bad label or event value: {e}") from e
    items.append(Item(video=name, path=resolve(videos_dir, name), caption=row["caption"], label=label,
                      split=(row.get("split") or "train").strip(), event=event))
  return items


# --- UCFCrime-AR: the official xlsx release ------------------------------------------------------------

UCF_SPLITS = {"train": ("ucf_crime_train.xlsx", "Anomaly_Train.txt"), "test": ("ucf_crime_test.xlsx", "Anomaly_Test.txt")}


def read_ucf_xlsx(path: str) -> list[tuple[str, object]]:
  """(stripped video name, English caption) rows of one release xlsx.

  Quirks handled: names end with a newline, some rows carry extra empty columns, the header is the
  first row (`Video Name`, `Chinese Text`, `English Text`); captions are returned as stored (prep checks them).
  """
  import openpyxl
  try:
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:   # openpyxl raises many types (zipfile, KeyError, InvalidFileException)
    raise TableError(f"{path}: cannot read the xlsx: {type(e).__name__}: {e}") from e
  rows = workbook.worksheets[0].iter_rows(values_only=True)
  header = [str(c).strip() if c is not None else "" for c in next(rows, ())]
  if "Video Name" not in header or "English Text" not in header:
    raise TableError(f"{path}: expected columns 'Video Name' and 'English Text', found {header}")
  name_col, text_col = header.index("Video Name"), header.index("English Text")
  out = []
  for row in rows:
    if row is None or len(row) <= name_col or row[name_col] is None or not str(row[name_col]).strip():
      continue
    caption = row[text_col] if len(row) > text_col else None
    out.append((str(row[name_col]).strip(), caption))
  workbook.close()
  return out


def read_split_list(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise TableError(f"{path}: cannot read the split list: {e}") from e


def read_ucf_annotations(path: str) -> dict[str, tuple[int, int]]:
  """Temporal_Anomaly_Annotation.txt -> {video stem: (first start frame, last end frame)}."""
  events = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if len(parts) < 4:
        continue
      bounds = [int(x) for x in parts[2:6] if int(x) >= 0]
      if len(bounds) >= 2:
        events[parts[0]] = (bounds[0], bounds[-1])
  return events


def ucf_label(name: str) -> int:
  return 0 if "Normal" in name else 1


def read_ucfcrime_ar(videos_dir: str, captions_dir: str, split_lists: list[str] | None = None) -> list[Item]:
  """`captions_dir` holds ucf_crime_{train,test}.xlsx; split lists default to Anomaly_{Train,Test}.txt there.

  A name in the xlsx but not in its split list keeps the xlsx split; prep reports lists that disagree.
  """
  if not os.path.isdir(captions_dir):
    raise TableError(f"{captions_dir}: --captions for ucfcrime_ar must be the directory holding ucf_crime_train.xlsx / ucf_crime_test.xlsx")
  lists = split_lists or [os.path.join(captions_dir, UCF_SPLITS[s][1]) for s in UCF_SPLITS]
  annotation_path = os.path.join(captions_dir, "Temporal_Anomaly_Annotation.txt")
  events = read_ucf_annotations(annotation_path) if os.path.exists(annotation_path) else {}
  listed = {}
  for path in lists:
    if os.path.exists(path) or split_lists:
      split = "test" if "test" in os.path.basename(path).lower() else "train"
      listed.update({name: split for name in read_split_list(path)})
  items = []
  for split, (xlsx, _) in UCF_SPLITS.items():
    for name, caption in read_ucf_xlsx(os.path.join(captions_dir, xlsx)):
      if listed and listed.get(name, split) != split:
        raise TableError(f"{xlsx}: {name} is in the {split} xlsx but in the {listed[name]} split list")
      stem = strip_video_suffix(os.path.basename(name))
      items.append(Item(video=name, path=resolve(videos_dir, name), caption=caption, label=ucf_label(name),
                        split=split, event_frames=events.get(stem), array_id=stem))
  return items


# --- XDViolence-AR: labels from file names, splits from the official id lists ---------------------------

XD_LISTS = {"train": "audio.list", "test": "audio_test.list"}


def xd_id(line: str) -> str:
  """An id-list line (a VGGish feature path) -> the video id: the file stem before `__vggish.npy`."""
  stem = os.path.basename(line.strip())
  return re.sub(r"__vggish(\.npy)?$", "", stem)


def xd_label(video_id: str) -> int:
  """`_label_A` marks a normal video; B1-B6 / G are violence classes."""
  return 0 if "_label_A" in video_id else 1


def read_xd_annotations(path: str) -> dict[str, tuple[int, int]]:
  events = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if len(parts) >= 3:
        frames = [int(x) for x in parts[1:]]
        events[parts[0]] = (frames[0], frames[-1])
  return events


def read_xdviolence_ar(videos_dir: str, lists_dir: str, split_lists: list[str] | None = None) -> list[Item]:
  """`lists_dir` holds audio.list / audio_test.list (or give --split-lists); the caption is empty (audio query)."""
  paths = split_lists or [os.path.join(lists_dir, name) for name in XD_LISTS.values()]
  annotation_path = os.path.join(lists_dir, "annotations.txt") if lists_dir and os.path.isdir(lists_dir) else ""
  events = read_xd_annotations(annotation_path) if annotation_path and os.path.exists(annotation_path) else {}
  items, seen = [], set()
  for path in paths:
    split = "test" if "test" in os.path.basename(path).lower() else "train"
    for line in read_split_list(path):
      video_id = xd_id(line)
      if video_id in seen:
        continue
      seen.add(video_id)
      found = [os.path.join(videos_dir, video_id + s) for s in VIDEO_SUFFIXES
               if videos_dir and os.path.exists(os.path.join(videos_dir, video_id + s))]
      path_on_disk = found[0] if found else os.path.join(videos_dir or "", video_id + ".mp4")
      items.append(Item(video=video_id, path=path_on_disk, caption="", label=xd_label(video_id), split=split,
                        event_frames=events.get(video_id), array_id=video_id))
  return items


READERS = {"folder": read_folder, "ucfcrime_ar": read_ucfcrime_ar, "xdviolence_ar": read_xdviolence_ar}
# Frame rate of the annotations' frame numbers, for records built without decoding the video: UCF-Crime
# is 30 fps, XD-Violence 24 fps. The folder csv gives events in seconds.
NOMINAL_FPS = {"folder": 30.0, "ucfcrime_ar": 30.0, "xdviolence_ar": 24.0}
# The task a dataset's tables support: XD-Violence has no captions (its queries are audio).
TASKS = {"folder": ("text", "audio"), "ucfcrime_ar": ("text", "audio"), "xdviolence_ar": ("audio",)}


def read(dataset: str, videos_dir: str | None, captions: str, split_lists: list[str] | None = None) -> list[Item]:
  if dataset == "folder":
    return read_folder(videos_dir, captions)
  return READERS[dataset](videos_dir, captions, split_lists)


def event_seconds(item: Item, fps: float) -> np.ndarray:
  """The record's float32[2] event interval in seconds, or [-1, -1]."""
  if item.event is not None:
    return np.asarray(item.event, np.float32)
  if item.event_frames is not None and fps > 0:
    return np.asarray(item.event_frames, np.float32) / np.float32(fps)
  return np.full(2, -1.0, np.float32)
