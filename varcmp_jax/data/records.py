"""One ArrayRecord record = one video: a msgpack'd dict of numpy arrays and strings.

The keys (video, caption, tokens, label, frames or features/regions, mel, prior, times, ...) are fixed by
the README's data section; this module only (de)serializes them, so that prep, extract-features, TFDS and the Grain pipeline agree.
"""
from typing import Any

import numpy as np
from flax import serialization


def encode_record(example: dict[str, Any]) -> bytes:
  """Serializes a record dict (numpy arrays, python scalars, str) to bytes."""
  return serialization.msgpack_serialize({k: _to_storable(v) for k, v in example.items()})


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`."""
  return serialization.msgpack_restore(data)


def _to_storable(value: Any) -> Any:
  if isinstance(value, (str, bytes)):
    return value
  return np.asarray(value)
