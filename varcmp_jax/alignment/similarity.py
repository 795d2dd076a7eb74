"""Hierarchical similarities of SPEC section 2, as (Q, G) matrices: rows = queries, columns = videos.

video-text:  video    S_vid = cos(mean_t f_t, s)
             frame    S_frm = sum_t w_t cos(f_t, s)
             spatial  S_spa = sum_t w_t 1/2 [mean_l max_k cos(r_tk, w_l) + mean_k max_l cos(r_tk, w_l)]
video-audio: semantic S_sem = cos(mean_t f_t, mean_t u_t)
             temporal S_tmp = sum_t w_t cos(f_t, u_t)
             spatial  S_spa = sum_t w_t max_k cos(r_tk, u_t)

Memory stays O(chunk_size) at any gallery size. Every level streams over blocks of chunk_size videos
(and queries) with lax.map: the video, frame and semantic levels pool each block to one vector per
video (S_frm is linear in the normalized f_t: s . sum_t w_t f_t/|f_t|); the temporal level contracts
(t, d) per block of chunk_size queries x chunk_size videos; the spatial levels (a max over regions or
words, not linear) build their cosines only for such a block: O(chunk_size^2 T R L), never
Q x G x T x R x L. Each block is rematerialized under autodiff so the backward pass keeps the bound.

Padding: padded snippets, words and audio segments are zeroed before use (garbage, even NaN, never
reaches a result) and masked out of every mean, max and sum. Norms, maxima and sums are float32 whatever the
input dtype.

Precision of the contractions (`precision`, config.loss.precision in training; SPEC section 4):
  "highest" (the default, and what evaluation, index and search use): float32 operands at Precision.HIGHEST.
            A plain float32 dot runs in bf16 passes on TPU and in TF32 on GPU, a ~1e-3 relative error in
            cosines that should be exact to rank a gallery.
  "tf32":   float32 operands at Precision.HIGH: TF32 tensor cores on GPU, three bf16 passes on TPU.
  "bf16":   bf16 operands, float32 accumulation and output, forward AND backward (bf16_einsum): the training
            default. JAX's own transpose of a bf16 dot with a float32 output would contract the float32
            cotangent, i.e. run the backward at float32 speed.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from varcmp_jax import config as config_lib
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings

_EPS = 1e-6
PRECISIONS = config_lib.LOSS_PRECISIONS
_LAX_PRECISION = {"tf32": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


def l2_normalize(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """float32 x / ||x|| over the last axis; entries where `mask` is False become exact zeros.

  The norm goes through max(sum x^2, eps^2), so a zero vector maps to 0 with a finite gradient, not NaN:
  below the floor the map is x / eps, whose Jacobian at 0 is I / eps = 1e6 I (large, not zero). Masked
  entries get an exact zero gradient (the mask selects before the norm).
  """
  x = x.astype(jnp.float32)
  if mask is not None:
    x = jnp.where(mask[..., None], x, 0.0)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS**2))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x (..., T, D) over valid T (mask (..., T)); zero where nothing is valid."""
  x = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
  count = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.float32), 1.0)
  return jnp.sum(x, axis=-2) / count[..., None]


def _transposed_specs(spec: str) -> tuple[str, str]:
  """The einsum specs of the two cotangents of `lhs,rhs->out`: out,rhs->lhs and out,lhs->rhs.

  Valid when every index of an operand also appears in the output or in the other operand (true of every
  contraction here: no operand is summed on its own).
  """
  inputs, out = spec.split("->")
  lhs, rhs = inputs.split(",")
  return f"{out},{rhs}->{lhs}", f"{out},{lhs}->{rhs}"


def _bf16_contract(spec, a, b):
  """bf16 x bf16 -> float32. XLA:CPU cannot run every such dot (jaxlib 0.10.2: "Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32" for some layouts), so on a CPU the bf16-rounded operands are contracted
  in float32: the same products (exact in float32) and the same float32 sums, slower."""
  a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  native = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  emulated = lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST)
  return jax.lax.platform_dependent(a, b, cpu=emulated, default=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bf16_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b) of float32 a, b with bf16 operands and float32 accumulation, in the forward and in both
  backward contractions (the float32 cotangent is rounded to bf16 first); float32 out, float32 cotangents."""
  return _bf16_contract(spec, a, b)


def _bf16_einsum_fwd(spec, a, b):
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  return _bf16_contract(spec, a16, b16), (a16, b16)     # bf16 residuals: half of float32's memory


def _bf16_einsum_bwd(spec, residuals, cotangent):
  a16, b16 = residuals
  da_spec, db_spec = _transposed_specs(spec)
  return _bf16_contract(da_spec, cotangent, b16), _bf16_contract(db_spec, cotangent, a16)


bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def contract(spec: str, a: jax.Array, b: jax.Array, precision: str = "highest") -> jax.Array:
  """The two-operand einsum of every similarity level, at `precision` (module docstring): float32 out."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if precision == "bf16":
    return bf16_einsum(spec, a, b)
  if precision not in _LAX_PRECISION:
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
  return jnp.einsum(spec, a, b, precision=_LAX_PRECISION[precision])


def _valid_weights(weights: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, weights.astype(jnp.float32), 0.0)


def _take(start, length):
  """Rows [start, start + length) of an array (start may be traced)."""
  return lambda x: jax.lax.dynamic_slice_in_dim(x, start, length, axis=0)


def _mean_pool(x: jax.Array, mask: jax.Array, chunk_size: int | None) -> jax.Array:
  """masked_mean over T, (N, T, D) -> (N, D) float32, block by block."""
  def block(start, length):
    take = _take(start, length)
    return masked_mean(take(x), take(mask))
  return _blockwise(block, x.shape[0], chunk_size, axis=0)


def _weighted_pool(video: VideoEmbeddings, weights: jax.Array, chunk_size: int | None, precision: str) -> jax.Array:
  """sum_t w_t f_t / ||f_t|| (G, D), block by block: S_frm is linear in it."""
  def block(start, length):
    take = _take(start, length)
    mask = take(video.mask)
    return contract("gt,gtd->gd", _valid_weights(take(weights), mask), l2_normalize(take(video.frames), mask),
                    precision)
  return _blockwise(block, video.frames.shape[0], chunk_size, axis=0)


def _cos_matrix(queries: jax.Array, gallery: jax.Array, precision: str) -> jax.Array:
  """(Q, D) x (G, D) -> (Q, G) cosine similarities."""
  return contract("qd,gd->qg", l2_normalize(queries), l2_normalize(gallery), precision)


# --- video-text ---------------------------------------------------------------------------------------


def text_video_level(video: VideoEmbeddings, query: TextEmbeddings, chunk_size: int | None = None,
                     precision: str = "highest") -> jax.Array:
  """S_vid = cos(mean_t f_t, s)."""
  return _cos_matrix(query.sentence, _mean_pool(video.frames, video.mask, chunk_size), precision)


def text_frame_level(video: VideoEmbeddings, weights: jax.Array, query: TextEmbeddings,
                     chunk_size: int | None = None, precision: str = "highest") -> jax.Array:
  """S_frm = sum_t w_t cos(f_t, s) = s/||s|| . sum_t w_t f_t/||f_t||."""
  return contract("qd,gd->qg", l2_normalize(query.sentence), _weighted_pool(video, weights, chunk_size, precision),
                  precision)


def _text_spatial_block(regions, snippet_mask, weights, words, word_mask, precision):
  """S_spa for one block: regions (g, T, R, D) normalized, words (q, L, D) normalized -> (q, g).

  The cosine tensor keeps the matmul's own (g, T, R, q, L) layout, so XLA never transposes it.
  """
  cos = contract("gtkd,qld->gtkql", regions, words, precision)            # the O(chunk) tensor
  num_words = jnp.sum(word_mask, axis=-1, dtype=jnp.float32)            # (q,)
  # Words -> regions: every real word finds its best region, averaged over real words.
  best_region = jnp.max(cos, axis=2)                                    # (g, T, q, L)
  word_term = jnp.sum(jnp.where(word_mask, best_region, 0.0), axis=-1) / jnp.maximum(num_words, 1.0)
  # Regions -> words: every region finds its best real word, averaged over the R regions.
  best_word = jnp.max(jnp.where(word_mask, cos, -jnp.inf), axis=-1)     # (g, T, R, q)
  region_term = jnp.mean(jnp.where(num_words > 0, best_word, 0.0), axis=2)
  per_snippet = 0.5 * (word_term + region_term)                         # (g, T, q)
  return contract("gt,gtq->qg", _valid_weights(weights, snippet_mask), per_snippet, precision)


def text_spatial_level(video: VideoEmbeddings, weights: jax.Array, query: TextEmbeddings,
                       chunk_size: int | None = None, precision: str = "highest") -> jax.Array:
  """S_spa (region-word), blockwise over queries and videos."""
  def block(q_start, q_len, g_start, g_len):
    take_q, take_g = _take(q_start, q_len), _take(g_start, g_len)
    snippet_mask, word_mask = take_g(video.mask), take_q(query.word_mask)
    regions = l2_normalize(take_g(video.regions), snippet_mask[..., None])
    words = l2_normalize(take_q(query.words), word_mask)
    return _text_spatial_block(regions, snippet_mask, take_g(weights), words, word_mask, precision)
  return _blockwise_matrix(block, query.words.shape[0], video.regions.shape[0], chunk_size)


# --- video-audio --------------------------------------------------------------------------------------


def _check_audio_grid(video: VideoEmbeddings, query: AudioEmbeddings):
  if query.segments.shape[1] != video.frames.shape[1]:
    raise ValueError(f"audio segments have {query.segments.shape[1]} snippets but videos have "
                     f"{video.frames.shape[1]}: the audio must be on the video's snippet grid")


def audio_semantic_level(video: VideoEmbeddings, query: AudioEmbeddings, chunk_size: int | None = None,
                         precision: str = "highest") -> jax.Array:
  """S_sem = cos(mean_t f_t, mean_t u_t)."""
  return _cos_matrix(_mean_pool(query.segments, query.mask, chunk_size),
                     _mean_pool(video.frames, video.mask, chunk_size), precision)


def audio_temporal_level(video: VideoEmbeddings, weights: jax.Array, query: AudioEmbeddings,
                         chunk_size: int | None = None, precision: str = "highest") -> jax.Array:
  """S_tmp = sum_t w_t cos(f_t, u_t): per block, one contraction over (t, d) of w-scaled frames and audio."""
  _check_audio_grid(video, query)
  def block(q_start, q_len, g_start, g_len):
    take_q, take_g = _take(q_start, q_len), _take(g_start, g_len)
    snippet_mask = take_g(video.mask)
    frames = l2_normalize(take_g(video.frames), snippet_mask)
    frames = frames * _valid_weights(take_g(weights), snippet_mask)[..., None]
    segments = l2_normalize(take_q(query.segments), take_q(query.mask))
    return contract("qtd,gtd->qg", segments, frames, precision)
  return _blockwise_matrix(block, query.segments.shape[0], video.frames.shape[0], chunk_size)


def _audio_spatial_block(regions, snippet_mask, weights, segments, precision):
  """S_spa for one block: regions (g, T, R, D), segments (q, T, D), both normalized -> (q, g)."""
  best_region = jnp.max(contract("gtkd,qtd->tgkq", regions, segments, precision), axis=2)   # (T, g, q)
  return contract("gt,tgq->qg", _valid_weights(weights, snippet_mask), best_region, precision)


def audio_spatial_level(video: VideoEmbeddings, weights: jax.Array, query: AudioEmbeddings,
                        chunk_size: int | None = None, precision: str = "highest") -> jax.Array:
  """S_spa (sounding region), blockwise over queries and videos."""
  _check_audio_grid(video, query)
  def block(q_start, q_len, g_start, g_len):
    take_q, take_g = _take(q_start, q_len), _take(g_start, g_len)
    snippet_mask = take_g(video.mask)
    regions = l2_normalize(take_g(video.regions), snippet_mask[..., None])
    segments = l2_normalize(take_q(query.segments), take_q(query.mask))
    return _audio_spatial_block(regions, snippet_mask, take_g(weights), segments, precision)
  return _blockwise_matrix(block, query.segments.shape[0], video.regions.shape[0], chunk_size)


# --- pairs (the loss's fine-grained levels on chosen candidates) -------------------------------------


def _gather_queries(query: TextEmbeddings | AudioEmbeddings, rows: jax.Array, snippet_index: jax.Array | None):
  """The query rows of `rows` (g, M) as (g, M, ...); audio segments taken at each video's snippets (g, k) too."""
  if snippet_index is None or isinstance(query, TextEmbeddings):
    return jax.tree_util.tree_map(lambda x: x[rows], query)
  at = (rows[:, :, None], snippet_index[:, None, :])      # (g, M, 1) x (g, 1, k): u_i at video j's snippets
  return AudioEmbeddings(segments=query.segments[at], mask=query.mask[at])


def _one_video_fine_level(level: str, task: str, precision: str):
  """S_level of one video against M queries: (video fields without the video axis, its M queries) -> (M,).

  It runs the matrix blocks above with a block of one video, so a pair is scored by the very same formula as
  in the (Q, G) matrix; vmapped over the videos of a block, their contractions become one batched dot.
  """
  def score(frames, regions, mask, weights, queries):
    one = lambda x: x[None]
    if task == "text":      # the spatial level: the only fine-grained text level
      words = l2_normalize(queries.words, queries.word_mask)
      regions = l2_normalize(regions, mask[:, None])
      return _text_spatial_block(one(regions), one(mask), one(weights), words, queries.word_mask, precision)[:, 0]
    segments = l2_normalize(queries.segments, queries.mask)
    if level == "temporal":
      frames = l2_normalize(frames, mask) * _valid_weights(weights, mask)[:, None]
      return contract("qtd,gtd->qg", segments, one(frames), precision)[:, 0]
    regions = l2_normalize(regions, mask[:, None])
    return _audio_spatial_block(one(regions), one(mask), one(weights), segments, precision)[:, 0]
  return score


def pair_similarities(video: VideoEmbeddings, weights: jax.Array, query: TextEmbeddings | AudioEmbeddings,
                      candidates: jax.Array, task: str, levels: tuple[str, ...], chunk_size: int | None = None,
                      precision: str = "highest", snippet_index: jax.Array | None = None) -> dict[str, jax.Array]:
  """{level: (G, M)}, entry (j, m) = S_level(query candidates[j, m], video j), for fine-grained levels.

  candidates: (G, M) query rows per video. snippet_index: (G, k) the snippets `video` was cut to (selection.
  top_snippets), by which an audio query's segments are taken so that u_t meets f_t of the same snippet; None when
  the video keeps its T snippets. Blocks of max(1, chunk_size^2 // M) videos, so a block holds as many pairs as a
  chunk_size x chunk_size block of the matrix levels, and as little memory.
  """
  num_videos, m = candidates.shape
  block_videos = max(1, chunk_size * chunk_size // m) if chunk_size else None
  def level_pairs(level):
    score = jax.vmap(_one_video_fine_level(level, task, precision))
    def block(start, length):
      take = _take(start, length)
      regions = None if video.regions is None else take(video.regions)
      queries = _gather_queries(query, take(candidates), None if snippet_index is None else take(snippet_index))
      return score(take(video.frames), regions, take(video.mask), take(weights), queries)
    return _blockwise(block, num_videos, block_videos, axis=0)
  return {level: level_pairs(level) for level in levels}


# --- blocks -------------------------------------------------------------------------------------------


def _blockwise(fn, size: int, chunk: int | None, axis: int) -> jax.Array:
  """Concatenates fn(start, length) blocks along `axis` to cover [0, size).

  Blocks have the static length `chunk`; when chunk does not divide size, the last block starts at
  size - chunk (it overlaps its neighbour, and the overlap is dropped), so no input is ever padded or
  copied. Each block is rematerialized in the backward pass (jax.checkpoint) to keep memory O(chunk).
  """
  if chunk is None or chunk <= 0 or chunk >= size:
    return fn(0, size)
  num = -(-size // chunk)
  starts = jnp.minimum(jnp.arange(num) * chunk, size - chunk)
  blocks = jax.lax.map(jax.checkpoint(lambda start: fn(start, chunk)), starts)   # (num, ...)
  blocks = jnp.moveaxis(blocks, 0, axis)
  shape = blocks.shape
  merged = blocks.reshape(shape[:axis] + (num * chunk,) + shape[axis + 2:])
  overlap = num * chunk - size
  if not overlap:
    return merged
  head = jax.lax.slice_in_dim(merged, 0, (num - 1) * chunk, axis=axis)
  tail = jax.lax.slice_in_dim(merged, (num - 1) * chunk + overlap, num * chunk, axis=axis)
  return jnp.concatenate([head, tail], axis=axis)


def _blockwise_matrix(block, num_queries: int, num_videos: int, chunk_size: int | None) -> jax.Array:
  """(Q, G) from block(q_start, q_len, g_start, g_len) -> (q_len, g_len), chunk_size on both axes."""
  def video_block(g_start, g_len):
    return _blockwise(lambda q_start, q_len: block(q_start, q_len, g_start, g_len),
                      num_queries, chunk_size, axis=0)
  return _blockwise(video_block, num_videos, chunk_size, axis=1)


# --- public API ---------------------------------------------------------------------------------------


def level_similarities(video: VideoEmbeddings, weights: jax.Array, query: TextEmbeddings | AudioEmbeddings,
                       task: str, chunk_size: int | None = None, levels: tuple[str, ...] | None = None,
                       mesh: jax.sharding.Mesh | None = None, precision: str = "highest") -> dict[str, jax.Array]:
  """{level: (Q, G)} for `levels` (default all of config.TASK_LEVELS[task]).

  weights: (G, T) anomaly-biased snippet weights w_t (weighting.snippet_weights). chunk_size: videos
  (and queries) per block (None or 0: one block, fine for a training batch). mesh: the videos are split
  over all its devices (G must divide; the queries are replicated): each device computes its own
  (Q, G_local) columns, chunk by chunk, and the result is (Q, G) sharded by columns. precision: of every
  contraction, one of PRECISIONS (module docstring); "highest" ranks exactly.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
  if task not in config_lib.TASK_LEVELS:
    raise ValueError(f"task {task!r} is not one of {tuple(config_lib.TASK_LEVELS)}")
  known = config_lib.TASK_LEVELS[task]
  # Default: every level the videos allow (released features have no region tokens, so no spatial level).
  levels = tuple(n for n in known if n != "spatial" or video.regions is not None) if levels is None else tuple(levels)
  if "spatial" in levels and video.regions is None:
    raise ValueError("the spatial level needs region tokens and these videos have none (released features): "
                     "set loss.levels.spatial=0")
  unknown = [name for name in levels if name not in known]
  if unknown:
    raise ValueError(f"levels {unknown} are not levels of task {task!r} {known}")
  expected = TextEmbeddings if task == "text" else AudioEmbeddings
  if not isinstance(query, expected):
    raise TypeError(f"task {task!r} needs {expected.__name__} queries, got {type(query).__name__}")
  if mesh is not None and mesh.size > 1:
    num_videos, axes = video.mask.shape[0], tuple(mesh.axis_names)
    if num_videos % mesh.size:
      raise ValueError(f"level_similarities: {num_videos} videos do not split over the {mesh.size} devices of "
                       "the mesh; pad the gallery with masked-out videos")
    local = functools.partial(level_similarities, task=task, chunk_size=chunk_size, levels=levels,
                              precision=precision)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P(None, axes))(
        video, weights, query)

  if task == "text":
    compute = {
        "video": lambda: text_video_level(video, query, chunk_size, precision),
        "frame": lambda: text_frame_level(video, weights, query, chunk_size, precision),
        "spatial": lambda: text_spatial_level(video, weights, query, chunk_size, precision),
    }
  else:
    compute = {
        "semantic": lambda: audio_semantic_level(video, query, chunk_size, precision),
        "temporal": lambda: audio_temporal_level(video, weights, query, chunk_size, precision),
        "spatial": lambda: audio_spatial_level(video, weights, query, chunk_size, precision),
    }
  return {name: compute[name]() for name in levels}


def combined_score(levels: dict[str, jax.Array], lambdas) -> jax.Array:
  """S = sum_g lambda_g S_g over the levels with a nonzero lambda (lambdas: a mapping level -> weight)."""
  lambdas = {name: float(weight) for name, weight in dict(lambdas).items() if float(weight) != 0.0}
  if not lambdas:
    raise ValueError("combined_score: every level weight is zero")
  missing = [name for name in lambdas if name not in levels]
  if missing:
    raise ValueError(f"combined_score: no similarity for weighted levels {missing}; have {sorted(levels)}")
  return sum(weight * levels[name] for name, weight in lambdas.items())


def snippet_relevance(video: VideoEmbeddings, weights: jax.Array,
                      query: TextEmbeddings | AudioEmbeddings) -> jax.Array:
  """Per-snippet contribution w_t cos(f_t, q) for aligned (query i, video i) pairs -> (P, T).

  q is the sentence s for text queries and the synchronized segment u_t for audio queries; zero on
  padded snippets. Its sum over t is the pair's frame (text) or temporal (audio) similarity. To rank
  the snippets of the top videos of one query, repeat the query along the pair axis.
  """
  frames = l2_normalize(video.frames, video.mask)                     # (P, T, D)
  if isinstance(query, TextEmbeddings):
    cos = contract("ptd,pd->pt", frames, l2_normalize(query.sentence))
  else:
    cos = jnp.sum(frames * l2_normalize(query.segments, query.mask), axis=-1)
  return _valid_weights(weights, video.mask) * cos
