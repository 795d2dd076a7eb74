"""How an index stores its per-snippet vectors (normalized f_t and region tokens r_tk): float16, int8 or int4.

  float16  the vectors as they are: 2 bytes a value
  int8     per vector v, codes c = round(127 v / max|v|) and one float16 scale s = 1/|c|: 1 byte a value
  int4     the same with codes in [-7, 7], half a byte a value, kept as two 2-bit planes in two arrays:
           c = 4 h + l with h = floor(c / 4) in [-2, 1] (the array itself) and l in [0, 3] (its `_low` array).
           Each plane packs four dimensions to a byte: byte j holds dimensions j, j + q, j + 2q and j + 3q
           (q = ceil(D/4)) in its bits 0-1, 2-3, 4-5, 6-7, so decoding is shifts and no interleaving.

s c is a unit vector (the direction of v on the code grid): every stage-2 level reads cosines, and the cosine of
a stored vector with a unit query q is s (c . q). So the scorer can contract the integer codes with an int8 copy
of the query (`int8_cosines`) instead of decoding them to float32: that is what makes stage 2 of a text query
fast on a CPU. Zero vectors (padded snippets) get codes 0 and scale 0; a vector with a non-finite value gets a
NaN scale, which the writer refuses, so it never reaches an index.

Why int4 in two planes: stage 2 of a query at 10^5 videos reads its K candidates' region codes from disk (an
index at real size outgrows the page cache). The high plane alone is a coarse copy, c ~ 4 h + 3/2 (what
`decode` and `int8_cosines` use when the `_low` array is not given), at half the bytes; the search ranks the K
candidates on it and reads the low plane only for the best few, whose int4 scores are then exact (index.search).

`auto` picks int4 for vectors at least AUTO_INT4_DIM wide and float16 below: int4's cosine error is about
0.14 / sqrt(D) (0.006 at D = 512, against cosines that spread by 1 / sqrt(D)), and narrow vectors are small
enough to keep exact. Measured in BENCHMARKS.md (search_scale).
"""
import jax
import jax.numpy as jnp
import numpy as np

STORAGES = ("float16", "int8", "int4")
AUTO_INT4_DIM = 256
LOW = "_low"      # the suffix of int4's low plane: read only to score a vector exactly
SCALE = "_scale"
_LEVELS = {"int8": 127, "int4": 7}
_PLANES = 4       # int4: 2-bit values per byte of a plane


def resolve(storage: str | None, dim: int) -> str:
  """The storage `auto` (or None) stands for at vector width `dim`; an explicit one as given."""
  if storage in (None, "auto"):
    return "int4" if dim >= AUTO_INT4_DIM else "float16"
  if storage not in STORAGES:
    raise ValueError(f"storage {storage!r} is not one of {('auto',) + STORAGES}")
  return storage


def arrays(storage: str, dim: int) -> dict[str, tuple[np.dtype, int | None]]:
  """{suffix: (dtype, values per vector, or None for one per vector)} of the arrays one field of `dim`-wide
  vectors is stored in, under the field's name plus the suffix."""
  if storage == "float16":
    return {"": (np.dtype(np.float16), dim)}
  if storage == "int8":
    return {"": (np.dtype(np.int8), dim), SCALE: (np.dtype(np.float16), None)}
  quarter = -(-dim // _PLANES)
  return {"": (np.dtype(np.uint8), quarter), LOW: (np.dtype(np.uint8), quarter), SCALE: (np.dtype(np.float16), None)}


def field(data: dict, name: str) -> dict:
  """The arrays of the vector field `name` in `data` (arrays by file name), keyed by suffix: what decode takes."""
  return {suffix: data[name + suffix] for suffix in ("", LOW, SCALE) if name + suffix in data}


def _pack(values: jax.Array) -> jax.Array:
  """uint8 (..., q) of 2-bit values (..., 4q): dimension i * q + j in bits 2i, 2i+1 of byte j."""
  quarter = values.shape[-1] // _PLANES
  bits = jnp.bitwise_and(values, 3).astype(jnp.uint8)
  return sum(jnp.left_shift(bits[..., i * quarter:(i + 1) * quarter], 2 * i) for i in range(_PLANES)).astype(jnp.uint8)


def encode(x: jax.Array, storage: str) -> dict[str, jax.Array]:
  """{suffix: array} (see `arrays`) of the vectors x (..., D) float32."""
  if storage == "float16":
    return {"": x.astype(jnp.float16)}
  levels = _LEVELS[storage]
  x = x.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  finite = jnp.isfinite(peak)
  safe = jnp.where(finite & (peak > 0), peak, 1.0)
  codes = jnp.clip(jnp.round(jnp.where(finite, x, 0.0) * (levels / safe)), -levels, levels).astype(jnp.int8)
  norm = jnp.sqrt(jnp.sum(jnp.square(codes.astype(jnp.float32)), axis=-1))
  scales = jnp.where(finite[..., 0], jnp.where(norm > 0, 1.0 / jnp.maximum(norm, 1.0), 0.0), jnp.nan)
  out = {SCALE: scales.astype(jnp.float16)}
  if storage == "int8":
    return {"": codes, **out}
  quarter = arrays(storage, x.shape[-1])[""][1]
  codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, _PLANES * quarter - x.shape[-1])])
  return {"": _pack(jnp.right_shift(codes, 2)), LOW: _pack(jnp.bitwise_and(codes, 3)), **out}


def _parts(stored: dict, storage: str, plane: str = "") -> list[jax.Array]:
  """int8 arrays whose concatenation over the last axis is the (padded) codes: int8's one, or the four quarters of
  an int4 plane (`plane`: "" the high plane, sign-extended; LOW the low one)."""
  if storage == "int8":
    return [stored[""]]
  packed = jax.lax.bitcast_convert_type(stored[plane], jnp.int8)
  if plane == LOW:
    return [jnp.bitwise_and(jnp.right_shift(packed, 2 * i), 3) for i in range(_PLANES)]
  return [jnp.right_shift(jnp.left_shift(packed, 6 - 2 * i), 6) for i in range(_PLANES)]   # sign-extending


def decode(stored: dict, storage: str, dim: int) -> jax.Array:
  """float32 (..., D): the stored vectors (unit length, or 0 where padded); int4 without its LOW array: the
  coarse vectors 4 h + 3/2."""
  if storage == "float16":
    return stored[""].astype(jnp.float32)
  values = jnp.concatenate(_parts(stored, storage), axis=-1).astype(jnp.float32)
  if storage == "int4":
    values = 4 * values + (jnp.concatenate(_parts(stored, storage, LOW), axis=-1) if LOW in stored else 1.5)
  return values[..., :dim] * stored[SCALE].astype(jnp.float32)[..., None]


def int8_cosines(stored: dict, queries: jax.Array, storage: str, spec: str) -> jax.Array:
  """Cosines of stored vectors with unit query vectors, contracted on int8 codes (int32 sums), float32 out.

  stored: a field's arrays (int8 or int4; int4 without LOW: the coarse vectors, as `decode`); queries (..., D)
  float32 unit vectors (or 0), quantized here to int8 with one scale each; spec: the einsum of the codes and the
  queries over the vector axis, e.g. "gtkd,ld->gtkl". Its output must keep the codes' leading axes first and the
  queries' after them.
  """
  peak = jnp.max(jnp.abs(queries), axis=-1)
  query_scale = jnp.where(peak > 0, peak / 127.0, 0.0)
  query_codes = jnp.round(queries / jnp.where(peak > 0, query_scale, 1.0)[..., None]).astype(jnp.int8)

  def dots(parts):
    width = parts[0].shape[-1]
    padded = jnp.pad(query_codes, [(0, 0)] * (query_codes.ndim - 1) + [(0, width * len(parts) - queries.shape[-1])])
    return sum(jnp.einsum(spec, part, padded[..., i * width:(i + 1) * width], preferred_element_type=jnp.int32)
               for i, part in enumerate(parts)).astype(jnp.float32)

  total = dots(_parts(stored, storage))
  if storage == "int4":
    low = dots(_parts(stored, storage, LOW)) if LOW in stored else 1.5 * jnp.sum(query_codes, -1, jnp.float32)
    total = 4 * total + low
  scales = stored[SCALE]
  scales = scales.astype(jnp.float32).reshape(scales.shape + (1,) * (total.ndim - scales.ndim))
  return total * scales * query_scale
