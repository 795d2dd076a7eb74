import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from data_prep.tfds import UcfcrimeAr, XdviolenceAr, builder
from media_fixtures import shared_data, ucf_release

TINY = builder.VarConfig(name="tiny", snippets=4, image_size=32)


def prepare(builder_class, manual_dir, data_dir):
  b = builder_class(config=TINY, data_dir=str(data_dir), file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return b.as_data_source()


def test_xdviolence_builder_from_real_clips_without_tensorflow(tmp_path):
  clips = os.path.join(shared_data(), "xd_clips")
  manual = tmp_path / "manual"
  manual.mkdir()
  ids = {"train": ["Clip.One__#00-00-00_00-00-07_label_B1-0-0", "Clip.Two__#00-00-00_00-00-16_label_A"],
         "test": ["Clip.Three__#00-00-00_00-00-06_label_B4-0-0"]}
  for video_id, clip in zip(ids["train"] + ids["test"], ("abuse1.mp4", "n2.mp4", "car2.mp4")):
    os.symlink(os.path.join(clips, clip), manual / f"{video_id}.mp4")
  (manual / "audio.list").write_text("".join(f"/f/train/{i}__vggish.npy\n" for i in ids["train"]))
  (manual / "audio_test.list").write_text("".join(f"/f/test/{i}__vggish.npy\n" for i in ids["test"]))
  (manual / "annotations.txt").write_text(f"{ids['test'][0]} 24 72\n")

  source = prepare(XdviolenceAr, manual, tmp_path / "data")
  assert len(source["train"]) == 2 and len(source["test"]) == 1
  train = {source["train"][i]["video"].decode(): source["train"][i] for i in range(2)}
  assert int(train[ids["train"][0]]["label"]) == 1 and int(train[ids["train"][1]]["label"]) == 0
  example = source["test"][0]
  assert example["frames"].shape == (4, 32, 32, 3) and example["frames"].dtype == np.uint8
  assert example["mel"].shape == (4, 96, 64) and example["mel"].dtype == np.float16
  np.testing.assert_allclose(example["event"], [1.0, 3.0], atol=1e-5)     # frames 24..72 at 24 fps
  assert "tensorflow" not in sys.modules


def test_ucfcrime_builder_reads_the_xlsx_release_layout(tmp_path):
  manual = tmp_path / "manual"
  ucf_release(manual, {
      "train": [("Abuse/Abuse001_x264.mp4", "caption of Abuse001_x264.mp4"),
                ("Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4", "caption of Normal_Videos001_x264.mp4")],
      "test": [("Arrest/Arrest001_x264.mp4", "caption of Arrest001_x264.mp4")]})

  source = prepare(UcfcrimeAr, manual, tmp_path / "data")
  assert len(source["train"]) == 2 and len(source["test"]) == 1
  example = source["test"][0]
  assert example["video"].decode() == "Arrest/Arrest001_x264.mp4"
  assert example["caption"].decode() == "caption of Arrest001_x264.mp4" and int(example["label"]) == 1
  assert example["tokens"].shape == (77,) and example["tokens"][0] == 49406
  assert example["frames"].shape == (4, 32, 32, 3) and "mel" not in example
  np.testing.assert_allclose(example["event"], [1.0, 2.0], atol=1e-5)     # frames 10..20 at 10 fps
  labels = sorted(int(source["train"][i]["label"]) for i in range(2))
  assert labels == [0, 1]
  assert "tensorflow" not in sys.modules
