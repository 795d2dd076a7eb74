"""Exact two-stage search over an on-disk index (SPEC section 4b), for `varcmp search --index` and the web page.

  index = Index("runs/demo/index")       # open once: reads the manifest, memory-maps nothing yet
  hits = index.search(query, top_k=10, candidates=1000)     # query: TextEmbeddings | AudioEmbeddings (row 0)
  hits = index.search(query, top_k=10, candidates=None)     # exhaustive: every level of every video

Stage 1 scores every video exactly on the levels linear in the video (index.levels): one dot product per
pooled row, streamed from pooled.npy in memory-mapped windows of `chunk_bytes`, keeping the K best by their
combined linear score. Stage 2 reads the per-snippet tensors of those K candidates block by block (a few
threads read the next READ_AHEAD blocks while one is scored), computes the other levels and ranks the candidates
by the combined score S = sum_g lambda_g S_g. An int4 index (index.codec) does this in two passes: the K
candidates on the high plane of their codes (half the bytes read), then the REFINE best of them again on both
planes, so the scores returned are the exact int4 ones. Memory: one window, READ_AHEAD + 1 blocks and K scores;
never O(G). When every stage-2 level has lambda = 0, stage 1 is the exact ranking and stage 2 runs for the top_k only.
`candidates=None` computes every level of every video, window by window: the exhaustive reference.

Stage 2 on float16 vectors runs the functions `varcmp eval` uses (alignment.similarity) on them. On int8/int4
codes (index.codec) the text spatial level contracts the codes with an int8 copy of the query's words (int32
sums, one scale per vector; 3x faster than float32 on a CPU) and reduces the cosines as
similarity.text_spatial_level does; the audio levels decode the codes to float32 and run the same functions.
"""
import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np

from varcmp_jax import config as config_lib
from varcmp_jax import hits as hits_lib
from varcmp_jax.alignment import similarity
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.index import codec
from varcmp_jax.index import layout as layout_lib
from varcmp_jax.index import levels as levels_lib
from varcmp_jax.index import reader as reader_lib
from varcmp_jax.index.errors import StoreError

DEFAULT_CHUNK_BYTES = 32 << 20
MAX_BLOCK = 512
READERS, READ_AHEAD = 4, 8
REFINE = 100       # int4: the candidates scored again on their exact codes after the coarse pass
VECTOR_FIELDS = layout_lib.VECTOR_FIELDS


class TopK:
  """The k highest scores seen so far, with their rows and per-level scores; O(k) memory."""

  def __init__(self, k: int):
    self.k, self.rows, self.scores, self.levels = k, np.zeros(0, np.int64), np.zeros(0, np.float32), None

  def add(self, rows: np.ndarray, scores: np.ndarray, levels: dict[str, np.ndarray]):
    rows, scores = np.concatenate([self.rows, rows]), np.concatenate([self.scores, scores])
    levels = levels if self.levels is None else {k: np.concatenate([self.levels[k], v]) for k, v in levels.items()}
    if len(rows) > self.k:
      keep = np.argpartition(-scores, self.k - 1)[:self.k]
      rows, scores, levels = rows[keep], scores[keep], {k: v[keep] for k, v in levels.items()}
    self.rows, self.scores, self.levels = rows, scores, levels

  def ranked(self):
    """(rows, scores, levels), best first; ties by row, as the gallery search orders them."""
    order = np.lexsort((self.rows, -self.scores))
    return self.rows[order], self.scores[order], {k: v[order] for k, v in (self.levels or {}).items()}


class Index:
  """An index opened for search. `chunk_bytes` bounds the working memory of a window of pooled rows and of a
  block of stage-2 rows (as float32). Opening checks the index, and every row stage 2 reads is checked as it is
  read (index.reader; verify_reads=False only to measure what that costs): a damaged or unreadable index raises
  IndexDamaged or IndexUnreadable (errors.StoreError), never answers silently."""

  def __init__(self, path: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, verify_reads: bool = True):
    self.store = reader_lib.IndexReader(path, verify_rows=verify_reads)
    self.path, self.manifest = self.store.path, self.store.manifest
    manifest, layout = self.manifest, self.store.layout
    self.task = manifest["task"]
    self.lambdas = {name: float(weight) for name, weight in manifest["levels"].items()}
    self.pooled_levels = tuple(manifest["pooled_levels"])
    self.snippet_levels = levels_lib.snippet_levels(self.task, layout["regions"] > 0)
    known = self.pooled_levels + self.snippet_levels
    missing = levels_lib.unscorable(self.lambdas, self.task, self.pooled_levels, layout["regions"] > 0)
    if missing:
      raise StoreError(f"{self.path}: levels {missing} have a weight but the index cannot score them "
                       f"(no region tokens); it scores {known}")
    self.level_order = tuple(name for name in config_lib.TASK_LEVELS[self.task] if name in known)
    self.storage = self.store.storage
    self.files = self._files({f for name in self.snippet_levels for f in levels_lib.SNIPPET_LEVEL_FIELDS[name]})
    self.coarse_files = tuple(f for f in self.files if not f.endswith(codec.LOW))
    config = manifest.get("config") or {}
    chunk_size = int(config.get("eval", {}).get("chunk_size", 64))
    self.window_rows = max(1, chunk_bytes // (4 * layout["pooled"] * layout["dim"]))
    # A stage-2 block: chunk_bytes of its stored values as float32 (16 videos of int4 codes at T = 256, D = 512,
    # R = 4: blocks small enough to stay in the CPU's caches score fastest there).
    per_video = max(1, sum(4 * int(np.prod(self.store.row_shape(f))) for f in self.files))
    self.block_rows = int(2 ** np.floor(np.log2(np.clip(chunk_bytes // per_video, 1, MAX_BLOCK))))
    d = layout["dim"]
    self._score_block = _block_scorer(self.task, self.snippet_levels, chunk_size, self.storage, d)
    self._relevance = jax.jit(lambda frames, mask, weights, query: similarity.snippet_relevance(
        VideoEmbeddings(frames=codec.decode(frames, self.storage, d), regions=None, mask=mask, anomaly=None),
        weights, query))

  def __len__(self) -> int:
    return self.store.videos

  @property
  def stage2_needed(self) -> bool:
    return any(self.lambdas.get(name, 0.0) for name in self.snippet_levels)

  # --- ranking --------------------------------------------------------------------------------------

  def rank(self, query, top_k: int = 5, candidates: int | None = 1000):
    """(rows, combined scores, {level: scores}) of the top_k videos for row 0 of `query`, best first.

    candidates: K videos kept by stage 1 for stage 2 (at least top_k); None: exhaustive.
    """
    query = self._check_query(query)
    top_k = max(1, min(int(top_k), len(self)))
    if candidates is None:
      best = TopK(top_k)
      for rows, linear in self._stage1_windows(levels_lib.query_vectors(query)):
        best.add(rows, *self._combine(linear, self._stage2(rows, query)))
      return best.ranked()
    if not self.stage2_needed:
      candidates = top_k
    rows, linear = self.stage1(query, max(top_k, min(int(candidates), len(self))))
    refine = max(top_k, REFINE)
    if len(rows) > refine and self.coarse_files != self.files:
      coarse, _ = self._combine(linear, self._stage2(rows, query, self.coarse_files))
      keep = np.sort(np.argpartition(-coarse, refine - 1)[:refine])
      rows, linear = rows[keep], linear[keep]
    best = TopK(top_k)
    best.add(rows, *self._combine(linear, self._stage2(rows, query)))
    return best.ranked()

  def stage1(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: (rows, (k, P) linear level scores) of the k videos best by their combined linear score, for row 0
    of a query `rank` has checked; rows ascending, so that stage 2 reads the shards in order."""
    best = TopK(k)
    for rows, linear in self._stage1_windows(levels_lib.query_vectors(query)):
      best.add(rows, linear @ self._linear_weights(), {"linear": linear})
    order = np.argsort(best.rows)
    return best.rows[order], best.levels["linear"][order]

  def _linear_weights(self) -> np.ndarray:
    return np.array([self.lambdas.get(name, 0.0) for name in self.pooled_levels], np.float32)

  def _files(self, fields) -> tuple[str, ...]:
    """The shard files behind `fields`: a vector field's arrays (codec.arrays)."""
    arrays = codec.arrays(self.storage, self.store.layout["dim"])
    return tuple(sorted({f + suffix for f in fields for suffix in (arrays if f in VECTOR_FIELDS else ("",))}))

  def _stage1_windows(self, vectors: np.ndarray):
    """(rows, (n, P) linear level scores) per window of pooled.npy."""
    for start, window in self.store.pooled_chunks(self.window_rows):
      linear = np.einsum("npd,pd->np", window, vectors)
      if not np.isfinite(linear).all():    # a damaged row would sink out of every ranking unseen
        row = start + int(np.argmin(np.isfinite(linear).all(axis=1)))
        raise self.store.damaged(self.store.pooled_path, f"row {row} holds non-finite values (NaN or inf)")
      yield np.arange(start, start + len(window), dtype=np.int64), linear

  def _stage2(self, rows: np.ndarray, query, files: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """{level: (len(rows),)} of the stage-2 levels, block by block (blocks padded to one shape: one compile).
    READ_AHEAD blocks are read by a few threads while one is scored: a cold candidate costs a random read of
    its row, and a disk serves several at once faster than one after another. files: the shard files to score
    from (default: all of them; coarse_files: int4's high planes)."""
    files = files or self.files
    out = {name: np.zeros(len(rows), np.float32) for name in self.snippet_levels}
    if not self.snippet_levels or not len(rows):
      return out
    blocks = [rows[start:start + self.block_rows] for start in range(0, len(rows), self.block_rows)]
    with concurrent.futures.ThreadPoolExecutor(READERS) as readers:
      pending = [readers.submit(self.store.read, block, files) for block in blocks[:READ_AHEAD]]
      for i, block in enumerate(blocks):
        data = pending[i].result()
        pending[i] = None                  # memory: READ_AHEAD blocks
        if i + READ_AHEAD < len(blocks):
          pending.append(readers.submit(self.store.read, blocks[i + READ_AHEAD], files))
        count = len(block)
        if count < self.block_rows:
          data = {k: np.pad(v, [(0, self.block_rows - count)] + [(0, 0)] * (v.ndim - 1)) for k, v in data.items()}
        start = i * self.block_rows
        for name, value in jax.device_get(self._score_block(data, query)).items():
          out[name][start:start + count] = value[:count]
    for name, value in out.items():
      if not np.isfinite(value).all():
        row = int(rows[np.argmin(np.isfinite(value))])
        shard = self.store.manifest["shards"][int(self.store.locate([row])[0][0])]["name"]
        raise self.store.damaged(os.path.join(self.path, layout_lib.SHARDS, shard),
                                 f"index row {row} gives a non-finite {name} score")
    return out

  def _combine(self, linear: np.ndarray, snippet: dict[str, np.ndarray]):
    levels = {name: linear[:, i] for i, name in enumerate(self.pooled_levels)}
    levels.update(snippet)
    levels = {name: levels[name] for name in self.level_order}
    return np.asarray(similarity.combined_score(levels, self.lambdas), np.float32), levels

  def _check_query(self, query):
    layout = self.store.layout
    expected = TextEmbeddings if self.task == "text" else AudioEmbeddings
    if not isinstance(query, expected):
      raise ValueError(f"{self.path} is a {self.task!r} index: it needs {expected.__name__} queries, "
                       f"got {type(query).__name__}")
    take = lambda x: np.asarray(x)[:1]
    query = jax.tree_util.tree_map(take, query)
    if isinstance(query, TextEmbeddings):
      if query.sentence.shape[-1] != layout["dim"]:
        raise ValueError(f"the query is {query.sentence.shape[-1]} wide, {self.path} holds {layout['dim']}")
      # Padded words count for nothing, so the query keeps its real words in a few fixed widths (few compiles).
      real = np.flatnonzero(query.word_mask[0])
      width = min(query.words.shape[1], max(8, 1 << int(np.ceil(np.log2(real[-1] + 1 if real.size else 1)))))
      return TextEmbeddings(query.sentence, query.words[:, :width], query.word_mask[:, :width])
    if query.segments.shape[1:] != (layout["snippets"], layout["dim"]):
      raise ValueError(f"the audio query is {query.segments.shape[1:]} (snippets, width); {self.path} holds "
                       f"videos of {layout['snippets']} snippets, {layout['dim']} wide")
    return query

  # --- hits -----------------------------------------------------------------------------------------

  def search(self, query, top_k: int = 5, candidates: int | None = 1000, threshold: float = 0.5) -> list[dict]:
    """The top_k hits of row 0 of `query`, as `varcmp search --json` prints them (varcmp_jax.hits)."""
    rows, combined, levels = self.rank(query, top_k, candidates)
    data = self.store.read(rows, self._files(("frames", "weights", "prior", "times", "mask")))
    one = jax.tree_util.tree_map(lambda x: np.repeat(np.asarray(x)[:1], len(rows), axis=0), query)
    relevance = np.asarray(self._relevance(codec.field(data, "frames"), data["mask"], data["weights"], one))
    metadata = self.store.metadata(rows)
    return [hits_lib.hit(rank, row, combined[i], {name: v[i] for name, v in levels.items()}, relevance[i],
                         data["prior"][i], data["mask"][i], data["times"][i], metadata[i], threshold)
            for i, (rank, row) in enumerate(zip(range(1, len(rows) + 1), rows))]


def _block_scorer(task: str, snippet_levels: tuple[str, ...], chunk_size: int, storage: str, dim: int):
  """jit: (shard files of a block of videos, query) -> {level: (block,)} for the stage-2 levels."""
  on_codes = ("spatial",) if task == "text" and storage != "float16" else ()

  @jax.jit
  def score(data, query):
    out = {}
    if on_codes:
      word_mask = query.word_mask[0]
      out["spatial"] = _text_spatial_on_codes(codec.field(data, "regions"), data["mask"], data["weights"],
                                              similarity.l2_normalize(query.words[0], word_mask), word_mask, storage)
    decoded = {f: codec.decode(codec.field(data, f), storage, dim) if f in data else None for f in VECTOR_FIELDS}
    video = VideoEmbeddings(frames=decoded["frames"], regions=decoded["regions"], mask=data["mask"], anomaly=None)
    rest = tuple(name for name in snippet_levels if name not in on_codes)
    if rest:
      levels = similarity.level_similarities(video, data["weights"], query, task, chunk_size, rest)
      out.update({name: value[0] for name, value in levels.items()})
    return out
  return score


def _text_spatial_on_codes(regions, snippet_mask, weights, words, word_mask, storage) -> jax.Array:
  """(g,) S_spa = sum_t w_t 1/2 [mean_l max_k cos(r_tk, w_l) + mean_k max_l cos(r_tk, w_l)] of one query's
  normalized words (L, D), with the cosines from the int8/int4 region codes (codec.int8_cosines): the reduction
  of similarity.text_spatial_level."""
  cos = codec.int8_cosines(regions, words, storage, "gtkd,ld->gtkl")              # (g, T, R, L)
  num_words = jnp.sum(word_mask, dtype=jnp.float32)
  word_term = jnp.sum(jnp.where(word_mask, jnp.max(cos, axis=2), 0.0), axis=-1) / jnp.maximum(num_words, 1.0)
  best_word = jnp.max(jnp.where(word_mask, cos, -jnp.inf), axis=-1)                      # (g, T, R)
  region_term = jnp.mean(jnp.where(num_words > 0, best_word, 0.0), axis=-1)
  return jnp.sum(jnp.where(snippet_mask, weights, 0.0) * 0.5 * (word_term + region_term), axis=-1)
