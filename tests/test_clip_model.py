"""Parity of the Flax CLIP towers with randomly initialized HF PyTorch `CLIPModel`s."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from varcmp_jax import clip
from varcmp_jax.clip import hf
from varcmp_jax.clip import model as clip_model

# Two shapes that differ in every size; the second also uses exact gelu and the legacy eos_token_id=2
# (HF then pools at argmax(ids)).
SHAPES = {
    "tiny_p8_r32": dict(
        projection_dim=48,
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "p16_r48_gelu_legacy_eos": dict(
        projection_dim=40,
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                           image_size=48, patch_size=16, hidden_act="gelu"),
        text_config=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                         hidden_act="gelu", eos_token_id=2)),
}


def random_ids(rng, lengths, vocab_size=49408, context=77):
  """BOS, random word ids, EOS, zero padding; length 77 means no padding at all. BOS/EOS are the last two ids."""
  ids = np.zeros((len(lengths), context), np.int32)
  for row, n in zip(ids, lengths):
    row[0], row[n - 1] = vocab_size - 2, vocab_size - 1
    row[1:n - 1] = rng.integers(1, vocab_size - 2, n - 2)
  return ids


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request):
  torch.manual_seed(0)
  hf_config = transformers.CLIPConfig(**SHAPES[request.param])
  torch_model = transformers.CLIPModel(hf_config).eval()
  config = clip.CLIPConfig.from_hf(hf_config)
  params = hf.params_from_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()}, config)
  rng = np.random.default_rng(0)
  size = hf_config.vision_config.image_size
  pixels = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  ids = random_ids(rng, [2, 9, 77])
  with torch.no_grad():
    image_out = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    text_out = torch_model.get_text_features(input_ids=torch.from_numpy(ids).long())
    vision_tokens = image_out.last_hidden_state[:, 1:]
    reference = dict(
        image=image_out.pooler_output.numpy(),
        text=text_out.pooler_output.numpy(),
        patches=torch_model.visual_projection(torch_model.vision_model.post_layernorm(vision_tokens)).numpy(),
        words=torch_model.text_projection(text_out.last_hidden_state).numpy())
  return config, params, pixels, ids, reference


def _run(config, params, pixels, ids):
  model = clip.CLIP(config)
  fn = jax.jit(lambda p, x, t: (model.apply({"params": p}, x, method=model.encode_image),
                                model.apply({"params": p}, t, method=model.encode_text),
                                model.apply({"params": p}, x, method=model.image_tokens),
                                model.apply({"params": p}, t, method=model.text_tokens)))
  image, text, (cls, patches), (sentence, words, word_mask) = fn(params, pixels, ids)
  return dict(image=image, text=text, cls=cls, patches=patches, sentence=sentence, words=words,
              word_mask=word_mask)


@pytest.fixture(scope="module")
def fp32_out(case):
  return _run(*case[:4])


def test_fp32_parity_with_hf(case, fp32_out):
  out, ref = fp32_out, case[4]
  for name, ref_name in (("image", "image"), ("cls", "image"), ("text", "text"), ("sentence", "text"),
                         ("patches", "patches"), ("words", "words")):
    assert out[name].shape == ref[ref_name].shape, name
    np.testing.assert_allclose(np.asarray(out[name]), ref[ref_name], atol=1e-5, rtol=0, err_msg=name)


def test_word_mask_marks_real_words_only(fp32_out):
  mask = np.asarray(fp32_out["word_mask"])
  # Hand-built: rows have 2 (BOS, EOS), 9 (7 words) and 77 (75 words) tokens.
  expected = np.zeros((3, 77), bool)
  expected[1, 1:8] = True
  expected[2, 1:76] = True
  np.testing.assert_array_equal(mask, expected)


def test_bf16_compute_close_to_fp32(case, fp32_out):
  config, params, pixels, ids, _ = case
  fp32 = fp32_out
  bf16 = _run(dataclasses.replace(config, dtype="bfloat16"), params, pixels, ids)
  for name in ("image", "text", "patches", "words"):
    a, b = np.asarray(fp32[name]), np.asarray(bf16[name], np.float32)
    assert bf16[name].dtype == jnp.bfloat16, name
    # A few bf16 roundings (8 mantissa bits) per layer: a few percent of the output scale at most.
    assert np.abs(a - b).max() <= 0.03 * np.abs(a).max(), name
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999, name


def test_bf16_params_and_attention_impl(case):
  config, params, pixels, ids, ref = case
  # Same numbers with the XLA attention kernel named explicitly.
  out = _run(dataclasses.replace(config, attention_impl="xla"), params, pixels, ids)
  np.testing.assert_allclose(np.asarray(out["image"]), ref["image"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out["text"]), ref["text"], atol=1e-5, rtol=0)
  # param_dtype is separate from the compute dtype: bf16 params are created by init as bf16.
  model = clip.CLIP(dataclasses.replace(config, param_dtype="bfloat16"))
  shapes = jax.eval_shape(model.init, jax.random.key(0), pixels[:1], ids[:1])["params"]
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_remat_gradients_match():
  config = clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=16, patch_size=8)
  pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  params = jax.jit(clip_model.VisionTransformer(config).init)(jax.random.key(0), pixels)["params"]

  def grad(remat):
    vit = clip_model.VisionTransformer(config, remat=remat)
    loss = lambda p: sum(jnp.sum(jnp.sin(y)) for y in vit.apply({"params": p}, pixels))
    return jax.jit(jax.grad(loss))(params)

  g, g_remat = grad(False), grad(True)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_config_from_dict_and_hf_round_trip():
  from varcmp_jax import config as varcmp_config  # pylint: disable=g-import-not-at-top
  cfg = varcmp_config.default_config()
  config = clip.CLIPConfig.from_dict(cfg.model.clip, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                     attention_impl=cfg.model.attention_impl, remat=cfg.model.remat)
  assert (config.vision.patch_size, config.vision.hidden_size, config.text.hidden_size) == (16, 768, 512)
  assert (config.dtype, config.attention_impl) == ("bfloat16", "auto")
  assert clip.CLIPConfig.from_hf(config.to_hf(), dtype="bfloat16") == config
  assert clip.CLIPConfig.from_dict(config.to_dict(), dtype="bfloat16", attention_impl=None) == config
  tiny = clip.CLIPConfig.from_dict(varcmp_config.clip_tiny(image_size=48, patch_size=16, width=96))
  assert (tiny.vision.grid, tiny.vision.hidden_size, tiny.text.num_attention_heads) == ((3, 3), 96, 3)
  with pytest.raises(ValueError, match="hidden_sizes"):
    clip.CLIPConfig.from_dict(dict(vision=dict(hidden_sizes=3)))


def test_vision_transformer_one_channel_matches_hf():
  """The audio tower's use: 1 input channel (square here, so HF can be the reference)."""
  torch.manual_seed(0)
  hf_config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8, num_channels=1)
  torch_model = transformers.CLIPVisionModel(hf_config).eval()
  config = clip.CLIPConfig.from_hf(transformers.CLIPConfig(vision_config=hf_config.to_dict())).vision
  state = {"vision_model." + k: v.numpy() for k, v in torch_model.state_dict().items()}
  # Reuse the CLIP table restricted to the vision tower.
  rows = [r for r in hf.param_table(clip.CLIPConfig(vision=config)) if r[0].startswith("vision/")]
  flat = {tuple(path.split("/")[1:]): hf._to_flax(state[key], kind) for path, key, kind in rows}
  import flax  # pylint: disable=g-import-not-at-top
  params = flax.traverse_util.unflatten_dict(flat)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  cls, patches = clip_model.VisionTransformer(config).apply({"params": params}, x)
  with torch.no_grad():
    out = torch_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    ref_patches = torch_model.post_layernorm(out.last_hidden_state[:, 1:]).numpy()
  np.testing.assert_allclose(np.asarray(cls), out.pooler_output.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(patches), ref_patches, atol=1e-5, rtol=0)


def test_vision_transformer_rectangular_input():
  config = clip.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=(96, 64), patch_size=16, num_channels=1)
  vit = clip_model.VisionTransformer(config)
  x = np.random.default_rng(0).normal(size=(2, 96, 64, 1)).astype(np.float32)
  params = jax.jit(vit.init)(jax.random.key(0), x)["params"]
  assert params["position_embedding"].shape == (6 * 4 + 1, 32)
  cls, patches = jax.jit(vit.apply)({"params": params}, x)
  assert cls.shape == (2, 32) and patches.shape == (2, 24, 32)
  assert np.isfinite(np.asarray(patches)).all()
  # Patch tokens are in row-major grid order: with no blocks each token sees only its own patch, so
  # changing the patch at grid row 5, column 0 changes token 5 * 4 + 0 alone.
  shallow = clip_model.VisionTransformer(dataclasses.replace(config, num_hidden_layers=0))
  shallow_params = jax.jit(shallow.init)(jax.random.key(0), x)["params"]
  y = x.copy()
  y[:, 80:96, 0:16] += 1.0
  tokens = jax.jit(lambda v: shallow.apply({"params": shallow_params}, v)[1])
  changed = np.abs(np.asarray(tokens(y) - tokens(x))).max(axis=(0, 2)) > 0
  assert np.flatnonzero(changed).tolist() == [20]
  with pytest.raises(ValueError, match="does not match"):
    vit.apply({"params": params}, x[:, :64])


def test_normalize_pixels():
  frames = np.array([[[[0, 128, 255]]]], np.uint8)
  expected = (np.array([0, 128, 255]) / 255 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
      [0.26862954, 0.26130258, 0.27577711])
  out = clip.normalize_pixels(frames)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
