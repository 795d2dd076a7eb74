import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_prep import prep, row
from media_fixtures import REPO, garbage_file, level_video, shared_data, truncated_copy, ucf_release
from varcmp_jax.data.records import decode_record


def write_csv(path, rows, header=("video", "caption", "label", "split")):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def read_records(out: str) -> dict[str, list[dict]]:
  with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  records = {}
  for split, info in manifest["splits"].items():
    records[split] = []
    for shard in info["shards"]:
      reader = ArrayRecordReader(os.path.join(out, shard))
      records[split] += [decode_record(r) for r in reader.read_all()]
      reader.close()
    assert len(records[split]) == info["records"]
  return records


def run_prep(*args) -> int:
  return prep.main([str(a) for a in args])


@pytest.mark.parametrize("task", ["text", "audio"])
def test_real_xd_clips_become_records_with_audio(tmp_path, task):
  clips = os.path.join(shared_data(), "xd_clips")
  rows = [("abuse1.mp4", "a man hits a woman", 1, "train"), ("car2.mp4", "two cars crash", 1, "train"),
          ("n2.mp4", "people walk in a street", 0, "test")]
  table = write_csv(tmp_path / "captions.csv", rows)
  out = tmp_path / "records"
  assert run_prep("--dataset", "folder", "--videos", clips, "--captions", table, "--out", out, "--task", task,
                  "--snippets", 4, "--image-size", 32, "--workers", 0) == 0
  records = read_records(str(out))
  assert [r["video"] for r in records["train"]] == ["abuse1.mp4", "car2.mp4"]
  assert [r["video"] for r in records["test"]] == ["n2.mp4"]
  for record in records["train"] + records["test"]:
    assert record["frames"].shape == (4, 32, 32, 3) and record["frames"].dtype == np.uint8
    assert record["mel"].shape == (4, 96, 64) and record["mel"].dtype == np.float16
    assert record["tokens"].shape == (77,) and record["tokens"].dtype == np.int32 and record["tokens"][0] == 49406
    assert record["times"].shape == (4, 2) and record["times"][-1, 1] == pytest.approx(float(record["duration"]))
    assert record["event"].tolist() == [-1.0, -1.0]
  assert records["train"][0]["caption"] == "a man hits a woman" and int(records["train"][0]["label"]) == 1
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["splits"]["train"]["shapes"]["mel"] == [4, 96, 64]
  assert manifest["splits"]["train"]["dtypes"]["frames"] == "uint8" and manifest["skipped"] == []


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  """Good videos (one with a unicode name), broken files, a silent video, missing and empty entries."""
  root = tmp_path_factory.mktemp("mixed")
  good = level_video(root / "good.mp4", seconds=2.0)
  level_video(root / "vidéo_ünï.mp4", seconds=2.0)
  level_video(root / "silent.mp4", seconds=2.0, audio=False)
  truncated_copy(good, root / "truncated.mp4")
  garbage_file(root / "garbage.mp4")
  (root / "empty.mp4").write_bytes(b"")
  rows = [("good.mp4", "a good video", 1, "train"), ("vidéo_ünï.mp4", "ünïcode caption", 0, "train"),
          ("silent.mp4", "no sound here", 0, "train"), ("truncated.mp4", "cut in half", 1, "train"),
          ("garbage.mp4", "random bytes", 1, "test"), ("empty.mp4", "zero bytes", 0, "test"),
          ("missing.mp4", "not on disk", 0, "test"), ("good.mp4", "   ", 1, "test"),
          ("good.mp4", "a good video", 1, "train")]
  return root, write_csv(root / "captions.csv", rows)


@pytest.mark.parametrize("task, workers", [("text", 2), ("audio", 0)])
def test_bad_inputs_are_skipped_with_reasons(tmp_path, mixed_folder, task, workers, capsys):
  root, table = mixed_folder
  out = tmp_path / "out"
  assert run_prep("--dataset", "folder", "--videos", root, "--captions", table, "--out", out, "--task", task,
                  "--snippets", 3, "--image-size", 16, "--workers", workers, "--shard-size", 2) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  reasons = {s["video"]: s["reason"] for s in manifest["skipped"]}
  expected_good = ["good.mp4", "vidéo_ünï.mp4"] + (["silent.mp4"] if task == "text" else [])
  records = read_records(str(out))
  assert sorted(r["video"] for r in records["train"]) == sorted(expected_good)
  # The audio task needs no caption, so the blank-caption test row is kept there (with caption "").
  assert [r["video"] for r in records.get("test", [])] == ([] if task == "text" else ["good.mp4"])
  assert "cannot open" in reasons["truncated.mp4"] or "truncated" in reasons["truncated.mp4"]
  assert "cannot open" in reasons["garbage.mp4"]
  assert reasons["empty.mp4"] == "empty file (0 bytes)"
  assert reasons["missing.mp4"] == "file not found"
  if task == "text":
    assert "silent.mp4" not in reasons
    assert any(s == {"video": "good.mp4", "reason": "empty caption"} for s in manifest["skipped"])
    silent = next(r for r in records["train"] if r["video"] == "silent.mp4")
    assert "mel" not in silent
  else:
    assert "no audio track" in reasons["silent.mp4"]
  assert {"video": "good.mp4", "reason": "duplicate entry in the train split"} in manifest["skipped"]
  unicode_record = next(r for r in records["train"] if r["video"] == "vidéo_ünï.mp4")
  assert unicode_record["caption"] == "ünïcode caption"
  out_text = capsys.readouterr().out
  assert f"skipped {len(manifest['skipped'])} videos" in out_text
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  # The summary gives the caption lengths (text records only: an audio record's blank caption has none).
  lengths = sorted(list(r["tokens"]).index(49407) - 1 for r in records["train"] if r["caption"])
  if task == "text":
    assert f"caption words: train p50 {lengths[(len(lengths) + 1) // 2 - 1]}, " in out_text
    assert f"max {lengths[-1]} words" in out_text


def test_ucfcrime_release_with_a_non_text_caption(tmp_path):
  release = tmp_path / "release"
  ucf_release(release, {
      "train": [("Abuse/Abuse001_x264.mp4", "A man hits a dog."), ("Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4", 42)],
      "test": [("Arrest/Arrest001_x264.mp4", "Police arrest a man.")]})
  out = tmp_path / "out"
  assert run_prep("--dataset", "ucfcrime_ar", "--videos", release / "videos", "--captions", release, "--out", out,
                  "--snippets", 2, "--image-size", 16, "--workers", 0,
                  "--split-lists", release / "Anomaly_Train.txt", release / "Anomaly_Test.txt") == 0
  records = read_records(str(out))
  assert [r["video"] for r in records["train"]] == ["Abuse/Abuse001_x264.mp4"]
  (arrest,) = records["test"]
  assert arrest["caption"] == "Police arrest a man." and int(arrest["label"]) == 1
  np.testing.assert_allclose(arrest["event"], [1.0, 2.0], atol=1e-5)      # frames 10..20 at 10 fps
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["skipped"] == [{"video": "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4",
                                  "reason": "caption is not text (int: 42)"}]


def test_check_caption_rejects_non_text():
  assert row.check_caption(" a b ", "text") == ("a b", None)
  assert row.check_caption(3.5, "text")[1].startswith("caption is not text (float")
  assert row.check_caption(None, "text")[1].startswith("caption is not text (NoneType")
  assert row.check_caption("", "text") == (None, "empty caption")
  assert row.check_caption(None, "audio") == ("", None)


def test_killed_job_resumes_with_every_video_exactly_once(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  rows = []
  for i in range(8):
    level_video(videos / f"v{i}.mp4", seconds=6.0, fps=10, size=(48, 64))
    rows.append((f"v{i}.mp4", f"video number {i}", i % 2, "train" if i < 6 else "test"))
  table = write_csv(tmp_path / "captions.csv", rows)
  out = tmp_path / "out"
  args = ["--dataset", "folder", "--videos", str(videos), "--captions", table, "--out", str(out),
          "--snippets", "4", "--image-size", "16", "--workers", "0", "--shard-size", "1"]
  command = [sys.executable, "-c", "import sys; from data_prep.prep import main; sys.exit(main(sys.argv[1:]))"] + args
  job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  journal = out / "journal"
  deadline = time.time() + 60
  while time.time() < deadline and job.poll() is None:
    if journal.is_dir() and len([n for n in os.listdir(journal) if n.endswith(".json")]) >= 2:
      break
    time.sleep(0.02)
  assert job.poll() is None, "prep finished before it could be killed"
  job.send_signal(signal.SIGKILL)
  job.wait()
  assert not (out / "manifest.json").exists()
  finished = [n for n in os.listdir(out) if n.endswith(".array_record")]
  assert 2 <= len(finished) < 8
  for name in finished:   # what was published is complete and readable
    reader = ArrayRecordReader(str(out / name))
    assert reader.num_records() == 1
    reader.close()

  assert subprocess.run(command, cwd=REPO, capture_output=True).returncode == 0
  records = read_records(str(out))
  names = sorted(r["video"] for split in records.values() for r in split)
  assert names == sorted(f"v{i}.mp4" for i in range(8))
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  # The caption word counts (what sizes model.max_words) survive the kill: from the shards' journal entries.
  manifest = json.loads((out / "manifest.json").read_text())
  for split, split_records in records.items():
    lengths = [list(r["tokens"]).index(49407) - 1 for r in split_records]
    expected = {str(n): lengths.count(n) for n in set(lengths)}
    assert manifest["splits"][split]["caption_words"] == expected


def test_exit_codes_for_jobs_that_cannot_run(tmp_path, mixed_folder):
  root, table = mixed_folder

  def prep_into(out, captions, snippets=2):
    return run_prep("--dataset", "folder", "--videos", root, "--captions", captions, "--out", out,
                    "--snippets", snippets, "--image-size", 16, "--workers", 0)

  assert prep_into(tmp_path / "a", tmp_path / "absent.csv") == 2          # unreadable captions table
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert prep_into(blocker / "sub", table) == 1                           # unwritable output
  one = write_csv(tmp_path / "one.csv", [("good.mp4", "a good video", 1, "train")])
  assert prep_into(tmp_path / "b", one) == 0
  assert prep_into(tmp_path / "b", one, snippets=3) == 2                  # a different job in the same --out
  with pytest.raises(SystemExit):
    prep_into(tmp_path / "c", table, snippets=0)


def feature_folder(root, count=6):
  """A folder dataset of per-video CLIP-like feature arrays (no videos): fast rows for job-level tests."""
  rng = np.random.default_rng(0)
  (root / "features").mkdir(parents=True)
  rows = []
  for i in range(count):
    np.save(root / "features" / f"v{i}.npy", rng.normal(size=(10, 8)).astype(np.float32))
    rows.append((f"v{i}.mp4", f"video number {i}", i % 2, "train" if i < count - 2 else "test"))
  return write_csv(root / "captions.csv", rows)


def feature_args(root, table, out, *extra):
  return ["--dataset", "folder", "--captions", table, "--out", out, "--visual-features",
          root / "features" / "{video}.npy", "--visual-clip-seconds", 0.5, "--snippets", 4, "--workers", 0, *extra]


def test_an_edited_table_is_a_different_job(tmp_path, capsys):
  table = feature_folder(tmp_path)
  out = tmp_path / "out"
  assert run_prep(*feature_args(tmp_path, table, out)) == 0
  assert run_prep(*feature_args(tmp_path, table, out)) == 0          # the same job: nothing to redo
  with open(table, encoding="utf-8") as f:
    text = f.read()
  with open(table, "w", encoding="utf-8") as f:                       # same path, one caption changed
    f.write(text.replace("video number 3", "a different caption"))
  capsys.readouterr()
  assert run_prep(*feature_args(tmp_path, table, out)) == 2
  assert "table_sha256" in capsys.readouterr().err
  assert run_prep(*feature_args(tmp_path, table, out, "--overwrite")) == 0
  assert [r["caption"] for r in read_records(str(out))["train"]][3] == "a different caption"


def test_a_job_that_writes_nothing_fails_with_the_reasons_counted(tmp_path, capsys):
  table = write_csv(tmp_path / "captions.csv", [("a.mp4", "x", 0, "train"), ("b.mp4", "", 0, "train"),
                                                ("c.mp4", "y", 0, "test"), ("d.mp4", "   ", 1, "test")])
  assert run_prep("--dataset", "folder", "--videos", tmp_path, "--captions", table, "--out", tmp_path / "out",
                  "--workers", 0) == 1
  captured = capsys.readouterr()
  assert "skipped 4 videos" in captured.out
  assert "     2  file not found  (e.g. " in captured.out and "     2  empty caption  (e.g. " in captured.out
  assert "no records written" in captured.err


def test_xdviolence_is_an_audio_dataset(tmp_path, capsys):
  lists = tmp_path / "lists"
  lists.mkdir()
  (lists / "audio.list").write_text("/f/Clip.One__#00_label_A__vggish.npy\n")
  (lists / "audio_test.list").write_text("/f/Clip.Two__#00_label_B1-0-0__vggish.npy\n")
  base = ["--dataset", "xdviolence_ar", "--videos", str(tmp_path), "--captions", str(lists), "--out", str(tmp_path / "o")]
  assert prep.parse_args(base).task == "audio"           # not a mass "empty caption" skip
  with pytest.raises(SystemExit) as exit_info:
    prep.parse_args(base + ["--task", "text"])
  assert exit_info.value.code == 2 and "has no captions" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["interrupt", "disk full"])
def test_a_failed_job_leaves_no_temp_shards_and_resumes(tmp_path, monkeypatch, capsys, failure):
  table = feature_folder(tmp_path, count=8)
  out = tmp_path / "out"
  calls = []
  build_record = prep.run_row

  def failing(job):
    calls.append(job)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return build_record(job)

  def full_disk(self, record, encoded):
    raise OSError(28, "No space left on device")

  if failure == "interrupt":
    monkeypatch.setattr(prep, "run_row", failing)
  else:
    monkeypatch.setattr(prep.ShardWriter, "add", full_disk)
  assert run_prep(*feature_args(tmp_path, table, out, "--shard-size", 4)) == 1
  err = capsys.readouterr().err
  assert ("interrupted" if failure == "interrupt" else "No space left on device") in err and "resume" in err
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert not (out / "manifest.json").exists()
  monkeypatch.undo()
  assert run_prep(*feature_args(tmp_path, table, out, "--shard-size", 4)) == 0
  names = sorted(r["video"] for split in read_records(str(out)).values() for r in split)
  assert names == sorted(f"v{i}.mp4" for i in range(8))
