"""A tiny audio -> video config for tests: `tiny_audio.py` (frames + spectrogram audio tower) or
`tiny_audio.py:features` (features regime + projected audio features)."""
from varcmp_jax import config as config_lib


def get_config(arg: str | None = None):
  regime = arg or "frames"
  if regime not in ("frames", "features"):
    raise ValueError(f"no variant {regime!r}; the variants of tiny_audio are 'frames' (the default) and 'features'")
  c = config_lib.default_config(task="audio", regime=regime)
  c.data.snippets = 4
  c.model.clip = config_lib.clip_tiny(image_size=16, patch_size=8, width=32, depth=1)
  c.model.dtype = "float32"
  c.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=16)
  c.model.anomaly_head = dict(hidden=16)
  c.model.audio.kind = "spectrogram" if regime == "frames" else "features"
  c.model.audio.mel_bins = 16
  c.model.audio.mel_frames = 16
  c.model.audio.patch_size = 8
  c.model.audio.feature_dim = 12
  c.train.batch_size = 8
  c.train.num_steps = 6
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.eval.batch_size = 8
  c.eval.chunk_size = 4
  return c
