"""Which queries and snippets the fine-grained levels see (alignment/selection.py), against NumPy sorts."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from varcmp_jax.alignment import selection
from varcmp_jax.alignment.embeddings import VideoEmbeddings


def numpy_hardest(coarse: np.ndarray, first: int, m: int) -> list[list[int]]:
  """Per video j (column): its own query first + j, then the m - 1 other queries by descending coarse, ties by row."""
  out = []
  for j in range(coarse.shape[1]):
    own = first + j
    others = sorted((i for i in range(coarse.shape[0]) if i != own), key=lambda i: (-coarse[i, j], i))
    out.append([own] + others[:m - 1])
  return out


@pytest.mark.parametrize("first", [0, 4])
def test_hardest_queries_are_the_own_query_then_the_largest_coarse(first):
  rng = np.random.default_rng(0)
  coarse = rng.normal(size=(12, 4)).astype(np.float32)     # 12 queries, this device's 4 videos (rows first..)
  coarse[first + 2, 2] = -10.0                              # the own query is chosen even when it scores worst
  rows = np.asarray(selection.hardest_queries(jnp.asarray(coarse), first, 5))
  assert rows.shape == (4, 5)
  assert rows.tolist() == numpy_hardest(coarse, first, 5)


def test_a_planted_hard_negative_is_always_chosen():
  rng = np.random.default_rng(1)
  for trial in range(5):
    coarse = rng.uniform(-0.5, 0.5, size=(16, 16)).astype(np.float32)
    video, impostor = rng.choice(16, 2, replace=False)
    coarse[impostor, video] = 0.9                           # a caption that nearly matches another video
    rows = np.asarray(selection.hardest_queries(jnp.asarray(coarse), 0, 2))
    assert rows[video].tolist() == [video, impostor], trial


def test_hardest_queries_break_ties_by_lower_row_and_carry_no_gradient():
  coarse = jnp.zeros((6, 2))
  rows = selection.hardest_queries(coarse, 0, 3)
  assert np.asarray(rows).tolist() == [[0, 1, 2], [1, 0, 2]]
  grad = jax.grad(lambda c: jnp.sum(selection.hardest_queries(c, 0, 3).astype(jnp.float32)))(coarse)
  assert np.all(np.asarray(grad) == 0)


def make_video(seed=0, g=3, t=7, r=2, d=4):
  rng = np.random.default_rng(seed)
  mask = np.ones((g, t), bool)
  mask[1, 3:] = False                                       # 3 valid snippets
  weights = rng.uniform(0.01, 1.0, size=(g, t)) * mask
  weights[0, [1, 4]] = weights[0, 2]                        # a three-way tie in video 0
  mask[2, 1] = False                                        # a hole: padding before a valid snippet ...
  weights[2] *= mask[2]
  weights[2, 4] = 0.0                                       # ... that weighs nothing: still ranked before padding
  video = VideoEmbeddings(frames=jnp.asarray(rng.normal(size=(g, t, d)), jnp.float32),
                          regions=jnp.asarray(rng.normal(size=(g, t, r, d)), jnp.float32),
                          mask=jnp.asarray(mask), anomaly=jnp.asarray(rng.uniform(size=(g, t)), jnp.float32),
                          external_prior=jnp.asarray(rng.uniform(size=(g, t)), jnp.float32))
  return video, jnp.asarray(weights, jnp.float32)


def numpy_top(weights: np.ndarray, mask: np.ndarray, k: int) -> list[list[int]]:
  """Valid snippets by descending weight, ties by index, then padding by index; the first k."""
  return [sorted(range(len(w)), key=lambda t: (not m[t], -w[t] if m[t] else 0.0, t))[:k]
          for w, m in zip(weights, mask)]


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_top_snippets_take_the_largest_weights_and_renormalize(k):
  video, weights = make_video()
  kept, kept_weights, index = selection.top_snippets(video, weights, k)
  w, mask = np.asarray(weights), np.asarray(video.mask)
  expected = numpy_top(w, mask, k)
  assert np.asarray(index).tolist() == expected
  for g, ts in enumerate(expected):
    np.testing.assert_array_equal(np.asarray(kept.frames[g]), np.asarray(video.frames[g])[ts])
    np.testing.assert_array_equal(np.asarray(kept.regions[g]), np.asarray(video.regions[g])[ts])
    np.testing.assert_array_equal(np.asarray(kept.external_prior[g]), np.asarray(video.external_prior[g])[ts])
    np.testing.assert_array_equal(np.asarray(kept.mask[g]), mask[g][ts])
    valid_kept = [t for t in ts if mask[g, t]]
    want = np.where(mask[g][ts], w[g][ts], 0.0) / w[g][valid_kept].sum()
    np.testing.assert_allclose(np.asarray(kept_weights[g]), want, rtol=1e-6)
    assert abs(float(np.sum(kept_weights[g])) - 1.0) < 1e-6


def test_top_snippets_keep_a_video_with_nothing_valid_at_zero():
  video, weights = make_video()
  video = video.replace(mask=video.mask.at[2].set(False))
  _, kept_weights, _ = selection.top_snippets(video, weights * video.mask, 3)
  assert np.all(np.asarray(kept_weights[2]) == 0)
