"""How an index stores its per-snippet vectors (normalized f_t and region tokens r_tk): float16, int8 or int4.

  float16  the vectors as they are: 2 bytes a value
  int8     per vector v, codes c = round(127 v / max|v|) and one float16 scale s = 1/|c|: 1 byte a value
  int4     the same with codes in [-7, 7], two to a byte: byte j holds dimension j in its low nibble and
           dimension j + ceil(D/2) in its high nibble, so decoding is two shifts and no interleaving: half a byte

s c is a unit vector (the direction of v on the code grid): every stage-2 level reads cosines, and the cosine of
a stored vector with a unit query q is s (c . q). So the scorer can contract the integer codes with an int8 copy
of the query (`int8_cosines`) instead of decoding them to float32: that is what makes stage 2 of a text query
fast on a CPU. Zero vectors (padded snippets) get codes 0 and scale 0; a vector with a non-finite value gets a
NaN scale, which the writer refuses, so it never reaches an index.

`auto` picks int4 for vectors at least AUTO_INT4_DIM wide and float16 below: int4's cosine error is about
0.14 / sqrt(D) (0.006 at D = 512, against cosines that spread by 1 / sqrt(D)), and narrow vectors are small
enough to keep exact. Measured in BENCHMARKS.md (search_scale).
"""
import jax
import jax.numpy as jnp
import numpy as np

STORAGES = ("float16", "int8", "int4")
AUTO_INT4_DIM = 256
_LEVELS = {"int8": 127, "int4": 7}


def resolve(storage: str | None, dim: int) -> str:
  """The storage `auto` (or None) stands for at vector width `dim`; an explicit one as given."""
  if storage in (None, "auto"):
    return "int4" if dim >= AUTO_INT4_DIM else "float16"
  if storage not in STORAGES:
    raise ValueError(f"storage {storage!r} is not one of {('auto',) + STORAGES}")
  return storage


def width(storage: str, dim: int) -> int:
  """Values stored per vector of `dim` floats (bytes for int8/int4, float16s for float16)."""
  return -(-dim // 2) if storage == "int4" else dim


def dtype(storage: str) -> np.dtype:
  return np.dtype({"float16": np.float16, "int8": np.int8, "int4": np.uint8}[storage])


def encode(x: jax.Array, storage: str) -> tuple[jax.Array, jax.Array | None]:
  """(codes, scales) of the vectors x (..., D) float32; scales (...) float16, None for float16 storage."""
  if storage == "float16":
    return x.astype(jnp.float16), None
  levels = _LEVELS[storage]
  x = x.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  finite = jnp.isfinite(peak)
  safe = jnp.where(finite & (peak > 0), peak, 1.0)
  codes = jnp.clip(jnp.round(jnp.where(finite, x, 0.0) * (levels / safe)), -levels, levels).astype(jnp.int8)
  norm = jnp.sqrt(jnp.sum(jnp.square(codes.astype(jnp.float32)), axis=-1))
  scales = jnp.where(finite[..., 0], jnp.where(norm > 0, 1.0 / jnp.maximum(norm, 1.0), 0.0), jnp.nan)
  if storage == "int4":
    half = width(storage, x.shape[-1])
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 2 * half - x.shape[-1])])
    low, high = codes[..., :half], codes[..., half:]
    codes = jax.lax.bitcast_convert_type(jnp.bitwise_or(jnp.bitwise_and(low, 15), jnp.left_shift(high, 4)), jnp.uint8)
  return codes, scales.astype(jnp.float16)


def _parts(codes: jax.Array, storage: str) -> list[jax.Array]:
  """int8 code arrays whose concatenation over the last axis is the (padded) vector: one, or int4's two halves."""
  if storage == "int8":
    return [codes]
  packed = jax.lax.bitcast_convert_type(codes, jnp.int8)
  return [jnp.right_shift(jnp.left_shift(packed, 4), 4), jnp.right_shift(packed, 4)]   # sign-extending shifts


def decode(codes: jax.Array, scales: jax.Array | None, storage: str, dim: int) -> jax.Array:
  """float32 (..., D): the stored vectors (unit length, or 0 where padded)."""
  if storage == "float16":
    return codes.astype(jnp.float32)
  values = jnp.concatenate(_parts(codes, storage), axis=-1)[..., :dim].astype(jnp.float32)
  return values * scales.astype(jnp.float32)[..., None]


def int8_cosines(codes: jax.Array, scales: jax.Array, queries: jax.Array, storage: str, spec: str) -> jax.Array:
  """Cosines of stored vectors with unit query vectors, contracted on int8 codes (int32 sums), float32 out.

  codes/scales: a stored field (int8 or int4); queries (..., D) float32 unit vectors (or 0), quantized here
  to int8 with one scale each; spec: the einsum of the codes and the queries over the vector axis, e.g.
  "gtkd,ld->gtkl". Its output must keep the codes' leading axes first and the queries' after them.
  """
  peak = jnp.max(jnp.abs(queries), axis=-1)
  query_scale = jnp.where(peak > 0, peak / 127.0, 0.0)
  query_codes = jnp.round(queries / jnp.where(peak > 0, query_scale, 1.0)[..., None]).astype(jnp.int8)
  parts = _parts(codes, storage)
  half = parts[0].shape[-1]
  query_codes = jnp.pad(query_codes, [(0, 0)] * (query_codes.ndim - 1) + [(0, half * len(parts) - queries.shape[-1])])
  dots = sum(jnp.einsum(spec, part, query_codes[..., i * half:(i + 1) * half], preferred_element_type=jnp.int32)
             for i, part in enumerate(parts))
  code_axes = scales.ndim
  scales = scales.astype(jnp.float32).reshape(scales.shape + (1,) * (dots.ndim - code_axes))
  return dots.astype(jnp.float32) * scales * query_scale
