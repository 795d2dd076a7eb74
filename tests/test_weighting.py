"""Anomaly prior selection, anomaly-biased weights and the top-k MIL loss against hand computations."""
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import ml_collections

from varcmp_jax.alignment import weighting
from varcmp_jax.alignment.embeddings import VideoEmbeddings

MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
PRIOR = np.array([[0.1, 0.9, 0.3, 0.2, 5.0, 7.0],
                  [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                  [0.2, 0.9, 0.9, 0.9, 0.9, 0.9]], np.float32)


def test_weights_match_the_formula():
  beta, tau = 0.3, 0.5
  got = np.asarray(weighting.snippet_weights(jnp.asarray(PRIOR), jnp.asarray(MASK), beta, tau))
  for b in range(3):
    idx = np.flatnonzero(MASK[b])
    exp = np.exp(PRIOR[b, idx] / tau)
    want = np.zeros(6)
    want[idx] = (1 - beta) / len(idx) + beta * exp / exp.sum()
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-7)


def test_beta_zero_is_uniform_over_valid_snippets():
  got = np.asarray(weighting.snippet_weights(jnp.asarray(PRIOR), jnp.asarray(MASK), 0.0, 0.1))
  want = MASK / MASK.sum(1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_small_tau_concentrates_on_the_highest_valid_prior():
  got = np.asarray(weighting.snippet_weights(jnp.asarray(PRIOR), jnp.asarray(MASK), 1.0, 1e-3))
  # Row 0: the padded 5.0 and 7.0 are ignored, the highest valid prior is 0.9 at t = 1.
  np.testing.assert_allclose(got[0], [0, 1, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(got[1], [1, 0, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(got[2], [1, 0, 0, 0, 0, 0], atol=1e-6)
  # With beta = 0.5 half the mass stays uniform.
  half = np.asarray(weighting.snippet_weights(jnp.asarray(PRIOR), jnp.asarray(MASK), 0.5, 1e-3))
  np.testing.assert_allclose(half[0], [0.125, 0.625, 0.125, 0.125, 0, 0], atol=1e-6)


def test_all_padding_row_gets_zero_weights():
  got = weighting.snippet_weights(jnp.ones((1, 4)), jnp.zeros((1, 4), bool), 0.5, 0.1)
  np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 4)))


def test_topk_mil_hand_case():
  # T_valid = 40 -> k = 2; T_valid = 10 -> k = 1; T_valid = 33 -> k = 2. Padding holds the largest values.
  scores = np.zeros((3, 48), np.float32)
  mask = np.zeros((3, 48), bool)
  scores[0, :40] = np.linspace(0.0, 0.39, 40)           # top 2: 0.39, 0.38
  mask[0, :40] = True
  scores[1, :10] = 0.1
  scores[1, 7] = 0.8                                     # top 1: 0.8
  mask[1, :10] = True
  scores[2, :33] = 0.2
  scores[2, [3, 30]] = [0.9, 0.7]                        # top 2: 0.9, 0.7
  mask[2, :33] = True
  scores[~mask] = 0.99
  rho = np.asarray(weighting.topk_mean(jnp.asarray(scores), jnp.asarray(mask)))
  np.testing.assert_allclose(rho, [(0.39 + 0.38) / 2, 0.8, 0.8], rtol=1e-6)
  labels = np.array([1, 0, 1])
  want = np.mean([-math.log(0.385), -math.log(1 - 0.8), -math.log(0.8)])
  got = float(weighting.mil_loss(jnp.asarray(scores), jnp.asarray(mask), jnp.asarray(labels)))
  assert abs(got - want) < 1e-5


def test_mil_gradient_reaches_only_the_top_k():
  scores = jnp.asarray(np.linspace(0.05, 0.95, 32, dtype=np.float32)[None])   # k = 2: the last two
  mask = jnp.ones((1, 32), bool)
  grad = np.asarray(jax.grad(lambda s: weighting.mil_loss(s, mask, jnp.array([1])))(scores))
  assert np.all(grad[0, :30] == 0) and np.all(grad[0, 30:] < 0)


def test_mil_is_jittable_with_varying_lengths():
  mask = jnp.asarray(np.arange(64)[None, :] < np.array([[5], [20], [64]]))
  got = jax.jit(weighting.topk_mean)(jnp.tile(jnp.linspace(0, 1, 64), (3, 1)), mask)
  lin = np.linspace(0, 1, 64)
  np.testing.assert_allclose(np.asarray(got), [lin[4], lin[19], lin[60:].mean()], rtol=1e-6)


def video_with_priors(external=True):
  anomaly = jnp.asarray([[0.2, 0.4]])
  return VideoEmbeddings(frames=jnp.zeros((1, 2, 3)), regions=jnp.zeros((1, 2, 1, 3)), mask=jnp.ones((1, 2), bool),
                         anomaly=anomaly, external_prior=jnp.asarray([[0.6, 0.0]]) if external else None)


@pytest.mark.parametrize("source,want", [("head", [0.2, 0.4]), ("external", [0.6, 0.0]), ("mean", [0.4, 0.2])])
def test_prior_sources(source, want):
  cfg = ml_collections.ConfigDict(dict(source=source))
  np.testing.assert_allclose(np.asarray(weighting.prior(video_with_priors(), cfg))[0], want, rtol=1e-6)


def test_prior_errors_are_clear():
  with pytest.raises(ValueError, match="needs an external prior"):
    weighting.prior(video_with_priors(external=False), "mean")
  with pytest.raises(ValueError, match="config.prior.source"):
    weighting.prior(video_with_priors(), "vad")
