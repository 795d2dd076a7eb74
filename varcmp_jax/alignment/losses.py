"""The composed VarCMP loss: sum_g lambda_g InfoNCE_sym(S_g * exp(logit_scale_g)) + lambda_mil L_mil.

Every term is a pure function of embeddings, masks, weights and config. A term whose weight is zero
is not computed at all (the config is static under jit), so an ablation is a config change.

The loss where the videos live (SPEC section 4): given the `mesh` the batch is sharded over, the
contrastive terms run under `jax.shard_map`. Each device keeps its own videos (the columns of every
(Q, G) matrix, and by far the largest embeddings: (G, T, R, D) region tokens), all-gathers the small
queries, and computes only its (Q, G_local) columns, in blocks of `loss.chunk_size`. InfoNCE_sym then
reduces across devices: a row's softmax spans every device's columns (its log-sum-exp from a pmax and a
psum), a column's softmax is local, and the target of query i, logit (i, i), lies on the device holding
video i. Per-device work and memory fall as 1/devices; the loss is the single-device one. Without a mesh
(or on one device) the very same functions run with no collectives.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings


def _psum(x, axes):
  return x if axes is None else jax.lax.psum(x, axes)


def info_nce_sym(logits: jax.Array, axes: tuple[str, ...] | None = None) -> jax.Array:
  """Mean of the row-wise and column-wise cross-entropy of (N, N) logits, the diagonal as target.

  With `axes` (inside a shard_map over them) `logits` is this device's (N, N_local) block of columns,
  device d holding columns [d N_local, (d + 1) N_local); every device returns the loss of the whole matrix.
  """
  if logits.ndim != 2 or (axes is None and logits.shape[0] != logits.shape[1]):
    raise ValueError(f"info_nce_sym needs square (N, N) logits, got shape {logits.shape}")
  logits = logits.astype(jnp.float32)
  n, n_local = logits.shape
  first = 0 if axes is None else jax.lax.axis_index(axes) * n_local
  target = jnp.diagonal(jax.lax.dynamic_slice_in_dim(logits, first, n_local, axis=0))   # logits[first + j, j]
  # A row's log-sum-exp over all devices' columns; its max only stabilizes, so it carries no gradient.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
  row_max = row_max if axes is None else jax.lax.pmax(row_max, axes)
  row_lse = row_max + jnp.log(_psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), axes))
  col_lse = jax.nn.logsumexp(logits, axis=0)
  return (jnp.sum(row_lse) + _psum(jnp.sum(col_lse - 2.0 * target), axes)) / (2.0 * n)


def clip_log_scale(logit_scale: jax.Array, logit_scale_max: float) -> jax.Array:
  """min(logit_scale, logit_scale_max) in value, with the gradient of the identity.

  A plain clip has zero gradient above the max, so a scale that overshot could never come back; the
  train step also clamps the parameter after each update (as OpenCLIP does), so it never drifts above.
  """
  return logit_scale - jax.lax.stop_gradient(jnp.maximum(logit_scale - logit_scale_max, 0.0))


def level_loss(sim: jax.Array, logit_scale: jax.Array, logit_scale_max: float,
               axes: tuple[str, ...] | None = None) -> jax.Array:
  """InfoNCE_sym(S_g * exp(logit_scale_g)), the log-scale clipped at logit_scale_max (clip_log_scale)."""
  return info_nce_sym(sim * jnp.exp(clip_log_scale(logit_scale, logit_scale_max)), axes)


def video_weights(video: VideoEmbeddings, config) -> jax.Array:
  """w_t from the configured prior (config.prior) and weighting (config.weighting)."""
  prior = weighting.prior(video, config.prior)
  if config.weighting.get("stop_gradient", True):
    prior = jax.lax.stop_gradient(prior)
  return weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)


def contrastive_losses(video: VideoEmbeddings, weights: jax.Array, query: TextEmbeddings | AudioEmbeddings,
                       logit_scales: dict[str, jax.Array], config,
                       axes: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
  """{"loss_<level>": InfoNCE_sym} for every level of `logit_scales`.

  With `axes` (inside a shard_map over them) video, weights and query are this device's rows: the
  queries are all-gathered and only this device's columns are computed.
  """
  if axes is not None:
    query = jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axes, tiled=True), query)
  # Configs written before loss.precision trained at "highest".
  sims = similarity.level_similarities(video, weights, query, config.task, chunk_size=config.loss.get("chunk_size", 0),
                                       levels=tuple(logit_scales), precision=config.loss.get("precision", "highest"))
  return {f"loss_{name}": level_loss(sims[name], scale, config.model.logit_scale_max, axes)
          for name, scale in logit_scales.items()}


def varcmp_loss(video: VideoEmbeddings, query: TextEmbeddings | AudioEmbeddings, labels: jax.Array,
                logit_scales: dict[str, jax.Array], config,
                mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, {"loss_<level>": ..., "loss_mil": ...}) for a batch of aligned (video i, query i) pairs.

  labels: (B,) video-level anomaly labels for MIL. logit_scales: {level: log-scale}. Only terms with a
  nonzero weight appear in the dict and in the total. mesh: the mesh whose axes (all of them) the batch
  is sharded over; the contrastive terms then run partitioned (module docstring). None: one device.
  """
  level_weights = {name: float(w) for name, w in config.loss.levels.items() if float(w) != 0.0}
  terms = {}
  if level_weights:
    missing = [name for name in level_weights if name not in logit_scales]
    if missing:
      raise ValueError(f"varcmp_loss: no logit scale for levels {missing}; have {sorted(logit_scales)}")
    scales = {name: logit_scales[name] for name in level_weights}
    snippet_weights = video_weights(video, config)
    if mesh is None or mesh.size == 1:
      terms.update(contrastive_losses(video, snippet_weights, query, scales, config))
    else:
      axes = tuple(mesh.axis_names)
      partitioned = jax.shard_map(functools.partial(contrastive_losses, config=config, axes=axes), mesh=mesh,
                                  in_specs=(P(axes), P(axes), P(axes), P()), out_specs=P())
      terms.update(partitioned(video, snippet_weights, query, scales))
  weights = {f"loss_{name}": w for name, w in level_weights.items()}
  if float(config.loss.mil) != 0.0:
    terms["loss_mil"] = weighting.mil_loss(video.anomaly, video.mask, labels)
    weights["loss_mil"] = float(config.loss.mil)
  if not terms:
    raise ValueError("varcmp_loss: every loss weight (config.loss.levels, config.loss.mil) is zero")
  total = sum(weights[name] * term for name, term in terms.items())
  return total, terms
