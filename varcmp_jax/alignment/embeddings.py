"""The embeddings VarCMP's towers hand to the alignment functions.

Pytrees (flax.struct dataclasses), so they pass through jit, sharding and tree maps unchanged.
"""
import flax
import jax


@flax.struct.dataclass
class VideoEmbeddings:
  frames: jax.Array      # (B, T, D) f_t, after the temporal adapter (not normalized)
  regions: jax.Array | None  # (B, T, R, D) r_{t,k} (not normalized); None: no region tokens (released
                             # features), so no spatial level
  mask: jax.Array        # (B, T) bool, valid snippets
  anomaly: jax.Array     # (B, T) a_t in [0,1] from the anomaly head
  external_prior: jax.Array | None = None  # (B, T) external per-snippet prior in [0,1], if the records have one


@flax.struct.dataclass
class TextEmbeddings:
  sentence: jax.Array    # (Q, D) s
  words: jax.Array       # (Q, L, D) w_l
  word_mask: jax.Array   # (Q, L) bool


@flax.struct.dataclass
class AudioEmbeddings:
  segments: jax.Array    # (Q, T, D) u_t (same snippet grid as the video)
  mask: jax.Array        # (Q, T) bool
