"""TFDS builders for the two VAR benchmarks (array_record files, uint8 tensors: no TensorFlow needed).

  import tensorflow_datasets as tfds
  from data_prep.tfds import UcfcrimeAr, XdviolenceAr
  builder = UcfcrimeAr(config="frames32_224", data_dir="~/tensorflow_datasets", file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/path/to/ucfcrime_ar"))
  source = builder.as_data_source()["test"]      # random access, numpy
"""
from data_prep.tfds.ucfcrime_ar import UcfcrimeAr
from data_prep.tfds.xdviolence_ar import XdviolenceAr
