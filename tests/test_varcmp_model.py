"""VarCMP model: shapes, zero-init adapter, padding invariance, regime equivalence, region pooling,
gradients of the composed loss and the image -> audio tower initialization.

References are independent: the CLIP tower applied directly through the clip API, torch's adaptive
average pooling and bilinear interpolation, NumPy loops and hand-computed values.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from varcmp_jax import config as config_lib
from varcmp_jax.alignment import losses, similarity
from varcmp_jax.clip import model as clip_model
from varcmp_jax.model import audio as audio_lib
from varcmp_jax.model.regions import pool_regions
from varcmp_jax.model.varcmp import VarCMP, clip_config, load_clip

IMAGE, PATCH, WIDTH = 32, 8, 64            # tiny CLIP: 4x4 patch grid
MEL_FRAMES, MEL_BINS = 16, 24              # spectrogram patch grid 2x3
AUDIO_FEATURES = 12
BOS, EOS = 49406, 49407
# Tiny models: XLA's compile time dominates, and its cheapest CPU backend settings halve it.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def tiny_config(task="text", regime="frames", audio_kind="spectrogram"):
  config = config_lib.default_config(task, regime)
  config.model.clip = config_lib.clip_tiny(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=8)
  config.model.anomaly_head.hidden = 16
  config.model.audio.update(kind=audio_kind, mel_frames=MEL_FRAMES, mel_bins=MEL_BINS, patch_size=PATCH,
                            feature_dim=AUDIO_FEATURES)
  return config


def make_batch(config, mask, seed=0):
  """A batch as the Grain pipeline gives it, every input present (the model reads what it needs)."""
  rng = np.random.RandomState(seed)
  mask = np.asarray(mask, bool)
  b, t = mask.shape
  regions = config.model.region_grid ** 2
  tokens = np.zeros((b, 77), np.int32)
  for i in range(b):
    n = 2 + i
    tokens[i, 0], tokens[i, 1:1 + n], tokens[i, 1 + n] = BOS, rng.randint(300, 40000, n), EOS
  return dict(
      frames=rng.randint(0, 256, (b, t, IMAGE, IMAGE, 3)).astype(np.uint8),
      features=rng.randn(b, t, WIDTH).astype(np.float32),
      regions=rng.randn(b, t, regions, WIDTH).astype(np.float32),
      mel=rng.randn(b, t, MEL_FRAMES, MEL_BINS).astype(np.float32),
      audio_features=rng.randn(b, t, AUDIO_FEATURES).astype(np.float32),
      tokens=tokens, label=(np.arange(b) % 2).astype(np.int32), mask=mask,
      prior=rng.rand(b, t).astype(np.float32))


def random_params(shapes, config, seed=0):
  """Random params of the given shapes (fast: no init to compile), non-zero residual projections included,
  so the adapters' attention and its masking show in the outputs."""
  rng = np.random.RandomState(seed)
  flat = flax.traverse_util.flatten_dict(shapes)
  for path, leaf in flat.items():
    if path[0] == "logit_scales":
      value = np.full(leaf.shape, config.model.logit_scale_init)
    elif path[-1] == "scale":
      value = 1.0 + 0.1 * rng.randn(*leaf.shape)
    else:
      value = 0.05 * rng.randn(*leaf.shape)
    flat[path] = jnp.asarray(value, leaf.dtype)
  return flax.traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=None)
def built(task, regime, audio_kind="spectrogram"):
  """(config, model, random params); params laid out as model.init makes them."""
  config = tiny_config(task, regime, audio_kind)
  model = VarCMP(config.model, task=task, regime=regime)
  shapes = jax.eval_shape(model.init, jax.random.key(0), make_batch(config, np.ones((2, 3), bool)))["params"]
  return config, model, random_params(shapes, config)


@functools.lru_cache(maxsize=None)
def initialized(task, regime, audio_kind="spectrogram"):
  """(config, model, params from model.init)."""
  config = tiny_config(task, regime, audio_kind)
  model = VarCMP(config.model, task=task, regime=regime)
  params = jit(model.init)(jax.random.key(0), make_batch(config, np.ones((2, 3), bool)))["params"]
  return config, model, params


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  return jit(functools.partial(model.apply, method=method and getattr(model, method)))


def apply(model, params, batch, method=None):
  """model.apply, jitted once per (model, method): compiling beats eager op-by-op dispatch even once."""
  return _jitted(model, method)({"params": params}, batch)


@functools.lru_cache(maxsize=None)
def _jitted_similarities(task):
  return jit(lambda video, query, config: similarity.level_similarities(
      video, losses.video_weights(video, config), query, task), static_argnums=2)


def similarities(video, query, config):
  return _jitted_similarities(config.task)(video, query, ml_collections.FrozenConfigDict(config))


CASES = [("text", "frames", "spectrogram"), ("text", "features", "spectrogram"),
         ("audio", "frames", "spectrogram"), ("audio", "frames", "features"),
         ("audio", "features", "spectrogram"), ("audio", "features", "features")]


@pytest.mark.parametrize("task,regime,audio_kind", CASES)
def test_shapes_and_param_tree(task, regime, audio_kind):
  config, model, params = built(task, regime, audio_kind)
  hash(model)   # attributes are hashable (jit can key on the module)
  expected = {"temporal", "anomaly_head", "logit_scales"}
  if regime == "frames" or task == "text":
    expected.add("clip")
  if task == "audio":
    expected.add("audio")
  assert set(params) == expected
  if "clip" in params:
    assert ("vision" in params["clip"]) == (regime == "frames")
    assert ("text" in params["clip"]) == (task == "text")
  if task == "audio":
    assert ("vit" in params["audio"]) == (audio_kind == "spectrogram")
  assert set(params["logit_scales"]) == set(config_lib.TASK_LEVELS[task])

  b, t, r = 2, 3, config.model.region_grid ** 2
  batch = make_batch(config, [[1, 1, 1], [1, 0, 0]], seed=3)
  video, query = apply(model, params, batch)
  assert video.frames.shape == (b, t, WIDTH) and video.frames.dtype == jnp.float32
  assert video.regions.shape == (b, t, r, WIDTH)
  assert video.anomaly.shape == (b, t) and video.mask.shape == (b, t)
  assert video.external_prior.shape == (b, t)
  a = np.asarray(video.anomaly)
  assert np.all((a[batch["mask"]] > 0) & (a[batch["mask"]] < 1)) and np.all(a[~batch["mask"]] == 0)
  assert np.all(np.asarray(video.frames)[~batch["mask"]] == 0)
  assert np.all(np.asarray(video.regions)[~batch["mask"]] == 0)
  if task == "text":
    assert query.sentence.shape == (b, WIDTH) and query.words.shape == (b, 75, WIDTH)   # 77 less BOS, last
    np.testing.assert_array_equal(query.word_mask.sum(axis=1), [2, 3])   # words between BOS and EOS
  else:
    assert query.segments.shape == (b, t, WIDTH)
    np.testing.assert_array_equal(query.mask, batch["mask"])
    assert np.all(np.asarray(query.segments)[~batch["mask"]] == 0)


def test_logit_scales_init_and_clip():
  config, model, params = initialized("text", "frames")
  scales = model.apply({"params": params}, method=model.logit_scales)
  for level in config_lib.TEXT_LEVELS:
    np.testing.assert_allclose(scales[level], config.model.logit_scale_init, rtol=1e-6)
  params = {**params, "logit_scales": {**params["logit_scales"], "frame": jnp.asarray(10.0)}}
  scales = model.apply({"params": params}, method=model.logit_scales)
  np.testing.assert_allclose(scales["frame"], np.log(100.0), rtol=1e-6)
  np.testing.assert_allclose(scales["video"], config.model.logit_scale_init, rtol=1e-6)


def test_bfloat16_compute_float32_params_and_outputs():
  config, model, params = built("text", "frames")
  config16 = tiny_config("text", "frames")
  config16.model.dtype = "bfloat16"
  model16 = VarCMP(config16.model, task="text", regime="frames")
  assert set(jax.tree.leaves(jax.tree.map(lambda x: x.dtype.name, params))) == {"float32"}
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=8)
  video, query = apply(model, params, batch)
  video16, query16 = apply(model16, params, batch)
  for got, want in [(video16.frames, video.frames), (video16.regions, video.regions),
                    (query16.sentence, query.sentence), (video16.anomaly, video.anomaly)]:
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()) + 1e-3)


def reference_regions(patches, grid, region_grid):
  """torch adaptive average pooling of (N, K, D) patch tokens laid out row-major on grid."""
  x = torch.tensor(np.asarray(patches, np.float32)).reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2)
  pooled = torch.nn.functional.adaptive_avg_pool2d(x, region_grid)
  return pooled.permute(0, 2, 3, 1).reshape(patches.shape[0], region_grid * region_grid, -1).numpy()


def test_zero_init_adapter_is_identity_and_regions():
  config, model, params = initialized("text", "frames")
  assert np.all(np.asarray(params["temporal"]["out_proj"]["kernel"]) == 0)
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=4)
  video, _ = apply(model, params, batch)
  # The tower run directly through the clip API on independently normalized pixels.
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  pixels = (batch["frames"].reshape(6, IMAGE, IMAGE, 3) / np.float32(255.0) - mean) / std
  tower = clip_model.CLIP(clip_config(config.model))
  cls, patches = jit(functools.partial(tower.apply, method=tower.image_tokens))({"params": params["clip"]}, pixels)
  g = np.asarray(cls).reshape(2, 3, WIDTH)
  valid = batch["mask"]
  np.testing.assert_allclose(np.asarray(video.frames)[valid], g[valid], atol=1e-6, rtol=1e-6)
  r = reference_regions(patches, (IMAGE // PATCH,) * 2, config.model.region_grid).reshape(2, 3, 4, WIDTH)
  np.testing.assert_allclose(np.asarray(video.regions)[valid], r[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid,region_grid", [((4, 4), 2), ((4, 4), 4), ((4, 4), 1), ((14, 14), 3), ((6, 4), 3)])
def test_region_pooling(grid, region_grid):
  rng = np.random.RandomState(0)
  patches = rng.randn(3, grid[0] * grid[1], 5).astype(np.float32)
  got = np.asarray(pool_regions(jnp.asarray(patches), grid, region_grid))
  np.testing.assert_allclose(got, reference_regions(patches, grid, region_grid), atol=1e-6)
  if grid[0] % region_grid == 0 and grid[1] % region_grid == 0:   # plain blocks, by a NumPy loop
    bh, bw = grid[0] // region_grid, grid[1] // region_grid
    tokens = patches.reshape(3, *grid, 5)
    for i in range(region_grid):
      for j in range(region_grid):
        block = tokens[:, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].mean(axis=(1, 2))
        np.testing.assert_allclose(got[:, i * region_grid + j], block, atol=1e-6)
  bf16 = np.asarray(pool_regions(jnp.asarray(patches, jnp.bfloat16), grid, region_grid))
  assert bf16.dtype == np.float32
  np.testing.assert_allclose(bf16, got, atol=3e-2)
  with pytest.raises(ValueError, match="region_grid"):
    pool_regions(jnp.asarray(patches), grid, min(grid) + 1)


def pad(batch, extra, seed=9):
  """Appends `extra` padded snippets full of garbage, and replaces the text padding after EOS by garbage."""
  rng = np.random.RandomState(seed)
  out = {}
  for key, value in batch.items():
    if key in ("tokens", "label"):
      out[key] = value
      continue
    garbage = rng.randn(value.shape[0], extra, *value.shape[2:]) * 50
    if key == "mask":
      garbage = np.zeros((value.shape[0], extra), bool)
    elif key == "frames":
      garbage = rng.randint(0, 256, garbage.shape)
    out[key] = np.concatenate([value, garbage.astype(value.dtype)], axis=1)
  tokens = batch["tokens"].copy()
  after_eos = np.arange(77)[None] > np.argmax(tokens == EOS, axis=1)[:, None]
  tokens[after_eos] = rng.randint(1, 49000, after_eos.sum())
  out["tokens"] = tokens
  return out


@pytest.mark.parametrize("task,regime,audio_kind", [("text", "frames", "spectrogram"),
                                                    ("audio", "features", "spectrogram")])
def test_padding_invariance(task, regime, audio_kind):
  config, model, params = built(task, regime, audio_kind)
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=5)
  padded = pad(batch, extra=3)
  v1, q1 = apply(model, params, batch)
  v2, q2 = apply(model, params, padded)
  valid = batch["mask"]
  for name in ("frames", "regions", "anomaly", "external_prior"):
    np.testing.assert_allclose(np.asarray(getattr(v2, name))[:, :3][valid], np.asarray(getattr(v1, name))[valid],
                               atol=1e-5, rtol=1e-5, err_msg=name)
  if task == "audio":
    np.testing.assert_allclose(np.asarray(q2.segments)[:, :3][valid], np.asarray(q1.segments)[valid], atol=1e-5)
  else:
    np.testing.assert_allclose(q2.sentence, q1.sentence, atol=1e-5)
    np.testing.assert_array_equal(q2.word_mask, q1.word_mask)
    np.testing.assert_allclose(np.asarray(q2.words)[q1.word_mask], np.asarray(q1.words)[q1.word_mask], atol=1e-5)
  s1, s2 = similarities(v1, q1, config), similarities(v2, q2, config)
  for level in s1:
    np.testing.assert_allclose(s2[level], s1[level], atol=1e-5, err_msg=level)


def shared_params(source, target):
  """target's params with every entry both models have taken from source."""
  out = dict(target)
  for name in target:
    if name == "clip":
      out["clip"] = {k: source["clip"][k] for k in target["clip"]}
    else:
      out[name] = source[name]
  return out


@pytest.mark.parametrize("task", ["text", "audio"])
def test_features_regime_matches_frames_regime(task):
  config, frames_model, frames_params = built(task, "frames")
  _, features_model, features_params = built(task, "features")
  features_params = shared_params(frames_params, features_params)
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=6)
  g, r = apply(frames_model, frames_params, batch["frames"], method="image_features")
  features_batch = {**batch, "features": np.asarray(g), "regions": np.asarray(r)}
  del features_batch["frames"]
  v1, q1 = apply(frames_model, frames_params, batch)
  v2, q2 = apply(features_model, features_params, features_batch)
  np.testing.assert_allclose(v2.frames, v1.frames, atol=1e-5)
  s1, s2 = similarities(v1, q1, config), similarities(v2, q2, config)
  for level in s1:
    np.testing.assert_allclose(s2[level], s1[level], atol=1e-5, err_msg=level)


@pytest.mark.parametrize("task,regime,audio_kind", [("text", "frames", "spectrogram"),
                                                    ("audio", "features", "spectrogram"),
                                                    ("audio", "features", "features")])
def test_loss_gradients_finite(task, regime, audio_kind):
  if regime == "frames":   # model.init params: zero residual projections, as training starts
    config, model, params = initialized(task, regime, audio_kind)
  else:
    config, model, params = built(task, regime, audio_kind)
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=7)

  def loss_fn(p):
    video, query = model.apply({"params": p}, batch)
    scales = model.apply({"params": p}, method=model.logit_scales)
    return losses.varcmp_loss(video, query, batch["label"], scales, config)[0]

  grads = jit(jax.grad(loss_fn))(params)
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  assert flat.keys() == flax.traverse_util.flatten_dict(params, sep="/").keys()
  for path, grad in flat.items():
    assert np.all(np.isfinite(grad)), path
  # The losses reach every trained part (CLIP's own logit_scale is unused by VarCMP).
  reached = ["temporal/out_proj", "anomaly_head", "logit_scales"]
  reached += ["clip/vision", "clip/visual_projection"] if regime == "frames" else []
  reached += ["clip/text", "clip/text_projection"] if task == "text" else ["audio"]
  for prefix in reached:
    assert any(np.any(g != 0) for p, g in flat.items() if p.startswith(prefix)), prefix


def test_init_audio_from_image_hand_case():
  w = 2
  kernel = np.arange(2 * 2 * 3 * w, dtype=np.float32).reshape(2, 2, 3, w)
  pos = np.array([[9, 9], [0, 0], [1, 10], [2, 20], [3, 30]], np.float32)   # CLS + a 2x2 grid
  layer = {"w": np.full((w, w), 7.0, np.float32)}
  clip_params = {"vision": {"patch_embedding": {"kernel": kernel}, "class_embedding": np.array([5., 6.]),
                            "position_embedding": pos, "layers_0": layer},
                 "visual_projection": {"kernel": np.eye(w, dtype=np.float32) * 3}}
  audio_params = {"vit": {"patch_embedding": {"kernel": np.zeros((2, 2, 1, w), np.float32)},
                          "class_embedding": np.zeros(w, np.float32),
                          "position_embedding": np.zeros((3, w), np.float32),
                          "layers_0": {"w": np.zeros((w, w), np.float32)}},
                  "projection": {"kernel": np.zeros((w, w), np.float32)}, "temporal": {"x": np.ones(1)}}
  new = audio_lib.init_audio_from_image(audio_params, clip_params, audio_grid=(1, 2))
  # Channel mean of kernel[i, j, :, c] = arange values 6*(2i+j) + c + {0, 2, 4}: mean adds 2.
  expected_kernel = np.array([[[[6 * (2 * i + j) + c + 2 for c in range(w)]] for j in range(2)] for i in range(2)],
                             np.float32)
  np.testing.assert_allclose(new["vit"]["patch_embedding"]["kernel"], expected_kernel)
  # 2x2 grid -> 1x2: the two rows averaged; CLS row kept.
  np.testing.assert_allclose(new["vit"]["position_embedding"], [[9, 9], [1, 10], [2, 20]])
  np.testing.assert_allclose(new["vit"]["class_embedding"], [5, 6])
  np.testing.assert_allclose(new["vit"]["layers_0"]["w"], layer["w"])
  np.testing.assert_allclose(new["projection"]["kernel"], np.eye(w) * 3)
  assert new["temporal"] is audio_params["temporal"]
  bad = {**audio_params, "vit": {**audio_params["vit"], "patch_embedding": {"kernel": np.zeros((4, 4, 1, w))}}}
  with pytest.raises(ValueError, match="patch size"):
    audio_lib.init_audio_from_image(bad, clip_params, audio_grid=(1, 2))


def test_load_clip():
  config, model, params = built("audio", "frames")
  tower = clip_model.CLIP(clip_config(config.model))
  imported = {"params": random_params(jax.eval_shape(
      tower.init, jax.random.key(42), np.zeros((1, IMAGE, IMAGE, 3), np.float32),
      np.zeros((1, 77), np.int32))["params"], config, seed=42)}
  loaded = load_clip(params, imported, config.model)
  assert set(loaded["clip"]) == {"vision", "visual_projection", "logit_scale"}   # the text tower is dropped
  np.testing.assert_array_equal(loaded["clip"]["vision"]["layers_0"]["mlp"]["fc1"]["kernel"],
                                imported["params"]["vision"]["layers_0"]["mlp"]["fc1"]["kernel"])
  vit, image = loaded["audio"]["vit"], imported["params"]["vision"]
  np.testing.assert_allclose(vit["patch_embedding"]["kernel"][..., 0, :],
                             np.asarray(image["patch_embedding"]["kernel"]).mean(axis=2), rtol=1e-6)
  np.testing.assert_array_equal(vit["layers_0"]["self_attn"]["q_proj"]["kernel"],
                                image["layers_0"]["self_attn"]["q_proj"]["kernel"])
  # Patch positions: the 4x4 image grid resized to the 2x3 spectrogram grid (torch antialiased bilinear).
  grid = torch.tensor(np.asarray(image["position_embedding"][1:])).reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(grid, size=(2, 3), mode="bilinear", align_corners=False, antialias=True)
  np.testing.assert_allclose(vit["position_embedding"][1:], resized[0].permute(1, 2, 0).reshape(6, WIDTH).numpy(),
                             atol=1e-6)
  np.testing.assert_array_equal(vit["position_embedding"][0], image["position_embedding"][0])
  np.testing.assert_array_equal(loaded["audio"]["temporal"]["out_proj"]["kernel"],
                                params["audio"]["temporal"]["out_proj"]["kernel"])
  # Without model_cfg the audio tower is left alone.
  np.testing.assert_array_equal(load_clip(params, imported)["audio"]["vit"]["position_embedding"],
                                params["audio"]["vit"]["position_embedding"])
  with pytest.raises(ValueError, match="lack"):
    load_clip(params, {"vision": imported["params"]["vision"]})


def test_bad_inputs():
  config, model, params = built("text", "features")
  batch = make_batch(config, np.ones((2, 3), bool))
  with pytest.raises(ValueError, match="features"):
    model.apply({"params": params}, {k: v for k, v in batch.items() if k != "features"}, method="encode_video")
  with pytest.raises(ValueError, match="regions"):
    model.apply({"params": params}, {**batch, "regions": batch["regions"][:, :, :1]}, method="encode_video")
  long = make_batch(config, np.ones((1, 9), bool))
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, long, method="encode_video")
  with pytest.raises(ValueError, match="regime"):
    VarCMP(config.model, task="text", regime="pixels")


def _gelu_tanh(x):   # flax.linen.gelu's default (tanh approximation), written from its formula
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_anomaly_head_matches_numpy_reference_with_nan_padding():
  """a_t = sigmoid(fc2(gelu(fc1(f_t)))) on valid snippets, 0 on padding, whatever the padded features hold."""
  config, model, params = built("text", "features")
  batch = make_batch(config, [[1, 1, 1, 0], [1, 0, 1, 1]], seed=11)
  for key in ("features", "regions"):
    batch[key][~batch["mask"]] = np.nan
  video = apply(model, params, batch, "encode_video")
  f, anomaly = np.asarray(video.frames, np.float64), np.asarray(video.anomaly)
  assert np.all(np.isfinite(f)) and np.all(np.isfinite(anomaly))
  head = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params["anomaly_head"])
  hidden = _gelu_tanh(f @ head["fc1"]["kernel"] + head["fc1"]["bias"])
  expected = 1 / (1 + np.exp(-(hidden @ head["fc2"]["kernel"] + head["fc2"]["bias"])[..., 0]))
  mask = batch["mask"]
  np.testing.assert_allclose(anomaly[mask], expected[mask], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(anomaly[~mask], 0.0)
  assert np.std(anomaly[mask]) > 1e-3          # not a constant head


def test_visual_features_of_any_width_are_projected_and_regions_are_optional():
  """video_features.dim = 20: the learned projection LayerNorm -> Dense -> GELU -> Dense (NumPy reference)
  feeds the adapter; without `regions` in the batch the video has none and only the spatial level is refused."""
  config = tiny_config("text", "features")
  config.model.video_features.dim = 20
  model = VarCMP(config.model, task="text", regime="features")
  batch = make_batch(config, [[1, 1, 1], [1, 1, 0]], seed=12)
  batch["features"] = np.random.RandomState(12).randn(2, 3, 20).astype(np.float32) * 3 + 1
  del batch["regions"]
  params = jit(model.init)(jax.random.key(1), batch)["params"]    # the adapter starts as the identity
  assert set(params["video_projection"]) == {"norm", "fc1", "fc2"}
  video, query = apply(model, params, batch)
  assert video.regions is None and video.frames.shape == (2, 3, WIDTH)
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params["video_projection"])
  x = batch["features"].astype(np.float64)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  hidden = _gelu_tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  expected = hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  mask = batch["mask"]
  np.testing.assert_allclose(np.asarray(video.frames)[mask], expected[mask], rtol=1e-4, atol=1e-5)
  sims = similarities(video, query, config)                        # every level the videos allow
  assert set(sims) == {"video", "frame"}
  with pytest.raises(ValueError, match="set loss.levels.spatial=0"):
    similarity.level_similarities(video, np.ones((2, 3), np.float32), query, "text", levels=("spatial",))
  with pytest.raises(ValueError, match=r"batch\['features'\] \(B, T, 20\) \(config.model.video_features.dim\)"):
    model.apply({"params": params}, {**batch, "features": batch["features"][..., :8]}, method="encode_video")


def test_word_budget_keeps_short_captions_and_cuts_long_ones_like_the_tokenizer():
  # Reference: the same params with no budget (all 77 positions), on ids truncated by hand the way CLIP's
  # tokenizer truncates: <BOS>, the first N words, <EOS>. The text tower is causal, so a caption within the
  # budget must come out the same from N + 2 positions as from 77.
  config, model, params = built("text", "features")
  budget = 5
  rng = np.random.RandomState(7)
  lengths = [2, 5, 9]                       # within, exactly at, over the budget
  tokens = np.zeros((3, 77), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 0], tokens[i, 1:1 + n], tokens[i, 1 + n] = BOS, rng.randint(300, 40000, n), EOS
  truncated = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    kept = min(n, budget)
    truncated[i, 0], truncated[i, 1:1 + kept], truncated[i, 1 + kept] = BOS, tokens[i, 1:1 + kept], EOS
  batch = make_batch(config, np.ones((3, 3), bool))
  budgeted_config = config.copy_and_resolve_references()
  budgeted_config.model.max_words = budget
  budgeted = VarCMP(budgeted_config.model, task="text", regime="features")
  got = apply(budgeted, params, {**batch, "tokens": tokens}, "encode_query")
  want = apply(model, params, {**batch, "tokens": truncated}, "encode_query")
  assert got.words.shape == (3, budget, WIDTH)
  np.testing.assert_array_equal(got.word_mask.sum(axis=1), [2, 5, 5])
  np.testing.assert_allclose(got.sentence, want.sentence, atol=1e-5)
  np.testing.assert_allclose(got.words, np.asarray(want.words)[:, :budget], atol=1e-5)
  # Captions within the budget are untouched by it: the same as from the untruncated 77 positions.
  full = apply(model, params, {**batch, "tokens": tokens}, "encode_query")
  np.testing.assert_allclose(got.sentence[:2], full.sentence[:2], atol=1e-5)
  np.testing.assert_allclose(got.words[:2], np.asarray(full.words)[:2, :budget], atol=1e-5)


@pytest.mark.parametrize("budget", [1, 5])
def test_fit_word_budget_at_every_length_around_the_budget(budget):
  # Against ids cut by hand as CLIP's tokenizer cuts at its context length: <BOS>, the first `budget` words,
  # <EOS>; zero padding after. Every caption length from 0 words to budget + 3, exactly budget + 1 included (the
  # first one that is cut: its <EOS> sits just past the kept positions).
  from varcmp_jax.model.varcmp import fit_word_budget
  rng = np.random.RandomState(3)
  lengths = list(range(budget + 4))
  ids = np.zeros((len(lengths), 77), np.int32)
  expected = np.zeros((len(lengths), budget + 2), np.int32)
  for i, n in enumerate(lengths):
    words = rng.randint(300, 40000, n)
    ids[i, 0], ids[i, 1:1 + n], ids[i, 1 + n] = BOS, words, EOS
    kept = min(n, budget)
    expected[i, 0], expected[i, 1:1 + kept], expected[i, 1 + kept] = BOS, words[:kept], EOS
  np.testing.assert_array_equal(fit_word_budget(jnp.asarray(ids), budget, EOS), expected)
  assert fit_word_budget(jnp.asarray(ids), 0, EOS).shape == (len(lengths), 77)       # 0: no budget
