"""XDViolence-AR, audio -> video (3954 train / 800 test videos), CLIP ViT-B/16 image tower.

  xdviolence_ar.py:features  (default) pre-extracted g_t, r_tk and 128-d VGGish audio features, T = 256
  xdviolence_ar.py:frames    pixels through the image tower and a log-mel spectrogram ViT
                             initialized from the image tower, T = 32
  xdviolence_ar.py:released  the official XD-Violence feature release: I3D RGB (1024, projected into the joint
                             space) and VGGish (128), no region tokens: the semantic and temporal levels only,
                             T = 128 (`varcmp prep --visual-features ... --audio-features ...`); no CLIP tower
Set --config.data.records=DIR and (frames, features) --config.model.clip_checkpoint=HF_CLIP_DIR.
"""
from varcmp_jax import config as config_lib


def get_config(arg: str | None = None):
  regime = arg or "features"
  if regime not in ("features", "frames", "released"):
    raise ValueError(f"no variant {regime!r}; the variants of xdviolence_ar are 'features' (the default), 'frames' "
                     "and 'released'")
  c = config_lib.default_config(task="audio", regime="frames" if regime == "frames" else "features")
  c.model.clip = config_lib.clip_b16()
  c.model.dtype = "bfloat16"
  c.train.num_steps = 5000
  c.train.warmup_steps = 300
  c.train.learning_rate = 1e-4
  c.eval.batch_size = 64
  c.eval.chunk_size = 32
  if regime == "released":
    c.data.snippets = 128                               # XD videos average ~1.5 min: ~135 I3D rows of 0.667 s
    c.model.video_features.dim = 1024                   # I3D RGB, mean of the 5 crops
    c.model.audio.kind = "features"
    c.model.audio.feature_dim = 128                     # VGGish
    c.loss.levels = dict(semantic=1.0, temporal=1.0, spatial=0.0)   # released features have no region tokens
    c.train.batch_size = 128
    c.train.lr_mult = dict(image=0.0, text=0.0, audio=1.0, heads=1.0)
  elif regime == "features":
    c.data.snippets = 256
    c.model.audio.kind = "features"
    c.model.audio.feature_dim = 128
    c.train.batch_size = 128
    c.train.lr_mult = dict(image=0.0, text=0.0, audio=1.0, heads=1.0)
  else:
    c.data.snippets = 32
    c.model.audio.kind = "spectrogram"
    c.model.audio.init_from_image = True
    c.train.batch_size = 64
    c.train.grad_accum_steps = 2
    c.model.remat = True
    c.train.lr_mult = dict(image=0.1, text=0.0, audio=1.0, heads=1.0)
  return c
