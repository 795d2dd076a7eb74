"""VarCMP: CLIP towers + temporal adapters + anomaly head + per-level logit scales (SPEC section 2).

  model = VarCMP(config.model, task=config.task, regime=config.regime)
  params = model.init(rng, batch)["params"]
  video = model.apply({"params": params}, batch, method=model.encode_video)   # VideoEmbeddings
  query = model.apply({"params": params}, batch, method=model.encode_query)   # TextEmbeddings | AudioEmbeddings
  video, query = model.apply({"params": params}, batch)
  scales = model.apply({"params": params}, method=model.logit_scales)         # {level: clipped log scale}

Top-level params, only those the task and regime use:
  clip          a clip.CLIP tree: the image tower (`vision`, `visual_projection`) in the frames regime, the text
                tower (`text`, `text_projection`) in the text task, and CLIP's own `logit_scale` (unused by
                VarCMP) whenever either is there. The features regime has no image tower: its g_t, r_{t,k}
                were computed by the tower beforehand, and a tower kept here would get no gradient while
                weight decay still shrank it. The audio task has no text tower.
  video_projection  features regime with config.model.video_features.dim > 0: stored features -> joint space.
  temporal      video temporal adapter.
  audio         audio tower with its own temporal adapter (audio task).
  anomaly_head  MLP on f_t -> a_t.
  logit_scales  {level: scalar}, one learned log-scale per similarity level.
Outputs are float32 whatever the compute dtype; padded snippets and non-word tokens are zero.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from varcmp_jax import config as config_lib
from varcmp_jax.alignment import losses
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.clip import model as clip_model
from varcmp_jax.model import audio as audio_lib
from varcmp_jax.model.regions import pool_regions
from varcmp_jax.model.temporal import TemporalAdapter


class AnomalyHead(nn.Module):
  """a_t = sigmoid(MLP(f_t)), in float32."""
  hidden: int
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, f):
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(f.astype(self.dtype))
    x = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(nn.gelu(x))
    return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


class FeatureProjection(nn.Module):
  """Stored visual features of any width -> the joint space: LayerNorm -> Dense -> GELU -> Dense, float32 out."""
  width: int
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x):
    return audio_lib.feature_mlp(x, self.width, self.dtype, self.param_dtype).astype(jnp.float32)


def clip_config(model_cfg) -> clip_model.CLIPConfig:
  """The CLIPConfig (sizes + dtype, attention kernel, remat) that config.model describes."""
  return clip_model.CLIPConfig.from_dict(model_cfg.clip, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                                         attention_impl=model_cfg.attention_impl, remat=model_cfg.remat)


def _require(batch, key: str, why: str):
  if key not in batch:
    raise ValueError(f"VarCMP: the batch has no {key!r} ({why}); it has {sorted(batch)}")
  return batch[key]


class VarCMP(nn.Module):
  """See the module docstring. `model_cfg` is config.model; a ConfigDict is frozen so the module hashes."""
  model_cfg: Any
  task: str = "text"
  regime: str = "frames"

  def __post_init__(self):
    if not isinstance(self.model_cfg, ml_collections.FrozenConfigDict):
      object.__setattr__(self, "model_cfg", ml_collections.FrozenConfigDict(self.model_cfg))
    if self.task not in config_lib.TASK_LEVELS:
      raise ValueError(f"VarCMP: unknown task {self.task!r}; expected one of {sorted(config_lib.TASK_LEVELS)}")
    if self.regime not in ("frames", "features"):
      raise ValueError(f"VarCMP: unknown regime {self.regime!r}; expected 'frames' or 'features'")
    if self.task == "audio" and self.model_cfg.audio.kind not in ("spectrogram", "features"):
      raise ValueError(f"VarCMP: unknown config.model.audio.kind {self.model_cfg.audio.kind!r}; expected "
                       f"'spectrogram' or 'features'")
    super().__post_init__()

  def setup(self):
    cfg = self.model_cfg
    tower = clip_config(cfg)
    run = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    temporal = cfg.temporal
    if self.regime == "frames" or self.task == "text":
      self.clip = clip_model.CLIP(tower)
    if self.regime == "features" and config_lib.video_feature_dim(cfg):
      self.video_projection = FeatureProjection(tower.projection_dim, **run)
    self.temporal = TemporalAdapter(**temporal, **run)
    self.anomaly_head = AnomalyHead(cfg.anomaly_head.hidden, **run)
    if self.task == "audio" and cfg.audio.kind == "spectrogram":
      vision = audio_lib.spectrogram_vision_config(tower.vision, cfg.audio.mel_frames, cfg.audio.mel_bins,
                                                   cfg.audio.patch_size)
      self.audio = audio_lib.SpectrogramTower(vision, tower.projection_dim, temporal,
                                              attention_impl=tower.attention_impl, remat=tower.remat, **run)
    elif self.task == "audio":
      self.audio = audio_lib.FeatureTower(cfg.audio.feature_dim, tower.projection_dim, temporal, **run)
    init = nn.initializers.constant(cfg.logit_scale_init)
    self.scale_params = self.param(
        "logit_scales", lambda rng: {level: init(rng, (), jnp.dtype(cfg.param_dtype))
                                     for level in config_lib.TASK_LEVELS[self.task]})

  def image_features(self, frames):
    """(B, T, S, S, 3) uint8 frames -> g (B, T, D), r (B, T, R, D) float32: the tower's per-snippet outputs.

    Exactly what the features regime reads from batch["features"] / batch["regions"].
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"VarCMP: batch['frames'] must be (B, T, S, S, 3) uint8, got {frames.shape}")
    batch, snippets = frames.shape[:2]
    pixels = clip_model.normalize_pixels(jnp.asarray(frames).reshape(batch * snippets, *frames.shape[2:]))
    pixels = pixels.astype(self.model_cfg.dtype)
    cls, patches = self.clip.image_tokens(pixels)
    regions = pool_regions(patches, self.clip.config.vision.grid, self.model_cfg.region_grid)
    return (cls.astype(jnp.float32).reshape(batch, snippets, -1),
            regions.reshape(batch, snippets, *regions.shape[1:]))

  def encode_video(self, batch) -> VideoEmbeddings:
    """Frames regime: the image tower's g_t and region tokens. Features regime: the stored `features` (and
    `regions` when the batch has them: released features have none, and only the spatial level reads them),
    projected into the joint space when config.model.video_features.dim > 0."""
    mask = jnp.asarray(_require(batch, "mask", "the (B, T) valid-snippet mask"), bool)
    if self.regime == "frames":
      g, r = self.image_features(_require(batch, "frames", "frames regime"))
    else:
      g = jnp.asarray(_require(batch, "features", "features regime"), jnp.float32)
      r = None if batch.get("regions") is None else jnp.asarray(batch["regions"], jnp.float32)
      width, regions = config_lib.stored_video_width(self.model_cfg), self.model_cfg.region_grid ** 2
      projected = bool(config_lib.video_feature_dim(self.model_cfg))
      field = "video_features.dim" if projected else "clip.projection_dim"
      if g.ndim != 3 or g.shape[-1] != width:
        raise ValueError(f"VarCMP: features regime needs batch['features'] (B, T, {width}) "
                         f"(config.model.{field}), got {g.shape}")
      if r is not None and r.shape != (*g.shape[:2], regions, width):
        raise ValueError(f"VarCMP: batch['regions'] must be (B, T, {regions}, {width}) (config.model.region_grid**2, "
                         f"{field}), got {r.shape}")
      if projected:
        g = self.video_projection(g)
        r = None if r is None else self.video_projection(r)
    if mask.shape != g.shape[:2]:
      raise ValueError(f"VarCMP: batch['mask'] has shape {mask.shape}, the snippets are {g.shape[:2]}")
    f = self.temporal(g, mask)
    anomaly = jnp.where(mask, self.anomaly_head(f), 0.0)
    prior = batch.get("prior")
    return VideoEmbeddings(
        frames=f, regions=None if r is None else jnp.where(mask[..., None, None], r, 0.0), mask=mask,
        anomaly=anomaly,
        external_prior=None if prior is None else jnp.where(mask, jnp.asarray(prior, jnp.float32), 0.0))

  def encode_query(self, batch) -> TextEmbeddings | AudioEmbeddings:
    if self.task == "text":
      ids = fit_word_budget(jnp.asarray(_require(batch, "tokens", "text task")), self.model_cfg.get("max_words", 0),
                            self.clip.config.text.eos_token_id)
      sentence, words, word_mask = self.clip.text_tokens(ids)
      # Words live between <BOS> (position 0) and the last position (<EOS>, or padding): L - 2 of them.
      words, word_mask = words[:, 1:-1], word_mask[:, 1:-1]
      return TextEmbeddings(sentence=sentence.astype(jnp.float32),
                            words=jnp.where(word_mask[..., None], words.astype(jnp.float32), 0.0),
                            word_mask=word_mask)
    mask = jnp.asarray(_require(batch, "mask", "the (B, T) valid-snippet mask"), bool)
    if self.model_cfg.audio.kind == "spectrogram":
      segments = self.audio(jnp.asarray(_require(batch, "mel", "audio.kind = 'spectrogram'")), mask)
    else:
      segments = self.audio(jnp.asarray(_require(batch, "audio_features", "audio.kind = 'features'")), mask)
    return AudioEmbeddings(segments=segments, mask=mask)

  def logit_scales(self) -> dict[str, jax.Array]:
    """{level: learned log-scale}, clipped at config.model.logit_scale_max with the gradient kept
    (losses.clip_log_scale): a scale above the max can still be pulled back."""
    top = self.model_cfg.logit_scale_max
    return {level: losses.clip_log_scale(s, top) for level, s in self.scale_params.items()}

  def __call__(self, batch):
    return self.encode_video(batch), self.encode_query(batch)


def fit_word_budget(ids: jax.Array, max_words: int, eos_token_id: int) -> jax.Array:
  """(B, L) token ids -> (B, max_words + 2): <BOS>, the first max_words words and <EOS> (config.model.max_words).

  The text tower is causal, so a caption within the budget gets exactly the embeddings it gets from all L
  positions, at a fraction of the cost, and the spatial level contracts over max_words words, not L - 2. A
  longer caption ends with <EOS> in the last position, as CLIP's tokenizer truncates at 77. max_words <= 0, or
  a budget as long as the ids: unchanged.
  """
  length = max_words + 2
  if max_words <= 0 or length >= ids.shape[1]:
    return ids
  kept = ids[:, :length]
  longer = clip_model.eos_index(ids, eos_token_id) >= length
  return kept.at[:, -1].set(jnp.where(longer, eos_token_id, kept[:, -1]))


def load_clip(params, clip_params, model_cfg=None):
  """params with imported CLIP weights (`varcmp_jax.clip.load` / `clip.from_hf`) in params["clip"].

  Only the parts this model has are taken (an unused tower is dropped). With model_cfg whose
  audio.init_from_image is true and a spectrogram audio tower in params, the audio tower is also started from
  the imported image tower (`init_audio_from_image`). Returns a new tree; shapes are checked, dtypes kept.
  """
  clip_params = clip_params.get("params", clip_params)
  params = dict(params)
  if "clip" in params:
    wanted = flax.traverse_util.flatten_dict(params["clip"], sep="/")
    given = flax.traverse_util.flatten_dict({k: v for k, v in clip_params.items() if k in params["clip"]}, sep="/")
    if set(wanted) != set(given):
      raise ValueError(f"load_clip: the imported CLIP params lack {sorted(set(wanted) - set(given))[:5]} and have "
                       f"unexpected {sorted(set(given) - set(wanted))[:5]}; does config.model.clip match the "
                       f"checkpoint?")
    params["clip"] = flax.traverse_util.unflatten_dict(
        {path: _fit(given[path], leaf, path) for path, leaf in wanted.items()}, sep="/")
  if model_cfg is not None and model_cfg.audio.init_from_image and "vit" in params.get("audio", {}):
    params["audio"] = audio_lib.init_audio_from_image(params["audio"], clip_params,
                                                      audio_lib.spectrogram_grid(model_cfg.audio))
  return params


def _fit(src, dst, name: str):
  if src.shape != dst.shape:
    raise ValueError(f"load_clip: imported clip/{name} has shape {src.shape}, the model needs {dst.shape}; "
                     f"does config.model.clip match the checkpoint?")
  return jnp.asarray(src, dst.dtype)
