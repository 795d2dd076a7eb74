"""Which pairs and which snippets the loss's fine-grained levels see at large batch (SPEC section 2).

  rows = hardest_queries(coarse, first, m)            # (G, m): each video's own query, then its m - 1 hardest
  video_k, weights_k, index = top_snippets(video, weights, k)   # each video's k snippets of largest w_t

Both choices are made under stop_gradient: the loss differentiates through the chosen similarities and weights,
never through the choosing. Ties go to the lower index (query row, snippet), as jax.lax.top_k orders them.
"""
import jax
import jax.numpy as jnp

from varcmp_jax.alignment.embeddings import VideoEmbeddings


def hardest_queries(coarse: jax.Array, first: jax.Array | int, m: int) -> jax.Array:
  """(G, m) query rows for the G videos whose coarse similarities are the columns of `coarse` (Q, G).

  Video j's own query is row first + j (`first`: the global row of this block's first video, for the columns one
  device holds); it comes first, then the m - 1 other queries of largest coarse similarity with video j.
  """
  scores = jax.lax.stop_gradient(coarse).T.astype(jnp.float32)                      # (G, Q)
  videos = jnp.arange(scores.shape[0])
  scores = scores.at[videos, first + videos].set(jnp.inf)
  return jax.lax.top_k(scores, m)[1]


def top_snippets(video: VideoEmbeddings, weights: jax.Array,
                 k: int) -> tuple[VideoEmbeddings, jax.Array, jax.Array]:
  """(video cut to its k snippets of largest w_t, their weights renormalized to sum 1, their (G, k) indices).

  Padded snippets come last (a video with fewer than k valid snippets keeps them all; the rest of its k are padding,
  masked). Renormalized, the fine-grained levels stay weighted means of cosines, as at evaluation, where every
  snippet counts: with k >= T_valid, or when the other snippets weigh zero, nothing changes.
  """
  mask = video.mask.astype(bool)
  key = jnp.where(mask, jax.lax.stop_gradient(weights).astype(jnp.float32), -1.0)   # weights are >= 0
  index = jax.lax.top_k(key, k)[1]                                                    # (G, k)

  def take(x):
    if x is None:
      return None
    at = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, at, axis=1)

  kept = VideoEmbeddings(frames=take(video.frames), regions=take(video.regions), mask=take(mask),
                         anomaly=take(video.anomaly), external_prior=take(video.external_prior))
  kept_weights = jnp.where(kept.mask, take(weights).astype(jnp.float32), 0.0)
  total = jnp.sum(kept_weights, axis=1, keepdims=True)
  return kept, kept_weights / jnp.where(total > 0, total, 1.0), index
