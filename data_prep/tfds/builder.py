"""The part of the two TFDS builders they share: configs, features and example generation via decode.py."""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_prep import datasets, row
from data_prep.decode import DecodeOptions

CONTEXT_LENGTH = 77


@dataclasses.dataclass(kw_only=True)
class VarConfig(tfds.core.BuilderConfig):
  """Snippet grid and frame size of the stored records."""
  snippets: int = 32
  image_size: int = 224
  mel_bins: int = 64
  mel_frames: int = 96


class ManualBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose data all comes from manual_dir: nothing to download, so no checksums file.

  Declaring that also keeps tfds from resolving its code path, which imports `importlib_resources`
  (a tfds dependency only declared for Python < 3.9, so absent here).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def _checksums_path(cls):
    return None


CONFIGS = [
    VarConfig(name="frames32_224", description="32 snippets, 224x224 frames (CLIP ViT-B/16)", snippets=32, image_size=224),
    VarConfig(name="frames16_96", description="16 snippets, 96x96 frames (small, for tests and CPU runs)",
              snippets=16, image_size=96),
]


def features(config: VarConfig, audio: bool) -> tfds.features.FeaturesDict:
  """Plain tensors (no tfds Image/Video features, whose encoding needs TensorFlow)."""
  t, s = config.snippets, config.image_size
  spec = {
      "video": tfds.features.Text(), "caption": tfds.features.Text(),
      "tokens": tfds.features.Tensor(shape=(CONTEXT_LENGTH,), dtype=np.int32),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
      "duration": tfds.features.Tensor(shape=(), dtype=np.float32),
      "times": tfds.features.Tensor(shape=(t, 2), dtype=np.float32),
      "event": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "frames": tfds.features.Tensor(shape=(t, s, s, 3), dtype=np.uint8),
  }
  if audio:
    spec["mel"] = tfds.features.Tensor(shape=(t, config.mel_frames, config.mel_bins), dtype=np.float16)
  return tfds.features.FeaturesDict(spec)


def generate_examples(items: list[datasets.Item], config: VarConfig, task: str):
  """Yields (key, example) per decodable video; a bad video is logged and skipped, as in `varcmp prep`."""
  from varcmp_jax import clip
  tokenize = clip.tokenizer()
  options = row.RowOptions(task=task, snippets=config.snippets, decode=DecodeOptions(
      snippets=config.snippets, image_size=config.image_size, audio="required" if task == "audio" else "none",
      mel_bins=config.mel_bins, mel_frames=config.mel_frames))
  for item in items:
    status, value = row.build_record(item, options)
    if status == "skip":
      logging.warning("skipping %s: %s", item.video, value)
      continue
    value["tokens"] = tokenize([value["caption"]])[0].astype(np.int32)
    value.pop("split")
    yield item.video, value
