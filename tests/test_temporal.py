"""Temporal adapter against a NumPy transformer written from the formula, with NaN / inf in the padding.

The reference sees only each video's valid snippets (with their own positions), so equality also shows that
nothing from the padded snippets reaches a valid f_t.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varcmp_jax.model.temporal import TemporalAdapter

WIDTH, HEADS, MLP, LAYERS, MAX_LEN = 16, 2, 2, 2, 12


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):   # tanh approximation (flax.linen.gelu's default)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def attention(x, p):
  """Multi-head self-attention over the rows of x (T, D); every row is a valid snippet."""
  q, k, v = (np.einsum("td,dhk->thk", x, p[name]["kernel"]) + p[name]["bias"] for name in ("query", "key", "value"))
  logits = np.einsum("qhk,thk->hqt", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("hqt,thk->qhk", weights, v)
  return np.einsum("qhk,hkd->qd", out, p["out"]["kernel"]) + p["out"]["bias"]


def reference(params, g, positions):
  """f = g + out_proj(LN(blocks(g + pos))) for one video's valid snippets g (T_valid, D) at `positions`."""
  x = g + params["pos_embedding"][positions]
  for i in range(LAYERS):
    p = params[f"block{i}"]
    x = x + attention(layer_norm(x, p["norm1"]), p["attn"])
    x = x + dense(gelu(dense(layer_norm(x, p["norm2"]), p["mlp_in"])), p["mlp_out"])
  return g + dense(layer_norm(x, params["norm"]), params["out_proj"])


def test_adapter_matches_numpy_reference_whatever_the_padding_holds():
  adapter = TemporalAdapter(num_layers=LAYERS, num_heads=HEADS, mlp_ratio=MLP, max_len=MAX_LEN)
  rng = np.random.default_rng(0)
  batch, snippets = 4, 8
  mask = np.zeros((batch, snippets), bool)
  mask[0, :8] = True                 # full
  mask[1, :3] = True                 # padded at the end
  mask[2, [1, 4, 5]] = True          # holes: valid snippets keep their own positions
  mask[3, 7] = True                  # one snippet
  g = rng.normal(size=(batch, snippets, WIDTH)).astype(np.float32)
  params = adapter.init(jax.random.key(0), jnp.asarray(g), jnp.asarray(mask))["params"]
  # Random values everywhere, the zero-initialized out_proj included, so the residual is not trivial.
  leaves, tree = jax.tree_util.tree_flatten(params)
  params = jax.tree_util.tree_unflatten(
      tree, [rng.normal(scale=0.5, size=leaf.shape).astype(np.float32) for leaf in leaves])
  numpy_params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)

  poisoned = g.copy()
  poisoned[~mask] = np.nan
  poisoned[1, 5] = np.inf
  poisoned[3, 0] = -1e30
  got = np.asarray(jax.jit(adapter.apply)({"params": params}, jnp.asarray(poisoned), jnp.asarray(mask)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[~mask], 0.0)
  for b in range(batch):
    valid = np.flatnonzero(mask[b])
    expected = reference(numpy_params, g[b, valid].astype(np.float64), valid)
    np.testing.assert_allclose(got[b, valid], expected, rtol=1e-4, atol=1e-4, err_msg=f"video {b}")
  assert np.abs(got[0] - g[0]).max() > 0.1        # the adapter did something


def test_zero_initialized_adapter_is_the_identity_on_valid_snippets():
  adapter = TemporalAdapter(num_layers=1, num_heads=HEADS, mlp_ratio=MLP, max_len=MAX_LEN)
  g = np.random.default_rng(1).normal(size=(2, 5, WIDTH)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  g[~mask] = np.nan
  params = adapter.init(jax.random.key(1), jnp.asarray(g), jnp.asarray(mask))
  got = np.asarray(adapter.apply(params, jnp.asarray(g), jnp.asarray(mask)))
  np.testing.assert_array_equal(got[mask], g[mask])
  np.testing.assert_array_equal(got[~mask], 0.0)


def test_too_many_snippets_names_the_field():
  adapter = TemporalAdapter(num_layers=1, num_heads=HEADS, mlp_ratio=MLP, max_len=4)
  with pytest.raises(ValueError, match="max_len=4"):
    adapter.init(jax.random.key(0), jnp.zeros((1, 6, WIDTH)), jnp.ones((1, 6), bool))
