"""Streamed PyAV decoding of one video into a record's snippet fields.

One pass over the demuxed packets: T uniformly spaced snippets cover the whole video; each keeps one
frame (the last one at or before the snippet centre), resized on its shorter side and centre-cropped, and
a VGGish-style log-mel window (0.975 s of 16 kHz mono audio, 25 ms windows, 10 ms hop) centred on the
snippet. Only the T small frames, the mel windows and at most one pending audio window are held, so
memory does not grow with the video's length. `decode_audio` computes the same mel windows from the audio
track alone, of any file with one (wav, flac, mp3, m4a, or a video): the audio queries of `varcmp search`.
"""
import dataclasses
import functools
import os

import av
import numpy as np
from transformers.audio_utils import mel_filter_bank, window_function

SAMPLE_RATE = 16000
WINDOW = 400      # 25 ms
HOP = 160         # 10 ms
FFT = 512
# A decode keeps going through broken packets, but gives up when more than this share of them fail.
MAX_BAD_PACKET_SHARE = 0.5
# Decoded video must reach this share of the declared duration, else the file is truncated.
MIN_COVERAGE = 0.9


class DecodeError(Exception):
  """A video that cannot become a record; `reason` says why (it goes into the manifest)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  snippets: int = 32
  image_size: int = 224
  audio: str = "optional"   # "required" | "optional" (mel when there is an audio track) | "none"
  mel_bins: int = 64
  mel_frames: int = 96


def snippet_times(duration: float, snippets: int) -> np.ndarray:
  """(T, 2) start/end seconds of T equal segments covering [0, duration]."""
  edges = np.linspace(0.0, duration, snippets + 1)
  return np.stack([edges[:-1], edges[1:]], axis=1).astype(np.float32)


def mel_filters(mel_bins: int) -> np.ndarray:
  """(FFT//2+1, mel_bins) HTK mel filterbank over 125-7500 Hz, as in VGGish."""
  return mel_filter_bank(num_frequency_bins=FFT // 2 + 1, num_mel_filters=mel_bins, min_frequency=125.0,
                         max_frequency=7500.0, sampling_rate=SAMPLE_RATE, norm=None, mel_scale="htk")


def log_mel(waveform: np.ndarray, filters: np.ndarray) -> np.ndarray:
  """(samples,) 16 kHz mono -> (frames, mel_bins) log(|STFT| mel + 0.01), VGGish's log-mel.

  A vectorized STFT (no centre padding): transformers' `spectrogram` loops over frames in Python, 15x slower.
  """
  frames = np.lib.stride_tricks.sliding_window_view(waveform.astype(np.float32), WINDOW)[::HOP]
  magnitude = np.abs(np.fft.rfft(frames * _hann(), n=FFT, axis=-1))
  # einsum, not matmul: BLAS threads oversubscribe the decoding workers and run 10x slower on tiny products.
  return np.log(np.einsum("fk,km->fm", magnitude, filters) + 0.01).astype(np.float32)


@functools.cache
def _hann() -> np.ndarray:
  return window_function(WINDOW, "hann", periodic=True).astype(np.float32)


def mel_window_samples(mel_frames: int) -> int:
  return (mel_frames - 1) * HOP + WINDOW


def resize_crop(frame: av.VideoFrame, size: int) -> np.ndarray:
  """Shorter side -> `size` (area filter), centre crop to (size, size, 3) uint8 RGB."""
  scale = size / min(frame.width, frame.height)
  width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
  rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
  top, left = (height - size) // 2, (width - size) // 2
  return np.ascontiguousarray(rgb[top:top + size, left:left + size])


def _duration(container, stream, path) -> float:
  """Seconds of `stream` (video or audio): its header, else the container's, else its packets' timestamps."""
  if stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / av.time_base
  # No header duration (some streamed containers): one cheap pass over packet timestamps, no decoding.
  end = 0.0
  for packet in container.demux(stream):
    if packet.pts is not None:
      end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
  container.seek(0)
  if end <= 0:
    raise DecodeError(path, "no duration: neither the header nor the packets give one")
  return end


class _AudioWindows:
  """Streams resampled audio and cuts one fixed-length log-mel window per snippet centre."""

  def __init__(self, centres: np.ndarray, duration: float, options: DecodeOptions):
    self.length = mel_window_samples(options.mel_frames)
    total = int(round(duration * SAMPLE_RATE))
    starts = np.round(centres * SAMPLE_RATE).astype(np.int64) - self.length // 2
    self.starts = np.clip(starts, 0, max(0, total - self.length))
    self.filters = mel_filters(options.mel_bins).astype(np.float32)
    self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    self.buffer = np.zeros(0, np.float32)
    self.buffer_start = 0       # sample index of buffer[0]
    self.next_sample = None     # sample index the next resampled chunk starts at
    self.mels = []

  def add(self, frame: av.AudioFrame | None, start_time: float):
    if frame is not None and self.next_sample is None:
      # Audio that starts after the container start is preceded by silence.
      self.next_sample = max(0, int(round(((frame.time or start_time) - start_time) * SAMPLE_RATE)))
      self.buffer_start = self.next_sample
    for chunk in self.resampler.resample(frame):
      self._push(chunk.to_ndarray().reshape(-1))

  def _push(self, samples: np.ndarray):
    self.buffer = np.concatenate([self.buffer, samples.astype(np.float32)])
    self._emit(final=False)

  def finish(self) -> np.ndarray:
    self.add(None, 0.0)
    self._emit(final=True)
    return np.stack(self.mels).astype(np.float16)

  def _emit(self, final: bool):
    while len(self.mels) < len(self.starts):
      start = int(self.starts[len(self.mels)])
      end = start + self.length
      if not final and self.buffer_start + len(self.buffer) < end:
        break
      window = np.zeros(self.length, np.float32)   # audio shorter than the video ends in silence
      lo, hi = max(start, self.buffer_start), min(end, self.buffer_start + len(self.buffer))
      if hi > lo:
        window[lo - start:hi - start] = self.buffer[lo - self.buffer_start:hi - self.buffer_start]
      self.mels.append(log_mel(window, self.filters))
    if len(self.mels) < len(self.starts):
      keep_from = int(self.starts[len(self.mels)])
      drop = min(len(self.buffer), max(0, keep_from - self.buffer_start))
      self.buffer, self.buffer_start = self.buffer[drop:], self.buffer_start + drop


def _open(path: str):
  if not os.path.isfile(path):
    raise DecodeError(path, "file not found")
  if os.path.getsize(path) == 0:
    raise DecodeError(path, "empty file (0 bytes)")
  try:
    return av.open(path, metadata_errors="ignore")
  except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
    raise DecodeError(path, f"cannot open: {e}") from e


def decode(path: str, options: DecodeOptions = DecodeOptions()) -> dict:
  """Decodes `path` into {"frames", "times", "duration", "fps", ["mel"]}; raises DecodeError with a reason."""
  path = os.fspath(path)
  with _open(path) as container:
    return _decode_open(container, path, options)


def decode_audio(path: str, options: DecodeOptions = DecodeOptions()) -> dict:
  """The audio track of any file PyAV opens, with or without video (wav, flac, mp3, m4a, mp4, ...), as
  {"mel" (T, mel_frames, mel_bins) float16, "times" (T, 2), "duration"}: the log-mel windows `decode` computes.

  The T snippets span the video stream's duration when there is one (the grid `decode` and prep use, so a
  video's own audio track gives its record's mel), else the audio stream's. Raises DecodeError with a reason.
  """
  path = os.fspath(path)
  with _open(path) as container:
    if not container.streams.audio:
      raise DecodeError(path, "no audio track")
    stream = container.streams.audio[0]
    duration, start_time = _timing(container, container.streams.video[0] if container.streams.video else stream, path)
    times = snippet_times(duration, options.snippets)
    audio = _AudioWindows(times.mean(axis=1), duration, options)
    demux, frames, end = _Demux(container, [stream]), 0, 0.0
    for frame in demux:
      frames += 1
      audio.add(frame, start_time)
      if frame.time is not None and frame.sample_rate:
        end = max(end, frame.time - start_time + frame.samples / frame.sample_rate)
  if not frames:
    raise DecodeError(path, demux.reason or "the audio track has no decodable audio")
  demux.check(path)
  if end < MIN_COVERAGE * duration - 1.0:
    raise DecodeError(path, f"truncated: audio ends at {end:.2f} s of {duration:.2f} s" + demux.why())
  return {"mel": audio.finish(), "times": times, "duration": np.float32(duration)}


def _timing(container, stream, path: str) -> tuple[float, float]:
  """(duration of `stream`, container start time) in seconds; DecodeError when there is no usable duration."""
  try:
    duration = _duration(container, stream, path)
  except av.FFmpegError as e:
    raise DecodeError(path, f"cannot read packets: {e}") from e
  if not duration > 0:
    raise DecodeError(path, f"zero or unknown duration ({duration})")
  return duration, (container.start_time / av.time_base if container.start_time is not None else 0.0)


class _Demux:
  """The decoded frames of `streams`, one pass: a packet that fails to decode is skipped and counted, and a
  demuxer that stops early ends the pass with its reason."""

  def __init__(self, container, streams):
    self.container, self.streams = container, streams
    self.packets = self.bad_packets = 0
    self.reason = None

  def __iter__(self):
    try:
      for packet in self.container.demux(self.streams):
        self.packets += 1
        try:
          decoded = packet.decode()
        except (av.FFmpegError, ValueError):
          self.bad_packets += 1   # one broken packet: skip it, keep decoding
          continue
        yield from decoded
    except av.FFmpegError as e:
      self.bad_packets += 1
      self.reason = f"demux stopped: {e}"

  def check(self, path: str):
    if self.packets and self.bad_packets / self.packets > MAX_BAD_PACKET_SHARE:
      raise DecodeError(path, f"{self.bad_packets} of {self.packets} packets failed to decode")

  def why(self) -> str:
    return f" ({self.reason})" if self.reason else ""


def _decode_open(container, path: str, options: DecodeOptions) -> dict:
  if not container.streams.video:
    raise DecodeError(path, "no video stream")
  video_stream = container.streams.video[0]
  video_stream.thread_type = "AUTO"
  audio_stream = container.streams.audio[0] if container.streams.audio and options.audio != "none" else None
  if audio_stream is None and options.audio == "required":
    raise DecodeError(path, "no audio track (required for the audio task)")
  duration, start_time = _timing(container, video_stream, path)
  times = snippet_times(duration, options.snippets)
  centres = times.mean(axis=1)
  frames, last, last_time = [], None, 0.0
  audio = _AudioWindows(centres, duration, options) if audio_stream is not None else None
  audio_frames = 0
  demux = _Demux(container, [video_stream] + ([audio_stream] if audio_stream is not None else []))
  for frame in demux:
    if isinstance(frame, av.AudioFrame):
      audio_frames += 1
      audio.add(frame, start_time)
      continue
    t = (frame.time if frame.time is not None else last_time) - start_time
    while len(frames) < options.snippets and t > centres[len(frames)]:
      frames.append(resize_crop(last if last is not None else frame, options.image_size))
    last, last_time = frame, t
  if last is None:
    raise DecodeError(path, demux.reason or "no decodable video frames")
  demux.check(path)
  if last_time < MIN_COVERAGE * duration - 1.0:
    raise DecodeError(path, f"truncated: video frames end at {last_time:.2f} s of {duration:.2f} s" + demux.why())
  while len(frames) < options.snippets:
    frames.append(resize_crop(last, options.image_size))

  fps = float(video_stream.average_rate) if video_stream.average_rate else len(frames) / duration
  out = {"frames": np.stack(frames), "times": times, "duration": np.float32(duration), "fps": fps}
  if audio is not None:
    if audio_frames == 0:
      if options.audio == "required":
        raise DecodeError(path, "audio track has no decodable audio")
    else:
      out["mel"] = audio.finish()
  return out
