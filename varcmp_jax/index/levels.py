"""Which similarity levels an index scores from pooled vectors, and the vectors on both sides.

A level is linear in the video when it is a dot product of one per-video vector with one per-query vector
(SPEC section 2): text S_vid = cos(mean_t f_t, s) and S_frm = s/|s| . sum_t w_t f_t/|f_t|, audio
S_sem = cos(mean_t f_t, mean_t u_t). Their per-video vectors are stored in pooled.npy, so stage 1 scores every
video exactly from G x P x D numbers. The other levels (text spatial, audio temporal and spatial) need the
per-snippet tensors: stage 2.
"""
import jax
import jax.numpy as jnp
import numpy as np

from varcmp_jax.alignment import similarity, weighting
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.index import codec

# Rows of pooled.npy, in order.
POOLED_LEVELS = {"text": ("video", "frame"), "audio": ("semantic",)}
# What each level computed in stage 2 reads from the shards.
SNIPPET_LEVEL_FIELDS = {"spatial": ("regions", "weights", "mask"), "temporal": ("frames", "weights", "mask")}


def snippet_levels(task: str, has_regions: bool) -> tuple[str, ...]:
  """The levels of `task` scored in stage 2 (the spatial level only when the model has region tokens)."""
  levels = ("temporal",) if task == "audio" else ()
  return levels + (("spatial",) if has_regions else ())


def unscorable(lambdas: dict, task: str, pooled_levels, has_regions: bool) -> list[str]:
  """The levels with a weight that neither stage can score (the spatial level of a model without regions)."""
  known = tuple(pooled_levels) + snippet_levels(task, has_regions)
  return [name for name, weight in lambdas.items() if weight and name not in known]


def snippet_weights(video: VideoEmbeddings, config) -> tuple[jax.Array, jax.Array]:
  """(prior, w_t), each (B, T), as `varcmp eval` weights the snippets."""
  prior = weighting.prior(video, config.prior)
  return prior, weighting.snippet_weights(prior, video.mask, config.weighting.beta, config.weighting.tau)


def index_arrays(video: VideoEmbeddings, prior: jax.Array, weights: jax.Array, task: str, storage: str) -> dict:
  """What an index stores of a batch of videos: pooled (B, P, D) float32 and the shard files of layout.files but
  times: normalized f_t and regions (absent without region tokens) encoded as `storage` (codec.encode: the
  codes under the field's name, their other arrays under its name plus a suffix), w_t, prior, mask."""
  mask = video.mask
  frames = similarity.l2_normalize(video.frames, mask)
  pooled = [similarity.l2_normalize(similarity.masked_mean(video.frames, mask))]
  if task == "text":
    pooled.append(jnp.einsum("gt,gtd->gd", jnp.where(mask, weights, 0.0), frames, precision=jax.lax.Precision.HIGHEST))
  out = {"pooled": jnp.stack(pooled, axis=1), "weights": jnp.where(mask, weights, 0.0),
         "prior": jnp.where(mask, prior, 0.0), "mask": mask}
  vectors = {"frames": frames}
  if video.regions is not None:
    vectors["regions"] = similarity.l2_normalize(video.regions, mask[..., None])
  for name, value in vectors.items():
    out.update({name + suffix: array for suffix, array in codec.encode(value, storage).items()})
  return out


def query_vectors(query: TextEmbeddings | AudioEmbeddings) -> np.ndarray:
  """(P, D) float32: the query side of each pooled level, for one query (row 0)."""
  if isinstance(query, TextEmbeddings):
    sentence = np.asarray(similarity.l2_normalize(jnp.asarray(query.sentence[:1])))[0]
    return np.stack([sentence] * len(POOLED_LEVELS["text"]))
  return np.asarray(similarity.l2_normalize(similarity.masked_mean(jnp.asarray(query.segments[:1]),
                                                                   jnp.asarray(query.mask[:1]))))
