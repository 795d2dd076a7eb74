"""Feature releases -> records (data_prep.released, data_prep.row, `varcmp prep --visual-features ...`) and
the released configs end to end.

Fixture arrays are made here, small, laid out like the real releases: XD-Violence I3D RGB (one file per crop,
`{id}__{crop}.npy`, 5 crops) + VGGish (`{id}__vggish.npy`) keyed by the official id lists; UCF-Crime CLIP
ViT-B/16 frame features as VadCLIP releases them (class folders, `{stem}__{crop}.npy`, 10 crops), and I3D with
the crops inside ((N, 10, D)). Resampling is checked against a NumPy loop over snippets and rows.
"""
import json
import os
import pickle

import numpy as np
import pytest

from data_prep import datasets, prep, released, row
from data_prep.decode import snippet_times
from test_npy_file import Payload, lying_npy
from test_prep import read_records

XD_I3D_SECONDS, VGGISH_SECONDS, UCF_SECONDS = 16 / 24, 0.96, 16 / 30


def reference_resample(rows, clip_seconds, times):
  """Per snippet [a, b]: sum_i overlap_i x_i / sum_i overlap_i, overlap with row i's [i S, (i+1) S]; a snippet
  that overlaps no row takes the last row."""
  out = []
  for a, b in times:
    overlap = np.array([max(0.0, min(b, (i + 1) * clip_seconds) - max(a, i * clip_seconds)) for i in range(len(rows))])
    out.append(rows[-1] if overlap.sum() == 0 else np.tensordot(overlap, rows, axes=1) / overlap.sum())
  return np.array(out)


@pytest.mark.parametrize("rows_count, clip_seconds, duration, snippets", [
    (7, XD_I3D_SECONDS, 7 * XD_I3D_SECONDS, 3),        # fewer snippets than rows
    (7, XD_I3D_SECONDS, 7 * XD_I3D_SECONDS, 20),       # more snippets than rows
    (5, VGGISH_SECONDS, 5 * VGGISH_SECONDS + 1.3, 9),  # the array ends before the video: tail snippets
    (40, UCF_SECONDS, 33 * UCF_SECONDS, 16),           # rows past the video's end are ignored
    (1, 0.5, 0.5, 4),
])
def test_resample_vs_numpy_loop(rows_count, clip_seconds, duration, snippets):
  rng = np.random.default_rng(rows_count)
  times = snippet_times(duration, snippets)
  for rows in (rng.normal(size=(rows_count, 6)), rng.uniform(size=rows_count)):
    got = released.resample(rows, clip_seconds, times)
    assert got.shape == (snippets,) + rows.shape[1:] and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_resample(rows, clip_seconds, times), atol=1e-5)


def test_resample_hand_case():
  rows = np.array([[0.0], [3.0], [6.0]])     # rows over [0, 1], [1, 2], [2, 3]
  times = np.array([[0.5, 1.5], [0.0, 3.0], [2.5, 4.0], [3.5, 4.0]])
  np.testing.assert_allclose(released.resample(rows, 1.0, times)[:, 0], [1.5, 3.0, 6.0, 6.0])


def write_ucf_xlsx(root, rows: dict[str, list[tuple[str, str]]]):
  """The UCFCrime-AR xlsx files and split lists only (no videos), with the release's trailing newlines."""
  import openpyxl
  for split, entries in rows.items():
    book = openpyxl.Workbook()
    book.active.append(["Video Name", "Chinese Text", "English Text"])
    for name, caption in entries:
      book.active.append([name + "\n", "中文", caption])
    book.save(os.path.join(root, f"ucf_crime_{split}.xlsx"))
    with open(os.path.join(root, f"Anomaly_{split.title()}.txt"), "w", encoding="utf-8") as f:
      f.writelines(name + "\n" for name, _ in entries)


UCF_ROWS = {
    "train": [(f"Abuse/Abuse00{i}_x264.mp4", f"a man hits a dog number {i}") for i in range(1, 4)]
             + [(f"Training_Normal_Videos_Anomaly/Normal_Videos00{i}_x264.mp4", f"people walk in a mall {i}")
                for i in range(1, 4)],
    "test": [("Arrest/Arrest001_x264.mp4", "police arrest a man"), ("Arrest/Arrest002_x264.mp4", "a car stops"),
             ("Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4", "an empty street"),
             ("Testing_Normal_Videos_Anomaly/Normal_Videos_004_x264.mp4", "a quiet shop")],
}


@pytest.fixture(scope="module")
def ucf_release(tmp_path_factory):
  """UCFCrime-AR tables + CLIP frame features (VadCLIP layout: 10 crop files per video, in class folders)."""
  root = tmp_path_factory.mktemp("ucf")
  write_ucf_xlsx(root, UCF_ROWS)
  rng = np.random.default_rng(0)
  for name, _ in UCF_ROWS["train"] + UCF_ROWS["test"]:
    folder = root / "clip" / os.path.dirname(name)
    folder.mkdir(parents=True, exist_ok=True)
    stem = os.path.splitext(os.path.basename(name))[0]
    base = rng.normal(size=(int(rng.integers(20, 40)), 32))
    for crop in range(10):
      np.save(folder / f"{stem}__{crop}.npy", (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32))
  return root


XD_IDS = {
    "train": ["Bad.Boys.1995__#00-26-51_00-27-53_label_B2-0-0", "A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A",
              "v=u5SF4SlqNDQ__#1_label_G-0-0", "Cop.Out.2010__#01-31-41_01-32-06_label_A",
              "Riot.2015__#00-00-10_00-00-30_label_B6-0-0", "Bus.2016__#00-01-00_00-01-20_label_A"],
    "test": ["Test.Movie.1__#00-00-00_00-00-30_label_B1-0-0", "Test.Movie.2__#00-00-00_00-00-25_label_A",
             "Test.Movie.3__#00-00-00_00-00-20_label_G-0-0", "Test.Movie.4__#00-00-00_00-00-15_label_A"],
}


def write_xd_arrays(root, video_id, rows, rng, i3d_width=24, vggish_width=16):
  for crop in range(5):
    np.save(root / "i3d" / f"{video_id}__{crop}.npy", rng.normal(size=(rows, i3d_width)).astype(np.float32))
  audio_rows = int(rows * XD_I3D_SECONDS / VGGISH_SECONDS)
  np.save(root / "vggish" / f"{video_id}__vggish.npy", rng.normal(size=(audio_rows, vggish_width)).astype(np.float32))
  np.save(root / "prior" / f"{video_id}.npy", rng.uniform(size=(rows, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def xd_release(tmp_path_factory):
  """The official id lists (paths ending in __vggish.npy) + I3D RGB 5-crop files + VGGish + a per-clip prior."""
  root = tmp_path_factory.mktemp("xd")
  for folder in ("lists", "i3d", "vggish", "prior"):
    (root / folder).mkdir()
  rng = np.random.default_rng(1)
  for split, list_name in (("train", "audio.list"), ("test", "audio_test.list")):
    (root / "lists" / list_name).write_text("".join(f"/data/xd/{split}/{i}__vggish.npy\n" for i in XD_IDS[split]))
    for video_id in XD_IDS[split]:
      write_xd_arrays(root, video_id, int(rng.integers(15, 40)), rng)
  return root


def xd_args(root, out, *extra):
  return ["--dataset", "xdviolence_ar", "--captions", str(root / "lists"), "--out", str(out),
          "--visual-features", str(root / "i3d" / "{video}__{crop}.npy"), "--visual-clip-seconds", str(XD_I3D_SECONDS),
          "--audio-features", str(root / "vggish" / "{video}__vggish.npy"), "--audio-clip-seconds", str(VGGISH_SECONDS),
          "--snippets", "8", "--workers", "0", *extra]


def test_xd_release_records(tmp_path, xd_release, capsys):
  out = tmp_path / "records"
  assert prep.main(xd_args(xd_release, out, "--prior", str(xd_release / "prior" / "{video}.npy"),
                           "--prior-clip-seconds", str(XD_I3D_SECONDS))) == 0
  records = read_records(str(out))
  assert [r["video"] for r in records["train"]] == XD_IDS["train"] and len(records["test"]) == 4
  for record in records["train"] + records["test"]:
    video_id = record["video"]
    i3d = np.mean([np.load(xd_release / "i3d" / f"{video_id}__{c}.npy") for c in range(5)], axis=0)
    vggish = np.load(xd_release / "vggish" / f"{video_id}__vggish.npy")
    prior = np.load(xd_release / "prior" / f"{video_id}.npy")[:, 0]
    assert float(record["duration"]) == pytest.approx(len(i3d) * XD_I3D_SECONDS, rel=1e-6)
    times = snippet_times(len(i3d) * XD_I3D_SECONDS, 8)
    np.testing.assert_allclose(record["times"], times, atol=1e-5)
    assert record["features"].dtype == np.float16 and record["features"].shape == (8, 24)
    np.testing.assert_allclose(record["features"], reference_resample(i3d, XD_I3D_SECONDS, times), atol=2e-3)
    np.testing.assert_allclose(record["audio_features"], reference_resample(vggish, VGGISH_SECONDS, times), atol=1e-5)
    np.testing.assert_allclose(record["prior"], reference_resample(prior, XD_I3D_SECONDS, times), atol=1e-5)
    assert "frames" not in record and "mel" not in record and record["caption"] == ""
    assert int(record["label"]) == datasets.xd_label(video_id)
  manifest = json.loads((out / "manifest.json").read_text())
  train = manifest["splits"]["train"]
  assert train["shapes"]["features"] == [8, 24] and train["dtypes"]["features"] == "float16"
  assert train["fields"] == {"caption": 0, "features": 6, "audio_features": 6, "prior": 6}
  assert manifest["task"] == "audio"          # the xdviolence_ar default: it has no captions


def test_ucf_release_records_from_class_folders(tmp_path, ucf_release):
  out = tmp_path / "records"
  assert prep.main(["--dataset", "ucfcrime_ar", "--captions", str(ucf_release), "--out", str(out),
                    "--visual-features", str(ucf_release / "clip" / "*" / "{video}__{crop}.npy"),
                    "--visual-clip-seconds", str(UCF_SECONDS), "--crops", "7", "--snippets", "8",
                    "--workers", "1"]) == 0
  records = read_records(str(out))
  assert [r["video"] for r in records["test"]] == [n for n, _ in UCF_ROWS["test"]]
  arrest = records["test"][0]
  crops = [np.load(ucf_release / "clip" / "Arrest" / f"Arrest001_x264__{k}.npy") for k in (7, 0)]
  seventh, first = (reference_resample(crop, UCF_SECONDS, arrest["times"]) for crop in crops)
  np.testing.assert_allclose(arrest["features"], seventh, atol=2e-3)       # --crops 7: crop 7's file
  assert np.abs(arrest["features"] - first).max() > 0.05
  assert arrest["caption"] == "police arrest a man" and arrest["tokens"][0] == 49406


def test_crops_inside_the_array_and_layouts(tmp_path):
  rng = np.random.default_rng(2)
  ten_crop = rng.normal(size=(6, 10, 4)).astype(np.float32)          # UCF I3D releases: (N, 10, 2048)
  np.save(tmp_path / "Abuse001_x264_i3d.npy", ten_crop)
  source = released.ArraySource("visual features", str(tmp_path / "{video}_i3d.npy"), UCF_SECONDS)
  np.testing.assert_allclose(released.load_rows(source, "Abuse001_x264"), ten_crop.mean(axis=1), atol=1e-6)
  third = released.ArraySource("visual features", source.pattern, UCF_SECONDS, crops="3")
  np.testing.assert_array_equal(released.load_rows(third, "Abuse001_x264"), ten_crop[:, 3])
  # One file per crop, --crops 2: only crop 2's file is read (the others may be broken).
  for crop in range(4):
    np.save(tmp_path / f"Arrest001_x264__{crop}.npy", ten_crop[:, crop])
  (tmp_path / "Arrest001_x264__0.npy").write_bytes(b"not an array")
  per_file = released.ArraySource("visual features", str(tmp_path / "{video}__{crop}.npy"), UCF_SECONDS, crops="2")
  np.testing.assert_array_equal(released.load_rows(per_file, "Arrest001_x264"), ten_crop[:, 2])
  assert released.probe(source, ["absent", "Abuse001_x264"]).width == 4
  assert released.probe(source, ["Abuse001_x264"]).num_crops == 10
  np.save(tmp_path / "p.npy", np.array([0.1, 0.9]))
  prior = released.ArraySource("prior", str(tmp_path / "{video}.npy"), 1.0, is_prior=True)
  np.testing.assert_allclose(released.load_rows(prior, "p"), [0.1, 0.9])
  with pytest.raises(released.ArrayError, match=r"^prior missing: no file matches .*/q.npy"):
    released.load_rows(prior, "q")
  # Video ids with glob characters are taken literally.
  np.save(tmp_path / "a[1]__vggish.npy", np.ones((2, 3)))
  assert released.find_files(str(tmp_path / "{video}__vggish.npy"), "a[1]")[0][1].endswith("a[1]__vggish.npy")


def broken_arrays(root):
  """{video: (how the arrays are broken, expected reason start)}: one bad case per video, good audio."""
  rng = np.random.default_rng(3)
  cases = {}

  def crops(video, make):
    for crop in range(5):
      np.save(root / "i3d" / f"{video}__{crop}.npy", make(crop))

  good = lambda crop: rng.normal(size=(20, 24)).astype(np.float32)
  # Hostile files: a header claiming a shape no array can have (first: the probe of the release's width meets
  # it), a header claiming 466 TiB over 1 KB, a pickled object array, random bytes, values of 1e38.
  crops("Zero.Rows_label_A", good)
  lying_npy(root / "i3d" / "Zero.Rows_label_A__0.npy", (0, 10 ** 20), data=b"")
  cases["Zero.Rows_label_A"] = ("visual features unreadable: Zero.Rows_label_A__0.npy: damaged: its header's shape "
                                "(0, 100000000000000000000) float32 is larger than any array can be")
  crops("Huge_label_A", good)
  lying_npy(root / "i3d" / "Huge_label_A__1.npy", (10 ** 12, 24))
  cases["Huge_label_A"] = ("visual features unreadable: Huge_label_A__1.npy: truncated: its header says shape "
                           "(1000000000000, 24) float32")
  crops("Pickle_label_A", good)
  np.save(root / "i3d" / "Pickle_label_A__0.npy", np.array([Payload(), 1], dtype=object), allow_pickle=True)
  cases["Pickle_label_A"] = "visual features unreadable: Pickle_label_A__0.npy: holds Python objects"
  crops("Random_label_A", good)
  (root / "i3d" / "Random_label_A__3.npy").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
  cases["Random_label_A"] = "visual features unreadable: Random_label_A__3.npy: not a .npy array file"
  crops("Big_label_A", lambda c: np.full((20, 24), 1e38, np.float32))
  cases["Big_label_A"] = "visual features out of range: values beyond float16 (|x| > 65504) in its 5 crop files"
  crops("Long.Audio_label_A", good)      # 100 VGGish rows (96 s) for a 13.33 s video: a wrong file or clip length
  cases["Long.Audio_label_A"] = "audio features length: 100 rows x 0.96 s cover 96.00 s of a 13.33 s video"
  np.save(root / "i3d" / "Missing.Crops_label_A__0.npy", good(0))          # crops 1-4 are missing
  cases["Missing.Crops_label_A"] = "visual features crops: 1, the release has 5"
  cases["No.Visual_label_A"] = "visual features missing: no file matches"
  crops("Empty_label_A", lambda c: np.zeros((0, 24), np.float32))
  cases["Empty_label_A"] = "visual features empty"
  crops("Nan_label_A", lambda c: np.where(np.arange(20)[:, None] == 3, np.nan, good(c)).astype(np.float32))
  cases["Nan_label_A"] = "visual features non-finite"
  crops("Wide_label_A", lambda c: rng.normal(size=(20, 12)).astype(np.float32))
  cases["Wide_label_A"] = "visual features width: 12, the release's width is 24"
  crops("Cube_label_A", lambda c: rng.normal(size=(20, 2, 24)).astype(np.float32))
  cases["Cube_label_A"] = "visual features misshapen"
  crops("Ragged_label_A", lambda c: rng.normal(size=(20 + c, 24)).astype(np.float32))
  cases["Ragged_label_A"] = "visual features misshapen: its 5 crop files have different lengths"
  crops("Garbage_label_A", good)
  (root / "i3d" / "Garbage_label_A__2.npy").write_bytes(b"\x93NUMPY garbage")
  cases["Garbage_label_A"] = "visual features unreadable"
  crops("Text_label_A", lambda c: np.array(["a", "b"]))
  cases["Text_label_A"] = "visual features not numeric"
  crops("Short.Audio_label_A", good)
  cases["Short.Audio_label_A"] = "audio features length: 2 rows x 0.96 s cover 1.92 s of a 13.33 s video"
  for video in cases:
    rows = {"Short.Audio_label_A": 2, "Long.Audio_label_A": 100}.get(video, 14)
    np.save(root / "vggish" / f"{video}__vggish.npy", rng.normal(size=(rows, 16)).astype(np.float32))
  np.save(root / "vggish" / "No.Audio_label_A__vggish.npy", np.ones((3, 16, 1)))
  crops("No.Audio_label_A", good)
  cases["No.Audio_label_A"] = "audio features misshapen"
  return cases


def test_bad_arrays_are_skipped_with_their_reason(tmp_path, xd_release, capsys):
  Payload.marker = str(tmp_path / "unpickled")
  root = tmp_path / "release"
  for folder in ("lists", "i3d", "vggish", "prior"):
    (root / folder).mkdir(parents=True)
  rng = np.random.default_rng(4)
  good = ["Good.One_label_A", "Good.Two_label_B1-0-0"]
  for video in good:
    write_xd_arrays(root, video, 20, rng)
  cases = broken_arrays(root)
  (root / "lists" / "audio.list").write_text("".join(f"/x/{v}__vggish.npy\n" for v in good + list(cases)))
  (root / "lists" / "audio_test.list").write_text("")
  out = tmp_path / "records"
  assert prep.main(xd_args(root, out)) == 0
  assert [r["video"] for r in read_records(str(out))["train"]] == good
  reasons = {s["video"]: s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
  assert set(reasons) == set(cases)
  for video, expected in cases.items():
    assert reasons[video].startswith(expected), (video, reasons[video])
  summary = capsys.readouterr().out
  assert f"skipped {len(cases)} videos" in summary and "visual features non-finite" in summary
  assert not os.path.exists(Payload.marker)            # the pickle was refused, not loaded


def test_a_shape_no_array_can_have_first_in_the_table_is_skipped(tmp_path, capsys):
  """The first video's array claims shape (0, 10**20): that video is skipped with one line naming the file (the
  probe of the release's width reads it first), and prep goes on with the others."""
  root = tmp_path / "release"
  for folder in ("lists", "i3d", "vggish", "prior"):
    (root / folder).mkdir(parents=True)
  videos = ["Zero.Rows_label_A", "Good.One_label_A", "Good.Two_label_B1-0-0"]
  rng = np.random.default_rng(5)
  for video in videos:
    write_xd_arrays(root, video, 20, rng)
  lying_npy(root / "i3d" / "Zero.Rows_label_A__3.npy", (0, 10 ** 20), data=b"")
  (root / "lists" / "audio.list").write_text("".join(f"/x/{v}__vggish.npy\n" for v in videos))
  (root / "lists" / "audio_test.list").write_text("")
  out = tmp_path / "records"
  assert prep.main(xd_args(root, out)) == 0
  assert [r["video"] for r in read_records(str(out))["train"]] == videos[1:]
  reason = ("visual features unreadable: Zero.Rows_label_A__3.npy: damaged: its header's shape "
            "(0, 100000000000000000000) float32 is larger than any array can be")
  assert json.loads((out / "manifest.json").read_text())["skipped"] == [{"video": videos[0], "reason": reason}]
  captured = capsys.readouterr()
  assert f"(e.g. {videos[0]}: {reason})" in captured.out and "Traceback" not in captured.err


def test_a_prior_out_of_range_and_float16_overflow(tmp_path):
  np.save(tmp_path / "v.npy", np.array([0.2, 1.7]))
  np.save(tmp_path / "v__0.npy", np.ones((2, 3), np.float32))
  options = row.RowOptions(task="audio", snippets=2, visual=released.ArraySource(
      "visual features", str(tmp_path / "{video}__{crop}.npy"), 1.0), prior=released.ArraySource(
      "prior", str(tmp_path / "{video}.npy"), 1.0, is_prior=True))
  item = datasets.Item(video="v", path="v", caption="", label=0, split="train")
  assert row.build_record(item, options) == (
      "skip", "prior out of range: values 0.2..1.7 in v.npy, a prior is in [0, 1]")
  np.save(tmp_path / "v.npy", np.array([0.2, 0.7]))
  np.save(tmp_path / "v__0.npy", np.full((2, 3), 1e6, np.float32))
  assert row.build_record(item, options) == (
      "skip", "visual features out of range: values beyond float16 (|x| > 65504) in v__0.npy")


def test_the_row_work_pickles(tmp_path):
  """build_record and its arguments cross process boundaries (multiprocessing, Apache Beam) unchanged."""
  np.save(tmp_path / "v__0.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
  options = row.RowOptions(task="text", snippets=2, visual=released.ArraySource(
      "visual features", str(tmp_path / "{video}__{crop}.npy"), 0.5, width=3, num_crops=1))
  item = datasets.Item(video="v.mp4", path="v.mp4", caption=" a caption ", label=1, split="test")
  status, record = pickle.loads(pickle.dumps(row.build_record))(*pickle.loads(pickle.dumps((item, options))))
  assert status == "ok" and record["caption"] == "a caption" and record["duration"] == 2.0
  np.testing.assert_array_equal(record["features"], [[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]])


def released_config(name, records, *overrides):
  """configs/<name>:released with tiny sizes (the tests' CPU budget) and the given overrides."""
  from varcmp_jax import command_flags
  from varcmp_jax import config as config_lib
  config = command_flags.load_config_file(f"configs/{name}:released", [
      f"--config.data.records={records}", "--config.data.snippets=8", "--config.model.dtype=float32",
      "--config.train.batch_size=2", "--config.train.num_steps=2", "--config.train.warmup_steps=1",
      "--config.train.checkpoint_every=2", "--config.eval.batch_size=4", "--config.eval.chunk_size=2", *overrides])
  config.model.clip = config_lib.clip_tiny(image_size=16, patch_size=8, width=32, depth=1)
  config.model.temporal = dict(num_layers=1, num_heads=2, mlp_ratio=2, max_len=16)
  config.model.anomaly_head.hidden = 16
  config_lib.validate(config)
  return config


def train_and_evaluate(config, workdir):
  from varcmp_jax import evaluate
  from varcmp_jax.train import train as train_lib
  train_lib.train(config, str(workdir))
  result = evaluate.evaluate(config, str(workdir))
  assert json.loads((workdir / "eval.json").read_text())["SumR"] == result["SumR"]
  return result


def test_xd_released_config_trains_and_evaluates(tmp_path, xd_release):
  out = tmp_path / "records"
  assert prep.main(xd_args(xd_release, out)) == 0
  config = released_config("xdviolence_ar.py", out, "--config.model.video_features.dim=24",
                           "--config.model.audio.feature_dim=16")
  result = train_and_evaluate(config, tmp_path / "run")
  assert set(result["levels"]) == {"semantic", "temporal"}     # no region tokens: no spatial level
  assert 0 < result["audio_to_video"]["R10"] <= 100


def test_ucf_released_config_trains_and_evaluates(tmp_path, ucf_release):
  out = tmp_path / "records"
  assert prep.main(["--dataset", "ucfcrime_ar", "--captions", str(ucf_release), "--out", str(out),
                    "--visual-features", str(ucf_release / "clip" / "*" / "{video}__{crop}.npy"),
                    "--visual-clip-seconds", str(UCF_SECONDS), "--snippets", "8", "--workers", "0"]) == 0
  # D = 32 = the tiny CLIP's joint width, as 512 for B/16; a random text tower on purpose (no CLIP on disk here).
  config = released_config("ucfcrime_ar.py", out, "--config.model.clip_checkpoint=")
  result = train_and_evaluate(config, tmp_path / "run")
  assert set(result["levels"]) == {"video", "frame"}
  assert 0 < result["text_to_video"]["R10"] <= 100
