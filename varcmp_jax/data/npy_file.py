""".npy files from users or strangers, read safely: the header first, nothing allocated until it is checked.

  array = npy_file.load(path, max_bytes=64 * 2**20, name="clip.npy")   # NpyError (a ValueError): one line

`np.load` trusts the file: a header claiming shape (10**12, 128) over 1 KB of data makes it try to allocate
466 TiB, random bytes get numpy's advice to load them with allow_pickle, and an object array would be
unpickled (running code) if pickles were allowed. Here the magic and header are parsed with numpy's own
readers (np.lib.format), an object dtype is refused before any data is read, the size the header claims is
compared with the file's size and with `max_bytes`, and only then is the data read (or memory-mapped).
Every error is one line naming `name` (default: the file's base name, so a server's temp files stay private).
Numpy only: the decoding workers of `varcmp prep` import this without jax.
"""
import math
import os

import numpy as np


def _size(n: int) -> str:
  return f"{n:,} bytes" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


class NpyError(ValueError):
  """A file that is not a readable .npy array; the message is one line naming the file."""


def _header(f, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) from an open file positioned at its start; the file then at its data."""
  try:
    version = np.lib.format.read_magic(f)
  except ValueError:   # too short, or another magic string
    raise NpyError(f"{label}: not a .npy array file (no .npy header)") from None
  readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
  if version not in readers:
    raise NpyError(f"{label}: .npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
  try:
    shape, fortran_order, dtype = readers[version](f)
  except (ValueError, SyntaxError, TypeError, EOFError) as e:
    raise NpyError(f"{label}: not a .npy array file (bad header: {' '.join(str(e).split())[:120]})") from None
  if any(n < 0 for n in shape):
    raise NpyError(f"{label}: not a .npy array file (negative shape {shape} in the header)")
  # numpy's own bound on an array's shape, zero-length arrays included: (0, 10**20) holds no data, so the size
  # check passes it, and numpy would then raise "Maximum allowed dimension exceeded" building it.
  if math.prod(n for n in shape if n) * max(dtype.itemsize, 1) > np.iinfo(np.intp).max:
    raise NpyError(f"{label}: damaged: its header's shape {tuple(shape)} {dtype} is larger than any array can be")
  return tuple(shape), fortran_order, dtype


def load(path: str, max_bytes: int | None = None, name: str | None = None, mmap: bool = False) -> np.ndarray:
  """The array in the .npy file at `path`, refusing, before anything is allocated: a file that is not .npy,
  an object (pickled) dtype, a header that claims more (or less) data than the file holds, and more than
  `max_bytes` of data. `mmap`: a read-only np.memmap instead of a copy in memory. Raises NpyError naming
  `name` (default: the base name of `path`)."""
  label = name or os.path.basename(path)
  try:
    with open(path, "rb") as f:
      shape, fortran_order, dtype = _header(f, label)
      if dtype.hasobject:
        raise NpyError(f"{label}: holds Python objects (dtype {dtype}), which are not read (loading them would "
                       "unpickle code); save a numeric array")
      offset, count = f.tell(), math.prod(shape)
      claimed, held = count * dtype.itemsize, os.fstat(f.fileno()).st_size - offset
      if claimed != held:
        problem = "truncated" if claimed > held else "damaged"
        raise NpyError(f"{label}: {problem}: its header says shape {shape} {dtype} ({claimed:,} bytes), the file "
                       f"holds {held:,} bytes of data")
      if max_bytes is not None and claimed > max_bytes:
        raise NpyError(f"{label}: too large: shape {shape} {dtype} is {_size(claimed)}, the limit is "
                       f"{_size(max_bytes)}")
      order = "F" if fortran_order else "C"
      if mmap and count:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
      data = np.fromfile(f, dtype=dtype, count=count)
  except OSError as e:
    raise NpyError(f"{label}: cannot read: {e.strerror or e}") from None
  if data.size != count:   # the file shrank while it was read
    raise NpyError(f"{label}: truncated while it was read ({data.size} of {count} values)")
  return data.reshape(shape[::-1]).T if fortran_order else data.reshape(shape)
