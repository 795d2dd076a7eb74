"""XDViolence-AR: XD-Violence videos with their audio tracks (video-audio retrieval)."""
import os

import tensorflow_datasets as tfds

from data_prep import datasets
from data_prep.tfds import builder


class XdviolenceAr(builder.ManualBuilder):
  """XDViolence-AR frame records: T snippet frames, T log-mel segments, label (from the name), event interval."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = builder.CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir: audio.list and audio_test.list (the official XD-Violence id lists), optionally
  annotations.txt, and the XD-Violence videos named <id>.mp4 (e.g.
  Bad.Boys.1995__#00-26-51_00-27-53_label_B2-0-0.mp4), directly in manual_dir or in manual_dir/videos.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=builder.features(self.builder_config, audio=True),
                                 homepage="https://roc-ng.github.io/XD-Violence/")

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    videos = os.path.join(manual, "videos") if os.path.isdir(os.path.join(manual, "videos")) else manual
    items = datasets.read_xdviolence_ar(videos, manual)
    return {split: self._generate_examples([i for i in items if i.split == split]) for split in ("train", "test")}

  def _generate_examples(self, items):
    return builder.generate_examples(items, self.builder_config, task="audio")
