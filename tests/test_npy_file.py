"""Reading .npy files safely (varcmp_jax/data/npy_file.py): every array np.save writes reads back as np.load reads
it, and hostile files (made here) are refused in one line, before anything is allocated or unpickled."""
import os

import numpy as np
import pytest

from varcmp_jax.data import npy_file


def lying_npy(path, shape, dtype="<f4", data=b"\0" * 1024, version=(1, 0)):
  """A .npy whose header claims `shape` over `data` (1 KB by default)."""
  header = {"descr": dtype, "fortran_order": False, "shape": shape}
  with open(path, "wb") as f:
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(f, header)
    f.write(data)
  return path


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    np.arange(5, dtype=">i2"),                        # big-endian
    np.float16(3.5) * np.ones(()),                    # 0-d
    np.zeros((0, 7), np.float32),                     # empty
    np.array([True, False]),
])
def test_reads_what_np_save_writes_as_np_load_does(tmp_path, array):
  path = tmp_path / "a.npy"
  np.save(path, array)
  reference = np.load(path)
  for got in (npy_file.load(str(path)), npy_file.load(str(path), mmap=True)):
    assert got.dtype == reference.dtype and got.shape == reference.shape
    np.testing.assert_array_equal(got, reference)


def test_version_2_headers_are_read(tmp_path):
  path = tmp_path / "v2.npy"
  values = np.arange(6, dtype="<f4")
  lying_npy(path, (2, 3), data=values.tobytes(), version=(2, 0))
  np.testing.assert_array_equal(npy_file.load(str(path)), values.reshape(2, 3))


def test_a_huge_claimed_shape_is_refused_before_allocating(tmp_path):
  path = lying_npy(tmp_path / "huge.npy", (10 ** 12, 128))
  with pytest.raises(npy_file.NpyError) as error:
    npy_file.load(str(path))
  message = str(error.value)
  assert message.startswith("huge.npy: truncated: its header says shape (1000000000000, 128) float32") and \
      "the file holds 1,024 bytes of data" in message and "\n" not in message
  with pytest.raises(npy_file.NpyError, match="truncated"):
    npy_file.load(str(path), mmap=True)
  # More data than the header claims is refused too (the header or the file is wrong).
  with pytest.raises(npy_file.NpyError, match=r"damaged: its header says shape \(2,\)"):
    npy_file.load(str(lying_npy(tmp_path / "long.npy", (2,))))


@pytest.mark.parametrize("shape", [(0, 10 ** 20), (10 ** 20,), (0, 2 ** 61, 2), (3, 0, 10 ** 30)])
def test_a_shape_no_array_can_have_is_refused(tmp_path, shape):
  """(0, 10**20) claims no data, so the size check alone passes it, and numpy then fails to build it ("Maximum
  allowed dimension exceeded"): refused from the header, as numpy's bound (elements x item size within intp) says."""
  path = lying_npy(tmp_path / "zero.npy", shape, data=b"")
  for mmap in (False, True):
    with pytest.raises(npy_file.NpyError) as error:
      npy_file.load(str(path), mmap=mmap)
    assert str(error.value) == f"zero.npy: damaged: its header's shape {shape} float32 is larger than any array can be"
  # Just inside numpy's bound: an empty array of that shape, as np.load reads it.
  inside = lying_npy(tmp_path / "inside.npy", (0, 2 ** 60), data=b"")
  assert npy_file.load(str(inside)).shape == np.load(inside).shape == (0, 2 ** 60)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_max_bytes_bounds_what_is_read(tmp_path, mmap):
  np.save(tmp_path / "a.npy", np.zeros((30, 12), np.float32))      # 1440 bytes
  assert npy_file.load(str(tmp_path / "a.npy"), max_bytes=1440, mmap=mmap).shape == (30, 12)
  with pytest.raises(npy_file.NpyError,
                     match=r"a.npy: too large: shape \(30, 12\) float32 is 1,440 bytes, the limit is 1,000 bytes"):
    npy_file.load(str(tmp_path / "a.npy"), max_bytes=1000, mmap=mmap)


def test_a_memory_map_is_read_only_and_leaves_the_file_alone(tmp_path):
  """The user's file is mapped read-only: writing through the array is refused, the bytes on disk never change."""
  path = tmp_path / "a.npy"
  np.save(path, np.arange(6, dtype=np.float32))
  before = path.read_bytes()
  mapped = npy_file.load(str(path), mmap=True)
  assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
  with pytest.raises(ValueError, match="read-only"):
    mapped[0] = 42.0
  del mapped
  assert path.read_bytes() == before


class Payload:
  """Unpickling it would create a file: the proof that an object array was (not) loaded."""
  marker = None

  def __reduce__(self):
    return (open, (Payload.marker, "w"))


def test_random_bytes_and_pickles_are_refused_without_numpys_advice(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "random.npy").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  (tmp_path / "short.npy").write_bytes(b"\x93NUM")
  (tmp_path / "bad_header.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4}   \n")
  (tmp_path / "v9.npy").write_bytes(b"\x93NUMPY\x09\x00" + b"\0" * 64)
  for name, problem in [("random.npy", "not a .npy array file (no .npy header)"),
                        ("short.npy", "not a .npy array file (no .npy header)"),
                        ("bad_header.npy", "not a .npy array file (bad header"),
                        ("v9.npy", ".npy format version 9.0 is not supported")]:
    with pytest.raises(npy_file.NpyError) as error:
      npy_file.load(str(tmp_path / name))
    assert str(error.value).startswith(f"{name}: {problem}") and "allow_pickle" not in str(error.value)

  Payload.marker = str(tmp_path / "unpickled")
  np.save(tmp_path / "objects.npy", np.array([Payload(), 1], dtype=object), allow_pickle=True)
  with pytest.raises(npy_file.NpyError, match=r"objects.npy: holds Python objects \(dtype object\), which are not "
                                              "read"):
    npy_file.load(str(tmp_path / "objects.npy"))
  assert not os.path.exists(Payload.marker)


def test_errors_name_the_given_name_not_the_path(tmp_path):
  (tmp_path / "tmpxlkluuhl.npy").write_bytes(b"junk")
  with pytest.raises(npy_file.NpyError) as error:
    npy_file.load(str(tmp_path / "tmpxlkluuhl.npy"), name="my clip.npy")
  assert str(error.value).startswith("my clip.npy: ") and "tmpxlkluuhl" not in str(error.value)
  with pytest.raises(npy_file.NpyError, match="missing.npy: cannot read: No such file"):
    npy_file.load(str(tmp_path / "missing.npy"))
  with pytest.raises(npy_file.NpyError, match="cannot read: Is a directory"):
    npy_file.load(str(tmp_path))
