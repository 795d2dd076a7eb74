"""CLIP towers in Flax Linen, numerically identical to HF transformers' PyTorch `CLIPModel`.

Layout of the parameter tree (names follow HF so `hf.py` maps them one to one):

  vision/  patch_embedding, class_embedding, position_embedding, pre_layrnorm,
           layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}}, post_layernorm
  text/    token_embedding, position_embedding, layers_{i}/..., final_layer_norm
  visual_projection, text_projection, logit_scale

Details that silently break parity with HF: quick_gelu, LayerNorm eps 1e-5, `pre_layrnorm` before the
vision blocks, causal attention in the text tower, text pooling at the EOS token.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from jax.extend import backend as jax_backend
import jax.numpy as jnp
import numpy as np

EOS_TOKEN_ID = 49407
# OpenAI CLIP pixel statistics (RGB, on [0, 1]).
PIXEL_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
PIXEL_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize_pixels(frames):
  """uint8 RGB (..., H, W, 3) -> float32 CLIP-normalized; numpy in, numpy out; jax in (e.g. under jit), jax out."""
  return (frames.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD


def _pair(x) -> tuple[int, int]:
  return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Sizes of a ViT tower (HF `CLIPVisionConfig` field names)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int | tuple[int, int] = 224     # int (square) or (H, W)
  patch_size: int | tuple[int, int] = 16      # int (square) or (h, w)
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def grid(self) -> tuple[int, int]:
    """Patch grid (rows, columns); the conv drops a remainder, as in PyTorch."""
    (h, w), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
    return h // ph, w // pw

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Sizes of the text transformer (HF `CLIPTextConfig` field names)."""
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # HF pools at the first `eos_token_id`; legacy configs carry 2 and then HF pools at argmax(ids).
  eos_token_id: int = EOS_TOKEN_ID


_VISION_KEYS = {f.name for f in dataclasses.fields(VisionConfig)}
_TEXT_KEYS = {f.name for f in dataclasses.fields(TextConfig)}


def _sub_config(cls, keys, d, what):
  unknown = set(d) - keys
  if unknown:
    raise ValueError(f"Unknown CLIP {what} config fields {sorted(unknown)}; known: {sorted(keys)}")
  d = dict(d)
  for k in ("image_size", "patch_size"):
    if k in d and not isinstance(d[k], int):
      d[k] = tuple(int(v) for v in d[k])
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Tower sizes plus how to run them (compute / param dtype, attention kernel, remat)."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592            # HF default, ln(1/0.07)
  dtype: str = "float32"                      # compute dtype, e.g. "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"                # ATTENTION_IMPLS; see `attention_plan`
  remat: bool = False                         # rematerialize each transformer block in the backward pass

  @classmethod
  def from_dict(cls, d, dtype="float32", param_dtype="float32", attention_impl="auto", remat=False):
    """From a `config.model.clip`-like mapping: projection_dim, vision{...}, text{...} (HF names)."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {"vision", "text", "projection_dim", "logit_scale_init"}
    if set(d) - known:
      raise ValueError(f"Unknown CLIP config fields {sorted(set(d) - known)}; known: {sorted(known)}")
    return cls(
        vision=_sub_config(VisionConfig, _VISION_KEYS, d.get("vision", {}), "vision"),
        text=_sub_config(TextConfig, _TEXT_KEYS, d.get("text", {}), "text"),
        projection_dim=int(d.get("projection_dim", 512)),
        logit_scale_init=float(d.get("logit_scale_init", 2.6592)),
        dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype).name,
        attention_impl=attention_impl or "auto", remat=bool(remat))

  def to_dict(self) -> dict[str, Any]:
    """The size fields only (what `from_dict` reads back); run settings are passed separately."""
    return dict(vision=dataclasses.asdict(self.vision), text=dataclasses.asdict(self.text),
                projection_dim=self.projection_dim, logit_scale_init=self.logit_scale_init)

  @classmethod
  def from_hf(cls, hf_config, **run_settings):
    """From a `transformers.CLIPConfig`; run_settings as in `from_dict`."""
    v, t = hf_config.vision_config, hf_config.text_config
    eos = t.eos_token_id if isinstance(t.eos_token_id, int) else int(t.eos_token_id[0])
    return cls.from_dict(dict(
        vision={k: getattr(v, k) for k in _VISION_KEYS},
        text={**{k: getattr(t, k) for k in _TEXT_KEYS - {"eos_token_id"}}, "eos_token_id": eos},
        projection_dim=hf_config.projection_dim,
        logit_scale_init=hf_config.logit_scale_init_value), **run_settings)

  def to_hf(self):
    """A `transformers.CLIPConfig` with these sizes (square images only, as HF CLIP requires)."""
    import transformers  # pylint: disable=g-import-not-at-top
    if not isinstance(self.vision.image_size, int) or not isinstance(self.vision.patch_size, int):
      raise ValueError(f"HF CLIPModel needs square images and patches, got image_size="
                       f"{self.vision.image_size} patch_size={self.vision.patch_size}")
    # projection_dim also in the tower configs, for CLIP{Vision,Text}ModelWithProjection users.
    towers = [dict(dataclasses.asdict(c), projection_dim=self.projection_dim) for c in (self.vision, self.text)]
    return transformers.CLIPConfig(vision_config=towers[0], text_config=towers[1],
                                   projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init)


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":                                   # HF "gelu" is the exact erf form
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"Unsupported CLIP hidden_act {name!r}")


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    x = _activation(self.hidden_act)(x)
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cudnn_attention_length(seq_len: int, head_dim: int, dtype, compute_capability: str) -> int | None:
  """The length to pad a self-attention sequence to so that JAX's cuDNN flash attention takes it, else None.

  JAX's own rule for our calls (no bias, no fp8), from jax/_src/cudnn/fused_attention_stablehlo.py
  (`check_layout`, `check_is_flash_attention`; the same from jax 0.10.2 to 0.11.2):
  - q/k/v in bfloat16 or float16;
  - head dim a multiple of 8, at most 256 from compute capability 9.0 (Hopper) on, else 128;
  - compute capability 10.3 needs cuDNN >= 9.11, a version no public API reports: refused here;
  - both lengths even whenever the call is differentiated. `cudnn.dot_product_attention` replaces a missing
    bias by an empty placeholder array before `_dot_product_attention_fwd_rule` tests `bias is not None`, so
    the training path applies the check meant for biased calls to every call: "Unsupported sequence length
    Q 197, KV 197". A trace does not know whether it will be differentiated, so the length is always even.
  """
  capability = tuple(int(x) for x in compute_capability.split("."))
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or capability == (10, 3):
    return None
  if head_dim % 8 or head_dim > (256 if capability >= (9, 0) else 128):
    return None
  return seq_len + seq_len % 2


def attention_plan(impl: str, platform: str, seq_len: int, head_dim: int, dtype,
                   compute_capability: str | None = None) -> tuple[str, int]:
  """(`jax.nn.dot_product_attention` implementation, padded sequence length) for `model.attention_impl`.

  platform: "cuda" for a CUDA GPU (then `compute_capability`, e.g. "9.0"), else the JAX backend name.
  "auto": cuDNN where `cudnn_attention_length` accepts the call, else XLA (CPU, TPU, ROCm, float32, odd head
  dims); JAX offers no other fused kernel through this API. "cudnn": the same, but a ValueError where cuDNN
  cannot run. "xla": XLA, unpadded.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}: must be one of {ATTENTION_IMPLS}")
  length = None
  if impl != "xla" and platform == "cuda":
    length = cudnn_attention_length(seq_len, head_dim, dtype, compute_capability)
  if length is not None:
    return "cudnn", length
  if impl == "cudnn":
    raise ValueError(f"model.attention_impl='cudnn' cannot run on {platform} with {jnp.dtype(dtype).name} "
                     f"compute and head dim {head_dim}: JAX's cuDNN attention needs a CUDA GPU, model.dtype "
                     f"bfloat16 or float16 and a head dim that is a multiple of 8 (<= 128, <= 256 from Hopper "
                     f"on); use 'auto' or 'xla'")
  return "xla", seq_len


def _default_backend() -> tuple[str, str | None]:
  """(platform, compute capability) as `attention_plan` takes them, for the default JAX backend."""
  backend = jax_backend.get_backend()
  if "cuda" in backend.platform_version:   # how JAX's cuDNN checks tell CUDA from ROCm
    return "cuda", jax.local_devices()[0].compute_capability
  return backend.platform, None


def dot_product_attention(q, k, v, causal: bool, implementation: str, length: int):
  """`jax.nn.dot_product_attention` over (B, N, heads, head_dim) q, k, v, run at sequence length `length`.

  For length > N the sequence is zero-padded here, the padded keys are masked (a causal mask already hides
  them: they come after every real query) and the output is cut back to N, so the result is the unpadded one.
  Scale 1/sqrt(head_dim) (the default) and softmax in float32, as HF does.
  """
  n = q.shape[1]
  if length == n:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, length - n), (0, 0), (0, 0)))
  key_lengths = None if causal else jnp.full((q.shape[0],), n, jnp.int32)
  y = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal, key_value_seq_lengths=key_lengths,
                                   implementation=implementation)
  return y[:, :n]


class Attention(nn.Module):
  """Multi-head self-attention with HF's separate q/k/v/out projections; the kernel from `attention_plan`."""
  num_heads: int
  causal: bool
  dtype: Any
  param_dtype: Any
  attention_impl: str

  @nn.compact
  def __call__(self, x):
    b, n, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    heads = lambda y: y.reshape(b, n, self.num_heads, head_dim)
    q, k, v = heads(dense("q_proj")(x)), heads(dense("k_proj")(x)), heads(dense("v_proj")(x))
    platform, capability = _default_backend()
    implementation, length = attention_plan(self.attention_impl, platform, n, head_dim, q.dtype, capability)
    y = dot_product_attention(q, k, v, self.causal, implementation, length)
    return dense("out_proj")(y.reshape(b, n, width))


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  causal: bool
  dtype: Any
  param_dtype: Any
  attention_impl: str

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    x = x + Attention(self.num_heads, self.causal, self.dtype, self.param_dtype, self.attention_impl,
                      name="self_attn")(norm("layer_norm1")(x))
    return x + MLP(self.intermediate_size, self.hidden_act, self.dtype, self.param_dtype,
                   name="mlp")(norm("layer_norm2")(x))


def _encoder(x, cfg, causal, dtype, param_dtype, attention_impl, remat):
  """The stack of blocks, named layers_0 .. layers_{n-1} in the calling module."""
  layer = nn.remat(EncoderLayer) if remat else EncoderLayer
  for i in range(cfg.num_hidden_layers):
    x = layer(cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps, causal,
              dtype, param_dtype, attention_impl, name=f"layers_{i}")(x)
  return x


class VisionTransformer(nn.Module):
  """The CLIP image tower (HF `CLIPVisionModel`), also the audio spectrogram tower.

  Constructor:
    VisionTransformer(config: VisionConfig, dtype="float32", param_dtype="float32",
                      attention_impl="auto", remat=False)
  `config.num_channels` sets the input channels (1 for log-mel spectrograms) and `config.image_size` /
  `config.patch_size` may be rectangular (H, W), e.g.
    VisionTransformer(dataclasses.replace(clip_config.vision, num_channels=1, image_size=(96, 64)))
  The position table then has grid_h * grid_w + 1 rows, so it is not loadable from a square HF one as is.

  __call__(pixels (B, H, W, C) float) -> (cls (B, width), patches (B, K, width)), both after
  `post_layernorm` and before any projection; K = grid_h * grid_w in row-major order.
  """
  config: VisionConfig
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    width = cfg.hidden_size
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
      raise ValueError(f"VisionTransformer expects (B, H, W, {cfg.num_channels}) pixels, got {pixels.shape}")
    if tuple(pixels.shape[1:3]) != _pair(cfg.image_size):
      raise ValueError(f"Input image size {pixels.shape[1:3]} does not match the config {_pair(cfg.image_size)}")
    patch = _pair(cfg.patch_size)
    x = nn.Conv(width, patch, strides=patch, padding="VALID", use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="patch_embedding")(pixels)
    x = x.reshape(x.shape[0], -1, width)
    cls = self.param("class_embedding", nn.initializers.normal(width ** -0.5), (width,), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (cfg.num_patches + 1, width),
                     self.param_dtype)
    x = x + pos.astype(x.dtype)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    x = norm("pre_layrnorm")(x)
    x = _encoder(x, cfg, False, self.dtype, self.param_dtype, self.attention_impl, self.remat)
    # HF applies post_layernorm to the pooled CLS; the patch tokens get the same LayerNorm.
    x = norm("post_layernorm")(x)
    return x[:, 0], x[:, 1:]


def eos_index(ids, eos_token_id: int = EOS_TOKEN_ID):
  """Position HF pools at: the first `eos_token_id`, or argmax(ids) for legacy configs (eos_token_id=2)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """The CLIP text tower (HF `CLIPTextModel`): causal attention, `final_layer_norm` on every token.

  __call__(ids (B, L) int, L <= max_position_embeddings) -> (pooled (B, width) at the EOS token,
  tokens (B, L, width)), both after `final_layer_norm`, before the projection.
  """
  config: TextConfig
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, ids):
    cfg = self.config
    if ids.ndim != 2 or ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"TextTransformer expects (B, L<={cfg.max_position_embeddings}) ids, got {ids.shape}")
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02), name=name)
    x = embed(cfg.vocab_size, "token_embedding")(ids)
    x = x + embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(ids.shape[1]))[None]
    x = _encoder(x, cfg, True, self.dtype, self.param_dtype, self.attention_impl, self.remat)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="final_layer_norm")(x)
    pooled = jnp.take_along_axis(x, eos_index(ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    return pooled, x


class CLIP(nn.Module):
  """Both towers, their projections and the learned logit scale (HF `CLIPModel`).

  Methods (all return projected, unnormalized embeddings of width `projection_dim`):
    encode_image(pixels (B,H,W,3) CLIP-normalized) -> (B, D)
    encode_text(ids (B,77)) -> (B, D)
    image_tokens(pixels) -> cls (B, D), patches (B, K, D)
    text_tokens(ids) -> sentence (B, D), words (B, L, D), word_mask (B, L) (True for real words only)
    __call__(pixels, ids) -> (image (B, D), text (B, D))
  """
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    run = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, attention_impl=cfg.attention_impl,
               remat=cfg.remat)
    self.vision = VisionTransformer(cfg.vision, **run)
    self.text = TextTransformer(cfg.text, **run)
    proj = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.visual_projection = proj()
    self.text_projection = proj()
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init), (),
                                  cfg.param_dtype)

  def image_tokens(self, pixels):
    cls, patches = self.vision(pixels)
    return self.visual_projection(cls), self.visual_projection(patches)

  def encode_image(self, pixels):
    return self.visual_projection(self.vision(pixels)[0])

  def text_tokens(self, ids):
    pooled, tokens = self.text(ids)
    position = jnp.arange(ids.shape[1])[None]
    word_mask = (position > 0) & (position < eos_index(ids, self.config.text.eos_token_id)[:, None])
    return self.text_projection(pooled), self.text_projection(tokens), word_mask

  def encode_text(self, ids):
    return self.text_projection(self.text(ids)[0])

  def __call__(self, pixels, ids):
    return self.encode_image(pixels), self.encode_text(ids)
