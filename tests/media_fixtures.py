"""Small media files for the data tests: videos with known content, broken files, the shared real clips."""
import os

import av
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data() -> str:
  """../shared/data (or $VARCMP_SHARED_DATA); skips the test with the reason when it is absent."""
  path = os.environ.get("VARCMP_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
  if not os.path.isdir(path):
    pytest.skip(f"real reference data not found at {os.path.abspath(path)} (set VARCMP_SHARED_DATA)")
  return os.path.abspath(path)


def write_video(path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = 44100,
                layout: str = "stereo", crf: int = 12, container_format: str = "mp4") -> str:
  """frames (N,H,W,3) uint8 -> H.264 mp4; audio (channels, samples) float32 -> AAC, when given."""
  with av.open(os.fspath(path), "w", format=container_format) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast"}
    sound = container.add_stream("aac", rate=sample_rate, layout=layout) if audio is not None else None
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
      frame.pts = i
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    if sound is not None:
      for start in range(0, audio.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, start:start + 1024], np.float32),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(sound.encode(frame))
      container.mux(sound.encode(None))
  return os.fspath(path)


def level_video(path, seconds: float = 4.0, fps: int = 10, size=(32, 48), audio: bool = True) -> str:
  """Frame i is grey level 6*i (readable back from pixels); stereo noise audio when `audio`."""
  n = int(seconds * fps)
  frames = np.repeat((np.arange(n) * 6 % 256).astype(np.uint8)[:, None, None, None], 3, axis=3)
  frames = np.broadcast_to(frames, (n, *size, 3))
  sound = None
  if audio:
    sound = 0.1 * np.random.default_rng(0).normal(size=(2, int(seconds * 44100))).astype(np.float32)
  return write_video(path, frames, fps, sound)


def truncated_copy(source: str, path) -> str:
  with open(source, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return os.fspath(path)


def garbage_file(path) -> str:
  with open(path, "wb") as f:
    f.write(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
  return os.fspath(path)


def ucf_release(root, rows: dict[str, list[tuple[str, object]]]) -> None:
  """A tiny UCFCrime-AR release in `root`: xlsx files with the official quirks (names ending in a newline,
  extra empty columns), split lists, a temporal annotation, and 3 s videos under root/videos/<name>."""
  import openpyxl
  for split, entries in rows.items():
    book = openpyxl.Workbook()
    book.active.append(["Video Name", "Chinese Text", "English Text", None, None])
    for name, caption in entries:
      os.makedirs(os.path.join(root, "videos", os.path.dirname(name)), exist_ok=True)
      level_video(os.path.join(root, "videos", name), seconds=3.0, audio=False)
      book.active.append([name + "\n", "中文", caption, None, None])
    book.save(os.path.join(root, f"ucf_crime_{split}.xlsx"))
    with open(os.path.join(root, f"Anomaly_{split.title()}.txt"), "w", encoding="utf-8") as f:
      f.writelines(name + "\n" for name, _ in entries)
  with open(os.path.join(root, "Temporal_Anomaly_Annotation.txt"), "w", encoding="utf-8") as f:
    f.write("Arrest001_x264  Arrest  10  20  -1  -1\n")
