"""VarCMP scoring in PyTorch, rebuilt from a `varcmp export` directory (safetensors only, no pickle).

  model = VarCMPTorch.from_pretrained("OUT")            # OUT/clip (HF CLIPModel), varcmp_heads.safetensors
  video = model.encode_video({"features": ..., "regions": ..., "mask": ...})   # or {"frames": uint8, "mask"};
                                                        # released features: no "regions" (no spatial level)
  query = model.encode_query({"tokens": ids})           # or {"mel": ..., "mask": ...} / {"audio_features": ...}
  levels = model.similarities(video, query)              # {level: (Q, G), "combined": (Q, G)}

Inputs and outputs mirror the Flax model (varcmp_jax.model.varcmp) field for field: uint8 frames are
(B, T, S, S, 3) and embeddings are dicts with the keys of alignment.embeddings. Module and parameter names
mirror the Flax tree too ("temporal.block0.attn.query.weight" is Flax temporal/block0/attn/query/kernel),
so `heads_state_dict` below is the whole Flax -> PyTorch mapping. Importing this module imports torch;
nothing else in varcmp_jax imports it.
"""
import json
import os

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.models.clip import modeling_clip

from varcmp_jax.config import TASK_LEVELS, video_feature_dim

CLIP_DIR = "clip"
HEADS_FILE = "varcmp_heads.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "varcmp-torch-export"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_EPS = 1e-6
FLAX_LAYER_NORM_EPS = 1e-6       # flax.linen.LayerNorm's default (the CLIP towers use HF's 1e-5)


# --- Flax params -> PyTorch state dict ------------------------------------------------------------------


def _torch_leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
  """One Flax leaf -> (torch key, array in torch layout)."""
  *parents, leaf = path
  if leaf == "kernel":
    if value.ndim == 4:                                   # Conv HWIO -> OIHW
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 3 and parents[-1] == "out":        # DenseGeneral (heads, head_dim, D) -> Linear
      value = value.reshape(-1, value.shape[-1]).T
    elif value.ndim == 3:                                 # DenseGeneral (D, heads, head_dim) -> Linear
      value = value.reshape(value.shape[0], -1).T
    else:
      value = value.T
    leaf = "weight"
  elif leaf == "bias":
    value = value.reshape(-1)
  elif leaf == "scale":
    leaf = "weight"
  return ".".join(parents + [leaf]), np.ascontiguousarray(value, np.float32)


def heads_state_dict(params) -> dict[str, np.ndarray]:
  """Every Flax param outside params["clip"] -> {torch key: float32 array} for `VarCMPTorch`."""
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict({k: v for k, v in dict(params).items() if k != "clip"})
  return dict(_torch_leaf(path, np.asarray(value, np.float32)) for path, value in flat.items())


# --- modules ---------------------------------------------------------------------------------------------


def _gelu(x):
  return F.gelu(x, approximate="tanh")     # flax.linen.gelu's default


class TemporalAttention(nn.Module):
  """flax.linen.MultiHeadDotProductAttention with a key padding mask (masked logits -> finfo.min)."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

  def forward(self, x, mask):
    b, t, width = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, -1).transpose(1, 2)        # (B, H, T, hd)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = (q / q.shape[-1] ** 0.5) @ k.transpose(-1, -2)
    logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
    y = torch.softmax(logits, dim=-1) @ v
    return self.out(y.transpose(1, 2).reshape(b, t, width))


class TemporalBlock(nn.Module):
  def __init__(self, width: int, num_heads: int, mlp_ratio: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=FLAX_LAYER_NORM_EPS)
    self.attn = TemporalAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=FLAX_LAYER_NORM_EPS)
    self.mlp_in = nn.Linear(width, mlp_ratio * width)
    self.mlp_out = nn.Linear(mlp_ratio * width, width)

  def forward(self, x, mask):
    x = x + self.attn(self.norm1(x), mask)
    return x + self.mlp_out(_gelu(self.mlp_in(self.norm2(x))))


class TemporalAdapter(nn.Module):
  """f_t = g_t + A(g)_t over the snippets; zero on padded snippets."""

  def __init__(self, width: int, num_layers: int, num_heads: int, mlp_ratio: int, max_len: int):
    super().__init__()
    self.num_layers = num_layers
    self.pos_embedding = nn.Parameter(torch.zeros(max_len, width))
    for i in range(num_layers):
      self.add_module(f"block{i}", TemporalBlock(width, num_heads, mlp_ratio))
    self.norm = nn.LayerNorm(width, eps=FLAX_LAYER_NORM_EPS)
    self.out_proj = nn.Linear(width, width)

  def forward(self, g, mask):
    if g.shape[1] > self.pos_embedding.shape[0]:
      raise ValueError(f"temporal adapter: {g.shape[1]} snippets exceed max_len={self.pos_embedding.shape[0]}")
    g = torch.where(mask[..., None], g, torch.zeros((), dtype=g.dtype))   # padding (NaN, inf) must not reach f_t
    x = g + self.pos_embedding[:g.shape[1]]
    for i in range(self.num_layers):
      x = getattr(self, f"block{i}")(x, mask)
    f = g + self.out_proj(self.norm(x))
    return torch.where(mask[..., None], f, torch.zeros((), dtype=f.dtype))


class AnomalyHead(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, 1)

  def forward(self, f):
    return torch.sigmoid(self.fc2(_gelu(self.fc1(f)))[..., 0])


class SpectrogramViT(nn.Module):
  """The CLIP ViT on 1-channel, rectangular log-mel segments; HF CLIP encoder layers, Flax param names."""

  def __init__(self, vision: transformers.CLIPVisionConfig, image_size: tuple[int, int], patch_size: int):
    super().__init__()
    width = vision.hidden_size
    grid = (image_size[0] // patch_size, image_size[1] // patch_size)
    self.image_size, self.num_layers = tuple(image_size), vision.num_hidden_layers
    self.patch_embedding = nn.Conv2d(1, width, patch_size, stride=patch_size, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(width))
    self.position_embedding = nn.Parameter(torch.zeros(grid[0] * grid[1] + 1, width))
    self.pre_layrnorm = nn.LayerNorm(width, eps=vision.layer_norm_eps)
    for i in range(vision.num_hidden_layers):
      self.add_module(f"layers_{i}", modeling_clip.CLIPEncoderLayer(vision))
    self.post_layernorm = nn.LayerNorm(width, eps=vision.layer_norm_eps)

  def forward(self, segments):
    """(N, H, W) log-mel -> (N, width) CLS token after post_layernorm."""
    x = self.patch_embedding(segments[:, None]).flatten(2).transpose(1, 2)      # row-major patches
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = self.pre_layrnorm(torch.cat([cls, x], dim=1) + self.position_embedding)
    for i in range(self.num_layers):
      x = getattr(self, f"layers_{i}")(x, None)
    return self.post_layernorm(x[:, 0])


class SpectrogramTower(nn.Module):
  def __init__(self, vision, image_size, patch_size, projection_dim, temporal):
    super().__init__()
    self.vit = SpectrogramViT(vision, image_size, patch_size)
    self.projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
    self.temporal = TemporalAdapter(projection_dim, **temporal)

  def forward(self, mel, mask):
    b, t = mel.shape[:2]
    if tuple(mel.shape[2:]) != self.vit.image_size:
      raise ValueError(f"audio spectrogram tower expects mel (B, T, {self.vit.image_size[0]}, "
                       f"{self.vit.image_size[1]}), got {tuple(mel.shape)}")
    u = self.projection(self.vit(mel.reshape(b * t, *mel.shape[2:]))).reshape(b, t, -1)
    return self.temporal(u, mask)


class FeatureProjection(nn.Module):
  """Pre-extracted features of any width -> the joint space: LayerNorm -> Linear -> GELU -> Linear."""

  def __init__(self, feature_dim, projection_dim):
    super().__init__()
    self.norm = nn.LayerNorm(feature_dim, eps=FLAX_LAYER_NORM_EPS)
    self.fc1, self.fc2 = nn.Linear(feature_dim, projection_dim), nn.Linear(projection_dim, projection_dim)

  def forward(self, features):
    return self.fc2(_gelu(self.fc1(self.norm(features))))


class FeatureTower(FeatureProjection):
  """The audio `features` tower: the projection, then its temporal adapter."""

  def __init__(self, feature_dim, projection_dim, temporal):
    super().__init__(feature_dim, projection_dim)
    self.temporal = TemporalAdapter(projection_dim, **temporal)

  def forward(self, features, mask):
    return self.temporal(super().forward(features), mask)


# --- alignment (SPEC section 2) --------------------------------------------------------------------------


def _normalize(x, mask=None):
  if mask is not None:
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
  return x / torch.clamp(x.norm(dim=-1, keepdim=True), min=_EPS)


def _masked_mean(x, mask):
  x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
  return x.sum(-2) / torch.clamp(mask.sum(-1, keepdim=True).to(x.dtype), min=1.0)


def snippet_weights(prior, mask, beta: float, tau: float):
  """w_t = (1 - beta) / T_valid + beta * softmax_t(a_t / tau) over valid t; zero on padding."""
  scores = (prior / tau).masked_fill(~mask, torch.finfo(prior.dtype).min)
  uniform = 1.0 / torch.clamp(mask.sum(-1, keepdim=True).to(prior.dtype), min=1.0)
  weights = (1.0 - beta) * uniform + beta * torch.softmax(scores, dim=-1)
  return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype))


class VarCMPTorch(nn.Module):
  """The VarCMP towers, adapters, anomaly head and scoring; see the module docstring."""

  def __init__(self, config: dict, clip: transformers.CLIPModel):
    super().__init__()
    self.config = config
    self.task, self.regime = config["task"], config["regime"]
    m = config["model"]
    width = m["clip"]["projection_dim"]
    temporal = dict(num_layers=m["temporal"]["num_layers"], num_heads=m["temporal"]["num_heads"],
                    mlp_ratio=m["temporal"]["mlp_ratio"], max_len=m["temporal"]["max_len"])
    self.clip = clip
    video_dim = video_feature_dim(m)
    if self.regime == "features" and video_dim:
      self.video_projection = FeatureProjection(video_dim, width)
    self.temporal = TemporalAdapter(width, **temporal)
    self.anomaly_head = AnomalyHead(width, m["anomaly_head"]["hidden"])
    if self.task == "audio":
      audio = m["audio"]
      if audio["kind"] == "spectrogram":
        self.audio = SpectrogramTower(clip.config.vision_config, (audio["mel_frames"], audio["mel_bins"]),
                                      audio["patch_size"], width, temporal)
      else:
        self.audio = FeatureTower(audio["feature_dim"], width, temporal)
    self.logit_scales = nn.ParameterDict({level: nn.Parameter(torch.zeros(())) for level in TASK_LEVELS[self.task]})

  @classmethod
  def from_pretrained(cls, directory: str) -> "VarCMPTorch":
    """Loads OUT/config.json, OUT/clip (HF CLIPModel) and OUT/varcmp_heads.safetensors; eval mode, float32."""
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    paths = {name: os.path.join(directory, name) for name in (CONFIG_FILE, CLIP_DIR, HEADS_FILE)}
    for path in paths.values():
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {directory} a `varcmp export` directory?")
    with open(paths[CONFIG_FILE]) as f:
      exported = json.load(f)
    if exported.get("format") != FORMAT:
      raise ValueError(f"{paths[CONFIG_FILE]}: format is {exported.get('format')!r}, expected {FORMAT!r}")
    clip = transformers.CLIPModel.from_pretrained(paths[CLIP_DIR], dtype=torch.float32, use_safetensors=True)
    model = cls(exported["config"], clip)
    heads = safetensors.torch.load_file(paths[HEADS_FILE])
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
      raise ValueError(f"{paths[HEADS_FILE]}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()

  # -- towers --

  def image_features(self, frames):
    """(B, T, S, S, 3) uint8 -> g (B, T, D), r (B, T, R, D), as the Flax `image_features`."""
    b, t = frames.shape[:2]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)
    std = torch.tensor(CLIP_STD, dtype=torch.float32)
    pixels = ((frames.reshape(b * t, *frames.shape[2:]).float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
    vision = self.clip.vision_model
    tokens = vision.post_layernorm(vision(pixel_values=pixels).last_hidden_state)   # HF norms only the CLS
    tokens = self.clip.visual_projection(tokens)
    grid = pixels.shape[-1] // self.clip.config.vision_config.patch_size
    patches = tokens[:, 1:].reshape(b * t, grid, grid, -1).permute(0, 3, 1, 2)
    # Adaptive average pooling = the Flax region bins (floor(i*H/G) .. ceil((i+1)*H/G) - 1).
    regions = F.adaptive_avg_pool2d(patches, self.config["model"]["region_grid"]).flatten(2).transpose(1, 2)
    return tokens[:, 0].reshape(b, t, -1), regions.reshape(b, t, *regions.shape[1:])

  def encode_video(self, batch) -> dict:
    mask = torch.as_tensor(batch["mask"]).bool()
    if self.regime == "frames":
      g, r = self.image_features(torch.as_tensor(batch["frames"]))
    else:   # released features have no regions: then neither has the video (and there is no spatial level)
      g = torch.as_tensor(batch["features"]).float()
      r = None if batch.get("regions") is None else torch.as_tensor(batch["regions"]).float()
      if hasattr(self, "video_projection"):
        g = self.video_projection(g)
        r = None if r is None else self.video_projection(r)
    f = self.temporal(g, mask)
    zero = torch.zeros(())
    video = dict(frames=f, regions=None if r is None else torch.where(mask[..., None, None], r, zero), mask=mask,
                 anomaly=torch.where(mask, self.anomaly_head(f), zero), external_prior=None)
    if batch.get("prior") is not None:
      video["external_prior"] = torch.where(mask, torch.as_tensor(batch["prior"]).float(), zero)
    return video

  def encode_query(self, batch) -> dict:
    if self.task == "text":
      ids = torch.as_tensor(batch["tokens"]).long()
      eos_id = self.clip.config.text_config.eos_token_id
      eos = ids.argmax(-1) if eos_id == 2 else (ids == eos_id).int().argmax(-1)
      max_words = int(self.config["model"].get("max_words", 0))
      if 0 < max_words and max_words + 2 < ids.shape[1]:   # the word budget: <BOS>, max_words words, <EOS>
        ids, longer = ids[:, :max_words + 2].clone(), eos >= max_words + 2
        ids[longer, -1] = eos_id
        eos = torch.where(longer, max_words + 1, eos)
      text = self.clip.text_model(input_ids=ids).last_hidden_state                  # after final_layer_norm
      tokens = self.clip.text_projection(text)
      position = torch.arange(ids.shape[1])[None]
      word_mask = ((position > 0) & (position < eos[:, None]))[:, 1:-1]    # words: between <BOS> and the last
      return dict(sentence=tokens[torch.arange(ids.shape[0]), eos],
                  words=torch.where(word_mask[..., None], tokens[:, 1:-1], torch.zeros(())), word_mask=word_mask)
    mask = torch.as_tensor(batch["mask"]).bool()
    if self.config["model"]["audio"]["kind"] == "spectrogram":
      segments = self.audio(torch.as_tensor(batch["mel"]).float(), mask)
    else:
      segments = self.audio(torch.as_tensor(batch["audio_features"]).float(), mask)
    return dict(segments=segments, mask=mask)

  # -- scoring --

  def prior(self, video):
    source = self.config["prior"]["source"]
    if source == "head":
      return video["anomaly"]
    if video["external_prior"] is None:
      raise ValueError(f"prior.source={source!r} needs batch['prior']")
    return video["external_prior"] if source == "external" else 0.5 * (video["anomaly"] + video["external_prior"])

  def weights(self, video):
    w = self.config["weighting"]
    return snippet_weights(self.prior(video), video["mask"], w["beta"], w["tau"])

  def logit_scale_values(self) -> dict:
    top = self.config["model"]["logit_scale_max"]
    return {level: torch.clamp(s, max=top) for level, s in self.logit_scales.items()}

  def similarities(self, video, query) -> dict:
    """{level: (Q, G)} for every level of the task the videos allow (no spatial level without region tokens),
    plus "combined" = sum_g lambda_g S_g."""
    w = self.weights(video)
    frames = _normalize(video["frames"], video["mask"])                                    # (G, T, D)
    mean_video = _normalize(_masked_mean(video["frames"], video["mask"]))
    chunk = int(self.config["eval"]["chunk_size"]) or frames.shape[0]
    if self.task == "text":
      s = _normalize(query["sentence"])
      levels = {"video": s @ mean_video.T, "frame": torch.einsum("qd,gtd,gt->qg", s, frames, w)}
    else:
      u = _normalize(query["segments"], query["mask"])                                     # (Q, T, D)
      mean_audio = _normalize(_masked_mean(query["segments"], query["mask"]))
      levels = {"semantic": mean_audio @ mean_video.T, "temporal": torch.einsum("qtd,gtd,gt->qg", u, frames, w)}
    lambdas = {k: float(v) for k, v in self.config["loss"]["levels"].items() if float(v) != 0.0}
    if video["regions"] is not None:
      levels["spatial"] = self._spatial(video, query, w, chunk)
    elif "spatial" in lambdas:
      raise ValueError("the spatial level needs region tokens and these videos have none (released features): "
                       "set loss.levels.spatial=0")
    levels["combined"] = sum(weight * levels[name] for name, weight in lambdas.items())
    return levels

  def _spatial(self, video, query, w, chunk):
    """S_spa over blocks of `chunk` videos: O(chunk) memory over the gallery."""
    regions = _normalize(video["regions"]) * video["mask"][..., None, None]                # (G, T, R, D)
    if self.task == "text":
      words = _normalize(query["words"], query["word_mask"])
      valid = query["word_mask"][:, None, None, None, :]
    else:
      u = _normalize(query["segments"], query["mask"])
    spatial = []
    for start in range(0, regions.shape[0], chunk):
      block, weights = regions[start:start + chunk], w[start:start + chunk]
      if self.task == "text":
        cos = torch.einsum("gtkd,qld->qgtkl", block, words)
        words_to_regions = (cos.amax(3) * valid[:, :, :, 0]).sum(-1) / valid.sum(-1)[:, :, :, 0].clamp(min=1)
        regions_to_words = cos.masked_fill(~valid, -torch.inf).amax(-1).mean(-1)
        regions_to_words = torch.where(valid.any(-1)[..., 0], regions_to_words, torch.zeros(()))
        spatial.append(torch.einsum("gt,qgt->qg", weights, 0.5 * (words_to_regions + regions_to_words)))
      else:
        spatial.append(torch.einsum("gt,qgt->qg", weights, torch.einsum("gtkd,qtd->qgtk", block, u).amax(-1)))
    return torch.cat(spatial, dim=1)

  def snippet_relevance(self, video, query):
    """w_t cos(f_t, q) (P, T) for aligned (query i, video i) pairs: the key-segment evidence."""
    frames = _normalize(video["frames"], video["mask"])
    if self.task == "text":
      cos = torch.einsum("ptd,pd->pt", frames, _normalize(query["sentence"]))
    else:
      cos = (frames * _normalize(query["segments"], query["mask"])).sum(-1)
    return self.weights(video) * cos
