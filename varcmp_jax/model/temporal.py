"""Temporal adapter: f_t = g_t + A(g)_t, a small transformer over the snippet sequence.

The residual output projection is zero-initialized, so at init f_t == g_t exactly and fine-tuning starts
from the pre-trained tower's embeddings.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class TemporalBlock(nn.Module):
  """Pre-LayerNorm transformer block over snippets, with a key padding mask."""
  num_heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attn_mask):
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        force_fp32_for_softmax=True, name="attn")(y, mask=attn_mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm2")(x)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_in")(y)
    y = nn.gelu(y)
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_out")(y)
    return x + y


class TemporalAdapter(nn.Module):
  """(B, T, D) per-snippet embeddings + (B, T) validity mask -> (B, T, D), zero on padded snippets.

  Whatever the padded snippets hold (zeros, NaN, inf), the valid outputs do not depend on it.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int
  max_len: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, g, mask):
    _, num_snippets, width = g.shape
    if num_snippets > self.max_len:
      raise ValueError(f"temporal adapter: {num_snippets} snippets exceed config.model.temporal.max_len="
                       f"{self.max_len}; raise max_len or lower config.data.snippets")
    positions = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, width),
                           self.param_dtype)
    # Padded snippets are zeroed first: the key padding mask gives them attention weight 0, but 0 x NaN (or
    # x inf) in the weighted sum of values would still reach every valid f_t.
    g = jnp.where(mask[..., None], g, jnp.zeros((), g.dtype))
    x = g.astype(self.dtype) + positions[:num_snippets].astype(self.dtype)
    # Key padding mask only: padded queries still get finite outputs, which are zeroed below.
    attn_mask = mask[:, None, None, :]
    for i in range(self.num_layers):
      x = TemporalBlock(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype, name=f"block{i}")(
          x, attn_mask)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    residual = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="out_proj")(x)
    f = g + residual.astype(g.dtype)
    return jnp.where(mask[..., None], f, jnp.zeros((), f.dtype))
