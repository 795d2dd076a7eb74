"""UCFCrime-AR: UCF-Crime videos with the official English captions (video-text retrieval)."""
import os

import tensorflow_datasets as tfds

from data_prep import datasets
from data_prep.tfds import builder


class UcfcrimeAr(builder.ManualBuilder):
  """UCFCrime-AR frame records: T snippet frames, caption, CLIP tokens, label, event interval."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = builder.CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir: ucf_crime_train.xlsx and ucf_crime_test.xlsx (the UCFCrime-AR release),
  Anomaly_Train.txt and Anomaly_Test.txt (UCF-Crime split lists), optionally
  Temporal_Anomaly_Annotation.txt, and the UCF-Crime videos, either in their release folders
  (Abuse/Abuse001_x264.mp4, Training_Normal_Videos_Anomaly/...) or flat, directly in manual_dir or in
  manual_dir/videos.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=builder.features(self.builder_config, audio=False),
                                 homepage="https://github.com/Roc-Ng/VAR")

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    videos = os.path.join(manual, "videos") if os.path.isdir(os.path.join(manual, "videos")) else manual
    items = datasets.read_ucfcrime_ar(videos, manual)
    return {split: self._generate_examples([i for i in items if i.split == split]) for split in ("train", "test")}

  def _generate_examples(self, items):
    return builder.generate_examples(items, self.builder_config, task="text")
