import csv
import os

import av
import numpy as np
import pytest

from data_prep import synth

ARGS = ["--videos", "6", "--duration", "4", "--fps", "5", "--size", "48", "--workers", "0"]


def decoded(path: str) -> tuple[np.ndarray, np.ndarray]:
  """All decoded RGB frames and audio samples of a file (container timestamps are not compared)."""
  with av.open(path) as container:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
  with av.open(path) as container:
    audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
  return frames, audio


def rows(out: str) -> list[dict]:
  with open(os.path.join(out, "captions.csv"), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  outs = {}
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    outs[name] = str(tmp_path_factory.mktemp(name))
    assert synth.main(["--out", outs[name], "--seed", str(seed)] + ARGS) == 0
  return outs


def test_same_seed_same_captions_and_decoded_content(runs):
  a, b, c = runs["a"], runs["b"], runs["c"]
  with open(os.path.join(a, "captions.csv"), "rb") as fa, open(os.path.join(b, "captions.csv"), "rb") as fb:
    assert fa.read() == fb.read()
  for row in rows(a):
    frames_a, audio_a = decoded(os.path.join(a, row["video"]))
    frames_b, audio_b = decoded(os.path.join(b, row["video"]))
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(audio_a, audio_b)
  differs = [not np.array_equal(decoded(os.path.join(a, r["video"]))[0], decoded(os.path.join(c, r["video"]))[0])
             for r in rows(a)]
  assert any(differs)


def test_files_are_h264_aac_mp4_of_the_asked_size(runs):
  for row in rows(runs["a"]):
    with av.open(os.path.join(runs["a"], row["video"])) as container:
      video, audio = container.streams.video[0], container.streams.audio[0]
      assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
      assert (video.width, video.height) == (48, 48)
      assert container.duration / 1e6 == pytest.approx(4.0, abs=0.3)


def test_captions_name_only_the_event_for_anomalous_videos(runs):
  table = rows(runs["a"])
  assert sum(int(r["label"]) for r in table) == 3
  assert {r["split"] for r in table} == {"train", "test"}
  for r in table:
    start, end = float(r["event_start"]), float(r["event_end"])
    if r["label"] == "1":
      assert r["caption"] == f"a {r['colour']} {r['shape']} {r['action']} in the {r['place']} corner"
      assert end - start == pytest.approx(0.4, abs=1e-3) and 0 <= start < end <= 4
      assert r["scene"].replace("_", " ") not in r["caption"]      # the place in the scene is not in it
    else:
      assert (start, end) == (-1.0, -1.0)
      assert r["activity"] in r["caption"] and r["caption"].endswith(synth.SCENES[r["scene"]][0])
  with open(os.path.join(runs["a"], "test.txt"), encoding="utf-8") as f:
    assert {line.strip() for line in f} == {r["video"] for r in table if r["split"] == "test"}


def test_event_is_visible_only_during_its_interval(tmp_path):
  # A longer video so that the event spans several frames.
  out = str(tmp_path)
  assert synth.main(["--out", out, "--seed", "0", "--videos", "2", "--duration", "10", "--fps", "5",
                     "--size", "64", "--workers", "0"]) == 0
  row = next(r for r in rows(out) if r["label"] == "1")
  frames, _ = decoded(os.path.join(out, row["video"]))
  colour = np.array(synth.COLOURS[row["colour"]], float)
  share = (np.abs(frames.astype(float) - colour).max(axis=-1) < 50).mean(axis=(1, 2))
  times = np.arange(len(frames)) / 5
  inside = (times >= float(row["event_start"]) + 0.01) & (times < float(row["event_end"]) - 0.01)
  assert inside.sum() >= 1
  assert share[inside].min() > 0.03          # a big, saturated shape
  assert share[~inside].max() < 0.005        # and nothing of that colour otherwise


def test_bad_arguments_are_refused(tmp_path):
  with pytest.raises(SystemExit) as error:
    synth.main(["--out", str(tmp_path), "--videos", "0"])
  assert error.value.code == 2                      # argparse's usage error


def test_existing_benchmark_is_kept_without_overwrite(tmp_path, capsys):
  """A second synth into the same --out refuses (exit 1, naming captions.csv) and touches nothing."""
  out = str(tmp_path)
  tiny = ["--out", out, "--duration", "1", "--fps", "2", "--size", "16", "--workers", "0"]
  assert synth.main(tiny + ["--videos", "1"]) == 0
  before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
  capsys.readouterr()
  assert synth.main(tiny + ["--videos", "2"]) == 1
  err = capsys.readouterr().err
  assert "captions.csv exists" in err and "--overwrite" in err
  assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
  assert synth.main(tiny + ["--videos", "2", "--overwrite"]) == 0
  assert len(rows(out)) == 2
