"""Audio towers: per-snippet audio embeddings u_t, same snippet grid as the video, then a temporal adapter.

Two kinds (config.model.audio.kind):
  "spectrogram": a CLIP-style ViT over each snippet's log-mel segment (mel_frames x mel_bins, 1 channel),
                 with the image tower's sizes, so it can start from the image tower (`init_audio_from_image`,
                 the AudioCLIP / Wav2CLIP recipe); its CLS token is projected to D like the image CLS.
  "features":    LayerNorm + a 2-layer GELU MLP from pre-extracted per-snippet features (e.g. 128-d VGGish,
                 the XD-Violence release) to D.

No audio region tokens. SPEC section 2 lets the spectrogram tower give region tokens, but no similarity level
reads them: every audio level uses u_t only (semantic: mean_t u_t; temporal: u_t; spatial, the sounding
region: the *video's* regions r_{t,k} against u_t). So the tower keeps only its projected CLS per segment;
projecting its patch tokens and carrying (B, T, R, D) audio regions through the loss, evaluation, export and
search would cost memory and time for nothing. A level that needed them would add them here and to
alignment.embeddings.AudioEmbeddings.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from varcmp_jax.clip import model as clip_model
from varcmp_jax.model.temporal import TemporalAdapter


def spectrogram_vision_config(vision: clip_model.VisionConfig, mel_frames: int, mel_bins: int,
                              patch_size: int) -> clip_model.VisionConfig:
  """The image tower's sizes on a 1-channel (mel_frames, mel_bins) input: time along H, mel bins along W."""
  return dataclasses.replace(vision, num_channels=1, image_size=(mel_frames, mel_bins), patch_size=patch_size)


class SpectrogramTower(nn.Module):
  """(B, T, mel_frames, mel_bins) log-mel + (B, T) mask -> (B, T, D) u_t, zero on padded snippets."""
  vision: clip_model.VisionConfig      # already the 1-channel spectrogram config
  projection_dim: int
  temporal: Any                        # config.model.temporal (frozen)
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, mel, mask):
    batch, snippets = mel.shape[:2]
    expected = clip_model._pair(self.vision.image_size)  # pylint: disable=protected-access
    if mel.ndim != 4 or tuple(mel.shape[2:]) != expected:
      raise ValueError(f"audio spectrogram tower expects batch['mel'] of shape (B, T, {expected[0]}, "
                       f"{expected[1]}) (config.model.audio.mel_frames, mel_bins), got {mel.shape}")
    segments = mel.reshape(batch * snippets, *expected, 1).astype(self.dtype)
    cls, _ = clip_model.VisionTransformer(self.vision, self.dtype, self.param_dtype, self.attention_impl,
                                          self.remat, name="vit")(segments)
    u = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="projection")(cls)
    u = u.reshape(batch, snippets, self.projection_dim).astype(jnp.float32)
    return TemporalAdapter(**self.temporal, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="temporal")(u, mask)


def feature_mlp(x, width: int, dtype, param_dtype):
  """Pre-extracted features -> the joint space: LayerNorm -> Dense -> GELU -> Dense. Call it inside an
  `nn.compact` method: its layers (`norm`, `fc1`, `fc2`) belong to the caller."""
  dense = lambda name: nn.Dense(width, dtype=dtype, param_dtype=param_dtype, name=name)
  x = nn.LayerNorm(dtype=dtype, param_dtype=param_dtype, name="norm")(x.astype(dtype))
  return dense("fc2")(nn.gelu(dense("fc1")(x)))


class FeatureTower(nn.Module):
  """(B, T, F) pre-extracted audio features + (B, T) mask -> (B, T, D) u_t, zero on padded snippets."""
  feature_dim: int
  projection_dim: int
  temporal: Any
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, features, mask):
    if features.ndim != 3 or features.shape[-1] != self.feature_dim:
      raise ValueError(f"audio features tower expects batch['audio_features'] of shape (B, T, "
                       f"{self.feature_dim}) (config.model.audio.feature_dim), got {features.shape}")
    x = feature_mlp(features, self.projection_dim, self.dtype, self.param_dtype)
    return TemporalAdapter(**self.temporal, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="temporal")(x.astype(jnp.float32), mask)


def spectrogram_grid(audio_cfg) -> tuple[int, int]:
  """Patch grid (rows along time, columns along mel bins) of the spectrogram tower for config.model.audio."""
  return audio_cfg.mel_frames // audio_cfg.patch_size, audio_cfg.mel_bins // audio_cfg.patch_size


def _grid_resize(table, grid_from: tuple[int, int], grid_to: tuple[int, int]):
  """Bilinear (antialiased when shrinking) resize of a row-major (gh*gw, W) position table."""
  if grid_from == grid_to:
    return table
  grid = table.reshape(*grid_from, table.shape[-1]).astype(jnp.float32)
  return jax.image.resize(grid, (*grid_to, table.shape[-1]), "bilinear").reshape(-1, table.shape[-1])


def _square_grid(num_patches: int) -> tuple[int, int]:
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f"init_audio_from_image: the image position table has {num_patches} patch rows, not a "
                     f"square grid")
  return side, side


def _fit(src, dst, what: str):
  if src.shape != dst.shape:
    raise ValueError(f"init_audio_from_image: image tower {what} has shape {src.shape}, the audio tower needs "
                     f"{dst.shape} (the spectrogram tower must have the image tower's sizes)")
  return jnp.asarray(src, dst.dtype)


def init_audio_from_image(audio_params, clip_params, audio_grid: tuple[int, int]):
  """Spectrogram tower params started from the CLIP image tower; returns a new `audio` tree.

  audio_grid: the spectrogram patch grid, `spectrogram_grid(config.model.audio)`.
  patch kernel: the image RGB kernel averaged over its 3 input channels; class embedding, pre/post
  LayerNorms and every transformer block: copied; position embeddings: the CLS row copied, the (square)
  image patch grid resized bilinearly to audio_grid; projection: the image `visual_projection`, so the
  initial u_t live in CLIP's joint space. The temporal adapter is left as it is. Needs the same tower
  sizes and patch size, else ValueError.
  """
  if "vit" not in audio_params:
    raise ValueError("init_audio_from_image: the audio params have no 'vit' (config.model.audio.kind must be "
                     "'spectrogram')")
  if "vision" not in clip_params or "visual_projection" not in clip_params:
    raise ValueError("init_audio_from_image: the CLIP params have no image tower ('vision', "
                     "'visual_projection')")
  image, audio = clip_params["vision"], audio_params["vit"]
  if set(image) != set(audio):
    raise ValueError(f"init_audio_from_image: image tower entries {sorted(image)} differ from the audio tower "
                     f"entries {sorted(audio)} (different depth?)")
  kernel = image["patch_embedding"]["kernel"]                       # (ph, pw, 3, width)
  audio_patch = audio["patch_embedding"]["kernel"].shape[:2]
  if kernel.shape[:2] != audio_patch:
    raise ValueError(f"init_audio_from_image: the image patch size {kernel.shape[:2]} differs from the audio "
                     f"patch size {audio_patch}; set config.model.audio.patch_size to the image patch size")
  pos = image["position_embedding"]                                 # (1 + gh*gw, width)
  patch_pos = _grid_resize(pos[1:], _square_grid(pos.shape[0] - 1), tuple(audio_grid))
  new = {**image,
         "patch_embedding": {"kernel": kernel.mean(axis=2, keepdims=True)},
         "position_embedding": jnp.concatenate([pos[:1], patch_pos.astype(pos.dtype)], axis=0)}
  new = {name: jax.tree.map(lambda src, dst, name=name: _fit(src, dst, name), new[name], audio[name])
         for name in audio}
  projection = _fit(clip_params["visual_projection"]["kernel"], audio_params["projection"]["kernel"],
                    "visual_projection")
  return {**audio_params, "vit": new, "projection": {"kernel": projection}}
