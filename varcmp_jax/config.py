"""The default VarCMP configuration and its validation.

Config files under `configs/` start from `default_config()` and change what differs, big_vision style.
Every loss term, level weight and weighting switch lives here, so an ablation is a config change.
"""
import math

import ml_collections

TEXT_LEVELS = ("video", "frame", "spatial")
AUDIO_LEVELS = ("semantic", "temporal", "spatial")
TASK_LEVELS = {"text": TEXT_LEVELS, "audio": AUDIO_LEVELS}
# Names of the two retrieval directions, query -> gallery first.
TASK_DIRECTIONS = {"text": ("text_to_video", "video_to_text"), "audio": ("audio_to_video", "video_to_audio")}


def clip_b16() -> ml_collections.ConfigDict:
  """CLIP ViT-B/16 tower sizes, with HF `CLIPConfig` field names."""
  return ml_collections.ConfigDict(dict(
      projection_dim=512,
      vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16),
      text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                vocab_size=49408, max_position_embeddings=77),
  ))


def clip_tiny(image_size: int = 32, patch_size: int = 8, width: int = 64, depth: int = 2) -> ml_collections.ConfigDict:
  """A tiny CLIP for tests and the CPU demo."""
  return ml_collections.ConfigDict(dict(
      projection_dim=width,
      vision=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                  num_attention_heads=max(1, width // 32), image_size=image_size, patch_size=patch_size),
      text=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                num_attention_heads=max(1, width // 32), vocab_size=49408, max_position_embeddings=77),
  ))


def default_config(task: str = "text", regime: str = "frames") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task            # "text" (video-text, UCFCrime-AR) | "audio" (video-audio, XDViolence-AR)
  c.regime = regime        # "frames" (pixels through the image tower) | "features" (pre-extracted g_t, r_tk)
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      records="",                  # directory written by `varcmp prep` / `varcmp extract-features`
      train_split="train", eval_split="test",
      snippets=32,                 # T: batches are padded / cropped to this many snippets
      worker_count=0, prefetch=2,
  ))

  c.model = ml_collections.ConfigDict(dict(
      clip=clip_b16(),
      clip_checkpoint="",          # HF CLIPModel directory or `varcmp import-clip` output; "" = random init
      dtype="bfloat16",            # compute dtype
      param_dtype="float32",
      attention_impl="xla",        # "xla" | "cudnn" (fused attention on GPU)
      remat=False,
      region_grid=2,               # patch tokens pooled on a grid x grid layout: R = grid**2
      temporal=dict(num_layers=1, num_heads=8, mlp_ratio=4, max_len=256),
      anomaly_head=dict(hidden=256),
      audio=dict(
          kind="spectrogram",      # "spectrogram" (ViT over log-mel segments) | "features" (projection)
          feature_dim=128,         # input width of `features` audio (128 = VGGish)
          init_from_image=True,    # spectrogram ViT initialized from the image tower (RGB kernel averaged)
          mel_bins=64, mel_frames=96, patch_size=16,
      ),
      logit_scale_init=math.log(1 / 0.07),
      logit_scale_max=math.log(100.0),
  ))

  c.prior = ml_collections.ConfigDict(dict(source="head"))   # "head" | "external" | "mean"
  c.weighting = ml_collections.ConfigDict(dict(beta=0.5, tau=0.1))

  c.loss = ml_collections.ConfigDict(dict(
      # lambda_g: weight of each similarity level in the loss and in the combined retrieval score.
      levels={name: 1.0 for name in TASK_LEVELS[task]},
      mil=1.0,
  ))
  c.eval = ml_collections.ConfigDict(dict(chunk_size=64, batch_size=32))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=1000, grad_accum_steps=1,
      learning_rate=1e-4, warmup_steps=100, weight_decay=0.2, b1=0.9, b2=0.98, grad_clip_norm=1.0,
      # Per-tower learning-rate multipliers; 0 freezes the tower.
      lr_mult=dict(image=1.0, text=1.0, audio=1.0, heads=1.0),
      log_every=10, checkpoint_every=200, keep_checkpoints=3, eval_every=0,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))   # -1: all remaining devices
  return c
