"""`varcmp export` + VarCMPTorch: fp32 parity with the Flax model for both tasks and both regimes.

The PyTorch side is rebuilt from the exported files only (HF CLIPModel + safetensors heads + config.json);
the Flax side is the model and alignment functions the trainer uses. Params are random and perturbed
(so the zero-initialized adapter residuals are not zero), inputs are padded with garbage.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from varcmp_jax import config as config_lib
from varcmp_jax import export
from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.model.varcmp import VarCMP
from varcmp_jax.torch_export import VarCMPTorch

IMAGE, PATCH, WIDTH, SNIPPETS = 16, 8, 32, 5
MEL_FRAMES, MEL_BINS, AUDIO_FEATURES = 16, 8, 12
BOS, EOS = 49406, 49407
TOL = 1e-4


def tiny_config(task, regime, audio_kind="spectrogram"):
  config = config_lib.default_config(task, regime)
  config.model.clip = config_lib.clip_tiny(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=1)
  config.model.dtype = "float32"
  config.model.temporal = dict(num_layers=2, num_heads=2, mlp_ratio=2, max_len=8)
  config.model.anomaly_head.hidden = 16
  config.model.audio.update(kind=audio_kind, mel_frames=MEL_FRAMES, mel_bins=MEL_BINS, patch_size=PATCH,
                            feature_dim=AUDIO_FEATURES)
  config.data.snippets = SNIPPETS
  config.eval.chunk_size = 2               # several gallery blocks on both sides
  config.model.max_words = 4               # the captions have 1, 3, 5, 7 words: two are cut to the budget
  levels = config_lib.TASK_LEVELS[task]
  config.loss.levels = {levels[0]: 1.0, levels[1]: 0.5, levels[2]: 2.0}
  return config


def make_batch(mask, regions, seed=0):
  rng = np.random.RandomState(seed)
  mask = np.asarray(mask, bool)
  b, t = mask.shape
  tokens = np.zeros((b, 77), np.int32)
  for i in range(b):
    n = 1 + 2 * i
    tokens[i, 0], tokens[i, 1:1 + n], tokens[i, 1 + n] = BOS, rng.randint(300, 40000, n), EOS
  return dict(
      frames=rng.randint(0, 256, (b, t, IMAGE, IMAGE, 3)).astype(np.uint8),
      features=rng.randn(b, t, WIDTH).astype(np.float32),
      regions=rng.randn(b, t, regions, WIDTH).astype(np.float32),
      mel=rng.randn(b, t, MEL_FRAMES, MEL_BINS).astype(np.float32),
      audio_features=rng.randn(b, t, AUDIO_FEATURES).astype(np.float32),
      tokens=tokens, mask=mask, prior=rng.rand(b, t).astype(np.float32))


def random_params(model, batch, seed=0):
  """Random params of the model's shapes, drawn in NumPy (no init compile): LayerNorm scales near 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  rng = np.random.RandomState(seed)
  def draw(path, leaf):
    noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def flax_outputs(model, params, batch, config):
  return jax.jit(lambda p, b: _flax_outputs(model, p, b, config))(params, batch)


def _flax_outputs(model, params, batch, config):
  video = model.apply({"params": params}, batch, method=model.encode_video)
  query = model.apply({"params": params}, batch, method=model.encode_query)
  prior = weighting.prior(video, config.prior)
  weights = weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)
  levels = similarity.level_similarities(video, weights, query, config.task, config.eval.chunk_size)
  levels["combined"] = similarity.combined_score(levels, config.loss.levels)
  relevance = similarity.snippet_relevance(video, weights, query)
  scales = model.apply({"params": params}, method=model.logit_scales)
  return video, query, prior, weights, levels, relevance, scales


def close(torch_value, flax_value, what):
  a, b = torch_value.detach().numpy(), np.asarray(flax_value)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  diff = np.max(np.abs(a - b)) if a.size else 0.0
  assert diff <= TOL, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("task, regime, audio_kind, prior_source", [
    ("text", "frames", "spectrogram", "head"),
    ("text", "features", "spectrogram", "mean"),
    ("audio", "frames", "spectrogram", "head"),
    ("audio", "features", "features", "external"),
])
def test_export_parity(tmp_path, task, regime, audio_kind, prior_source):
  config = tiny_config(task, regime, audio_kind)
  config.prior.source = prior_source
  model = VarCMP(config.model, task=task, regime=regime)
  batch = make_batch([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
                     config.model.region_grid ** 2)
  params = random_params(model, batch)
  out = export.export(config, params, str(tmp_path / "out"), step=7)

  # The towers are a complete HF CLIPModel directory, whatever this model uses.
  _, info = transformers.CLIPModel.from_pretrained(str(tmp_path / "out" / "clip"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["step"] == 7 and exported["config"]["task"] == task
  heads = safetensors.numpy.load_file(str(tmp_path / "out" / "varcmp_heads.safetensors"))
  num_heads = sum(x.size for name, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if jax.tree_util.keystr(name[:1]) != "['clip']")
  assert sum(x.size for x in heads.values()) == num_heads and not any(k.startswith("clip") for k in heads)

  torch_model = VarCMPTorch.from_pretrained(out)
  video, query, prior, weights, levels, relevance, scales = flax_outputs(model, params, batch, config)
  with torch.no_grad():
    t_video = torch_model.encode_video({k: torch.from_numpy(v) for k, v in batch.items()})
    t_query = torch_model.encode_query({k: torch.from_numpy(v) for k, v in batch.items()})
    t_levels = torch_model.similarities(t_video, t_query)
    t_relevance = torch_model.snippet_relevance(t_video, t_query)
  for field in ("frames", "regions", "anomaly", "mask"):
    close(t_video[field].float(), getattr(video, field), f"video.{field}")
  if task == "text":
    for field in ("sentence", "words", "word_mask"):
      close(t_query[field].float(), getattr(query, field), f"query.{field}")
  else:
    close(t_query["segments"], query.segments, "query.segments")
  close(torch_model.prior(t_video), prior, "prior")
  close(torch_model.weights(t_video), weights, "weights")
  assert set(t_levels) == set(levels)
  for name in levels:
    close(t_levels[name], levels[name], f"similarity {name}")
  close(t_relevance, relevance, "snippet relevance")
  for name, value in torch_model.logit_scale_values().items():
    close(value, scales[name], f"logit scale {name}")
  # Guard against a vacuous comparison: the adapter residual and the prior are not trivial.
  assert np.abs(np.asarray(video.frames) - batch["features"] * batch["mask"][..., None]).max() > 1e-2 or regime == "frames"
  assert np.std(np.asarray(weights)[0]) > 1e-3


def test_export_main_from_checkpoint(tmp_path):
  """`varcmp export --workdir` restores the Orbax checkpoint and exports exactly its params."""
  from varcmp_jax.train import checkpoint as checkpoint_lib
  from varcmp_jax.train import step as step_lib
  config = tiny_config("text", "features")
  config.train.batch_size = config.eval.batch_size = 4
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  trainer = step_lib.build(config)
  params = random_params(trainer.model, make_batch(np.ones((2, SNIPPETS)), 4), seed=3)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": trainer.tx.init(params)}
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), 1, 2)
  checkpointer.save(5, state, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()

  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
  heads = safetensors.numpy.load_file(str(tmp_path / "out" / "varcmp_heads.safetensors"))
  kernel = np.asarray(state["params"]["anomaly_head"]["fc1"]["kernel"])
  np.testing.assert_array_equal(heads["anomaly_head.fc1.weight"], kernel.T)
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["step"] == 5 and exported["clip_towers"]["text"] == "trained"
  assert exported["clip_towers"]["image"].startswith("random init")
  with pytest.raises(SystemExit, match="no checkpoint at step 9"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out2"), "--step", "9"])


@pytest.mark.parametrize("task, audio_kind", [("text", "spectrogram"), ("audio", "features")])
def test_export_parity_released_features(tmp_path, task, audio_kind):
  """Visual features of another width (projected into the joint space) and no region tokens: no spatial level."""
  config = tiny_config(task, "features", audio_kind)
  config.model.video_features.dim = 24
  config.loss.levels.spatial = 0.0
  model = VarCMP(config.model, task=task, regime="features")
  batch = make_batch([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], 4, seed=5)
  batch["features"] = np.random.RandomState(5).randn(3, SNIPPETS, 24).astype(np.float32)
  del batch["regions"]
  params = random_params(model, batch, seed=5)
  assert "video_projection" in params
  torch_model = VarCMPTorch.from_pretrained(export.export(config, params, str(tmp_path / "out"), step=1))
  video, query, prior, weights, levels, relevance, _ = flax_outputs(model, params, batch, config)
  with torch.no_grad():
    t_video = torch_model.encode_video({k: torch.from_numpy(v) for k, v in batch.items()})
    t_levels = torch_model.similarities(t_video, torch_model.encode_query({k: torch.from_numpy(v) for k, v in batch.items()}))
  assert video.regions is None and t_video["regions"] is None
  close(t_video["frames"], video.frames, "video.frames")
  close(torch_model.weights(t_video), weights, "weights")
  assert set(t_levels) == set(levels) == set(config_lib.TASK_LEVELS[task][:2]) | {"combined"}
  for name in levels:
    close(t_levels[name], levels[name], f"similarity {name}")
  assert np.abs(np.asarray(video.frames)).max() > 1e-2
