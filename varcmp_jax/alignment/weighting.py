"""Anomaly prior, anomaly-biased snippet weights and the top-k MIL loss (SPEC section 2).

All functions take padded (B, T) arrays plus the (B, T) validity mask: padded snippets never get a
weight and never enter the MIL top-k. Shapes are static (k varies per video through a rank mask), so
everything runs under jit.
"""
import jax
import jax.numpy as jnp

from varcmp_jax.alignment.embeddings import VideoEmbeddings
from varcmp_jax.config import PRIOR_SOURCES

_EPS = 1e-6


def prior(video: VideoEmbeddings, cfg) -> jax.Array:
  """The per-snippet anomaly prior (B, T) chosen by `cfg.source` (a `config.prior`, or the source name)."""
  source = cfg if isinstance(cfg, str) else cfg.source
  if source not in PRIOR_SOURCES:
    raise ValueError(f"config.prior.source: {source!r} is not one of {PRIOR_SOURCES}")
  if source == "head":
    return video.anomaly
  if video.external_prior is None:
    raise ValueError(f"config.prior.source={source!r} needs an external prior, but the video embeddings "
                     "have none (the records carry no 'prior' field)")
  external = video.external_prior.astype(video.anomaly.dtype)
  return external if source == "external" else 0.5 * (video.anomaly + external)


def valid_counts(mask: jax.Array) -> jax.Array:
  """T_valid per video (B,), as float32."""
  return jnp.sum(mask, axis=-1, dtype=jnp.float32)


def snippet_weights(prior_scores: jax.Array, mask: jax.Array, beta: float, tau: float) -> jax.Array:
  """w_t = (1 - beta) / T_valid + beta * softmax_t(a_t / tau) over valid t; zero on padding.

  Each valid video's weights sum to 1; a video with no valid snippet gets all-zero weights.
  """
  mask = mask.astype(bool)
  scores = prior_scores.astype(jnp.float32) / tau
  # The most negative finite float (not -inf) keeps an all-padding row finite; it is zeroed below anyway.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  attention = jax.nn.softmax(scores, axis=-1)
  uniform = 1.0 / jnp.maximum(valid_counts(mask), 1.0)[:, None]
  return jnp.where(mask, (1.0 - beta) * uniform + beta * attention, 0.0)


def topk_mean(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """rho = mean of the top-k scores over valid t, k = max(1, floor(T_valid / 16)); (B,).

  Sorting plus a rank mask keeps shapes static while k differs from video to video.
  """
  mask = mask.astype(bool)
  scores = scores.astype(jnp.float32)
  num_valid = jnp.sum(mask, axis=-1)
  k = jnp.maximum(1, num_valid // 16)
  # Descending sort with padding last: padding gets -inf, valid scores keep their value (and gradient).
  ranked = -jnp.sort(-jnp.where(mask, scores, -jnp.inf), axis=-1)
  rank = jnp.arange(scores.shape[-1])
  in_top = (rank[None, :] < k[:, None]) & (rank[None, :] < num_valid[:, None])
  total = jnp.sum(jnp.where(in_top, ranked, 0.0), axis=-1)
  return total / k.astype(jnp.float32)


def binary_cross_entropy(prob: jax.Array, labels: jax.Array) -> jax.Array:
  """Elementwise BCE of probabilities (not logits), clipped away from 0 and 1 for finite logs."""
  prob = jnp.clip(prob, _EPS, 1.0 - _EPS)
  labels = labels.astype(prob.dtype)
  return -(labels * jnp.log(prob) + (1.0 - labels) * jnp.log1p(-prob))


def mil_loss(anomaly: jax.Array, mask: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-k MIL: mean over videos of BCE(rho, y), y = 0 normal / 1 anomalous."""
  return jnp.mean(binary_cross_entropy(topk_mean(anomaly, mask), labels))
