"""`varcmp synth`: the procedural surveillance benchmark, as real mp4 files (H.264 + AAC) and captions.csv.

Every video is a long static-camera scene (a place: parking lot, street, park, plaza) with normal activity
(a few or many people walking / cars driving). Anomalous videos (half of them) add one short event, about
10% of the video: a big saturated shape of some colour doing an action in one corner of the frame, with a
synchronized tone (pitch from the colour, timbre from the shape, envelope from the action).
Captions are templated from a small vocabulary: an anomalous caption names only the event
("a red square jumps in the top left corner"), so retrieval must find the event; a normal caption names
the activity and the place ("many cars drive through the street").
Everything is drawn from numpy generators seeded by (seed, video index) and the video is lossless H.264,
so a seed fixes captions.csv, the decoded frames and the decoded audio (container timestamps may differ).
"""
import argparse
import csv
import multiprocessing
import os
import sys

import av
import numpy as np
from tqdm import tqdm

SAMPLE_RATE = 16000

SCENES = {   # name: (caption phrase, background RGB); muted, so that the event colours stand out
    "parking_lot": ("the parking lot", (112, 112, 108)),
    "street": ("the street", (62, 62, 68)),
    "park": ("the park", (84, 108, 78)),
    "plaza": ("the plaza", (150, 138, 118)),
}
SCENE_HUM_HZ = {"parking_lot": 100.0, "street": 140.0, "park": 0.0, "plaza": 220.0}
ACTIVITIES = {"people": "walk around", "cars": "drive through"}
DENSITIES = {"a few": (2, 3), "many": (6, 8)}

COLOURS = {"red": (230, 20, 20), "green": (20, 210, 40), "blue": (30, 60, 240), "yellow": (245, 225, 20)}
COLOUR_HZ = {"red": 300.0, "green": 500.0, "blue": 800.0, "yellow": 1300.0}
SHAPES = ("circle", "square", "triangle")
ACTIONS = ("jumps", "flashes", "grows", "shakes")
PLACES = {"top left": (0.28, 0.28), "top right": (0.28, 0.72), "bottom left": (0.72, 0.28),
          "bottom right": (0.72, 0.72)}   # (y, x) centre as a fraction of the frame


def video_specs(videos: int, seed: int, duration: float, event_fraction: float, test_fraction: float) -> list[dict]:
  """The captions and everything drawn in each video, from the seed alone."""
  rng = np.random.default_rng(seed)
  labels = np.zeros(videos, np.int32)
  labels[rng.permutation(videos)[:videos // 2]] = 1
  split = np.array(["train"] * videos, dtype=object)
  for label in (0, 1):   # the same test share of normal and anomalous videos
    members = rng.permutation(np.flatnonzero(labels == label))
    split[members[:int(round(len(members) * test_fraction))]] = "test"

  specs = []
  for index in range(videos):
    r = np.random.default_rng([seed, index])
    spec = dict(video=f"synth_{index:05d}.mp4", index=index, seed=seed, label=int(labels[index]),
                split=str(split[index]), duration=duration,
                scene=str(r.choice(list(SCENES))), activity=str(r.choice(list(ACTIVITIES))),
                density=str(r.choice(list(DENSITIES))), event_start=-1.0, event_end=-1.0)
    low, high = DENSITIES[spec["density"]]
    spec["count"] = int(r.integers(low, high + 1))
    if spec["label"]:
      length = event_fraction * duration
      start = float(r.uniform(0.05 * duration, 0.95 * duration - length))
      spec.update(colour=str(r.choice(list(COLOURS))), shape=str(r.choice(SHAPES)),
                  action=str(r.choice(ACTIONS)), place=str(r.choice(list(PLACES))),
                  event_start=round(start, 3), event_end=round(start + length, 3))
      spec["caption"] = f"a {spec['colour']} {spec['shape']} {spec['action']} in the {spec['place']} corner"
    else:
      spec.update(colour="", shape="", action="", place="")
      spec["caption"] = f"{spec['density']} {spec['activity']} {ACTIVITIES[spec['activity']]} {SCENES[spec['scene']][0]}"
    specs.append(spec)
  return specs


# --- pictures -------------------------------------------------------------------------------------------

def background(scene: str, size: int, rng: np.random.Generator) -> np.ndarray:
  image = np.empty((size, size, 3), np.float32)
  image[:] = SCENES[scene][1]
  yy, xx = np.mgrid[0:size, 0:size]
  light = np.array([200, 200, 195], np.float32)
  if scene == "parking_lot":    # bays: pale vertical lines in two rows
    lines = (xx % (size // 6) == 0) & ((yy < size * 0.3) | (yy > size * 0.7))
    image[lines] = light
  elif scene == "street":       # kerbs and a dashed centre line
    image[(yy < size * 0.12) | (yy > size * 0.88)] = (120, 120, 120)
    image[(np.abs(yy - size // 2) <= 0) & ((xx // 6) % 2 == 0)] = light
  elif scene == "park":         # darker grass patches
    for _ in range(5):
      cy, cx, radius = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.08, 0.18) * size]
      image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = (64, 88, 60)
  elif scene == "plaza":        # paving tiles
    image[(xx % (size // 8) == 0) | (yy % (size // 8) == 0)] = (128, 118, 100)
  return image


def shape_mask(shape: str, yy, xx, cy: float, cx: float, radius: float) -> np.ndarray:
  if shape == "circle":
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
  if shape == "square":
    half = 0.85 * radius
    return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
  # Upward triangle: apex at the top, base at the bottom.
  top, bottom = cy - radius, cy + 0.8 * radius
  return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= (yy - top) * 0.62)


def reflect(position: np.ndarray, low: float, high: float) -> np.ndarray:
  """Positions bouncing between two walls."""
  span = high - low
  p = np.mod(position - low, 2 * span)
  return low + np.where(p > span, 2 * span - p, p)


class Scene:
  """Draws the frames and the sound of one spec."""

  def __init__(self, spec: dict, size: int):
    self.spec, self.size = spec, size
    rng = np.random.default_rng([spec["seed"], spec["index"], 1])
    self.background = background(spec["scene"], size, rng)
    self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n = spec["count"]
    self.start = rng.uniform(0.1 * size, 0.9 * size, (n, 2))
    if spec["activity"] == "people":
      angle = rng.uniform(0, 2 * np.pi, n)
      self.velocity = np.stack([np.sin(angle), np.cos(angle)], 1) * rng.uniform(0.04, 0.1, (n, 1)) * size
      self.tones = rng.uniform(30, 70, (n, 1)) * np.ones((1, 3))
    else:
      lanes = np.where(rng.random(n) < 0.5, 0.25, 0.75) * size
      self.start[:, 0] = lanes + rng.uniform(-0.06, 0.06, n) * size
      direction = np.where(lanes < size / 2, 1.0, -1.0)
      self.velocity = np.stack([np.zeros(n), direction * rng.uniform(0.15, 0.3, n) * size], 1)
      grey = rng.uniform(90, 180, (n, 1))
      self.tones = grey + rng.uniform(-12, 12, (n, 3))   # muted car paint

  def frame(self, t: float, frame_index: int) -> np.ndarray:
    image = self.background.copy()
    s, yy, xx = self.size, self.yy, self.xx
    position = self.start + self.velocity * t
    for (y, x), tone in zip(position, self.tones):
      if self.spec["activity"] == "people":
        y, x = reflect(y, 0.05 * s, 0.95 * s), reflect(x, 0.05 * s, 0.95 * s)
        mask = ((yy - y) / (0.05 * s)) ** 2 + ((xx - x) / (0.03 * s)) ** 2 <= 1
      else:
        x = np.mod(x + 0.1 * s, 1.2 * s) - 0.1 * s
        mask = (np.abs(yy - y) <= 0.045 * s) & (np.abs(xx - x) <= 0.09 * s)
      image[mask] = tone
    spec = self.spec
    if spec["label"] and spec["event_start"] <= t < spec["event_end"]:
      self._draw_event(image, t, frame_index)
    return np.clip(image, 0, 255).astype(np.uint8)

  def _draw_event(self, image: np.ndarray, t: float, frame_index: int):
    spec, s, yy, xx = self.spec, self.size, self.yy, self.xx
    colour = np.array(COLOURS[spec["colour"]], np.float32)
    fy, fx = PLACES[spec["place"]]
    cy, cx, radius = fy * s, fx * s, 0.15 * s
    tau = t - spec["event_start"]
    progress = tau / (spec["event_end"] - spec["event_start"])
    action = spec["action"]
    # Each action is visible in a single frame (so one snippet frame shows it) and also moves over time.
    if action == "jumps":        # lifted off the ground, with its shadow left below
      shadow = ((yy - (cy + radius)) / (0.06 * s)) ** 2 + ((xx - cx) / radius) ** 2 <= 1
      image[shadow] = image[shadow] * 0.35
      cy -= 0.08 * s + 0.06 * s * abs(np.sin(2 * np.pi * 1.5 * tau))
    elif action == "flashes":    # white halo, the body blinking bright
      ring = shape_mask(spec["shape"], yy, xx, cy, cx, radius * 1.35)
      image[ring] = (255, 255, 255)
      if frame_index % 2:
        colour = 0.55 * colour + 0.45 * 255
    elif action == "grows":      # from normal to very large
      radius *= 1.1 + 0.7 * progress
    elif action == "shakes":     # fast sideways jitter with motion ghosts
      for offset in (-0.09 * s, 0.09 * s):
        ghost = shape_mask(spec["shape"], yy, xx, cy, cx + offset, radius)
        image[ghost] = 0.5 * image[ghost] + 0.5 * colour
      cx += 0.04 * s * np.sin(2 * np.pi * 4 * tau)
    image[shape_mask(spec["shape"], yy, xx, cy, cx, radius)] = colour

  def sound(self) -> np.ndarray:
    spec = self.spec
    rng = np.random.default_rng([spec["seed"], spec["index"], 2])
    n = int(round(spec["duration"] * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    noise = np.convolve(rng.normal(0, 1, n), np.ones(8) / 8, mode="same")   # soft ambient hiss
    audio = 0.03 * noise
    hum = SCENE_HUM_HZ[spec["scene"]]
    if hum:
      audio += 0.03 * np.sin(2 * np.pi * hum * t)
    if spec["label"]:
      audio += self._event_sound(t)
    return audio.astype(np.float32)

  def _event_sound(self, t: np.ndarray) -> np.ndarray:
    spec = self.spec
    start, end = spec["event_start"], spec["event_end"]
    on = (t >= start) & (t < end)
    tau = np.where(on, t - start, 0.0)
    base = COLOUR_HZ[spec["colour"]]
    action = spec["action"]
    if action == "grows":        # pitch sweeps up an octave
      phase = 2 * np.pi * base * (tau + tau ** 2 / (2 * (end - start)))
    else:
      phase = 2 * np.pi * base * tau
    if spec["shape"] == "circle":
      wave = np.sin(phase)
    elif spec["shape"] == "square":
      wave = 0.6 * np.sign(np.sin(phase))
    else:                        # triangle -> sawtooth timbre
      wave = 0.7 * (2 * np.mod(phase / (2 * np.pi), 1.0) - 1)
    if action == "jumps":        # bouncing pulses
      envelope = np.abs(np.sin(2 * np.pi * 1.5 * tau)) ** 2
    elif action == "flashes":    # hard on/off gating
      envelope = (np.mod(tau * 8, 1.0) < 0.5).astype(np.float64)
    elif action == "shakes":     # tremolo
      envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 12 * tau)
    else:
      envelope = 0.4 + 0.6 * tau / (end - start)
    return 0.5 * on * envelope * wave


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (3H/2, W) uint8 yuv420p planes (BT.601, limited range), as PyAV takes them.

  Done here rather than by swscale, whose rgb24 -> yuv420p path reads uninitialised memory for some
  widths (48 px gave a different result on each call), which broke determinism for a seed.
  """
  r, g, b = np.moveaxis(image.astype(np.float32), -1, 0)
  y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
  w = image.shape[1]
  r, g, b = [(c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) / 4 for c in (r, g, b)]
  u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
  v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
  planes = [np.clip(np.round(p), 0, 255).astype(np.uint8).reshape(-1, w) for p in (y, u, v)]
  return np.concatenate(planes)


def write_video(spec: dict, out_dir: str, size: int, fps: int) -> str:
  """Renders and encodes one spec to out_dir/spec['video'] (written under a temp name, then renamed)."""
  scene = Scene(spec, size)
  path = os.path.join(out_dir, spec["video"])
  tmp = path + ".tmp.mp4"
  with av.open(tmp, "w", format="mp4") as container:
    video = container.add_stream("libx264", rate=fps)
    video.width = video.height = size
    video.pix_fmt = "yuv420p"
    # One x264 thread: parallelism is across videos, and x264's threaded lookahead made the bitstream (and
    # so the decoded pixels) differ between runs. codec_context.thread_count alone does not reach x264.
    # Lossless (qp 0): decoded pixels equal the drawn ones whatever x264 decides, so a seed fixes them even
    # though x264 picked different encodings of the same frames in rare runs.
    video.options = {"qp": "0", "preset": "veryfast", "x264-params": "threads=1:lookahead-threads=1"}
    audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
    frames = int(round(spec["duration"] * fps))
    for i in range(frames):
      frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(scene.frame(i / fps, i)), format="yuv420p")
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    samples = scene.sound()
    chunk = 1024
    for i in range(0, len(samples), chunk):
      block = samples[i:i + chunk]
      frame = av.AudioFrame.from_ndarray(block[None], format="fltp", layout="mono")
      frame.sample_rate, frame.pts = SAMPLE_RATE, i
      container.mux(audio.encode(frame))
    container.mux(audio.encode(None))
  os.replace(tmp, path)
  return path


def _write(job):
  return write_video(*job)


CSV_FIELDS = ("video", "caption", "label", "split", "event_start", "event_end",
              "scene", "activity", "density", "colour", "shape", "action", "place")


def write_captions(specs: list[dict], out_dir: str):
  with open(os.path.join(out_dir, "captions.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for spec in specs:
      writer.writerow({**spec, "event_start": f"{spec['event_start']:.3f}", "event_end": f"{spec['event_end']:.3f}"})
  for split in ("train", "test"):
    with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
      f.writelines(s["video"] + "\n" for s in specs if s["split"] == split)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="varcmp synth", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output directory (mp4 files, captions.csv, train.txt, test.txt)")
  p.add_argument("--videos", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--duration", type=float, default=12.0, help="seconds per video")
  p.add_argument("--size", type=int, default=96, help="frame height and width in pixels")
  p.add_argument("--fps", type=int, default=8)
  p.add_argument("--event-fraction", type=float, default=0.1, help="event length / video length")
  p.add_argument("--test-fraction", type=float, default=0.25)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="0 = in this process")
  p.add_argument("--overwrite", action="store_true", help="replace the videos and captions.csv already in --out")
  args = p.parse_args(argv)
  if args.videos < 1 or args.duration <= 0 or args.size < 16 or args.size % 4 or args.fps < 1:
    p.error("--videos >= 1, --duration > 0, --size >= 16 and a multiple of 4, and --fps >= 1 are required")
  if not 0 < args.event_fraction < 0.9 or not 0 <= args.test_fraction < 1:
    p.error("--event-fraction must lie in (0, 0.9) and --test-fraction in [0, 1)")
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  captions = os.path.join(args.out, "captions.csv")
  if os.path.exists(captions) and not args.overwrite:
    print(f"varcmp synth: {captions} exists: a benchmark was already written there; pass --overwrite to replace "
          "it, or choose another --out", file=sys.stderr)
    return 1
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    print(f"varcmp synth: cannot create --out {args.out}: {e}", file=sys.stderr)
    return 1
  specs = video_specs(args.videos, args.seed, args.duration, args.event_fraction, args.test_fraction)
  jobs = [(spec, args.out, args.size, args.fps) for spec in specs]
  progress = tqdm(total=len(jobs), desc="synth", unit="video")
  if args.workers:
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
      for _ in pool.imap_unordered(_write, jobs):
        progress.update()
  else:
    for job in jobs:
      _write(job)
      progress.update()
  progress.close()
  write_captions(specs, args.out)
  anomalous = sum(s["label"] for s in specs)
  print(f"wrote {len(specs)} videos ({anomalous} anomalous) and captions.csv to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
