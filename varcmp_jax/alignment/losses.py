"""The composed VarCMP loss: sum_g lambda_g InfoNCE_sym(S_g * exp(logit_scale_g)) + lambda_mil L_mil.

Every term is a pure function of embeddings, masks, weights and config. A term whose weight is zero
is not computed at all (the config is static under jit), so an ablation is a config change.
"""
import jax
import jax.numpy as jnp
import optax

from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings


def info_nce_sym(logits: jax.Array) -> jax.Array:
  """Mean of the row-wise and column-wise cross-entropy of (N, N) logits, the diagonal as target."""
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"info_nce_sym needs square (N, N) logits, got shape {logits.shape}")
  logits = logits.astype(jnp.float32)
  targets = jnp.arange(logits.shape[0])
  rows = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  cols = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return 0.5 * (jnp.mean(rows) + jnp.mean(cols))


def level_loss(sim: jax.Array, logit_scale: jax.Array, logit_scale_max: float) -> jax.Array:
  """InfoNCE_sym(S_g * exp(logit_scale_g)), the log-scale clipped at logit_scale_max."""
  return info_nce_sym(sim * jnp.exp(jnp.minimum(logit_scale, logit_scale_max)))


def video_weights(video: VideoEmbeddings, config) -> jax.Array:
  """w_t from the configured prior (config.prior) and weighting (config.weighting)."""
  prior = weighting.prior(video, config.prior)
  if config.weighting.get("stop_gradient", True):
    prior = jax.lax.stop_gradient(prior)
  return weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)


def varcmp_loss(video: VideoEmbeddings, query: TextEmbeddings | AudioEmbeddings, labels: jax.Array,
                logit_scales: dict[str, jax.Array], config) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, {"loss_<level>": ..., "loss_mil": ...}) for a batch of aligned (video i, query i) pairs.

  labels: (B,) video-level anomaly labels for MIL. logit_scales: {level: log-scale}. Only terms with a
  nonzero weight appear in the dict and in the total.
  """
  level_weights = {name: float(w) for name, w in config.loss.levels.items() if float(w) != 0.0}
  terms = {}
  if level_weights:
    sims = similarity.level_similarities(
        video, video_weights(video, config), query, config.task,
        chunk_size=config.loss.get("chunk_size", 0), levels=tuple(level_weights))
    for name in level_weights:
      if name not in logit_scales:
        raise ValueError(f"varcmp_loss: no logit scale for level {name!r}; have {sorted(logit_scales)}")
      terms[f"loss_{name}"] = level_loss(sims[name], logit_scales[name], config.model.logit_scale_max)
  weights = {f"loss_{name}": w for name, w in level_weights.items()}
  if float(config.loss.mil) != 0.0:
    terms["loss_mil"] = weighting.mil_loss(video.anomaly, video.mask, labels)
    weights["loss_mil"] = float(config.loss.mil)
  if not terms:
    raise ValueError("varcmp_loss: every loss weight (config.loss.levels, config.loss.mil) is zero")
  total = sum(weights[name] * term for name, term in terms.items())
  return total, terms
