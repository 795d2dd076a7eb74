"""The index's storage (index.codec and the store: layout, manifest, checksum, writer, verify, reader): codes against
NumPy decoding, byte-sized shards, the writer's memory, stage 2's candidate set, and damaged or unreadable indexes
(truncated, a byte flipped in any file, NaN rows, deleted or unreadable files, an --append onto damage) as one-line
IndexDamaged / IndexUnreadable errors, found when the index opens or when a query reads the bytes.

Synthetic indexes are written through the index's own writer (test_index.write_synthetic); the references are
NumPy written from the formulas (test_index.reference_scores) or from the file format (`reseal`: the checksums
recomputed with zlib's CRC32 from the format's description).
"""
import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_index import REPO, random_query, random_videos, reference_scores, write_synthetic
from varcmp_jax import cli, search
from varcmp_jax.index import codec, store
from varcmp_jax.index import search as index_search


def unpack_planes(plane: np.ndarray, signed: bool) -> np.ndarray:
  """The 2-bit values of an int4 plane, from the format: byte j holds dimensions j, j + q, j + 2q, j + 3q in its
  bits 0-1, 2-3, 4-5, 6-7 (the high plane two's complement)."""
  values = [(plane.astype(np.int16) >> (2 * i)) & 3 for i in range(4)]
  return np.concatenate([(v ^ 2) - 2 if signed else v for v in values], -1)


def numpy_codes(stored: dict, storage: str, dim: int) -> np.ndarray:
  """The integer codes of stored vectors: int8's as they are, int4's c = 4 h + l from its two planes."""
  if storage == "int8":
    return stored[""].astype(np.int16)
  return (4 * unpack_planes(stored[""], True) + unpack_planes(stored["_low"], False))[..., :dim]


def read_decoded(path: str, name: str, storage: str, dim: int) -> np.ndarray:
  """Every video's stored `name` vectors, decoded by NumPy, shards concatenated."""
  folder = os.path.join(path, store.SHARDS)
  shards = sorted(os.listdir(folder))
  load = lambda suffix: np.concatenate([np.load(os.path.join(folder, s, f"{name}{suffix}.npy")) for s in shards])
  if storage == "float16":
    return load("").astype(np.float32)
  if storage == "coarse":         # int4's high plane alone: 4 h + 3/2
    codes = 4 * unpack_planes(load(""), True)[..., :dim] + 1.5
    return codes * load("_scale").astype(np.float32)[..., None]
  stored = {suffix: load(suffix) for suffix in ("", "_low", "_scale") if suffix != "_low" or storage == "int4"}
  return numpy_codes(stored, storage, dim) * stored["_scale"].astype(np.float32)[..., None]


@pytest.mark.parametrize("storage,levels", [("int8", 127), ("int4", 7)])
def test_codes_are_the_nearest_grid_points_and_decode_to_unit_vectors(storage, levels):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((50, 7)) * rng.uniform(0.1, 10, (50, 1))).astype(np.float32)    # odd width: int4 pads
  x[3] = 0.0
  x[4, 2] = 40.0                                                                        # one outlying coordinate
  stored = jax.device_get(codec.encode(jnp.asarray(x), storage))
  scales = stored["_scale"]
  arrays = codec.arrays(storage, 7)
  assert {k: (v.shape, v.dtype) for k, v in stored.items()} == {
      suffix: ((50,) if width is None else (50, width), dtype) for suffix, (dtype, width) in arrays.items()}
  assert scales.dtype == np.float16 and stored[""].shape[-1] == {"int8": 7, "int4": 2}[storage]
  ints = numpy_codes(stored, storage, 7)
  peak = np.abs(x).max(-1, keepdims=True)
  target = x * levels / np.where(peak > 0, peak, 1.0)
  assert np.abs(ints - target).max() <= 0.5 + 1e-4 and np.abs(ints).max() <= levels     # the nearest grid point
  decoded = ints * scales.astype(np.float32)[:, None]
  norms = np.linalg.norm(decoded, axis=-1)
  np.testing.assert_allclose(np.delete(norms, 3), 1.0, atol=1e-3)       # unit vectors, up to the float16 scale
  assert norms[3] == 0 and scales[3] == 0
  np.testing.assert_allclose(jax.device_get(codec.decode(stored, storage, 7)), decoded, atol=1e-6)
  # Cosines on the codes with an int8 query: off by at most the query's rounding, |e| <= sqrt(D) max|q| / 254.
  queries = rng.standard_normal((5, 7)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
  cosines = jax.device_get(codec.int8_cosines(stored, jnp.asarray(queries), storage, "nd,ld->nl"))
  np.testing.assert_allclose(cosines, decoded @ queries.T, atol=np.sqrt(7) / 254 + 1e-3)
  if storage == "int4":     # without the low plane: the coarse vectors (4 floor(c / 4) + 3/2) s
    high = {k: v for k, v in stored.items() if k != "_low"}
    coarse = (4 * np.floor(ints / 4) + 1.5) * scales.astype(np.float32)[:, None]
    np.testing.assert_allclose(jax.device_get(codec.decode(high, storage, 7)), coarse, atol=1e-6)
    np.testing.assert_allclose(jax.device_get(codec.int8_cosines(high, jnp.asarray(queries), storage, "nd,ld->nl")),
                               coarse @ queries.T, atol=1.5 * np.sqrt(7) / 254 + 1e-3)
  # A non-finite vector gets a NaN scale (which the writer refuses); the others are untouched.
  x[5, 1], x[6, 0] = np.nan, np.inf
  scales_after = jax.device_get(codec.encode(jnp.asarray(x), storage))["_scale"]
  assert np.isnan(scales_after[5:7]).all()
  np.testing.assert_array_equal(np.delete(scales_after, [5, 6]), np.delete(scales, [5, 6]))


def test_the_query_is_quantized_to_round_127_q_over_its_peak():
  # Stored vectors that are the unit basis (int8 codes e_j, scale 1) give back each quantized query value:
  # cosine(e_j, q) on the codes = c_j s with c = round(127 q / max|q|) and s = max|q| / 127, exactly.
  d = 9
  stored = {"": jnp.eye(d, dtype=jnp.int8), "_scale": jnp.ones(d, jnp.float16)}
  queries = np.array([[0.9, -0.45, 0.3, 0.2, -0.1, 0.05, 0.31, -0.62, 0.0],
                      [-1.0, 0.5, 0.25, 0.125, 0.7, -0.33, 0.01, 0.99, 0.6]], np.float32)
  peak = np.abs(queries).max(-1, keepdims=True)
  expected = np.round(127 * queries / peak) * (peak / 127)
  cosines = jax.device_get(codec.int8_cosines(stored, jnp.asarray(queries), "int8", "nd,ld->nl")).T
  np.testing.assert_allclose(cosines, expected, rtol=1e-6, atol=0)
  zero = jax.device_get(codec.int8_cosines(stored, jnp.zeros((1, d)), "int8", "nd,ld->nl")).T
  assert np.array_equal(zero, np.zeros((1, d)))                                    # a zero query scores 0


def test_auto_storage_is_int4_from_256_wide_vectors():
  assert codec.resolve("auto", 256) == "int4" and codec.resolve(None, 256) == "int4"
  assert codec.resolve("auto", 255) == "float16" and codec.resolve("auto", 512) == "int4"
  assert codec.resolve("int8", 16) == "int8"
  with pytest.raises(ValueError, match="not one of"):
    codec.resolve("int2", 512)


def test_int4_returns_top_k_hits_when_top_k_is_more_than_the_refined_candidates(tmp_path):
  # The low planes are read for max(top_k, REFINE) candidates: a top_k above REFINE (100) gets top_k hits, each
  # with its exact int4 score (the exhaustive search's for that video), best first.
  rng = np.random.default_rng(11)
  videos = random_videos(rng, g=130, t=2, d=8, r=1)
  index = index_search.Index(write_synthetic(tmp_path / "index", "text", videos, 64, storage="int4"))
  query = random_query(rng, "text", 2, 8)
  assert index_search.REFINE == 100
  rows, combined, _ = index.rank(query, top_k=120, candidates=130)
  exhaustive_rows, exhaustive, _ = index.rank(query, top_k=130, candidates=None)
  assert len(rows) == len(set(rows.tolist())) == 120 and np.all(np.diff(combined) <= 0)
  exact = dict(zip(exhaustive_rows.tolist(), exhaustive.tolist()))
  np.testing.assert_allclose(combined, [exact[row] for row in rows.tolist()], atol=1e-6)
  assert len(index.search(query, top_k=120, candidates=130)) == 120


@pytest.mark.parametrize("task", ["text", "audio"])
@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_a_quantized_index_scores_its_decoded_vectors(tmp_path, task, storage):
  rng = np.random.default_rng(3)
  videos = random_videos(rng, g=37, t=6, d=16, r=3)
  path = write_synthetic(tmp_path / "index", task, videos, shard_size=10, storage=storage)
  index = index_search.Index(path)
  assert index.storage == storage
  decoded = {**videos, **{name: read_decoded(path, name, storage, 16) for name in ("frames", "regions")}}
  for _ in range(2):
    query = random_query(rng, task, 6, 16)
    exact, on_codes = reference_scores(task, videos, query), reference_scores(task, decoded, query)
    rows, combined, levels = index.rank(query, top_k=37, candidates=None)
    pooled = ("video", "frame") if task == "text" else ("semantic",)
    for name, value in levels.items():
      # Pooled levels are exact (float32); stage-2 levels are the decoded vectors' (text: the int8 query's
      # rounding, |e| <= sqrt(D) / 254).
      reference = exact[name] if name in pooled else on_codes[name]
      tolerance = 1e-5 if name in pooled else np.sqrt(16) / 254 if task == "text" else 1e-4
      np.testing.assert_allclose(value, reference[rows], atol=tolerance, err_msg=name)
    assert np.all(np.diff(combined) <= 0)
    two_stage = index.rank(query, top_k=10, candidates=37)
    np.testing.assert_array_equal(two_stage[0], rows[:10])
    np.testing.assert_allclose(two_stage[1], combined[:10], atol=1e-6)


def test_shards_are_sized_in_bytes():
  layout = store.layout_of(snippets=6, dim=16, pooled=2, regions=3, storage="int4")
  # One video: pooled float32 rows, int4 frames (two 4-byte planes) and regions with float16 scales, weights,
  # prior, times, mask, its metadata offset and line, and a CRC32 of its row of each of the 10 arrays and its line.
  expected = (2 * 16 * 4 + 6 * (8 + 2) + 6 * 3 * (8 + 2) + 6 * 4 * 2 + 6 * 2 * 4 + 6 + 8 + store.METADATA_BYTES
              + 11 * 4)
  assert store.video_bytes(layout) == expected
  headers = 12 * 128          # a shard's 10 .npy files, metadata_offsets.npy, rows_crc32.npy: 128-byte headers here
  assert store.videos_per_shard(layout, headers + 11 * expected - 1) == 10
  assert store.videos_per_shard(layout, headers + 11 * expected) == 11 and store.videos_per_shard(layout, 5) == 1
  float16 = store.layout_of(snippets=6, dim=16, pooled=2, regions=0, storage="float16")
  assert store.video_bytes(float16) == (2 * 16 * 4 + 6 * 16 * 2 + 6 * 4 * 2 + 6 * 2 * 4 + 6 + 8
                                        + store.METADATA_BYTES + 6 * 4)


WRITER_PROBE = textwrap.dedent("""
    import json, sys
    import jax, ml_collections, numpy as np
    from varcmp_jax.alignment.embeddings import VideoEmbeddings
    from varcmp_jax.index import levels, store

    def status(key):
      with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    g, t, d, r, batch = 1200, 32, 512, 4, 24
    config = ml_collections.ConfigDict({"prior": {"source": "head"}, "weighting": {"beta": 0.5, "tau": 0.1}})
    header = {"run": None, "config": config.to_dict(), "task": "text", "levels": {"video": 1.0},
              "pooled_levels": ["video", "frame"]}
    prepare = jax.jit(lambda v: levels.index_arrays(v, *levels.snippet_weights(v, config), "text", "float16"))
    rng = np.random.default_rng(0)
    with store.IndexWriter(sys.argv[1], header, storage="float16") as writer:
      source = writer.add_source({"records": "x", "split": "test", "fingerprint": "0", "videos": g, "slices": 1}, False)
      shard = writer.shard(source, 0, 0, g)                    # one shard of every video: 200 MB on disk
      for start in range(0, g, batch):
        video = VideoEmbeddings(frames=rng.standard_normal((batch, t, d), np.float32),
                                regions=rng.standard_normal((batch, t, r, d), np.float32),
                                mask=np.ones((batch, t), bool),
                                anomaly=rng.uniform(0, 1, (batch, t)).astype(np.float32))
        arrays = jax.device_get(prepare(video))
        arrays["times"] = np.zeros((batch, t, 2), np.float32)
        shard.add(arrays, [{"video": str(start + i)} for i in range(batch)])
        if start == 0:                                         # compiled, one batch written
          with open("/proc/self/clear_refs", "w") as f:        # resets VmHWM to the current RSS
            f.write("5")
          before = status("VmRSS")
      shard.commit()
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_the_writer_streams_a_shard_in_the_memory_of_one_batch(tmp_path):
  probe = subprocess.run([sys.executable, "-c", WRITER_PROBE, str(tmp_path / "index")], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert probe.returncode == 0, probe.stderr[-2000:]
  memory = json.loads(probe.stdout.strip().splitlines()[-1])
  shard_bytes = sum(f.stat().st_size for f in (tmp_path / "index" / "shards").rglob("*"))
  assert shard_bytes > 190e6
  # A batch is 24 videos: 7.9 MB of float32 input, 2 MB written; the shard is 200 MB. Measured: 35-55 MB of growth
  # at shards of 40, 200 and 400 MB alike (XLA's and the allocator's buffers); a writer holding the shard: > 200 MB.
  assert memory["peak"] - memory["before"] < 100e6, memory


@pytest.mark.parametrize("storage", ["float16", "int4"])
def test_stage2_scores_exactly_the_K_best_linear_videos_and_the_Kth_can_come_first(tmp_path, monkeypatch, storage):
  rng = np.random.default_rng(5)
  g, t, d, r, k = 40, 4, 16, 2, 6
  videos = random_videos(rng, g, t, d, r)
  query = random_query(rng, "text", t, d)
  weights = {"video": 1.0, "frame": 1.0, "spatial": 5.0}
  before = reference_scores("text", videos, query)
  linear = before["video"] + before["frame"]
  order = np.argsort(-linear)
  kth = int(order[k - 1])
  videos["regions"][kth] = query.words[0][:r]            # its regions are the query's words: spatial level near 1
  after = reference_scores("text", videos, query)
  combined = after["video"] + after["frame"] + 5.0 * after["spatial"]
  assert int(np.argmax(combined)) == kth and np.sort(-linear)[k] - np.sort(-linear)[k - 1] > 1e-3   # premises

  index = index_search.Index(write_synthetic(tmp_path / "index", "text", videos, 10, weights, storage))
  scored = []
  stage2 = index._stage2                                                           # pylint: disable=protected-access
  monkeypatch.setattr(index, "_stage2", lambda rows, q, *files: scored.append(np.array(rows)) or stage2(rows, q,
                                                                                                       *files))
  rows, _, _ = index.rank(query, top_k=3, candidates=k)
  assert rows[0] == kth
  assert len(scored) == 1 and sorted(scored[0]) == sorted(order[:k])           # K videos, each once
  scored.clear()
  rows, _, _ = index.rank(query, top_k=3, candidates=k - 1)
  assert kth not in rows and sorted(scored[0]) == sorted(order[:k - 1])
  assert index.rank(query, top_k=1, candidates=None)[0][0] == kth               # the exhaustive search finds it


@pytest.mark.parametrize("task", ["text", "audio"])
def test_int4_ranks_the_candidates_on_the_high_plane_and_reads_the_low_plane_of_the_best_only(tmp_path, monkeypatch,
                                                                                               task):
  rng = np.random.default_rng(8)
  g, refine = 60, 25
  videos = random_videos(rng, g, t=5, d=32, r=3)
  path = write_synthetic(tmp_path / "index", task, videos, 16, storage="int4")
  index = index_search.Index(path)
  query = random_query(rng, task, 5, 32)
  exhaustive_rows, exhaustive, _ = index.rank(query, top_k=g, candidates=None)        # every video, exact int4
  reads = []
  read = index.store.read
  monkeypatch.setattr(index.store, "read",
                      lambda rows, names: reads.append((len(rows), set(names))) or read(rows, names))
  monkeypatch.setattr(index_search, "REFINE", refine)
  rows, combined, _ = index.rank(query, top_k=5, candidates=g)
  coarse_reads = [n for n, names in reads if not any(name.endswith("_low") for name in names)]
  exact_reads = [(n, names) for n, names in reads if any(name.endswith("_low") for name in names)]
  assert sum(coarse_reads) == g and sum(n for n, _ in exact_reads) == refine     # the low planes of `refine` videos
  assert all({f"{f}_low" for f in ("frames", "regions") if f in names} <= names for _, names in exact_reads)
  # The best are scored on their exact codes: the exhaustive search's top 5 and its scores.
  np.testing.assert_array_equal(rows, exhaustive_rows[:5])
  np.testing.assert_allclose(combined, exhaustive[:5], atol=1e-5)
  # The planes decoded by NumPy: the high plane alone ranks (and scores) differently from both planes.
  high = {**videos, **{f: read_decoded(path, f, "coarse", 32) for f in ("frames", "regions")}}
  coarse = reference_scores(task, high, query)["combined"]
  assert not np.allclose(coarse[exhaustive_rows], exhaustive, atol=1e-3)


def test_rows_are_read_in_any_order_into_arrays_jax_can_use_in_place(tmp_path):
  rng = np.random.default_rng(9)
  videos = random_videos(rng, g=12, t=3, d=16, r=2)
  reader = store.IndexReader(write_synthetic(tmp_path / "index", "text", videos, 5, storage="float16"))
  rows = np.array([11, 0, 5, 4, 6, 10])                     # three shards, runs of consecutive rows, unsorted
  data = reader.read(rows, ("regions", "mask"))
  assert np.array_equal(data["mask"], videos["mask"][rows])
  unit = videos["regions"] / np.maximum(np.linalg.norm(videos["regions"], axis=-1, keepdims=True), 1e-12)
  np.testing.assert_allclose(data["regions"].astype(np.float32)[data["mask"]], unit[rows][videos["mask"][rows]],
                             atol=1e-3)
  assert all(value.ctypes.data % 64 == 0 for value in data.values())   # XLA:CPU's alignment: no copy per block


# --- damaged indexes ----------------------------------------------------------------------------------------
# The clean index: 30 videos in shards of 8, 8, 7, 7 (index rows 0-7, 8-15, 16-22, 23-29), int4.


@pytest.fixture(scope="module")
def clean_index(tmp_path_factory):
  rng = np.random.default_rng(7)
  path = tmp_path_factory.mktemp("clean") / "index"
  write_synthetic(path, "text", random_videos(rng, g=30, t=5, d=16, r=2), 8, storage="int4")
  return str(path)


def damaged_copy(clean, tmp_path, damage):
  path = str(tmp_path / "damaged")
  shutil.copytree(clean, path)
  damage(path)
  return path


def truncate(name, cut):
  return lambda path: os.truncate(os.path.join(path, name), os.path.getsize(os.path.join(path, name)) - cut)


def overwrite(name, offset, data):
  def damage(path):
    with open(os.path.join(path, name), "r+b") as f:
      f.seek(offset if offset >= 0 else os.path.getsize(os.path.join(path, name)) + offset)
      f.write(data)
  return damage


def data_offset(file) -> int:
  """Where a .npy file's data starts, from the .npy format."""
  with open(file, "rb") as f:
    version = np.lib.format.read_magic(f)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    return f.tell()


def flip_middle_byte(name):
  """Inverts one byte halfway through the data of `name` (past a .npy file's header); returns the damage."""
  def damage(path):
    file = os.path.join(path, name)
    start = data_offset(file) if name.endswith(".npy") else 0
    at = start + (os.path.getsize(file) - start) // 2
    with open(file, "r+b") as f:
      byte = os.pread(f.fileno(), 1, at)
      os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), at)
  return damage


def nan_row(name, row, row_bytes):
  def damage(path):
    overwrite(name, data_offset(os.path.join(path, name)) + row * row_bytes,
              np.full(row_bytes // 4, np.nan, np.float32).tobytes())(path)
  return damage


def reseal(path):
  """Rewrites every checksum of the index at `path` from its bytes as they are now, as if it had been written so,
  from the format (layout.py, manifest.py) with zlib's CRC32: a CRC32 of each file; per shard, of its rows of
  pooled.npy and, in rows_crc32.npy, of each row of its arrays (sorted by name) and of each metadata line; of
  the manifest's canonical JSON."""
  manifest_file = os.path.join(path, "manifest.json")
  manifest = json.loads(open(manifest_file, "rb").read())
  del manifest["crc32"]
  pooled = open(os.path.join(path, "pooled.npy"), "rb").read()
  pooled_start = data_offset(os.path.join(path, "pooled.npy"))
  row_bytes = manifest["layout"]["pooled"] * manifest["layout"]["dim"] * 4
  for shard in manifest["shards"]:
    folder = os.path.join(path, "shards", shard["name"])
    arrays = sorted(n for n in shard["files"] if n not in ("metadata_offsets.npy", "rows_crc32.npy", "metadata.jsonl"))
    columns = [[zlib.crc32(row.tobytes()) for row in np.load(os.path.join(folder, n))] for n in arrays]
    offsets = np.load(os.path.join(folder, "metadata_offsets.npy"))
    lines = open(os.path.join(folder, "metadata.jsonl"), "rb").read()
    columns.append([zlib.crc32(lines[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    table = os.path.join(folder, "rows_crc32.npy")
    header = open(table, "rb").read()[:data_offset(table)]
    with open(table, "wb") as f:
      f.write(header + np.array(columns, np.uint32).T.tobytes())
    for name in shard["files"]:
      data = open(os.path.join(folder, name), "rb").read()
      shard["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    start = pooled_start + shard["offset"] * row_bytes
    shard["pooled_crc32"] = zlib.crc32(pooled[start:start + shard["count"] * row_bytes])
  body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
  with open(manifest_file, "w") as f:
    json.dump({**manifest, "crc32": zlib.crc32(body)}, f)


def one_line_naming(message: str, file: str):
  assert "\n" not in message.strip() and file in message and "Traceback" not in message, message
  return message


def verify(capsys, path) -> tuple[int, list[str]]:
  """`varcmp index --verify PATH`: its exit status and its stderr lines but the progress bar's."""
  rc = cli.main(["index", "--verify", path])
  lines = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
  return rc, [line for line in lines if line and not line.startswith("verify:")]


def edit_manifest(edit):
  def damage(path):
    file = os.path.join(path, "manifest.json")
    manifest = json.loads(open(file).read())
    edit(manifest)
    with open(file, "w") as f:
      json.dump(manifest, f)
  return damage


def test_the_checksums_are_the_formats(clean_index, tmp_path, capsys):
  # Resealing the clean index from the format's description rewrites the same bytes: the writer wrote the format.
  path = damaged_copy(clean_index, tmp_path, reseal)
  read = lambda root, file: open(os.path.join(root, file), "rb").read()
  assert json.loads(read(path, "manifest.json")) == json.loads(read(clean_index, "manifest.json"))
  for file in [f"shards/{s:06d}/rows_crc32.npy" for s in range(4)]:
    assert read(path, file) == read(clean_index, file), file
  assert verify(capsys, path) == (0, [])


# name: damage, the file named, the error opening the index gives (search, serve, the page)
DAMAGES = {
    "truncated shard array": (truncate("shards/000001/regions.npy", 10), "shards/000001/regions.npy",
                              store.IndexDamaged),
    "truncated pooled.npy": (truncate("pooled.npy", 200), "pooled.npy", store.IndexDamaged),
    "truncated .npy header": (truncate("shards/000002/mask.npy", 140), "shards/000002/mask.npy", store.IndexDamaged),
    "zeroed .npy header": (overwrite("shards/000002/frames.npy", 0, b"\0" * 20), "shards/000002/frames.npy",
                           store.IndexDamaged),
    "missing shard": (lambda p: shutil.rmtree(os.path.join(p, "shards/000003")), "shards/000003",
                      store.IndexUnreadable),
    "empty manifest": (lambda p: open(os.path.join(p, "manifest.json"), "w").close(), "manifest.json",
                       store.IndexDamaged),
    "manifest edited, still JSON": (edit_manifest(lambda m: m["levels"].update(spatial=5.0)), "manifest.json",
                                    store.IndexDamaged),
    "rewritten metadata": (overwrite("shards/000000/metadata.jsonl", 0, b"xx"), "shards/000000/metadata.jsonl",
                           store.IndexDamaged),
    "NaN pooled row": (nan_row("pooled.npy", 3, 2 * 16 * 4), "pooled.npy", store.IndexDamaged),
    "NaN weights row": (nan_row("shards/000001/weights.npy", 2, 5 * 4), "shards/000001/weights.npy",
                        store.IndexDamaged),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_index_is_one_line_naming_its_file(clean_index, tmp_path, capsys, name):
  damage, file, error = DAMAGES[name]
  path = damaged_copy(clean_index, tmp_path, damage)
  rc, problems = verify(capsys, path)
  assert rc == 1 and problems
  for line in problems:
    assert line.startswith("varcmp index: ") and os.path.join(path, file) in line and "rebuild" in line, line
  with pytest.raises(store.StoreError) as opened:
    index_search.Index(path)
  assert type(opened.value) is error
  one_line_naming(str(opened.value), os.path.join(path, file))
  with pytest.raises(SystemExit) as searched:
    search.main(["--index", path, "--text", "a red car"])
  assert str(searched.value.code).startswith("varcmp search: ")
  one_line_naming(str(searched.value.code), os.path.join(path, file))


SHARD_FILES = ["frames.npy", "frames_low.npy", "frames_scale.npy", "regions.npy", "regions_low.npy",
               "regions_scale.npy", "weights.npy", "prior.npy", "times.npy", "mask.npy", "metadata.jsonl",
               "metadata_offsets.npy", "rows_crc32.npy"]
CODE_FILES = ("frames.npy", "frames_low.npy", "regions.npy", "regions_low.npy")     # int4's codes: checked per row


@pytest.mark.parametrize("name", [f"shards/000001/{f}" for f in SHARD_FILES] + ["pooled.npy"])
def test_a_flipped_byte_in_any_file_is_one_line_naming_it(clean_index, tmp_path, capsys, name):
  path = damaged_copy(clean_index, tmp_path, flip_middle_byte(name))
  file = os.path.join(path, name)
  rc, problems = verify(capsys, path)
  assert rc == 1 and len(problems) == 1 and file in problems[0] and "checksum" in problems[0], problems
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  if os.path.basename(name) not in CODE_FILES:     # the small files and pooled.npy: checked when the index opens
    with pytest.raises(store.IndexDamaged) as opened:
      index_search.Index(path)
    one_line_naming(str(opened.value), file)
    assert "rebuild it: `varcmp index" in str(opened.value)
    return
  # The codes: the row is checked when a query reads it (here every row: every video is ranked and returned).
  index = index_search.Index(path)
  with pytest.raises(store.IndexDamaged) as searched:
    index.search(query, top_k=30, candidates=None)
  one_line_naming(str(searched.value), file)
  row_bytes = np.load(file, mmap_mode="r")[0].nbytes
  local = (os.path.getsize(file) - data_offset(file)) // 2 // row_bytes
  assert f"row {local} (index row {8 + local}) does not match its checksum" in str(searched.value)


def test_bytes_changed_after_the_index_opened_are_found_when_read(clean_index, tmp_path):
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  index = index_search.Index(path)
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  index.search(query, top_k=30, candidates=None)
  caption = open(os.path.join(path, "shards/000002/metadata.jsonl"), "rb").read().index(b'"c17"')
  changes = {"shards/000002/weights.npy": flip_middle_byte("shards/000002/weights.npy"),
             "shards/000002/times.npy": flip_middle_byte("shards/000002/times.npy"),
             "shards/000002/metadata.jsonl": overwrite("shards/000002/metadata.jsonl", caption, b'"c71"')}  # JSON
  for name, change in changes.items():
    change(path)
    with pytest.raises(store.IndexDamaged) as searched:
      index.search(query, top_k=30, candidates=None)
    one_line_naming(str(searched.value), os.path.join(path, name))
    shutil.copy(os.path.join(clean_index, name), os.path.join(path, name))


def test_a_file_cut_short_after_the_index_opened_is_damaged_when_read(clean_index, tmp_path):
  # Each row read checks that the file still holds it: the row checksums and the metadata line offsets.
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  index = index_search.Index(path)
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  index.search(query, top_k=30, candidates=None)
  for name in ("shards/000002/rows_crc32.npy", "shards/000002/metadata_offsets.npy"):
    file = os.path.join(path, name)
    with open(file, "r+b") as f:
      f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(store.IndexDamaged) as searched:
      index.search(query, top_k=30, candidates=None)
    one_line_naming(str(searched.value), file)
    assert "truncated" in str(searched.value)
    shutil.copy(os.path.join(clean_index, name), file)


@pytest.mark.parametrize("array,row_bytes", [("pooled.npy", 2 * 16 * 4), ("shards/000001/weights.npy", 5 * 4)])
def test_non_finite_rows_written_with_their_checksums_are_found_by_the_scans(clean_index, tmp_path, capsys, array,
                                                                             row_bytes):
  # Index row 10 (row 2 of shard 000001) made NaN, and every checksum rewritten to match: as if written so.
  row = 10 if array == "pooled.npy" else 2
  path = damaged_copy(clean_index, tmp_path, lambda p: (nan_row(array, row, row_bytes)(p), reseal(p)))
  rc, problems = verify(capsys, path)
  assert rc == 1 and len(problems) == 1, problems
  assert os.path.join(path, array) in problems[0] and "checksum" not in problems[0]
  assert "row 2 of shard 000001 (index row 10) holds non-finite values" in problems[0]
  index = index_search.Index(path)                      # the checksums match: opening cannot tell
  with pytest.raises(store.IndexDamaged) as ranked:     # never a silent drop out of the ranking
    index.rank(random_query(np.random.default_rng(0), "text", 5, 16), top_k=5, candidates=None)
  one_line_naming(str(ranked.value), path)
  assert ("pooled.npy: row 10 holds non-finite" if array == "pooled.npy" else
          "index row 10 gives a non-finite") in str(ranked.value)


def test_a_file_deleted_while_the_index_is_open_is_unreadable_not_damaged(clean_index, tmp_path):
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  index = index_search.Index(path)
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  for name in ("shards/000001/regions.npy", "shards/000002/metadata.jsonl", "shards/000003/rows_crc32.npy",
               "pooled.npy"):
    os.rename(os.path.join(path, name), os.path.join(path, name + ".away"))
    with pytest.raises(store.IndexUnreadable) as searched:
      index.search(query, top_k=30, candidates=None)
    message = one_line_naming(str(searched.value), os.path.join(path, name))
    assert "missing" in message and "rebuild the index: `varcmp index" in message
    os.rename(os.path.join(path, name + ".away"), os.path.join(path, name))
  assert len(index.search(query, top_k=30, candidates=None)) == 30


@pytest.mark.parametrize("name,when", [("shards/000001/weights.npy", "open"), ("shards/000001/regions.npy", "query"),
                                       ("pooled.npy", "query"), ("manifest.json", "open")])
def test_a_file_the_process_may_not_read_is_a_permission_problem_not_damage(clean_index, tmp_path, monkeypatch,
                                                                            name, when):
  # What the operating system answers a process that may not read the file (a root process is never told so).
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  denied = os.path.join(path, name)
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  index = index_search.Index(path) if when == "query" else None
  real_open, real_os_open, real_memmap = open, os.open, np.memmap

  def refuse(file):
    if os.fspath(file) == denied:
      raise PermissionError(13, "Permission denied", denied)

  monkeypatch.setattr("builtins.open", lambda file, *a, **k: refuse(file) or real_open(file, *a, **k))
  monkeypatch.setattr(os, "open", lambda file, *a, **k: refuse(file) or real_os_open(file, *a, **k))
  monkeypatch.setattr(np, "memmap", lambda file, *a, **k: refuse(file) or real_memmap(file, *a, **k))
  with pytest.raises(store.IndexUnreadable) as refused:
    if when == "open":
      index_search.Index(path)
    else:
      index.search(query, top_k=30, candidates=None)
  problem = one_line_naming(str(refused.value), denied).replace(denied, "FILE")
  assert "permission denied" in problem and "rebuild" not in problem and "damaged" not in problem, problem


CHMOD_PROBE = textwrap.dedent("""
    import json, sys
    from varcmp_jax.index import errors, search
    try:
      search.Index(sys.argv[1])
      print(json.dumps(["opened", ""]))
    except errors.StoreError as e:
      print(json.dumps([type(e).__name__, str(e)]))
""")


def test_a_chmod_000_shard_file_is_named_as_a_permission_problem(clean_index, tmp_path):
  # The real thing: a file of mode 000, opened by a process that may not read it. Root reads it whatever its mode,
  # so as root the index is opened by a child process running as `nobody` (where one can be made so).
  folder = tempfile.mkdtemp(prefix="varcmp_chmod_")
  try:
    path = os.path.join(folder, "index")
    shutil.copytree(clean_index, path)
    for parent, dirs, files in os.walk(folder):
      for name in dirs + files:
        os.chmod(os.path.join(parent, name), 0o755 if name in dirs else 0o644)
    os.chmod(folder, 0o755)
    denied = os.path.join(path, "shards/000001/times.npy")
    os.chmod(denied, 0)
    as_nobody = {}
    if os.geteuid() == 0:
      nobody = pwd.getpwnam("nobody").pw_uid
      as_nobody = {"user": nobody, "group": nobody, "extra_groups": []}
      readable = subprocess.run(["cat", denied], capture_output=True, **as_nobody).returncode == 0
    else:
      readable = os.access(denied, os.R_OK)
    if readable:
      pytest.skip("this process and its children read a file of mode 000")
    try:
      probe = subprocess.run([sys.executable, "-c", CHMOD_PROBE, path], capture_output=True, text=True, timeout=300,
                             cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "HOME": folder}, **as_nobody)
    except PermissionError as e:
      pytest.skip(f"`nobody` may not run this checkout's Python ({e})")
    assert probe.returncode == 0, probe.stderr[-2000:]
    kind, message = json.loads(probe.stdout.strip().splitlines()[-1])
    assert kind == "IndexUnreadable", (kind, message)
    problem = one_line_naming(message, denied).replace(denied, "FILE")
    assert "permission denied" in problem and "rebuild" not in problem, problem
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def test_append_checks_what_it_builds_on_before_it_writes(clean_index, tmp_path):
  manifest = json.loads(open(os.path.join(clean_index, "manifest.json")).read())
  header = {key: manifest[key] for key in store.HEADER_KEYS}
  damages = {"deleted shard": (lambda p: shutil.rmtree(os.path.join(p, "shards/000001")), "shards/000001"),
             "truncated shard": (truncate("shards/000002/regions_low.npy", 7), "shards/000002/regions_low.npy"),
             "checksum-bad shard": (flip_middle_byte("shards/000003/regions.npy"), "shards/000003/regions.npy"),
             "damaged pooled.npy": (flip_middle_byte("pooled.npy"), "pooled.npy")}
  for name, (damage, file) in damages.items():
    path = damaged_copy(clean_index, tmp_path / name.replace(" ", "_"), damage)
    before = {p: p.read_bytes() for p in pathlib.Path(path).rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(store.StoreError) as refused:
      store.IndexWriter(path, header, append=True)
    message = one_line_naming(str(refused.value), os.path.join(path, file))
    assert message.endswith("nothing was written") and "rebuild" in message, message
    after = {p: p.read_bytes() for p in pathlib.Path(path).rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before, name
  with store.IndexWriter(damaged_copy(clean_index, tmp_path / "clean", lambda p: None), header, append=True) as writer:
    assert writer.videos == 30                       # the clean index opens for appending


def test_an_index_of_another_format_is_refused(clean_index, tmp_path):
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
  with open(os.path.join(path, "manifest.json"), "w") as f:
    json.dump({**manifest, "format": 3}, f)
  with pytest.raises(store.StoreError, match="format 3: written by another varcmp version"):
    index_search.Index(path)


def test_a_clean_index_verifies(clean_index, capsys):
  assert cli.main(["index", "--verify", clean_index]) == 0
  assert "30 videos in 4 shards" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["index", "--verify", clean_index, "--out", "x"])     # --verify takes no build arguments


def test_non_finite_embeddings_are_never_written(tmp_path):
  rng = np.random.default_rng(8)
  videos = random_videos(rng, g=12, t=4, d=16, r=2)
  videos["regions"][7, 0, 1, 3] = np.nan                  # a valid snippet (every video has snippet 0)
  with pytest.raises(store.StoreError, match=r"video v7: non-finite values .* in its regions;"):
    write_synthetic(tmp_path / "index", "text", videos, 5, storage="int4")
  manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
  # Three shards of 4 videos: the first is committed and intact, the second (videos 4-7) never was.
  assert manifest["videos"] == 4 and store.check(str(tmp_path / "index"), manifest, full=True) == []
