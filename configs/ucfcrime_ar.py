"""UCFCrime-AR, text -> video (1610 train / 290 test videos), CLIP ViT-B/16.

  ucfcrime_ar.py:features  (default) pre-extracted g_t and r_tk (`varcmp extract-features`), T = 256
  ucfcrime_ar.py:frames    pixels through the image tower (fine-tuned at 0.1x lr), T = 32
  ucfcrime_ar.py:released  released CLIP ViT-B/16 frame features (VadCLIP's UCF-Crime release, D = 512, already
                           in the joint space; `varcmp prep --visual-features`), no region tokens: the video and
                           frame levels only, T = 256
Set --config.data.records=DIR and, for the towers, --config.model.clip_checkpoint=HF_CLIP_DIR (for :released
the OpenAI CLIP ViT-B/16 whose image tower made the features, so that its text tower shares their space).
"""
from varcmp_jax import config as config_lib


def get_config(arg: str | None = None):
  regime = arg or "features"
  if regime not in ("features", "frames", "released"):
    raise ValueError(f"no variant {regime!r}; the variants of ucfcrime_ar are 'features' (the default), 'frames' and "
                     "'released'")
  c = config_lib.default_config(task="text", regime="frames" if regime == "frames" else "features")
  c.model.clip = config_lib.clip_b16()
  c.model.dtype = "bfloat16"
  c.train.num_steps = 3000
  c.train.warmup_steps = 200
  c.train.learning_rate = 1e-4
  c.eval.batch_size = 64
  if regime == "released":
    c.data.snippets = 256
    c.model.video_features.dim = 0                      # CLIP ViT-B/16 image embeddings: the joint space
    c.model.clip_checkpoint = "required"                # the features' CLIP: train/eval refuse to run without one
    c.loss.levels = dict(video=1.0, frame=1.0, spatial=0.0)   # released features have no region tokens
    c.train.batch_size = 128
    c.train.lr_mult = dict(image=0.0, text=0.1, audio=1.0, heads=1.0)
  elif regime == "features":
    c.data.snippets = 256
    c.train.batch_size = 128
    c.train.lr_mult = dict(image=0.0, text=0.1, audio=1.0, heads=1.0)   # no image tower runs on features
  else:
    c.data.snippets = 32
    c.train.batch_size = 64
    c.train.grad_accum_steps = 2
    c.model.remat = True
    c.train.lr_mult = dict(image=0.1, text=0.1, audio=1.0, heads=1.0)
  return c
