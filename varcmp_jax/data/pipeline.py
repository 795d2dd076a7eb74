"""The Grain input pipeline: ArrayRecord shards of one split -> fixed-shape numpy batches.

Each process reads its own contiguous slice of the split (grain ShardOptions over jax.process_index /
process_count), shuffles it with a seed that changes every epoch, fits every record to
`config.data.snippets` snippets (pad with a mask, or crop by a uniform subsample over the whole video)
and stacks records into batches with the keys of the README's data section.

Training checkpoints the iterator with Orbax next to the model:
  manager.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(train_iter)))
  manager.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(train_iter)))
With `config.data.worker_count > 0` records are decoded in spawned worker processes: the transforms below
are module-level classes so they pickle, and scripts need an `if __name__ == "__main__":` guard.
"""
import copy
import hashlib
import json
import math
import pathlib
from typing import Any, Iterator

import grain
import jax
import numpy as np
from absl import flags

from varcmp_jax import config as config_lib
from varcmp_jax.data import records, records_check

# Per-snippet keys: their leading axis is the snippet axis T, fitted to config.data.snippets. The regions
# travel only to a config with a spatial level (released features have none).
VIDEO_KEYS = {"frames": ("frames",), "features": ("features", "regions")}
AUDIO_KEYS = {"spectrogram": "mel", "features": "audio_features"}
METADATA_KEYS = ("video", "caption", "label", "duration", "times", "event")
# Batch keys for bookkeeping only: the model never reads them.
BOOKKEEPING_KEYS = ("index", "valid")


def model_inputs(batch: dict) -> dict:
  """The batch without its bookkeeping keys."""
  return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}


def read_manifest(records_dir: str) -> dict[str, Any]:
  """Reads DIR/manifest.json written by `varcmp prep` / `varcmp extract-features`."""
  path = pathlib.Path(records_dir) / "manifest.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no manifest; is {records_dir} a directory written by `varcmp prep`?")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  splits = manifest.get("splits") if isinstance(manifest, dict) else None
  if not isinstance(splits, dict):
    raise ValueError(f"{path}: expected an object with a \"splits\" object, got {str(manifest)[:200]}")
  for name, split in splits.items():
    if (not isinstance(split, dict) or not isinstance(split.get("records"), int)
        or not isinstance(split.get("shards"), list)
        or not all(isinstance(s, str) for s in split["shards"])):
      raise ValueError(f"{path}: split {name!r} must be {{\"records\": int, \"shards\": [str, ...]}}, "
                       f"got {str(split)[:200]}")
  return manifest


def manifest_sha256(records_dir: str) -> str:
  """The hash of DIR/manifest.json: what caches and indexes of the records check they were built from."""
  with open(pathlib.Path(records_dir) / "manifest.json", "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def reading(config, records_dir: str):
  """A copy of `config` that reads `records_dir` in this process (no Grain workers)."""
  config = copy.deepcopy(config)
  config.data.records, config.data.worker_count = records_dir, 0
  return config


def split_entry(records_dir: str, split: str) -> dict[str, Any]:
  splits = read_manifest(records_dir)["splits"]
  if split not in splits:
    raise KeyError(f"{pathlib.Path(records_dir) / 'manifest.json'}: no split {split!r} "
                   f"(splits: {sorted(splits)})")
  return splits[split]


def split_size(records_dir: str, split: str) -> int:
  """Number of records (videos) in a split, from the manifest."""
  return split_entry(records_dir, split)["records"]


def shard_paths(records_dir: str, split: str) -> list[str]:
  """The split's ArrayRecord files; manifest entries are relative to `records_dir` (or absolute)."""
  paths = [str(pathlib.Path(records_dir) / s) for s in split_entry(records_dir, split)["shards"]]
  for p in paths:
    if not pathlib.Path(p).is_file():
      raise FileNotFoundError(f"{p}: shard listed in {pathlib.Path(records_dir) / 'manifest.json'} is missing")
  return paths


class IndexedSource(grain.sources.RandomAccessDataSource):
  """The split's shards as one random-access source yielding (index within the split, record bytes).

  `shard` restricts it to one process's contiguous slice (grain's even split, remainder kept).
  """

  def __init__(self, records_dir: str, split: str, shard: grain.sharding.ShardOptions | None = None):
    self.records_dir, self.split = str(records_dir), split
    paths = shard_paths(records_dir, split)
    expected = split_size(records_dir, split)
    manifest = pathlib.Path(records_dir) / "manifest.json"
    if not expected or not paths:
      raise ValueError(f"{manifest}: split {split!r} has no records")
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != expected:
      raise ValueError(f"{manifest}: split {split!r} lists {expected} records but its shards hold {len(self._source)}")
    self.start, self.stop = 0, expected
    if shard is not None:   # The first `remainder` slices get one record more.
      per_shard, remainder = divmod(expected, shard.shard_count)
      self.start = shard.shard_index * per_shard + min(shard.shard_index, remainder)
      self.stop = self.start + per_shard + (shard.shard_index < remainder)

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    index = self.start + int(index)
    return index, self._source[index]

  def __repr__(self) -> str:
    # Grain checks the repr against a restored iterator state: name the data, not the object.
    return f"IndexedSource(records_dir={self.records_dir!r}, split={self.split!r}, records={self.start}:{self.stop})"


def snippet_indices(num_snippets: int, target: int) -> np.ndarray:
  """Which stored snippets fill the `target` slots: all of them (then padding), or a uniform subsample.

  The subsample takes the snippet at the centre of each of `target` equal parts of the video, so a crop
  still spans the whole video and is the same every epoch.
  """
  if num_snippets <= target:
    return np.arange(num_snippets)
  return np.floor((np.arange(target) + 0.5) * num_snippets / target).astype(np.int64)


def fit_snippets(array: np.ndarray, target: int) -> np.ndarray:
  """Crops (uniform subsample) or zero-pads the leading snippet axis to `target`."""
  array = array[snippet_indices(array.shape[0], target)]
  padding = [(0, target - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
  return np.pad(array, padding)


class DecodeAndFit(grain.transforms.Map):
  """(index, record bytes) -> one example with the batch keys, snippets fitted to `snippets`.

  The example holds exactly what the model reads: the regime's video keys (regions only with `regions`),
  the audio tower's input for the audio task, the external prior when `prior_source` reads it. Float arrays
  become float32 (`cast`), or keep their stored dtype (device-resident data casts inside the step).
  """

  def __init__(self, regime: str, task: str, snippets: int, records_dir: str, prior_source: str = "head",
               audio_kind: str = "spectrogram", regions: bool = True, cast: bool = True):
    if regime not in VIDEO_KEYS:
      raise ValueError(f"config.regime must be one of {sorted(VIDEO_KEYS)}, got {regime!r}")
    self.snippets, self.records_dir, self.cast = snippets, records_dir, cast
    self.video_keys = [k for k in VIDEO_KEYS[regime] if regions or k != "regions"]
    self.audio_keys = [AUDIO_KEYS[audio_kind]] if task == "audio" else []
    # The external prior travels only when config.prior.source reads it, so a missing one is an error
    # here rather than silent zeros in the model.
    self.prior_keys = [] if prior_source == "head" else ["prior"]
    self.needed_by = {**{k: f"regime={regime!r}" for k in self.video_keys}, "regions": "loss.levels.spatial",
                      **{k: f"model.audio.kind={audio_kind!r}" for k in self.audio_keys},
                      "prior": f"prior.source={prior_source!r}", "tokens": "every model", "label": "the MIL loss"}

  def map(self, element: tuple[int, bytes]) -> dict[str, np.ndarray]:
    index, data = element
    record = records.decode_record(data)
    where = f"{self.records_dir}: record {index} ({record.get('video', '?')!r})"
    video_keys, audio_keys, prior_keys = self.video_keys, self.audio_keys, self.prior_keys
    for key in video_keys + audio_keys + prior_keys + ["tokens", "label"]:
      if key not in record:
        raise KeyError(f"{where} has no {key!r} (needed by {self.needed_by[key]}); keys: {sorted(record)}")

    num_snippets = record[video_keys[0]].shape[0]
    for k in video_keys + audio_keys + prior_keys:
      if record[k].shape[0] != num_snippets:
        raise ValueError(f"{where}: {k!r} has {record[k].shape[0]} snippets, {video_keys[0]!r} has {num_snippets}")
    kept = min(num_snippets, self.snippets)
    example = {
        "tokens": np.asarray(record["tokens"], np.int32),
        "label": np.asarray(record["label"], np.int32).reshape(()),
        "mask": np.arange(self.snippets) < kept,
        "index": np.int32(index),
    }
    for k in video_keys + audio_keys + prior_keys:
      value = fit_snippets(record[k], self.snippets)
      # Features/regions/mel/prior may be stored in float16 or bfloat16; batches are float32.
      example[k] = value if k == "frames" or not self.cast else value.astype(np.float32)
    return example


def decode_and_fit(config, cast: bool = True) -> DecodeAndFit:
  """The config's DecodeAndFit (what its batches hold, fitted to config.data.snippets)."""
  return DecodeAndFit(config.regime, config.task, int(config.data.snippets), config.data.records,
                      config.prior.source, config.model.audio.kind, config_lib.uses_regions(config), cast=cast)


def _mark_flags_parsed(worker_count: int):
  # grain 0.2.18 workers read absl flags; outside absl.app nothing parsed them.
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _data_loader(config, split: str, batch_size: int, *, shuffle: bool, num_epochs: int | None, seed: int,
                 shard: grain.sharding.ShardOptions, drop_remainder: bool,
                 source_shard: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  records_dir = config.data.records
  source = IndexedSource(records_dir, split, source_shard)
  worker_count = int(config.data.worker_count)
  _mark_flags_parsed(worker_count)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  prefetch = max(1, int(config.data.prefetch))
  return grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[decode_and_fit(config), grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
      worker_count=worker_count, worker_buffer_size=prefetch,
      # Grain's default read-ahead is 500 records: far too much memory for frame records.
      read_options=grain.ReadOptions(num_threads=4, prefetch_buffer_size=prefetch * batch_size))


def check_against_config(config, split: str) -> None:
  """records_check.RecordsMismatch (a ValueError naming each config field and its fix) when the split's records
  cannot feed `config`; called before anything compiles."""
  records_check.check(config, split, read_manifest(config.data.records))


def _shard_options(shard_index: int | None, shard_count: int | None, drop_remainder: bool):
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=drop_remainder)


def make_train_iterator(config, batch_size_per_process: int, seed: int, *,
                        shard_index: int | None = None, shard_count: int | None = None):
  """An infinite, checkpointable iterator over shuffled training batches of this process's slice.

  Every process gets the same number of records per epoch (the remainder is dropped) and the last
  incomplete batch of the stream is never produced; the shuffle order changes every epoch and depends
  only on `seed`. `shard_index`/`shard_count` default to jax.process_index()/process_count().
  """
  shard = _shard_options(shard_index, shard_count, drop_remainder=True)
  split = config.data.train_split
  check_against_config(config, split)
  if split_size(config.data.records, split) < shard.shard_count:
    raise ValueError(f"{config.data.records}: split {split!r} has fewer records than processes ({shard.shard_count})")
  loader = _data_loader(config, split, batch_size_per_process, shuffle=True, num_epochs=None, seed=seed,
                        shard=shard, drop_remainder=True)
  return iter(loader)


class EvalBatches:
  """One pass over a split in order, in batches of `batch_size`; rows past the end have valid=False.

  Every process yields the same number of batches (a multi-host eval step needs that), so a process
  whose slice is shorter gets extra padding rows. Padding rows are zeros with mask False and index -1.
  """

  def __init__(self, config, split: str, batch_size: int, shard: grain.sharding.ShardOptions):
    self.batch_size = batch_size
    total = split_size(config.data.records, split)
    if total < shard.shard_count:
      raise ValueError(f"{config.data.records}: split {split!r} has fewer records ({total}) than processes "
                       f"({shard.shard_count})")
    self.num_batches = math.ceil(math.ceil(total / shard.shard_count) / batch_size)
    # Grain's DataLoader drops a shard's remainder even with drop_remainder=False (its length is
    # records // shard_count), so eval slices the source itself and reads the slice unsharded.
    self._loader = _data_loader(config, split, batch_size, shuffle=False, num_epochs=1, seed=0,
                                shard=grain.sharding.NoSharding(), drop_remainder=False, source_shard=shard)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    template = None
    produced = 0
    for batch in self._loader:
      template = batch
      produced += 1
      yield _pad_batch(batch, self.batch_size)
    # This process's slice may be shorter than others: add fully invalid batches.
    for _ in range(self.num_batches - produced):
      yield _pad_batch({k: v[:0] for k, v in template.items()}, self.batch_size)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  rows = len(batch["index"])
  padded = {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
  padded["index"][rows:] = -1
  padded["valid"] = np.arange(batch_size) < rows
  return padded


def make_eval_iterator(config, split: str, batch_size: int, *,
                       shard_index: int | None = None, shard_count: int | None = None) -> EvalBatches:
  """Batches covering this process's slice of `split` once, in record order, with "valid" flags."""
  check_against_config(config, split)
  return EvalBatches(config, split, batch_size, _shard_options(shard_index, shard_count, drop_remainder=False))


def load_split_metadata(records_dir: str, split: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
  """Per-record metadata (video, caption, label, duration, times, event) in split order (= batch "index"), of
  the records [start, stop) (default: all)."""
  source = IndexedSource(records_dir, split)
  metadata = []
  for i in range(start, len(source) if stop is None else stop):
    record = records.decode_record(source[i][1])
    missing = [k for k in METADATA_KEYS if k not in record]
    if missing:
      raise KeyError(f"{records_dir}: record {i} of split {split!r} has no {missing}")
    metadata.append(dict(
        video=str(record["video"]), caption=str(record["caption"]), label=int(record["label"]),
        duration=float(record["duration"]), times=np.asarray(record["times"], np.float32),
        event=np.asarray(record["event"], np.float32)))
  return metadata
