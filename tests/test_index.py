"""The on-disk index and its two-stage search (varcmp_jax.index), against NumPy written from the formulas, the
in-memory gallery search, the exhaustive search, a killed job (mid-shard and at a shard's final rename), --append,
byte-sized shards, the commands a damaged index names, and a memory bound.

Synthetic indexes are written through the index's own writer (index.levels.index_arrays -> store.IndexWriter),
as benchmarks/search_scale.py writes them; model indexes through `varcmp index` on the tiny runs of
search_fixtures.
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

import search_fixtures as fixtures
from varcmp_jax import cli, evaluate, search
from varcmp_jax import config as config_lib
from varcmp_jax.alignment.embeddings import AudioEmbeddings, TextEmbeddings, VideoEmbeddings
from varcmp_jax.index import build, levels, store
from varcmp_jax.index import search as index_search

REPO = pathlib.Path(__file__).resolve().parents[1]
BETA, TAU = 0.5, 0.1


# --- a synthetic index and its NumPy reference -------------------------------------------------------------


def random_videos(rng, g, t, d, r):
  valid = rng.integers(1, t + 1, g)
  valid[:3] = t, 1, 2
  mask = np.arange(t)[None] < valid[:, None]
  frames = rng.standard_normal((g, t, d)).astype(np.float32)
  frames[~mask] = np.nan              # padding must never reach a score
  return {"frames": frames, "regions": rng.standard_normal((g, t, r, d)).astype(np.float32),
          "prior": rng.uniform(0, 1, (g, t)).astype(np.float32), "mask": mask}


def write_synthetic(path, task, videos, shard_size, levels_weights=None, storage="float16"):
  config = ml_collections.ConfigDict({"prior": {"source": "head"}, "weighting": {"beta": BETA, "tau": TAU},
                                      "eval": {"chunk_size": 4}})
  weights = levels_weights or {name: 1.0 for name in config_lib.TASK_LEVELS[task]}
  header = {"run": None, "config": config.to_dict(), "task": task, "levels": weights,
            "pooled_levels": list(levels.POOLED_LEVELS[task])}
  g, t = videos["mask"].shape
  video = VideoEmbeddings(frames=videos["frames"], regions=videos["regions"], mask=videos["mask"],
                          anomaly=videos["prior"])
  prepare = jax.jit(lambda video: levels.index_arrays(video, *levels.snippet_weights(video, config), task, storage))
  arrays = jax.device_get(prepare(video))
  arrays["times"] = np.broadcast_to(np.stack([np.arange(t), np.arange(t) + 1], -1).astype(np.float32), (g, t, 2))
  with store.IndexWriter(str(path), header, storage=storage) as writer:
    source = writer.add_source({"records": "synthetic", "split": "test", "fingerprint": "0", "videos": g,
                                "slices": -(-g // shard_size)}, False)
    for i in writer.pending_slices(source):
      lo, hi = store.slice_bounds(g, -(-g // shard_size), i)
      shard = writer.shard(source, i, lo, hi)
      shard.add({k: v[lo:hi] for k, v in arrays.items()},
                [{"video": f"v{j}", "caption": f"c{j}", "label": 0, "duration": float(t), "event": [-1.0, -1.0]}
                 for j in range(lo, hi)])
      shard.commit()
  return str(path)


def unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def reference_scores(task, videos, query) -> dict[str, np.ndarray]:
  """Every level and the combined score (weights 1) of every video, by loops over the formulas of SPEC 2."""
  out = {}
  for g, mask in enumerate(videos["mask"]):
    f, r = videos["frames"][g][mask].astype(np.float64), videos["regions"][g][mask].astype(np.float64)
    prior = videos["prior"][g][mask].astype(np.float64)
    soft = np.exp((prior - prior.max()) / TAU)
    w = (1 - BETA) / mask.sum() + BETA * soft / soft.sum()
    if task == "text":
      s, words = unit(query.sentence[0].astype(np.float64)), unit(query.words[0][query.word_mask[0]].astype(np.float64))
      cos = np.einsum("tkd,ld->tkl", unit(r), words)
      scores = {"video": unit(f.mean(0)) @ s, "frame": np.sum(w * (unit(f) @ s)),
                "spatial": np.sum(w * 0.5 * (cos.max(1).mean(-1) + cos.max(2).mean(-1)))}
    else:
      u, both = query.segments[0].astype(np.float64), query.mask[0][mask]
      cos_t = np.sum(unit(f) * unit(u[mask]), -1)
      scores = {"semantic": unit(f.mean(0)) @ unit(u[query.mask[0]].mean(0)),
                "temporal": np.sum((w * cos_t)[both]),
                "spatial": np.sum((w * np.einsum("tkd,td->tk", unit(r), unit(u[mask])).max(1))[both])}
    for name, value in scores.items():
      out.setdefault(name, []).append(value)
  out = {k: np.asarray(v) for k, v in out.items()}
  out["combined"] = sum(out.values())
  return out


def random_query(rng, task, t, d, words=5):
  if task == "text":
    return TextEmbeddings(sentence=rng.standard_normal((1, d)).astype(np.float32),
                          words=rng.standard_normal((1, 77, d)).astype(np.float32),
                          word_mask=np.arange(77)[None] < words)
  mask = np.arange(t)[None] < t - 1
  return AudioEmbeddings(segments=rng.standard_normal((1, t, d)).astype(np.float32), mask=mask)


@pytest.mark.parametrize("task", ["text", "audio"])
def test_two_stage_equals_exhaustive_and_the_formulas_when_candidates_cover_the_index(tmp_path, task):
  rng = np.random.default_rng(0)
  videos = random_videos(rng, g=37, t=6, d=16, r=3)
  index = index_search.Index(write_synthetic(tmp_path / "index", task, videos, shard_size=10))
  assert len(index) == 37 and index.store.manifest["videos"] == 37
  assert [s["count"] for s in index.store.manifest["shards"]] == [10, 9, 9, 9]
  for _ in range(2):
    query = random_query(rng, task, 6, 16)
    reference = reference_scores(task, videos, query)
    expected = np.argsort(-reference["combined"], kind="stable")[:10]
    two_stage = index_search.Index(index.path, chunk_bytes=2048).rank(query, top_k=10, candidates=37)
    exhaustive = index.rank(query, top_k=10, candidates=None)
    np.testing.assert_array_equal(two_stage[0], exhaustive[0])
    np.testing.assert_allclose(two_stage[1], exhaustive[1], atol=1e-6)
    # float16 storage: the scores are the formulas' within float16 rounding, the order is theirs.
    np.testing.assert_array_equal(exhaustive[0], expected)
    np.testing.assert_allclose(exhaustive[1], reference["combined"][expected], atol=3e-3)
    for name, value in exhaustive[2].items():
      np.testing.assert_allclose(value, reference[name][expected], atol=2e-3, err_msg=name)


def test_stage1_alone_is_exact_when_the_stage2_levels_weigh_nothing(tmp_path):
  rng = np.random.default_rng(1)
  videos = random_videos(rng, g=30, t=5, d=8, r=2)
  path = write_synthetic(tmp_path / "index", "text", videos, 8, {"video": 1.0, "frame": 0.5, "spatial": 0.0})
  index = index_search.Index(path)
  assert not index.stage2_needed
  query = random_query(rng, "text", 5, 8)
  reference = reference_scores("text", videos, query)
  combined = reference["video"] + 0.5 * reference["frame"]
  rows, scores, per_level = index.rank(query, top_k=5, candidates=1)
  np.testing.assert_array_equal(rows, np.argsort(-combined, kind="stable")[:5])
  np.testing.assert_allclose(scores, combined[rows], atol=2e-3)
  np.testing.assert_allclose(per_level["spatial"], reference["spatial"][rows], atol=2e-3)   # still reported


def test_recall_on_planted_ground_truths(tmp_path):
  """benchmarks/search_scale.py at a small size: planted truths found, two-stage top 10 = exhaustive top 10."""
  out = tmp_path / "scale.json"
  subprocess.run([sys.executable, str(REPO / "benchmarks" / "search_scale.py"), "--videos", "4000", "--snippets",
                  "8", "--dim", "32", "--regions", "4", "--words", "6", "--queries", "6", "--candidates", "100",
                  "--related", "30", "--shard-size", "1500", "--out", str(tmp_path / "index"), "--json", str(out)],
                 check=True, capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  for key in ("index_build_s", "index_bytes", "bytes_per_video", "query_p50_s", "query_p95_s", "exhaustive_p50_s",
              "recall_at_10", "recall_at_10_vs_fp32"):
    assert result[key] is not None and result[key] >= 0, key
  # At D = 32 `auto` keeps float16: the two-stage top 10 is the exhaustive one and the float32 reference's.
  assert result["storage"] == "float16" and result["recall_at_10"] == result["recall_at_10_vs_fp32"] == 1.0
  assert result["planted_recall_at_10"] == 1.0 and result["planted_recall_at_1"] >= 0.8
  assert result["index_bytes"] > 4000 * 8 * 5 * 32 * 2      # frames + regions in float16 at least
  assert result["bytes_per_video"] == result["index_bytes"] / 4000


def test_a_second_writer_is_refused(tmp_path):
  header = {"run": None, "config": {}, "task": "text", "levels": {"video": 1.0}, "pooled_levels": ["video", "frame"]}
  with store.IndexWriter(str(tmp_path / "index"), header, storage="float16"):
    with pytest.raises(store.StoreError, match="another `varcmp index` .pid"):
      store.IndexWriter(str(tmp_path / "index"), header)
  with pytest.raises(store.StoreError, match="not an index"):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    store.IndexWriter(str(tmp_path / "other"), header, storage="float16")


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from varcmp_jax.alignment.embeddings import TextEmbeddings
    from varcmp_jax.index import search

    def status(key):
      with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    index = search.Index(sys.argv[1], chunk_bytes=4 << 20)
    rng = np.random.default_rng(0)
    query = TextEmbeddings(sentence=rng.standard_normal((1, 512)).astype(np.float32),
                           words=rng.standard_normal((1, 8, 512)).astype(np.float32), word_mask=np.ones((1, 8), bool))
    index.search(query, 10, 100), index.search(query, 10, None)       # compile first
    with open("/proc/self/clear_refs", "w") as f:                      # resets VmHWM to the current RSS
      f.write("5")
    before = status("VmRSS")
    index.search(query, 10, 100), index.search(query, 10, None)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_search_memory_stays_far_below_the_index_size(tmp_path):
  rng = np.random.default_rng(2)
  g, t, d = 40_000, 2, 512
  videos = {"frames": rng.standard_normal((g, t, d), dtype=np.float32),
            "regions": rng.standard_normal((g, t, 1, d), dtype=np.float32),
            "prior": rng.uniform(0, 1, (g, t)).astype(np.float32), "mask": np.ones((g, t), bool)}
  path = write_synthetic(tmp_path / "index", "text", videos, shard_size=10_000)
  del videos
  index_bytes = sum(f.stat().st_size for f in (tmp_path / "index").rglob("*") if f.is_file())
  pooled_bytes = (tmp_path / "index" / "pooled.npy").stat().st_size
  assert index_bytes > 200e6 and pooled_bytes > 80e6
  probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, path], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert probe.returncode == 0, probe.stderr[-2000:]
  memory = json.loads(probe.stdout.strip().splitlines()[-1])
  grown = memory["peak"] - memory["before"]
  # Two-stage and exhaustive over 245 MB (82 MB of pooled rows) in windows of 4 MiB.
  assert grown < 40e6, memory


# --- `varcmp index` on a model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A tiny text run (loaded once, so its jitted encoders compile once), 20 planted records and 6 more."""
  from varcmp_jax import trained
  root = tmp_path_factory.mktemp("text_run")
  config = fixtures.tiny_config("text")
  trainer, params = fixtures.save_run(str(root / "run"), config)
  texts = fixtures.captions(20)
  fixtures.write_records(root / "records", fixtures.planted_text_records(trainer, params, texts))
  extra = fixtures.captions(6, offset=20)
  fixtures.write_records(root / "extra", fixtures.planted_text_records(trainer, params, extra, seed=1, name="extra"))
  run = trained.Trained(config, trainer, params, 1, str(root / "run"))     # what trained.load restores
  return {"dir": str(root / "run"), "run": run, "encoder": search.QueryEncoder(run), "records": str(root / "records"),
          "extra": str(root / "extra"), "texts": texts, "extra_texts": extra}


def index_args(text_run, out, records=None, *more):
  return ["--workdir", text_run["dir"], "--records", records or text_run["records"], "--out", str(out),
          "--shard-size", "5", *more]


def build_index(text_run, out, records=None, append=False) -> dict:
  return build.build(text_run["run"], records or text_run["records"], str(out), "test", append, shard_size=5)


def test_index_search_agrees_with_the_gallery_search(text_run, tmp_path, capsys):
  out = tmp_path / "index"
  assert cli.main(["index", *index_args(text_run, out)]) == 0
  assert "20 videos (20 added" in capsys.readouterr().out
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["run"] == {"workdir": os.path.realpath(text_run["dir"]), "step": 1}
  assert manifest["task"] == "text" and manifest["videos"] == 20 and manifest["layout"]["regions"] == 4
  assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5]

  run, index = text_run["run"], index_search.Index(str(out))
  gallery = search.load_gallery(run, text_run["records"], "test", use_cache=False)
  for text in text_run["texts"][:4] + ["people walk in the park"]:
    query = text_run["encoder"].text(text)
    exact = {h["video"]: h for h in search.search(run, gallery, query, top_k=20)}
    ranked = sorted(exact.values(), key=lambda h: h["rank"])
    for mine, theirs in zip(index.search(query, top_k=10), ranked):
      assert set(mine) == set(theirs)
      # The same top 10 in the same order, up to videos whose scores tie within float16 rounding.
      reference = exact[mine["video"]]
      assert mine["video"] == theirs["video"] or abs(reference["score"] - theirs["score"]) < 2e-3
      assert mine["score"] == pytest.approx(reference["score"], abs=2e-3)
      for name, value in reference["levels"].items():
        assert mine["levels"][name] == pytest.approx(value, abs=2e-3), name
      np.testing.assert_allclose(mine["relevance"], reference["relevance"], atol=2e-3)
      assert mine["prior"] == pytest.approx(reference["prior"], abs=1e-6)
      assert (mine["snippet_times"], mine["event"], mine["caption"]) == (
          reference["snippet_times"], reference["event"], reference["caption"])
      assert [(s["start"], s["end"]) for s in mine["segments"]] == [(s["start"], s["end"]) for s in reference["segments"]]

  # The command: no --workdir (the index knows its run); the JSON of `search --gallery`, with the index's keys.
  assert search.main(["--index", str(out), "--text", text_run["texts"][1], "--top-k", "3", "--json"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["hits"][0]["video"] == "video_1.mp4" and printed["candidates"] == 1000 and printed["step"] == 1
  assert set(printed) == {"query", "split", "step", "index", "candidates", "hits"}
  lines = search.format_table(printed["hits"], printed["query"]).splitlines()
  assert lines[2].split()[:3] == ["1", f"{printed['hits'][0]['score']:.3f}", "video_1.mp4"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from varcmp_jax.index import build, store
    add = store.ShardWriter.add
    def add_then_die(self, arrays, metadata):
      add(self, arrays, metadata)
      if self.entry["name"] == "000002":    # part of the third shard written, its pooled rows appended
        os.kill(os.getpid(), signal.SIGKILL)
    store.ShardWriter.add = add_then_die
    build.main(sys.argv[1:])
""")


def test_a_killed_index_job_resumes_to_the_same_index(text_run, tmp_path, monkeypatch):
  out = tmp_path / "killed"
  killed = subprocess.run([sys.executable, "-c", KILLER, *index_args(text_run, out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["videos"] == 10 and (out / "shards" / "000002.tmp").is_dir()
  assert (out / "pooled.npy").stat().st_size > 128 + 10 * 2 * 32 * 4       # float32 rows past the committed 10

  embedded = []
  stream = evaluate.embed_batches
  def counting(*args, **kwargs):
    embedded.append(kwargs["shard_index"])
    return stream(*args, **kwargs)
  monkeypatch.setattr(evaluate, "embed_batches", counting)
  assert build_index(text_run, out)["added"] == 10
  assert embedded == [2, 3]                        # the committed slices are not embedded again
  assert build_index(text_run, out)["added"] == 0 and embedded == [2, 3]     # complete: nothing to do
  build_index(text_run, tmp_path / "whole")
  assert_same_index(out, tmp_path / "whole")


RENAME_KILLER = textwrap.dedent("""
    import os, signal, sys
    from varcmp_jax.index import build
    moment, victim = sys.argv[1:3]
    rename = os.rename
    def rename_and_die(source, target):      # a shard's final rename (manifest writes use os.replace)
      if source.endswith(os.sep + victim + ".tmp"):
        if moment == "after":
          rename(source, target)
        os.kill(os.getpid(), signal.SIGKILL)
      rename(source, target)
    os.rename = rename_and_die
    build.main(sys.argv[3:])
""")


@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_crash_at_a_shards_final_rename_resumes_to_a_clean_build(text_run, tmp_path, moment):
  out = tmp_path / "crashed"

  def crash(victim, argv) -> dict:
    killed = subprocess.run([sys.executable, "-c", RENAME_KILLER, moment, victim, *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "shards" / (victim if moment == "after" else f"{victim}.tmp")).is_dir()
    return json.loads((out / "manifest.json").read_text())

  assert crash("000002", index_args(text_run, out))["videos"] == 10            # the build: 4 shards of 5
  assert build_index(text_run, out)["added"] == 10
  assert crash("000004", index_args(text_run, out, text_run["extra"], "--append"))["videos"] == 20
  assert build_index(text_run, out, text_run["extra"], append=True)["videos"] == 26
  build_index(text_run, tmp_path / "clean")
  build_index(text_run, tmp_path / "clean", text_run["extra"], append=True)
  assert_same_index(out, tmp_path / "clean")


def test_a_damaged_index_names_the_commands_that_rebuild_it(text_run, tmp_path, capsys):
  out = tmp_path / "index"
  build_index(text_run, out)
  build_index(text_run, out, text_run["extra"], append=True)
  os.truncate(out / "shards" / "000001" / "regions.npy", 100)
  with pytest.raises(store.StoreError) as damaged:
    index_search.Index(str(out))
  message = str(damaged.value)
  assert message.startswith(f"{out}/shards/000001/regions.npy: ") and "\n" not in message
  command = message.split("`")[1]
  run = f"varcmp index --workdir {os.path.realpath(text_run['dir'])} --step 1"
  rebuilt = f"{out}.rebuilt"
  assert command == (f"{run} --records {os.path.realpath(text_run['records'])} --split test --out {rebuilt} "
                     f"--storage float16 && {run} --records {os.path.realpath(text_run['extra'])} --split test "
                     f"--out {rebuilt} --storage float16 --append")
  for part in command.split(" && "):                    # the commands, as given, rebuild it
    argv = shlex.split(part)
    assert argv[:2] == ["varcmp", "index"] and cli.main(argv[1:]) == 0
  assert cli.main(["index", "--verify", rebuilt]) == 0
  capsys.readouterr()
  query = text_run["encoder"].text(text_run["extra_texts"][1])
  build_index(text_run, tmp_path / "clean")
  build_index(text_run, tmp_path / "clean", text_run["extra"], append=True)
  expected = index_search.Index(str(tmp_path / "clean")).rank(query, 26, None)
  again = index_search.Index(rebuilt).rank(query, 26, None)
  np.testing.assert_array_equal(again[0], expected[0])
  np.testing.assert_allclose(again[1], expected[1], atol=1e-6)


def flip_byte(file):
  """Inverts the last byte of `file` (a row's data in a .npy file)."""
  with open(file, "r+b") as f:
    last = os.pread(f.fileno(), 1, os.path.getsize(file) - 1)
    os.pwrite(f.fileno(), bytes([last[0] ^ 0xFF]), os.path.getsize(file) - 1)


# damage: the file named, and the words the line says
SEARCH_DAMAGES = {
    "a byte flipped in a shard": ("shards/000003/regions.npy", flip_byte, "does not match its checksum"),
    "a byte flipped in pooled.npy": ("pooled.npy", flip_byte, "checksum differs"),
    "a byte flipped in weights.npy": ("shards/000001/weights.npy", flip_byte, "checksum differs"),
    "a byte flipped in times.npy": ("shards/000002/times.npy", flip_byte, "checksum differs"),
    "a deleted shard": ("shards/000002", shutil.rmtree, "missing"),
    "a shard file of mode 000": ("shards/000001/times.npy", lambda file: os.chmod(file, 0), "permission denied"),
}


@pytest.fixture(scope="module")
def model_index(text_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("model_index") / "index"
  build_index(text_run, out)
  return out


@pytest.mark.parametrize("name", list(SEARCH_DAMAGES))
def test_search_on_a_damaged_index_exits_with_one_line_naming_the_file(model_index, text_run, tmp_path, capsys, name):
  file, damage, words = SEARCH_DAMAGES[name]
  out = tmp_path / "index"
  shutil.copytree(model_index, out)
  damage(str(out / file))
  try:
    if name.endswith("mode 000"):
      try:
        open(out / file, "rb").close()
        pytest.skip("this process reads a file of mode 000 (root): test_index_store covers permission errors")
      except PermissionError:
        pass
    with pytest.raises(SystemExit) as searched:
      search.main(["--index", str(out), "--text", text_run["texts"][3], "--top-k", "3"])
  finally:
    if name.endswith("mode 000"):
      os.chmod(out / file, 0o644)
  message = str(searched.value.code)
  assert searched.value.code not in (0, None) and message.startswith(f"varcmp search: {out / file}"), message
  assert "\n" not in message and words in message and "Traceback" not in capsys.readouterr().err, message
  assert ("rebuild" in message) != name.endswith("mode 000"), message


def test_append_onto_a_damaged_index_refuses_before_it_writes(model_index, text_run, tmp_path):
  out = tmp_path / "index"
  shutil.copytree(model_index, out)
  flip_byte(str(out / "shards" / "000001" / "regions.npy"))
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
  with pytest.raises(SystemExit) as appended:
    build.main(index_args(text_run, out, text_run["extra"], "--append"))
  message = str(appended.value.code)
  assert message.startswith(f"varcmp index: {out}/shards/000001/regions.npy: ") and "\n" not in message
  assert "rebuild it" in message and message.endswith("nothing was written"), message
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_shards_hold_what_fits_in_shard_mb(text_run, tmp_path):
  layout = build.planned_layout(text_run["run"].config, "float16")
  budget = 4 * store.video_bytes(layout) + 2000            # room for the shard's .npy headers
  out = tmp_path / "index"
  assert cli.main(["index", "--workdir", text_run["dir"], "--records", text_run["records"], "--out", str(out),
                   "--shard-mb", repr(budget / 2**20)]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["layout"] == layout and [s["count"] for s in manifest["shards"]] == [4] * 5
  for shard in manifest["shards"]:
    on_disk = sum(f.stat().st_size for f in (out / "shards" / shard["name"]).iterdir())
    assert on_disk + shard["count"] * store.pooled_row_bytes(layout) <= budget


def assert_same_index(a, b):
  manifest_a, manifest_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
  assert manifest_a["shards"] == manifest_b["shards"] and manifest_a["layout"] == manifest_b["layout"]
  assert sorted(os.listdir(a / "shards")) == sorted(os.listdir(b / "shards"))
  assert (a / "pooled.npy").read_bytes() == (b / "pooled.npy").read_bytes()
  for shard in os.listdir(a / "shards"):
    for name in os.listdir(a / "shards" / shard):
      assert (a / "shards" / shard / name).read_bytes() == (b / "shards" / shard / name).read_bytes(), (shard, name)


def test_append_adds_new_records(text_run, tmp_path):
  out = tmp_path / "index"
  build_index(text_run, out)
  with pytest.raises(store.StoreError, match="--append"):
    build_index(text_run, out, text_run["extra"])
  assert build_index(text_run, out, text_run["extra"], append=True)["videos"] == 26
  build_index(text_run, tmp_path / "extra_only", text_run["extra"])
  pooled = np.load(out / "pooled.npy", mmap_mode="r")
  assert pooled.shape == (26, 2, 32)
  np.testing.assert_array_equal(pooled[20:], np.load(tmp_path / "extra_only" / "pooled.npy"))
  manifest = json.loads((out / "manifest.json").read_text())
  assert [s["records"] for s in manifest["sources"]] == [os.path.realpath(text_run[k]) for k in ("records", "extra")]
  # The appended index ranks like its two parts ranked together (the second part's rows after the first's).
  build_index(text_run, tmp_path / "first_only")
  query = text_run["encoder"].text(text_run["extra_texts"][2])
  first, extra = (index_search.Index(str(tmp_path / p)).rank(query, 26, None) for p in ("first_only", "extra_only"))
  rows, scores = np.concatenate([first[0], extra[0] + 20]), np.concatenate([first[1], extra[1]])
  both = index_search.Index(str(out)).rank(query, 26, None)
  np.testing.assert_array_equal(both[0], rows[np.lexsort((rows, -scores))])
  np.testing.assert_allclose(both[1], np.sort(scores)[::-1], rtol=0, atol=1e-6)
  assert build_index(text_run, out, text_run["extra"], append=True)["added"] == 0       # already there
  # Records that changed since they were indexed are refused, not mixed in.
  extra_manifest = pathlib.Path(text_run["extra"]) / "manifest.json"
  original = extra_manifest.read_text()
  try:
    extra_manifest.write_text(original.replace("}}}", "}}, \"note\": 1}"))
    with pytest.raises(store.StoreError, match="changed since"):
      build_index(text_run, out, text_run["extra"], append=True)
  finally:
    extra_manifest.write_text(original)


def test_bad_index_paths_are_one_line_errors(text_run, tmp_path):
  with pytest.raises(SystemExit, match="not an index"):
    search.main(["--index", str(tmp_path), "--text", "a red car"])
  with pytest.raises(SystemExit, match="no index to append to"):
    build.main(index_args(text_run, tmp_path / "new", None, "--append"))
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit, match="exists and is not an index"):
    build.main(index_args(text_run, tmp_path))
