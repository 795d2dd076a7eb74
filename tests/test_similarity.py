"""Similarity levels against NumPy loops written from SPEC section 2, padding invariance, chunking."""
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from varcmp_jax.alignment import similarity
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings

G, Q, T, R, L, D = 5, 4, 6, 3, 5, 8

# Jitted once per (task, chunk, levels): eager op-by-op dispatch is what makes small tests slow.
levels_jit = jax.jit(similarity.level_similarities, static_argnames=("task", "chunk_size", "levels"))


def cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def make_inputs(seed=0, num_videos=G, num_queries=Q):
  rng = np.random.default_rng(seed)
  mask = np.ones((num_videos, T), bool)
  mask[1, 4:] = False                     # a short video
  mask[-1, 1:] = False                    # a one-snippet video
  video = dict(frames=rng.normal(size=(num_videos, T, D)), regions=rng.normal(size=(num_videos, T, R, D)),
               mask=mask, anomaly=rng.uniform(size=(num_videos, T)))
  weights = rng.uniform(size=(num_videos, T)) * mask
  word_mask = np.ones((num_queries, L), bool)
  word_mask[0, 2:] = False
  word_mask[2, 4:] = False
  text = dict(sentence=rng.normal(size=(num_queries, D)), words=rng.normal(size=(num_queries, L, D)),
              word_mask=word_mask)
  audio_mask = np.ones((num_queries, T), bool)
  audio_mask[1, 3:] = False
  audio = dict(segments=rng.normal(size=(num_queries, T, D)), mask=audio_mask)
  return video, weights, text, audio


def to_jax(video, weights, text, audio):
  v = VideoEmbeddings(**{k: jnp.asarray(x, jnp.float32 if x.dtype != bool else bool) for k, x in video.items()})
  t = TextEmbeddings(**{k: jnp.asarray(x, jnp.float32 if x.dtype != bool else bool) for k, x in text.items()})
  a = AudioEmbeddings(**{k: jnp.asarray(x, jnp.float32 if x.dtype != bool else bool) for k, x in audio.items()})
  return v, jnp.asarray(weights, jnp.float32), t, a


# --- NumPy references: one (query, video) pair at a time, straight from the formulas --------------------


def valid(mask):
  return [i for i in range(len(mask)) if mask[i]]


def ref_text(video, weights, text):
  out = {name: np.zeros((len(text["sentence"]), len(video["frames"]))) for name in ("video", "frame", "spatial")}
  for q in range(len(text["sentence"])):
    s = text["sentence"][q]
    words = [text["words"][q, l] for l in valid(text["word_mask"][q])]
    for g in range(len(video["frames"])):
      ts = valid(video["mask"][g])
      out["video"][q, g] = cos(np.mean([video["frames"][g, t] for t in ts], axis=0), s)
      out["frame"][q, g] = sum(weights[g, t] * cos(video["frames"][g, t], s) for t in ts)
      total = 0.0
      for t in ts:
        regions = video["regions"][g, t]
        word_side = np.mean([max(cos(r, w) for r in regions) for w in words])
        region_side = np.mean([max(cos(r, w) for w in words) for r in regions])
        total += weights[g, t] * 0.5 * (word_side + region_side)
      out["spatial"][q, g] = total
  return out


def ref_audio(video, weights, audio):
  out = {name: np.zeros((len(audio["segments"]), len(video["frames"]))) for name in ("semantic", "temporal", "spatial")}
  for q in range(len(audio["segments"])):
    audio_ts = valid(audio["mask"][q])
    u_mean = np.mean([audio["segments"][q, t] for t in audio_ts], axis=0)
    for g in range(len(video["frames"])):
      ts = valid(video["mask"][g])
      out["semantic"][q, g] = cos(np.mean([video["frames"][g, t] for t in ts], axis=0), u_mean)
      # Snippets where either side is padding contribute nothing.
      both = [t for t in ts if audio["mask"][q, t]]
      out["temporal"][q, g] = sum(weights[g, t] * cos(video["frames"][g, t], audio["segments"][q, t]) for t in both)
      out["spatial"][q, g] = sum(weights[g, t] * max(cos(r, audio["segments"][q, t]) for r in video["regions"][g, t])
                                 for t in both)
  return out


@pytest.mark.parametrize("task", ["text", "audio"])
def test_levels_match_numpy_loops(task):
  video, weights, text, audio = make_inputs()
  v, w, t, a = to_jax(video, weights, text, audio)
  got = levels_jit(v, w, t if task == "text" else a, task=task, chunk_size=None)
  want = ref_text(video, weights, text) if task == "text" else ref_audio(video, weights, audio)
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == (Q, G)
    np.testing.assert_allclose(np.asarray(got[name]), want[name], atol=2e-5, err_msg=name)


def pad_with_garbage(video, weights, text, audio, extra_t=3, extra_l=4):
  """Appends padded snippets/words/segments holding huge values and NaNs, with random weights."""
  rng = np.random.default_rng(7)
  def grow(x, axis, extra, fill):
    shape = list(x.shape)
    shape[axis] = extra
    return np.concatenate([x, fill(shape)], axis=axis)
  garbage = lambda shape: np.where(rng.uniform(size=shape) < 0.2, np.nan, 1e6 * rng.normal(size=shape))
  video = dict(frames=grow(video["frames"], 1, extra_t, garbage), regions=grow(video["regions"], 1, extra_t, garbage),
               mask=grow(video["mask"], 1, extra_t, lambda s: np.zeros(s, bool)),
               anomaly=grow(video["anomaly"], 1, extra_t, lambda s: rng.uniform(size=s)))
  weights = grow(weights, 1, extra_t, lambda s: rng.uniform(size=s))
  text = dict(sentence=text["sentence"], words=grow(text["words"], 1, extra_l, garbage),
              word_mask=grow(text["word_mask"], 1, extra_l, lambda s: np.zeros(s, bool)))
  audio = dict(segments=grow(audio["segments"], 1, extra_t, garbage),
               mask=grow(audio["mask"], 1, extra_t, lambda s: np.zeros(s, bool)))
  return video, weights, text, audio


@pytest.mark.parametrize("task", ["text", "audio"])
def test_padding_never_changes_a_result(task):
  inputs = make_inputs(seed=1)
  v, w, t, a = to_jax(*inputs)
  pv, pw, pt, pa = to_jax(*pad_with_garbage(*inputs))
  base = levels_jit(v, w, t if task == "text" else a, task=task, chunk_size=2)
  padded = levels_jit(pv, pw, pt if task == "text" else pa, task=task, chunk_size=2)
  for name in base:
    assert np.all(np.isfinite(np.asarray(padded[name]))), name
    np.testing.assert_allclose(np.asarray(padded[name]), np.asarray(base[name]), atol=1e-6, err_msg=name)
  # Localization too: the first Q videos paired with the Q queries; padded snippets score exactly 0.
  first = lambda tree: jax.tree.map(lambda x: x[:Q], tree)
  base_rel = similarity.snippet_relevance(first(v), w[:Q], t if task == "text" else a)
  padded_rel = np.asarray(similarity.snippet_relevance(first(pv), pw[:Q], pt if task == "text" else pa))
  np.testing.assert_allclose(padded_rel[:, :T], np.asarray(base_rel), atol=1e-6)
  assert np.all(padded_rel[:, T:] == 0.0)


@pytest.mark.parametrize("task", ["text", "audio"])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_equals_unchunked(task, chunk):
  # 7 queries x 9 videos: 1 divides both, 4 neither (overlapping last blocks), 7 is one whole query block.
  v, w, t, a = to_jax(*make_inputs(seed=2, num_videos=9, num_queries=7))
  query = t if task == "text" else a
  full = levels_jit(v, w, query, task=task, chunk_size=None)
  chunked = levels_jit(v, w, query, task=task, chunk_size=chunk)
  for name in full:
    assert chunked[name].shape == (7, 9)
    np.testing.assert_allclose(np.asarray(chunked[name]), np.asarray(full[name]), atol=1e-6, err_msg=name)


def test_spatial_gradients_chunked_equal_unchunked():
  v, w, t, _ = to_jax(*make_inputs(seed=3))
  def total(regions, words, chunk):
    video = v.replace(regions=regions)
    query = t.replace(words=words)
    return jnp.sum(similarity.text_spatial_level(video, w, query, chunk) ** 2)
  grad = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)
  full, chunked = grad(v.regions, t.words, None), grad(v.regions, t.words, 3)
  for a, b in zip(full, chunked):
    assert np.all(np.isfinite(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("task", ["text", "audio"])
def test_snippet_relevance_per_pair(task):
  video, weights, text, audio = make_inputs(seed=4, num_videos=4, num_queries=4)
  v, w, t, a = to_jax(video, weights, text, audio)
  got = np.asarray(similarity.snippet_relevance(v, w, t if task == "text" else a))
  assert got.shape == (4, T)
  for p in range(4):
    for step in range(T):
      if not video["mask"][p, step] or (task == "audio" and not audio["mask"][p, step]):
        assert got[p, step] == 0.0
        continue
      q = text["sentence"][p] if task == "text" else audio["segments"][p, step]
      np.testing.assert_allclose(got[p, step], weights[p, step] * cos(video["frames"][p, step], q), atol=1e-6)
  # Summed over snippets it is the pair's frame (text) / temporal (audio) similarity.
  level = "frame" if task == "text" else "temporal"
  sims = levels_jit(v, w, t if task == "text" else a, task=task, levels=(level,))
  np.testing.assert_allclose(got.sum(1), np.diagonal(np.asarray(sims[level])), atol=1e-5)


def test_combined_score_weights_levels():
  levels = {"video": jnp.ones((2, 3)), "frame": 2 * jnp.ones((2, 3)), "spatial": 3 * jnp.ones((2, 3))}
  got = similarity.combined_score(levels, {"video": 1.0, "frame": 0.5, "spatial": 0.0})
  np.testing.assert_allclose(np.asarray(got), 2.0 * np.ones((2, 3)))
  with pytest.raises(ValueError, match="spatial"):
    similarity.combined_score({"video": levels["video"]}, {"video": 1.0, "spatial": 1.0})


def test_bad_arguments_are_named():
  v, w, t, a = to_jax(*make_inputs())
  with pytest.raises(ValueError, match="not levels of task"):
    similarity.level_similarities(v, w, t, "text", levels=("temporal",))
  with pytest.raises(TypeError, match="AudioEmbeddings"):
    similarity.level_similarities(v, w, t, "audio")


def dot_precisions(jaxpr):
  """The precision of every dot_general in a jaxpr, sub-jaxprs (map, checkpoint, jit) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn.params["precision"]
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from dot_precisions(inner)


@pytest.mark.parametrize("task", ["text", "audio"])
def test_every_contraction_is_pinned_to_float32_precision(task):
  # Unpinned, a float32 dot runs in bf16 passes on TPU and TF32 on GPU; on CPU it makes no difference, so
  # the pin itself is what is checked, in the forward and the backward pass (levels and localization).
  v, w, t, a = to_jax(*make_inputs())
  query = t if task == "text" else a
  def all_levels(v, query):
    sims = similarity.level_similarities(v, w, query, task, chunk_size=2)
    return sum(jnp.sum(s) for s in sims.values()) + jnp.sum(similarity.snippet_relevance(v, w[:Q], query))
  first = lambda tree: jax.tree.map(lambda x: x[:Q], tree)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda v, q: all_levels(first(v), q), argnums=(0, 1),
                                            allow_int=True))(v, query).jaxpr
  precisions = list(dot_precisions(jaxpr))
  assert len(precisions) >= 6
  highest = jax.lax.Precision.HIGHEST
  for precision in precisions:
    assert precision is not None and all(p == highest for p in (precision if isinstance(precision, tuple) else (precision,))), precision


def test_l2_normalize_of_zero_is_finite_with_the_documented_gradient():
  # Below the eps floor the map is x / eps: at 0 the Jacobian is I / eps (the docstring's claim), and
  # masked-out entries get an exact zero gradient.
  jacobian = np.asarray(jax.jacfwd(similarity.l2_normalize)(jnp.zeros(3)))
  np.testing.assert_allclose(jacobian, np.eye(3) / 1e-6, rtol=1e-6)
  masked = jax.jacfwd(lambda x: similarity.l2_normalize(x, jnp.asarray([False, True])))(jnp.ones((2, 3)))
  assert np.all(np.asarray(masked)[0] == 0.0)
  assert np.all(np.asarray(similarity.l2_normalize(jnp.zeros((2, 3)))) == 0.0)


def bf16_round(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def test_bf16_einsum_rounds_every_operand_forward_and_backward():
  # Reference: float64 einsums of bf16-rounded operands; in the backward pass the cotangent is rounded too
  # (JAX's own transpose of a bf16 dot would contract the float32 cotangent, at float32 speed).
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(6, 5))
  spec = "gtd,qd->gtq"
  cotangent = rng.normal(size=(3, 4, 6))
  out, vjp = jax.vjp(lambda x, y: similarity.contract(spec, x, y, "bf16"), jnp.asarray(a, jnp.float32),
                     jnp.asarray(b, jnp.float32))
  da, db = vjp(jnp.asarray(cotangent, jnp.float32))
  assert out.dtype == da.dtype == db.dtype == jnp.float32
  np.testing.assert_allclose(out, np.einsum(spec, bf16_round(a), bf16_round(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum("gtq,qd->gtd", bf16_round(cotangent), bf16_round(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum("gtq,gtd->qd", bf16_round(cotangent), bf16_round(a)), rtol=1e-5, atol=1e-5)
  # ... and it is not the float32 result (the rounding is real at these values).
  assert np.abs(np.asarray(out) - np.einsum(spec, a, b)).max() > 1e-4


@pytest.mark.parametrize("task", ["text", "audio"])
def test_bf16_runs_every_contraction_on_bf16_operands(task):
  # Forward and backward, every level, chunked: all of it on bf16 operands in the program an accelerator
  # compiles (flops counts each dot with its operand dtypes; a CPU contracts the bf16-rounded values in
  # float32, see test_bf16_einsum_rounds_every_operand_forward_and_backward); at "highest" none of it.
  from varcmp_jax import flops
  v, w, t, a = to_jax(*make_inputs())
  query = t if task == "text" else a
  def loss(v, query, precision):
    sims = similarity.level_similarities(v, w, query, task, chunk_size=2, precision=precision)
    return sum(jnp.sum(s) for s in sims.values())
  for precision, share in (("bf16", 1.0), ("highest", 0.0)):
    count = flops.count(jax.grad(functools.partial(loss, precision=precision), argnums=(0, 1), allow_int=True),
                        v, query, platform="cuda")
    assert count.executed > 0 and count.bf16_share == share, (precision, count.by_dtype)
  with pytest.raises(ValueError, match="precision"):
    similarity.level_similarities(v, w, query, task, precision="fp8")


@pytest.mark.parametrize("task", ["text", "audio"])
@pytest.mark.parametrize("devices", [1, 8], ids=["one_device", "gallery_on_8_devices"])
@pytest.mark.parametrize("precision, expected", [("tf32", jax.lax.Precision.HIGH),
                                                 ("highest", jax.lax.Precision.HIGHEST)])
def test_the_precision_asked_for_reaches_every_contraction(task, devices, precision, expected):
  # "tf32" is Precision.HIGH (TF32 on GPU, 3 bf16 passes on TPU), "highest" Precision.HIGHEST, read off every
  # dot_general of the program, forward and backward; with the gallery split over 8 devices too, where each
  # device's part runs in a shard_map that must be given the same precision (eval.precision on a multi-device
  # host). The mesh is an AbstractMesh: tracing the shard_map needs its shape, not 8 devices.
  v, w, t, a = to_jax(*make_inputs(num_videos=8))
  query = t if task == "text" else a
  mesh = None if devices == 1 else jax.sharding.AbstractMesh((devices,), ("data",))
  def all_levels(v, query):
    sims = similarity.level_similarities(v, w, query, task, chunk_size=2, mesh=mesh, precision=precision)
    return sum(jnp.sum(s) for s in sims.values())
  jaxpr = jax.make_jaxpr(jax.value_and_grad(all_levels, argnums=(0, 1), allow_int=True))(v, query).jaxpr
  precisions = list(dot_precisions(jaxpr))
  assert len(precisions) >= 6
  for pair in precisions:
    assert pair == (expected, expected), pair
