"""`varcmp prep --runner beam` against the local prep (the reference): the same shards, records and skips."""
import csv
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="Apache Beam is an extra: pip install 'varcmp-jax[beam]'")

import data_prep  # pylint: disable=wrong-import-position
from data_prep import beam_prep, prep, synth  # pylint: disable=wrong-import-position
from media_fixtures import level_video  # pylint: disable=wrong-import-position
from test_prep import (feature_args, feature_folder, mixed_folder, read_records,  # pylint: disable=unused-import,wrong-import-position
                       run_prep, write_csv)


def manifest(out) -> dict:
  with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
    return json.load(f)


def assert_same_job(local_out, beam_out):
  """Equal manifests (but for the runner and the time), shard names, and records field by field, in order."""
  local, beam = manifest(local_out), manifest(beam_out)
  assert (local.pop("runner"), beam.pop("runner")) == ("local", "beam")
  local.pop("created"), beam.pop("created")
  assert beam == local
  local_records, beam_records = read_records(str(local_out)), read_records(str(beam_out))
  assert beam_records.keys() == local_records.keys()
  for split, expected in local_records.items():
    assert [r["video"] for r in beam_records[split]] == [r["video"] for r in expected]
    for got, want in zip(beam_records[split], expected):
      assert list(got) == list(want)
      for key, value in want.items():
        if isinstance(value, np.ndarray):
          assert got[key].dtype == value.dtype and np.array_equal(got[key], value), (want["video"], key)
        else:
          assert got[key] == value, (want["video"], key)


def test_beam_equals_local_on_synthetic_videos(tmp_path):
  synth.main(["--out", str(tmp_path / "videos"), "--videos", "6", "--duration", "3", "--size", "48", "--seed", "3",
              "--workers", "0"])
  common = ["--dataset", "folder", "--videos", tmp_path / "videos", "--captions", tmp_path / "videos" / "captions.csv",
            "--snippets", 4, "--image-size", 24, "--shard-size", 2]
  assert run_prep(*common, "--out", tmp_path / "local", "--workers", 0) == 0
  # The default Beam options: the FnApiRunner with 2 worker processes (elements pickled across processes).
  assert run_prep(*common, "--out", tmp_path / "beam", "--workers", 2, "--runner", "beam") == 0
  assert_same_job(tmp_path / "local", tmp_path / "beam")
  records = read_records(str(tmp_path / "beam"))
  assert sum(map(len, records.values())) == 6
  assert all(r["frames"].shape == (4, 24, 24, 3) and r["tokens"][0] == 49406 for rs in records.values() for r in rs)


@pytest.fixture(scope="module")
def broken_inputs(mixed_folder):
  """test_prep's good and broken videos, plus released feature arrays (one with a NaN, one missing)."""
  root, table = mixed_folder
  level_video(root / "no_array.mp4", seconds=2.0)
  level_video(root / "other.mp4", seconds=2.0)
  (root / "features").mkdir()
  rng = np.random.default_rng(0)
  for name in ("good", "other", "vidéo_ünï", "silent", "truncated", "garbage", "empty", "missing"):
    rows = rng.normal(size=(4, 8)).astype(np.float32)     # 4 rows x 0.5 s cover the 2 s videos
    if name == "silent":
      rows[1, 3] = np.nan
    np.save(root / "features" / f"{name}.npy", rows)
  with open(table, encoding="utf-8") as f:
    rows = list(csv.reader(f))[1:]
  rows += [("no_array.mp4", "a video without features", 0, "test"), ("other.mp4", "a good one in test", 1, "test")]
  return root, write_csv(root / "with_arrays.csv", rows)


def test_beam_equals_local_on_broken_files_and_arrays(tmp_path, broken_inputs):
  root, table = broken_inputs
  common = ["--dataset", "folder", "--videos", root, "--captions", table, "--snippets", 3, "--image-size", 16,
            "--shard-size", 2, "--workers", 0, "--visual-features", root / "features" / "{video}.npy",
            "--visual-clip-seconds", 0.5]
  assert run_prep(*common, "--out", tmp_path / "local") == 0
  assert run_prep(*common, "--out", tmp_path / "beam", "--runner", "beam") == 0    # FnApiRunner in this process
  assert_same_job(tmp_path / "local", tmp_path / "beam")
  records = read_records(str(tmp_path / "beam"))
  assert [r["video"] for r in records["train"]] == ["good.mp4", "vidéo_ünï.mp4"]
  assert [r["video"] for r in records["test"]] == ["other.mp4"]
  assert records["train"][0]["features"].shape == (3, 8) and records["train"][0]["features"].dtype == np.float16
  reasons = {s["video"]: s["reason"] for s in manifest(tmp_path / "beam")["skipped"] if s["video"] != "good.mp4"}
  assert len(manifest(tmp_path / "beam")["skipped"]) == 8          # 6 below, the blank caption, the duplicate
  assert reasons["silent.mp4"].startswith("visual features non-finite")
  assert reasons["no_array.mp4"].startswith("visual features missing")
  assert reasons["missing.mp4"] == "file not found" and reasons["empty.mp4"] == "empty file (0 bytes)"
  assert "cannot open" in reasons["garbage.mp4"]
  assert "cannot open" in reasons["truncated.mp4"] or "truncated" in reasons["truncated.mp4"]


def test_a_rerun_after_a_failed_pipeline_keeps_finished_shards(tmp_path, monkeypatch, capsys):
  table = feature_folder(tmp_path, count=8)      # 4 shards: train 3, test 1
  out = tmp_path / "beam"
  args = feature_args(tmp_path, table, out, "--shard-size", 2, "--runner", "beam")
  journal = out / prep.JOURNAL_DIR
  write_shard = beam_prep.write_shard

  def fail_on_the_last_shard(element, out_dir):
    """Whichever shard the runner writes last fails after its temp file is written (its name is a directory)."""
    if len([n for n in os.listdir(journal) if n.endswith(".json")]) == 3:
      os.mkdir(os.path.join(out_dir, element[0][1]))
    return write_shard(element, out_dir)

  monkeypatch.setattr(beam_prep, "write_shard", fail_on_the_last_shard)
  assert run_prep(*args) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "the Beam pipeline failed" in err and "Is a directory" in err and "3 of 4 shards finished" in err
  assert not (out / "manifest.json").exists()
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]       # the failed shard's temp file is gone
  finished = {n.removesuffix(".json"): os.stat(out / n.removesuffix(".json"))
              for n in os.listdir(journal) if n.endswith(".json")}
  assert len(finished) == 3
  (blocked,) = [n for n in os.listdir(out) if os.path.isdir(out / n) and n != prep.JOURNAL_DIR]
  os.rmdir(out / blocked)
  (out / f"{blocked}.0badc0de.tmp").write_bytes(b"a killed worker's partial shard")

  monkeypatch.undo()
  assert run_prep(*args) == 0
  for name, before in finished.items():         # finished shards are kept, not rewritten
    after = os.stat(out / name)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert not [n for n in os.listdir(journal) if not n.endswith(".json")]     # the rows files are gone
  assert run_prep(*feature_args(tmp_path, table, tmp_path / "local", "--shard-size", 2)) == 0
  assert_same_job(tmp_path / "local", out)       # each video exactly once, as the local prep writes them
  assert sorted(r["video"] for rs in read_records(str(out)).values() for r in rs) == [f"v{i}.mp4" for i in range(8)]


def test_without_beam_the_local_prep_runs_and_beam_is_one_line_error(tmp_path, monkeypatch, capsys):
  table = feature_folder(tmp_path, count=4)
  monkeypatch.setitem(sys.modules, "apache_beam", None)       # import apache_beam now fails
  monkeypatch.delitem(sys.modules, "data_prep.beam_prep")
  monkeypatch.delattr(data_prep, "beam_prep")
  assert run_prep(*feature_args(tmp_path, table, tmp_path / "beam", "--runner", "beam")) == 2
  assert capsys.readouterr().err.strip() == "varcmp prep: --runner beam needs Apache Beam: pip install 'varcmp-jax[beam]'"
  assert run_prep(*feature_args(tmp_path, table, tmp_path / "local")) == 0
  monkeypatch.undo()
  monkeypatch.chdir(tmp_path)                  # a remote runner cannot resolve a relative --out
  assert run_prep(*feature_args(tmp_path, table, "relative", "--runner", "beam",
                                "--beam-options=--runner=DataflowRunner")) == 2
  err = capsys.readouterr().err
  assert "absolute paths" in err and "--out relative" in err
