"""InfoNCE against torch's cross-entropy; the composed loss against a hand-weighted sum; gradients."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import jax
import jax.numpy as jnp

from varcmp_jax import config as config_lib
from varcmp_jax.alignment import losses, similarity
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings

B, T, R, L, D = 4, 6, 2, 5, 8


def test_info_nce_sym_equals_torch():
  logits = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32) * 5
  target = torch.arange(6)
  want = 0.5 * (F.cross_entropy(torch.from_numpy(logits), target)
                + F.cross_entropy(torch.from_numpy(logits).T, target))
  assert abs(float(losses.info_nce_sym(jnp.asarray(logits))) - float(want)) < 1e-5
  with pytest.raises(ValueError, match="square"):
    losses.info_nce_sym(jnp.zeros((2, 3)))


def make_batch(task, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, T), bool)
  mask[2, 3:] = False
  video = VideoEmbeddings(frames=jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
                          regions=jnp.asarray(rng.normal(size=(B, T, R, D)), jnp.float32),
                          mask=jnp.asarray(mask), anomaly=jnp.asarray(rng.uniform(0.05, 0.95, (B, T)), jnp.float32),
                          external_prior=jnp.asarray(rng.uniform(size=(B, T)), jnp.float32))
  if task == "text":
    word_mask = np.ones((B, L), bool)
    word_mask[1, 2:] = False
    query = TextEmbeddings(sentence=jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
                           words=jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32), word_mask=jnp.asarray(word_mask))
  else:
    query = AudioEmbeddings(segments=jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32), mask=jnp.asarray(mask))
  labels = jnp.asarray([1, 0, 1, 0])
  scales = {name: jnp.float32(math.log(1 / 0.07) + 0.5 * i) for i, name in enumerate(config_lib.TASK_LEVELS[task])}
  return video, query, labels, scales


def torch_info_nce(sim):
  logits = torch.from_numpy(np.asarray(sim, np.float64))
  target = torch.arange(logits.shape[0])
  return 0.5 * float(F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@pytest.mark.parametrize("task", ["text", "audio"])
def test_composed_loss_is_the_hand_weighted_sum(task):
  video, query, labels, scales = make_batch(task)
  config = config_lib.default_config(task)
  config.loss.levels = {name: w for name, w in zip(config_lib.TASK_LEVELS[task], (0.5, 1.0, 2.0))}
  config.loss.mil = 0.3
  config.prior.source = "mean"
  config.weighting.beta, config.weighting.tau = 0.7, 0.2
  config.loss.precision = "highest"   # exact, against the float64 reference (bf16: test_bf16_loss_tracks_highest)
  total, terms = jax.jit(lambda *args: losses.varcmp_loss(*args, config))(video, query, labels, scales)
  assert set(terms) == {f"loss_{name}" for name in config_lib.TASK_LEVELS[task]} | {"loss_mil"}

  # The reference: weights from the formula in NumPy, per-level CE by torch, MIL by hand.
  prior = 0.5 * (np.asarray(video.anomaly) + np.asarray(video.external_prior))
  mask = np.asarray(video.mask)
  w = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(mask[b])
    e = np.exp(prior[b, idx] / 0.2)
    w[b, idx] = 0.3 / len(idx) + 0.7 * e / e.sum()
  sims = jax.jit(similarity.level_similarities, static_argnums=3)(video, jnp.asarray(w, jnp.float32), query, task)
  want = 0.0
  for name, weight in config.loss.levels.items():
    level = torch_info_nce(np.asarray(sims[name]) * min(math.exp(float(scales[name])), 100.0))
    assert abs(float(terms[f"loss_{name}"]) - level) < 1e-4, name
    want += weight * level
  rho = []
  for b in range(B):
    valid = np.sort(np.asarray(video.anomaly)[b, mask[b]])[::-1]
    rho.append(valid[:max(1, len(valid) // 16)].mean())
  mil = np.mean([-math.log(r) if y else -math.log(1 - r) for r, y in zip(rho, np.asarray(labels))])
  assert abs(float(terms["loss_mil"]) - mil) < 1e-5
  want += 0.3 * mil
  assert abs(float(total) - want) < 1e-4


def test_logit_scale_is_clipped_at_the_max():
  video, query, labels, scales = make_batch("text")
  config = config_lib.default_config("text")
  big = {name: jnp.float32(10.0) for name in scales}
  at_max = {name: jnp.float32(math.log(100.0)) for name in scales}
  total = jax.jit(lambda s: losses.varcmp_loss(video, query, labels, s, config)[0])
  np.testing.assert_allclose(float(total(big)), float(total(at_max)), rtol=1e-6)


def test_logit_scale_above_the_max_keeps_its_gradient():
  # The clip is min(s, max) in value, but a scale that overshot must still feel the loss (a plain clip
  # has zero gradient above the max, so it would stay stuck). Reference: torch autograd of the loss at
  # s = ln 100, where the clip is inactive.
  video, query, labels, scales = make_batch("text")
  config = config_lib.default_config("text")
  config.loss.mil = 0.0
  config.loss.precision = "highest"
  grad = jax.jit(jax.grad(lambda s: losses.varcmp_loss(video, query, labels, s, config)[0]))
  above = grad({name: jnp.float32(10.0) for name in scales})
  sims = jax.jit(similarity.level_similarities, static_argnums=3)(
      video, losses.video_weights(video, config), query, "text")
  for name in scales:
    scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    logits = torch.from_numpy(np.asarray(sims[name], np.float64)) * torch.exp(scale)
    target = torch.arange(B)
    (0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))).backward()
    assert abs(float(scale.grad)) > 1e-3, name
    np.testing.assert_allclose(float(above[name]), float(scale.grad), rtol=1e-4, err_msg=name)


def test_zero_weight_removes_the_term():
  video, query, labels, scales = make_batch("text")
  config = config_lib.default_config("text")
  config.loss.levels.spatial = 0.0
  config.loss.mil = 0.0
  total, terms = jax.jit(lambda s: losses.varcmp_loss(video, query, labels, s, config))(scales)
  assert set(terms) == {"loss_video", "loss_frame"}
  np.testing.assert_allclose(float(total), float(terms["loss_video"] + terms["loss_frame"]), rtol=1e-6)
  # The spatial level is never computed: no logit scale for it is needed.
  del scales["spatial"]
  jax.eval_shape(lambda s: losses.varcmp_loss(video, query, labels, s, config), scales)


@pytest.mark.parametrize("task", ["text", "audio"])
def test_gradients_are_finite_for_every_term(task):
  video, query, labels, scales = make_batch(task)
  config = config_lib.default_config(task)
  config.weighting.stop_gradient = False      # let every path, the weights included, carry gradient
  config.loss.chunk_size = 3                  # the blockwise spatial path, with an overlapping last block
  config.prior.source = "mean"                # both the head and the external prior
  # Every float input (masks stay fixed); one reverse pass per term: {term: {input: gradient}}.
  video_fields, query_fields = ("frames", "regions", "anomaly", "external_prior"), query.__dataclass_fields__
  floats = {name: getattr(video, name) for name in video_fields}
  floats |= {name: getattr(query, name) for name in query_fields if "mask" not in name}
  floats["scales"] = scales

  def terms(floats):
    v = video.replace(**{name: floats[name] for name in video_fields})
    q = query.replace(**{name: floats[name] for name in query_fields if "mask" not in name})
    return losses.varcmp_loss(v, q, labels, floats["scales"], config)[1]

  grads = jax.jit(jax.jacrev(terms))(floats)
  assert set(grads) == {f"loss_{n}" for n in config_lib.TASK_LEVELS[task]} | {"loss_mil"}
  for name, grad in grads.items():
    leaves = jax.tree.leaves(grad)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), name
    assert any(float(jnp.abs(x).max()) > 0 for x in leaves), name


def test_stop_gradient_keeps_contrastive_terms_off_the_anomaly_head():
  video, query, labels, scales = make_batch("text")
  config = config_lib.default_config("text")
  config.loss.mil = 0.0
  config.loss.levels.spatial = 0.0            # the frame level alone carries the weights; keeps it quick
  def anomaly_grad(config):
    loss = lambda v: losses.varcmp_loss(v, query, labels, scales, config)[0]
    return jax.jit(jax.grad(loss, allow_int=True))(video).anomaly
  assert float(jnp.abs(anomaly_grad(config)).max()) == 0.0
  config.weighting.stop_gradient = False
  assert float(jnp.abs(anomaly_grad(config)).max()) > 0.0


@pytest.mark.parametrize("task", ["text", "audio"])
def test_bf16_loss_tracks_highest(task):
  # Issue 19's bar for training at bf16: the loss within 1e-2 relative of the exact one and the gradient
  # (w.r.t. every embedding) pointing the same way (cosine >= 0.99), on a batch whose pairs are related
  # (a loss far from its chance value log B), with realistic widths.
  b, t, r, l, d = 16, 12, 4, 10, 64
  rng = np.random.default_rng(3)
  shared = 0.4 * rng.normal(size=(b, 1, d))
  video = VideoEmbeddings(frames=jnp.asarray(shared + rng.normal(size=(b, t, d)), jnp.float32),
                          regions=jnp.asarray(shared[:, :, None] + rng.normal(size=(b, t, r, d)), jnp.float32),
                          mask=jnp.ones((b, t), bool), anomaly=jnp.asarray(rng.uniform(size=(b, t)), jnp.float32))
  if task == "text":
    query = TextEmbeddings(sentence=jnp.asarray(shared[:, 0] + rng.normal(size=(b, d)), jnp.float32),
                           words=jnp.asarray(shared + rng.normal(size=(b, l, d)), jnp.float32),
                           word_mask=jnp.asarray(np.arange(l)[None] < rng.integers(3, l, (b, 1))))
  else:
    query = AudioEmbeddings(segments=jnp.asarray(shared + rng.normal(size=(b, t, d)), jnp.float32),
                            mask=jnp.ones((b, t), bool))
  scales = {name: jnp.float32(math.log(1 / 0.07)) for name in config_lib.TASK_LEVELS[task]}
  results = {}
  for precision in ("bf16", "highest"):
    config = config_lib.default_config(task)
    config.loss.precision, config.loss.mil, config.loss.chunk_size = precision, 0.0, 8
    loss_fn = lambda v, q: losses.varcmp_loss(v, q, jnp.zeros(b), scales, config)[0]
    results[precision] = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), allow_int=True))(video, query)
  (loss16, grad16), (loss32, grad32) = results["bf16"], results["highest"]
  assert float(loss16) != float(loss32)                         # loss.precision reached the contractions
  assert 0.2 < float(loss32) / (math.log(b) * len(scales)) < 0.8   # the pairs are found, not too easily
  assert abs(float(loss16) - float(loss32)) <= 1e-2 * abs(float(loss32))
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)
                                   if jnp.issubdtype(x.dtype, jnp.floating)])
  g16, g32 = flat(grad16), flat(grad32)
  assert g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)) >= 0.99
