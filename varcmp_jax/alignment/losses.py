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

Large batches (loss.fine_candidates = M, loss.fine_snippets = k; SPEC section 2). The fine-grained levels
(config.COARSE_LEVELS says which are not) cost O(B^2) per step, so per sample they grow with the global batch. With
0 < M < B each video j is scored only against C_j = its own query j and the M - 1 queries of largest coarse
similarity with it (config.COARSE_SELECTION, over the whole global batch, chosen under stop_gradient); the pairs are
P = {(i, j): i in C_j}, exactly M per video. Video j's loss (a column) is the cross-entropy over C_j; query i's (a
row) is the cross-entropy over the videos whose C_j holds i, which always include video i: the rows are taken over
the pairs the columns chose (SPEC's second definition), so each device scores exactly its own videos x M pairs and
nothing but a (B,) vector per level crosses devices beyond today's query all-gather. With k > 0 the fine-grained
levels of video j use only its k snippets of largest w_t, weights renormalized over them (selection.top_snippets).
M >= B and k >= T are the exact loss, computed as such.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from varcmp_jax import config as config_lib
from varcmp_jax.alignment import selection, similarity, weighting
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


def sampled_info_nce(logits: jax.Array, candidates: jax.Array, num_queries: int,
                     axes: tuple[str, ...] | None = None) -> jax.Array:
  """InfoNCE_sym over the pairs {(candidates[j, m], j)}: logits (G, M), column j's own query in slot 0.

  Column j (a video): cross-entropy over its M queries, target slot 0. Row i (a query): cross-entropy over every
  pair that holds query i, on any device, target its pair with video i. With every query in every column this is
  info_nce_sym. With `axes` (inside a shard_map) logits and candidates are this device's videos, candidates index the
  gathered (global) queries, and every device returns the loss of the whole batch.
  """
  logits = logits.astype(jnp.float32)
  target = logits[:, 0]
  col_lse = jax.nn.logsumexp(logits, axis=1)
  # A row's log-sum-exp gathers its pairs from all columns (and devices); its max only stabilizes: no gradient.
  row_max = jnp.full((num_queries,), -jnp.inf, jnp.float32).at[candidates].max(jax.lax.stop_gradient(logits))
  row_max = row_max if axes is None else jax.lax.pmax(row_max, axes)
  row_sum = jnp.zeros((num_queries,), jnp.float32).at[candidates].add(jnp.exp(logits - row_max[candidates]))
  row_lse = row_max + jnp.log(_psum(row_sum, axes))
  return (jnp.sum(row_lse) + _psum(jnp.sum(col_lse - 2.0 * target), axes)) / (2.0 * num_queries)


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
  queries are all-gathered and only this device's columns are computed. loss.fine_candidates and
  loss.fine_snippets bound the fine-grained levels (module docstring).
  """
  if axes is not None:
    query = jax.tree_util.tree_map(lambda x: jax.lax.all_gather(x, axes, tiled=True), query)
  task = config.task
  fine = tuple(name for name in logit_scales if name not in config_lib.COARSE_LEVELS[task])
  coarse = tuple(name for name in logit_scales if name not in fine)
  # The coarse level that chooses the fine levels' candidates is computed even when it carries no loss weight.
  chooser = config_lib.COARSE_SELECTION[task]
  wanted = coarse + ((chooser,) if fine and _sampled(config, query) and chooser not in coarse else ())
  sims = similarity.level_similarities(video, weights, query, task, chunk_size=config.loss.get("chunk_size", 0),
                                       levels=wanted, precision=_precision(config))
  scale_max = config.model.logit_scale_max
  terms = {name: level_loss(sims[name], logit_scales[name], scale_max, axes) for name in coarse}
  terms.update(_fine_losses(video, weights, query, logit_scales, fine, sims.get(chooser), config, axes)
               if fine else {})
  return {f"loss_{name}": terms[name] for name in logit_scales}     # the levels' order: the same sum as ever


def _precision(config) -> str:
  return config.loss.get("precision", "highest")    # configs written before loss.precision trained at "highest"


def _num_queries(query) -> int:
  return jax.tree_util.tree_leaves(query)[0].shape[0]


def _sampled(config, query) -> bool:
  """Whether loss.fine_candidates picks fewer queries per video than the batch holds (else: the exact loss)."""
  return 0 < config_lib.fine_candidates(config) < _num_queries(query)


def _fine_losses(video, weights, query, logit_scales, fine, coarse_sims, config, axes):
  """{level: InfoNCE} of the fine-grained levels, on the pairs and snippets loss.fine_* choose (module docstring)."""
  task, chunk_size, precision = config.task, config.loss.get("chunk_size", 0), _precision(config)
  num_queries, k = _num_queries(query), config_lib.fine_snippets(config)
  sampled, cut = _sampled(config, query), 0 < k < video.mask.shape[1]
  scale_max = config.model.logit_scale_max
  index = None
  if cut:
    video, weights, index = selection.top_snippets(video, weights, k)
  if not (sampled or (cut and task == "audio")):
    sims = similarity.level_similarities(video, weights, query, task, chunk_size=chunk_size, levels=fine,
                                         precision=precision)
    return {name: level_loss(sims[name], logit_scales[name], scale_max, axes) for name in fine}
  # Pairs: the chosen candidates, or (audio cut to k snippets) every query, whose segments must then be taken at
  # each video's own snippets.
  if sampled:
    first = 0 if axes is None else jax.lax.axis_index(axes) * video.mask.shape[0]
    rows = selection.hardest_queries(coarse_sims, first, config_lib.fine_candidates(config))
  else:
    rows = jnp.broadcast_to(jnp.arange(num_queries), (video.mask.shape[0], num_queries))
  pairs = similarity.pair_similarities(video, weights, query, rows, task, fine, chunk_size, precision, index)
  if not sampled:
    return {name: level_loss(pairs[name].T, logit_scales[name], scale_max, axes) for name in fine}
  return {name: sampled_info_nce(pairs[name] * jnp.exp(clip_log_scale(logit_scales[name], scale_max)), rows,
                                 num_queries, axes) for name in fine}


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


def fine_work(config, batch_size: int) -> str | None:
  """One line for the train log: the fine-grained levels' work per step (videos x queries x snippets) as
  loss.fine_candidates and loss.fine_snippets set it, against the exact loss's; None without a fine-grained level."""
  fine = [name for name in config_lib.TASK_LEVELS[config.task] if name not in config_lib.COARSE_LEVELS[config.task]
          and float(config.loss.levels.get(name, 0.0)) != 0.0]
  if not fine:
    return None
  m, k, snippets = config_lib.fine_candidates(config), config_lib.fine_snippets(config), config.data.snippets
  queries = m if 0 < m < batch_size else batch_size
  kept = k if 0 < k < snippets else snippets
  line = f"fine-grained levels ({', '.join(fine)}): {batch_size} videos x {queries} queries x {kept} snippets per step"
  if (queries, kept) == (batch_size, snippets):
    return line + " (the exact loss)"
  share = queries * kept / (batch_size * snippets)
  return (line + f", {100 * share:.3g}% of the exact loss's {batch_size} x {batch_size} x {snippets} "
          f"(loss.fine_candidates={m}, loss.fine_snippets={k})")
