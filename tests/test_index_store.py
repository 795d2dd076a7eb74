"""The index's storage (index.codec, index.store): codes against NumPy decoding, byte-sized shards, the writer's
memory, stage 2's candidate set, and damaged indexes (truncated, corrupted, NaN rows) as one-line errors.

Synthetic indexes are written through the index's own writer (test_index.write_synthetic); the references are
NumPy written from the formulas (test_index.reference_scores) or from the file format.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

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
  # prior, times, mask, its metadata offset and line.
  expected = 2 * 16 * 4 + 6 * (8 + 2) + 6 * 3 * (8 + 2) + 6 * 4 * 2 + 6 * 2 * 4 + 6 + 8 + store.METADATA_BYTES
  assert store.video_bytes(layout) == expected
  headers = 11 * 128          # a shard's 10 .npy files and metadata_offsets.npy, 128-byte headers here
  assert store.videos_per_shard(layout, headers + 11 * expected - 1) == 10
  assert store.videos_per_shard(layout, headers + 11 * expected) == 11 and store.videos_per_shard(layout, 5) == 1
  float16 = store.layout_of(snippets=6, dim=16, pooled=2, regions=0, storage="float16")
  assert store.video_bytes(float16) == 2 * 16 * 4 + 6 * 16 * 2 + 6 * 4 * 2 + 6 * 2 * 4 + 6 + 8 + store.METADATA_BYTES


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


def nan_row(name, row, row_bytes):
  def damage(path):
    offset = store._npy_layout(os.path.join(path, name))[0]                   # pylint: disable=protected-access
    overwrite(name, offset + row * row_bytes, np.full(row_bytes // 4, np.nan, np.float32).tobytes())(path)
  return damage


def one_line_naming(message: str, file: str):
  assert "\n" not in message.strip() and file in message and "Traceback" not in message, message
  return message


def verify(capsys, path) -> tuple[int, list[str]]:
  """`varcmp index --verify PATH`: its exit status and its stderr lines but the progress bar's."""
  rc = cli.main(["index", "--verify", path])
  lines = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
  return rc, [line for line in lines if line and not line.startswith("verify:")]


# name: damage, the file named, whether opening the index (search, serve) already refuses it
DAMAGES = {
    "truncated shard array": (truncate("shards/000001/regions.npy", 10), "shards/000001/regions.npy", True),
    "truncated pooled.npy": (truncate("pooled.npy", 200), "pooled.npy", True),
    "truncated .npy header": (truncate("shards/000002/mask.npy", 140), "shards/000002/mask.npy", True),
    "zeroed .npy header": (overwrite("shards/000002/frames.npy", 0, b"\0" * 20), "shards/000002/frames.npy", True),
    "missing shard": (lambda p: shutil.rmtree(os.path.join(p, "shards/000003")), "shards/000003", True),
    "empty manifest": (lambda p: open(os.path.join(p, "manifest.json"), "w").close(), "manifest.json", True),
    "flipped bytes": (overwrite("shards/000002/regions.npy", -20, b"\x55\x55"), "shards/000002/regions.npy", False),
    "rewritten metadata": (overwrite("shards/000000/metadata.jsonl", 0, b"xx"), "shards/000000/metadata.jsonl", False),
    "NaN pooled row": (nan_row("pooled.npy", 3, 2 * 16 * 4), "pooled.npy", False),
    "NaN weights row": (nan_row("shards/000001/weights.npy", 2, 5 * 4), "shards/000001/weights.npy", False),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_index_is_one_line_naming_its_file(clean_index, tmp_path, capsys, name):
  damage, file, refused_on_open = DAMAGES[name]
  path = damaged_copy(clean_index, tmp_path, damage)
  rc, problems = verify(capsys, path)
  assert rc == 1 and problems
  for line in problems:
    assert line.startswith("varcmp index: ") and os.path.join(path, file) in line and "rebuild" in line, line
  if refused_on_open:
    with pytest.raises(store.StoreError) as opened:
      index_search.Index(path)
    one_line_naming(str(opened.value), os.path.join(path, file))
    with pytest.raises(SystemExit) as searched:
      search.main(["--index", path, "--text", "a red car"])
    one_line_naming(str(searched.value.code), os.path.join(path, file))
    return
  # Opening checks sizes only; what the bytes hold is found by --verify, or by the search that reads them.
  index = index_search.Index(path)
  query = random_query(np.random.default_rng(0), "text", 5, 16)
  if name.startswith("NaN"):      # never a silent drop out of the ranking
    with pytest.raises(store.StoreError) as ranked:
      index.rank(query, top_k=5, candidates=None)
    one_line_naming(str(ranked.value), path)
    assert ("pooled.npy: row 3" if "pooled" in name else "index row 10 gives a non-finite") in str(ranked.value)
  if name == "rewritten metadata":
    with pytest.raises(store.StoreError) as read:
      index.store.metadata([0])
    one_line_naming(str(read.value), os.path.join(path, file))


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


def test_an_index_of_another_format_is_refused(clean_index, tmp_path):
  path = damaged_copy(clean_index, tmp_path, lambda p: None)
  manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
  with open(os.path.join(path, "manifest.json"), "w") as f:
    json.dump({**manifest, "format": 1}, f)
  with pytest.raises(store.StoreError, match="format 1: written by another varcmp version"):
    index_search.Index(path)
