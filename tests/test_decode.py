import glob
import os
import tracemalloc

import numpy as np
import pytest
import torch

import search_fixtures
from data_prep import decode as decode_lib
from data_prep.decode import DecodeError, DecodeOptions, decode, decode_audio
from media_fixtures import garbage_file, level_video, shared_data, truncated_copy, write_video


def htk_mel_filters(bins: int, fft: int = 512, rate: int = 16000, low: float = 125.0, high: float = 7500.0):
  """Triangular HTK-mel filters in Hz space, written out here as the independent reference."""
  mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)
  hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
  edges = hz(np.linspace(mel(low), mel(high), bins + 2))
  freqs = np.linspace(0, rate / 2, fft // 2 + 1)
  filters = np.zeros((fft // 2 + 1, bins))
  for k in range(bins):
    left, centre, right = edges[k:k + 3]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    filters[:, k] = np.maximum(0, np.minimum(rising, falling))
  return filters


def torch_log_mel(waveform: np.ndarray, bins: int) -> np.ndarray:
  # torch centres the 400-sample window inside each 512-sample frame: 56 zeros on each side line the
  # frames up with 400-sample frames zero-padded to 512 (VGGish / tf.signal.stft); |FFT| ignores the shift.
  padded = np.pad(waveform.astype(np.float64), 56)
  spec = torch.stft(torch.from_numpy(padded), n_fft=512, hop_length=160, win_length=400,
                    window=torch.hann_window(400, periodic=True, dtype=torch.float64), center=False,
                    return_complex=True).abs().numpy()          # (257, frames)
  return np.log(htk_mel_filters(bins).T @ spec + 0.01).T       # (frames, bins)


def test_log_mel_matches_torch_stft_reference():
  waveform = np.random.default_rng(0).normal(0, 0.3, decode_lib.mel_window_samples(96)).astype(np.float32)
  ours = decode_lib.log_mel(waveform, decode_lib.mel_filters(64).astype(np.float32))
  reference = torch_log_mel(waveform, 64)
  assert ours.shape == (96, 64)
  np.testing.assert_allclose(ours, reference, atol=2e-4)


def test_snippets_take_the_frame_at_each_centre(tmp_path):
  # Frame i has grey level 6*i; 4 s at 10 fps, 8 snippets of 0.5 s: centre k lies at 0.25 + 0.5k s,
  # so snippet k shows frame 2 + 5k (the last frame at or before the centre).
  path = level_video(tmp_path / "levels.mp4", seconds=4.0, fps=10, size=(32, 48))
  out = decode(path, DecodeOptions(snippets=8, image_size=16, audio="none"))
  assert out["frames"].shape == (8, 16, 16, 3) and out["frames"].dtype == np.uint8
  np.testing.assert_allclose(out["times"], np.stack([np.arange(8) * 0.5, np.arange(1, 9) * 0.5], 1), atol=1e-6)
  assert out["duration"] == pytest.approx(4.0, abs=0.01)
  expected = (2 + 5 * np.arange(8)) * 6
  np.testing.assert_allclose(out["frames"][:, 8, 8, 0].astype(float), expected, atol=4)
  assert "mel" not in out


def test_resize_keeps_aspect_and_crops_the_centre(tmp_path):
  # 32x64 frame: red left quarter, blue right quarter, green middle half -> the centre crop is green.
  image = np.zeros((32, 64, 3), np.uint8)
  image[:, :16] = (255, 0, 0)
  image[:, 16:48] = (0, 255, 0)
  image[:, 48:] = (0, 0, 255)
  path = write_video(tmp_path / "wide.mp4", np.stack([image] * 10), fps=10)
  frames = decode(path, DecodeOptions(snippets=2, image_size=16, audio="none"))["frames"]
  centre = frames[:, :, 2:-2].reshape(-1, 3).astype(float).mean(0)
  assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


def test_audio_is_mixed_to_mono_resampled_and_aligned(tmp_path):
  # 1 kHz tone in the LEFT channel only, from 2 s to 3 s of a 4 s stereo 44.1 kHz track.
  rate, seconds = 44100, 4.0
  t = np.arange(int(rate * seconds)) / rate
  left = np.where((t >= 2) & (t < 3), 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)
  audio = np.stack([left, np.zeros_like(left)]).astype(np.float32)
  frames = np.zeros((40, 32, 32, 3), np.uint8)
  path = write_video(tmp_path / "tone.mp4", frames, fps=10, audio=audio, sample_rate=rate)
  mel = decode(path, DecodeOptions(snippets=8, image_size=16, audio="required"))["mel"].astype(np.float32)
  assert mel.shape == (8, 96, 64) and np.isfinite(mel).all()
  energy = mel.mean(axis=1).max(axis=1)   # the loudest mel bin of each snippet
  # Snippet centres 2.25 s and 2.75 s: the 0.975 s windows lie inside the tone.
  assert energy[4] > energy[0] + 1 and energy[5] > energy[7] + 1
  peak_hz = np.argmax(mel[4].mean(0))
  filters = htk_mel_filters(64)
  centre_hz = np.linspace(0, 8000, 257)[np.argmax(filters[:, peak_hz])]
  assert abs(centre_hz - 1000) < 100


@pytest.mark.parametrize("make, reason", [
    (lambda p: open(p, "wb").close() or str(p), "empty file"),
    (garbage_file, "cannot open"),
    # An mp4 keeps its index (moov) at the end: cut in half, FFmpeg cannot open it at all.
    (lambda p: truncated_copy(level_video(p.with_suffix(".ok.mp4")), p),
     "cannot open: [Errno 1094995529] Invalid data found when processing input"),
    (lambda p: str(p) + ".missing", "file not found"),
])
def test_bad_files_raise_decode_error_with_a_reason(tmp_path, make, reason):
  path = make(tmp_path / "bad.mp4")
  with pytest.raises(DecodeError) as error:
    decode(path, DecodeOptions(snippets=4, image_size=16))
  assert reason in error.value.reason and error.value.reason


def test_no_audio_track_required_vs_optional(tmp_path):
  path = level_video(tmp_path / "silent.mp4", audio=False)
  with pytest.raises(DecodeError, match="no audio track"):
    decode(path, DecodeOptions(snippets=4, image_size=16, audio="required"))
  assert "mel" not in decode(path, DecodeOptions(snippets=4, image_size=16, audio="optional"))


def test_memory_does_not_grow_with_video_length(tmp_path):
  peaks = []
  for seconds in (4.0, 32.0):
    path = level_video(tmp_path / f"len{seconds}.mp4", seconds=seconds, fps=10, size=(16, 16))
    tracemalloc.start()
    decode(path, DecodeOptions(snippets=4, image_size=16, audio="required"))
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
  # Fully buffered, 32 s of 16 kHz float32 audio alone would be 2 MB more than 4 s.
  assert peaks[1] < peaks[0] + 512 * 1024, peaks


def test_real_xd_clips_with_multichannel_audio():
  clips = sorted(glob.glob(os.path.join(shared_data(), "xd_clips", "*.mp4")))
  assert len(clips) == 16
  for name in ("car2.mp4", "riot2.mp4"):   # 6-channel 44.1 kHz and 7-channel 48 kHz
    out = decode(os.path.join(shared_data(), "xd_clips", name), DecodeOptions(snippets=4, image_size=32, audio="required"))
    assert out["frames"].shape == (4, 32, 32, 3) and out["mel"].shape == (4, 96, 64)
    assert np.isfinite(out["mel"].astype(np.float32)).all() and out["mel"].astype(np.float32).std() > 0.1


def test_corrupt_packets_in_the_middle_do_not_stop_decoding(tmp_path):
  path = level_video(tmp_path / "ok.mp4", seconds=4.0, fps=10, size=(64, 64))
  data = bytearray(open(path, "rb").read())
  noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
  for start in (len(data) // 5, len(data) // 3, len(data) // 2):   # inside the media data, not the header
    data[start:start + 64] = noise
  (tmp_path / "corrupt.mp4").write_bytes(bytes(data))
  out = decode(str(tmp_path / "corrupt.mp4"), DecodeOptions(snippets=8, image_size=16, audio="required"))
  assert out["frames"].shape == (8, 16, 16, 3) and out["mel"].shape == (8, 96, 64)
  assert np.isfinite(out["mel"].astype(np.float32)).all()


def test_truncated_stream_with_its_header_intact(tmp_path):
  # Matroska keeps its header in front, so a cut file opens and its frames stop early.
  frames = np.repeat(np.arange(100, dtype=np.uint8)[:, None, None, None], 3, axis=3)
  path = write_video(tmp_path / "whole.mkv", np.broadcast_to(frames, (100, 32, 32, 3)), fps=10,
                     container_format="matroska")
  assert decode(path, DecodeOptions(snippets=4, image_size=16, audio="none"))["duration"] == pytest.approx(10.0)
  data = open(path, "rb").read()
  (tmp_path / "cut.mkv").write_bytes(data[:len(data) // 3])
  with pytest.raises(DecodeError, match="truncated: video frames end at"):
    decode(str(tmp_path / "cut.mkv"), DecodeOptions(snippets=4, image_size=16, audio="none"))


# --- decode_audio: the audio track of any file, with or without video --------------------------------------

AUDIO = DecodeOptions(snippets=8, audio="required", mel_bins=64, mel_frames=96)


def windows_of(waveform: np.ndarray, duration: float, options: DecodeOptions) -> np.ndarray:
  """log_mel of the raw samples, one window per snippet centre, cut here by index (no decoding)."""
  length = decode_lib.mel_window_samples(options.mel_frames)
  centres = (np.arange(options.snippets) + 0.5) * duration / options.snippets
  starts = np.clip(np.round(centres * 16000).astype(int) - length // 2, 0, len(waveform) - length)
  filters = decode_lib.mel_filters(options.mel_bins).astype(np.float32)
  return np.stack([decode_lib.log_mel(waveform[s:s + length], filters) for s in starts])


@pytest.mark.parametrize("extension", [".wav", ".flac", ".mp3", ".m4a"])
def test_audio_only_files(tmp_path, extension):
  # Noise with a 1 kHz tone from 2 s to 3 s of 4 s: 8 snippets of 0.5 s, centres 2.25 s and 2.75 s in the tone.
  waveform = search_fixtures.tone_waveform(4.0)
  path = search_fixtures.write_audio(tmp_path / f"query{extension}", waveform)
  out = decode_audio(path, AUDIO)
  assert out["mel"].shape == (8, 96, 64) and out["mel"].dtype == np.float16
  assert out["duration"] == pytest.approx(4.0, abs=0.01)
  np.testing.assert_allclose(out["times"][:, 0], np.arange(8) * 0.5, atol=1e-3)
  mel = out["mel"].astype(np.float32)
  if extension in (".wav", ".flac"):      # lossless: the windows of the samples written (16-bit, float16 mel)
    error = np.abs(mel - windows_of(waveform, 4.0, AUDIO))
    assert error.mean() < 1e-3 and error.max() < 0.03, (error.mean(), error.max())   # log(|x| + 0.01): quiet bins
  energy = mel.mean(axis=1).max(axis=1)
  assert np.all(energy[[4, 5]] > energy[[0, 1, 2, 3, 6, 7]].max() + 1), energy


def test_audio_of_a_video_is_its_records_mel(tmp_path):
  path = level_video(tmp_path / "video.mp4", seconds=4.0)
  options = DecodeOptions(snippets=6, image_size=16, audio="required", mel_bins=32, mel_frames=48)
  np.testing.assert_array_equal(decode_audio(path, options)["mel"], decode(path, options)["mel"])


def test_audio_decode_errors_name_their_reason(tmp_path):
  with pytest.raises(DecodeError, match="no audio track"):
    decode_audio(level_video(tmp_path / "silent.mp4", audio=False), AUDIO)
  flac = search_fixtures.write_audio(tmp_path / "whole.flac", search_fixtures.tone_waveform(8.0))
  with pytest.raises(DecodeError, match=r"truncated: audio ends at 3\.\d+ s of 8\.00 s"):
    decode_audio(truncated_copy(flac, tmp_path / "cut.flac"), AUDIO)
  with pytest.raises(DecodeError, match="cannot open"):
    decode_audio(garbage_file(tmp_path / "noise.mp3"), AUDIO)
  with pytest.raises(DecodeError, match="empty file"):
    decode_audio(str(open(tmp_path / "empty.wav", "wb").name), AUDIO)
