"""Tiny trained-looking runs and records for the search and index tests.

The models are untrained VarCMPs (features regime) saved as an Orbax checkpoint the way training saves them.
Their temporal adapter starts as the identity (zero-initialized residual), so f_t = g_t, which lets a text
gallery be built to be retrieved correctly: in each video the event snippets carry the text embedding of its
caption (regions: its word embeddings), every other snippet is noise, and the external prior is high on the
event.
"""
import json
import os

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from varcmp_jax import clip
from varcmp_jax import config as config_lib
from varcmp_jax.data.records import encode_record

SNIPPET_SECONDS = 1.5
COLOURS = ["red", "blue", "green", "yellow", "white", "purple", "orange", "black"]
THINGS = ["car crashes into a wall", "ball bounces across the grass", "square spins near the door",
          "truck stops in the rain", "person falls off a bicycle", "circle drifts slowly left"]


def captions(count: int, offset: int = 0) -> list[str]:
  """`count` distinct captions: colour x thing."""
  return [f"a {COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]}"
          for i in range(offset, offset + count)]


def tiny_config(task: str = "text"):
  config = config_lib.default_config(task, "features")
  config.model.clip = config_lib.clip_tiny(image_size=16, patch_size=8, width=32, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=16)
  config.model.anomaly_head.hidden = 16
  config.data.snippets = 8
  config.prior.source = "external"
  config.train.batch_size = config.eval.batch_size = 4
  config.eval.chunk_size = 4
  if task == "audio":
    config.model.audio.update(kind="spectrogram", mel_bins=16, mel_frames=16, patch_size=8, init_from_image=False)
  return config


def save_run(workdir, config, seed: int = 0):
  """Writes config.json and a step-1 checkpoint of freshly initialized params; returns (trainer, params)."""
  from varcmp_jax.train import checkpoint as checkpoint_lib   # pylint: disable=g-import-not-at-top
  from varcmp_jax.train import step as step_lib               # pylint: disable=g-import-not-at-top
  trainer = step_lib.build(config)
  state = trainer.init_state(seed)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), 1, 1)
  checkpointer.save(1, state, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return trainer, state["params"]


def write_records(root, records: list[dict], split: str = "test"):
  os.makedirs(root, exist_ok=True)
  name = f"{split}-00000-of-00001.array_record"
  writer = ArrayRecordWriter(os.path.join(root, name), "group_size:1")
  for record in records:
    writer.write(encode_record({**record, "split": split}))
  writer.close()
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump({"splits": {split: {"records": len(records), "shards": [name]}}}, f)
  return str(root)


def text_embeddings(trainer, params, texts: list[str]):
  model = trainer.model
  return jax.device_get(model.apply({"params": params}, {"tokens": clip.tokenizer()(texts)},
                                    method=model.encode_query))


def default_layout(count: int) -> list[tuple[int, list[int], bool]]:
  """(stored snippets, event snippets, has an event interval) a video: snippets vary from 5 to 10 (the batches
  keep 8), the event is 1-2 snippets, every fifth video has no event interval (a normal video)."""
  layout = []
  for g in range(count):
    n = 5 + g % 6
    layout.append((n, [g % (n - 1)] + ([g % (n - 1) + 1] if g % 2 else []), g % 5 != 4))
  return layout


def planted_text_records(trainer, params, texts: list[str], seed: int = 0, name: str = "video",
                         layout=None) -> list[dict]:
  """One record per caption, laid out by `layout` (default_layout); the event snippets carry the caption's
  embeddings, the prior is high on them."""
  config = trainer.config
  text = text_embeddings(trainer, params, texts)
  rng = np.random.default_rng(seed)
  width, num_regions = config.model.clip.projection_dim, config.model.region_grid ** 2
  records = []
  for g, (caption, (n, event_snippets, has_event)) in enumerate(zip(texts, layout or default_layout(len(texts)))):
    features = 0.3 * rng.standard_normal((n, width))
    regions = 0.3 * rng.standard_normal((n, num_regions, width))
    prior = np.full(n, 0.05)
    words = text.words[g][text.word_mask[g]]
    for t in event_snippets:
      features[t] = text.sentence[g]
      regions[t, :len(words[:num_regions])] = words[:num_regions]
      prior[t] = 0.95
    times = np.stack([np.arange(n), np.arange(n) + 1], -1) * SNIPPET_SECONDS
    event = [times[event_snippets[0], 0], times[event_snippets[-1], 1]] if has_event else [-1.0, -1.0]
    records.append(dict(
        video=f"{name}_{g}.mp4", caption=caption, tokens=clip.tokenizer()([caption])[0], label=np.int32(has_event),
        duration=np.float32(n * SNIPPET_SECONDS), times=times.astype(np.float32),
        event=np.asarray(event, np.float32), features=features.astype(np.float16),
        regions=regions.astype(np.float16), prior=prior.astype(np.float32)))
  return records


def random_audio_records(config, count: int, seed: int = 0) -> list[dict]:
  """Audio-task records: random features/regions/prior and random log-mel windows, or audio features for a
  `features` audio tower (no planted answer)."""
  rng = np.random.default_rng(seed)
  width, num_regions, t = config.model.clip.projection_dim, config.model.region_grid ** 2, config.data.snippets
  audio = config.model.audio
  records = []
  for g in range(count):
    times = np.stack([np.arange(t), np.arange(t) + 1], -1) * SNIPPET_SECONDS
    if audio.kind == "features":
      query = dict(audio_features=rng.standard_normal((t, audio.feature_dim)).astype(np.float32))
    else:
      query = dict(mel=rng.normal(-2, 1, (t, audio.mel_frames, audio.mel_bins)).astype(np.float16))
    records.append(dict(
        video=f"clip_{g}.mp4", caption="", tokens=np.zeros(77, np.int32), label=np.int32(g % 2),
        duration=np.float32(t * SNIPPET_SECONDS), times=times.astype(np.float32),
        event=np.asarray([-1.0, -1.0], np.float32),
        features=rng.standard_normal((t, width)).astype(np.float16),
        regions=rng.standard_normal((t, num_regions, width)).astype(np.float16),
        prior=rng.uniform(0, 1, t).astype(np.float32), **query))
  return records


# Container and codec of each audio file type the audio query accepts.
AUDIO_FORMATS = {".wav": ("wav", "pcm_s16le", "s16"), ".flac": ("flac", "flac", "s16"),
                 ".mp3": ("mp3", "libmp3lame", "fltp"), ".m4a": ("ipod", "aac", "fltp")}


def write_audio(path, waveform: np.ndarray, rate: int = 16000) -> str:
  """Mono float waveform in [-1, 1] -> an audio-only file of the type its extension names (AUDIO_FORMATS)."""
  import av  # pylint: disable=g-import-not-at-top
  container_format, codec, sample_format = AUDIO_FORMATS[os.path.splitext(str(path))[1]]
  with av.open(str(path), "w", format=container_format) as container:
    stream = container.add_stream(codec, rate=rate, layout="mono")
    for start in range(0, len(waveform), 1024):
      chunk = np.asarray(waveform[None, start:start + 1024], np.float32)
      if sample_format == "s16":
        chunk = np.round(chunk * 32767).astype(np.int16)
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=sample_format, layout="mono")
      frame.sample_rate, frame.pts = rate, start
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
  return str(path)


def tone_waveform(seconds: float, rate: int = 16000, start: float = 2.0, stop: float = 3.0, seed: int = 0):
  """Quiet noise with a 1 kHz tone between `start` and `stop` seconds."""
  t = np.arange(int(seconds * rate)) / rate
  noise = 0.02 * np.random.default_rng(seed).standard_normal(len(t))
  return (noise + np.where((t >= start) & (t < stop), 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)).astype(np.float32)
