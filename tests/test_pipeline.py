"""Grain pipeline: batch contents against NumPy references, sharding, shuffling, Orbax restore, eval cover."""
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from varcmp_jax import config as config_lib
from varcmp_jax.data import pipeline
from varcmp_jax.data.records import encode_record

SNIPPETS = 6
D, R, S, MEL = 8, 4, 4, (5, 3)


def make_record(i: int, num_snippets: int, rng: np.random.Generator, with_prior: bool) -> dict:
  record = dict(
      video=f"video_{i:03d}.mp4", caption=f"caption {i}", tokens=rng.integers(0, 49408, 77).astype(np.int32),
      label=np.int32(i % 2), split="train", duration=np.float32(2.0 * num_snippets),
      times=np.stack([np.arange(num_snippets), np.arange(num_snippets) + 1], -1).astype(np.float32) * 2,
      event=np.array([1.0, 3.0] if i % 2 else [-1.0, -1.0], np.float32),
      frames=rng.integers(0, 256, (num_snippets, S, S, 3)).astype(np.uint8),
      features=rng.normal(size=(num_snippets, D)).astype(np.float16),
      regions=rng.normal(size=(num_snippets, R, D)).astype(np.float16),
      mel=rng.normal(size=(num_snippets,) + MEL).astype(np.float16),
  )
  if with_prior:
    record["prior"] = rng.uniform(size=num_snippets).astype(np.float32)
  return record


def write_records(root, splits: dict[str, list[dict]], shards: int = 2):
  """Writes ArrayRecord shards + manifest.json the way `varcmp prep` lays them out."""
  manifest = {"splits": {}, "skipped": []}
  for split, recs in splits.items():
    names = []
    for s, chunk in enumerate(np.array_split(np.arange(len(recs)), shards)):
      name = f"{split}-{s:05d}-of-{shards:05d}.array_record"
      writer = ArrayRecordWriter(str(root / name), "group_size:1")
      for i in chunk:
        writer.write(encode_record(recs[i]))
      writer.close()
      names.append(name)
    manifest["splits"][split] = {"records": len(recs), "shards": names}
  (root / "manifest.json").write_text(json.dumps(manifest))
  return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  rng = np.random.default_rng(0)
  lengths = [3, 6, 9, 13, 4, 20, 6, 1, 7, 11, 5, 8]
  train = [make_record(i, n, rng, with_prior=i % 3 == 0) for i, n in enumerate(lengths)]
  test = [make_record(100 + i, n, rng, with_prior=False) for i, n in enumerate([2, 8, 5, 6, 10, 3, 7])]
  root = write_records(tmp_path_factory.mktemp("records"), {"train": train, "test": test})
  return root, {"train": train, "test": test}


def make_config(root, regime="features", task="text", workers=0):
  config = config_lib.default_config(task, regime)
  config.data.records = str(root)
  config.data.snippets = SNIPPETS
  config.data.worker_count = workers
  return config


def reference_fit(array: np.ndarray, target: int):
  """NumPy loop reference: keep all snippets and zero-pad, or take the snippet under the centre of each of
  `target` equal parts of the video."""
  n = array.shape[0]
  out = np.zeros((target,) + array.shape[1:], array.dtype)
  mask = np.zeros(target, bool)
  if n <= target:
    out[:n], mask[:n] = array, True
    return out, mask
  edges = np.linspace(0.0, n, target + 1)
  for j in range(target):
    out[j] = array[int((edges[j] + edges[j + 1]) / 2)]
  mask[:] = True
  return out, mask


def check_batch(batch, recs, keys):
  for row, index in enumerate(batch["index"]):
    record = recs[index]
    for key in keys:
      expected, mask = reference_fit(record[key], SNIPPETS)
      np.testing.assert_array_equal(batch[key][row], expected.astype(batch[key].dtype), err_msg=key)
      np.testing.assert_array_equal(batch["mask"][row], mask)
    if "prior" in batch:
      np.testing.assert_array_equal(batch["prior"][row], reference_fit(record["prior"], SNIPPETS)[0])
    np.testing.assert_array_equal(batch["tokens"][row], record["tokens"])
    assert batch["label"][row] == record["label"]


def test_manifest_errors(tmp_path, data):
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    pipeline.read_manifest(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="manifest.json.*not valid JSON"):
    pipeline.read_manifest(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"records": "3"}}}))
  with pytest.raises(ValueError, match="split 'train'"):
    pipeline.read_manifest(tmp_path)
  root, recs = data
  assert pipeline.split_size(root, "train") == len(recs["train"])
  with pytest.raises(KeyError, match="no split 'val'"):
    pipeline.split_size(root, "val")


def test_features_batches_match_numpy_reference(data):
  root, recs = data
  it = pipeline.make_train_iterator(make_config(root), batch_size_per_process=4, seed=0)
  for _ in range(4):   # more than one epoch of 12 records
    batch = next(it)
    assert set(batch) == {"features", "regions", "tokens", "label", "mask", "index"}
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "features": ((4, SNIPPETS, D), np.float32), "regions": ((4, SNIPPETS, R, D), np.float32),
        "tokens": ((4, 77), np.int32), "label": ((4,), np.int32), "mask": ((4, SNIPPETS), np.bool_),
        "index": ((4,), np.int32)}
    check_batch(batch, recs["train"], ["features", "regions"])


def test_external_prior_travels_only_when_the_config_reads_it(tmp_path, data):
  rng = np.random.default_rng(3)
  recs = [make_record(i, n, rng, with_prior=True) for i, n in enumerate([3, 9, 5, 12])]
  config = make_config(write_records(tmp_path, {"train": recs}, shards=1))
  config.prior.source = "external"
  batch = next(pipeline.make_train_iterator(config, batch_size_per_process=4, seed=0))
  assert batch["prior"].shape == (4, SNIPPETS) and batch["prior"].dtype == np.float32
  check_batch(batch, recs, ["features", "regions"])
  # Records without a prior (some in `data`) are an error naming the record, not silent zeros.
  config = make_config(data[0])
  config.prior.source = "mean"
  with pytest.raises(KeyError, match="has no 'prior' \\(needed by prior.source='mean'\\)"):
    for _ in range(4):
      next(pipeline.make_train_iterator(config, batch_size_per_process=4, seed=0))


def test_frames_audio_batches_match_numpy_reference(data):
  root, recs = data
  it = pipeline.make_train_iterator(make_config(root, "frames", "audio"), batch_size_per_process=3, seed=1)
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {"frames", "mel", "tokens", "label", "mask", "index"}
    assert batch["frames"].dtype == np.uint8 and batch["frames"].shape == (3, SNIPPETS, S, S, 3)
    assert batch["mel"].dtype == np.float32 and batch["mel"].shape == (3, SNIPPETS) + MEL
    check_batch(batch, recs["train"], ["frames", "mel"])


def test_missing_regime_key_names_record(tmp_path):
  record = make_record(0, 3, np.random.default_rng(0), False)
  del record["features"]
  root = write_records(tmp_path, {"train": [record]}, shards=1)
  with pytest.raises(KeyError, match="video_000.mp4.*features"):
    next(pipeline.make_train_iterator(make_config(root), 1, 0))


def epoch_indices(config, seed, shard_index=0, shard_count=1, epochs=1):
  per_shard = pipeline.split_size(config.data.records, "train") // shard_count
  it = pipeline.make_train_iterator(config, 1, seed, shard_index=shard_index, shard_count=shard_count)
  return [[int(next(it)["index"][0]) for _ in range(per_shard)] for _ in range(epochs)]


def test_process_sharding_is_disjoint_and_complete(data):
  root, recs = data
  config = make_config(root)
  for count in (2, 3, 4):
    shards = [epoch_indices(config, 0, i, count, epochs=2) for i in range(count)]
    for epoch in range(2):
      seen = [i for shard in shards for i in shard[epoch]]
      assert sorted(seen) == list(range(len(recs["train"]))), (count, epoch)


def test_shuffle_is_seed_deterministic(data):
  root, recs = data
  config = make_config(root)
  a, b, c = (epoch_indices(config, seed, epochs=2) for seed in (5, 5, 6))
  assert a == b
  assert a != c
  assert a[0] != a[1]                              # a new order every epoch
  assert sorted(a[0]) == sorted(a[1]) == list(range(len(recs["train"])))


def test_restored_iterator_yields_the_same_next_batch(data, tmp_path):
  root, _ = data
  config = make_config(root)
  it = pipeline.make_train_iterator(config, 5, seed=3)
  for _ in range(3):   # past the first epoch boundary
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(2)]

  fresh = pipeline.make_train_iterator(config, 5, seed=3)
  restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(
      3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  for want in expected:
    got = next(restored)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_eval_covers_every_record_once(data):
  root, recs = data
  config = make_config(root)
  total = len(recs["test"])
  batches = list(pipeline.make_eval_iterator(config, "test", 3))
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index[valid], np.arange(total))   # in order, each once
  assert valid.sum() == total and not valid[total:].any()
  last = batches[-1]
  assert set(last) == {"features", "regions", "tokens", "label", "mask", "index", "valid"}
  assert not last["mask"][~last["valid"]].any() and not last["features"][~last["valid"]].any()
  for b in batches:
    rows = b["valid"]
    check_batch({k: v[rows] for k, v in b.items()}, recs["test"], ["features", "regions"])

  # Three processes: same number of batches each, together every record once.
  per_process = [list(pipeline.make_eval_iterator(config, "test", 2, shard_index=i, shard_count=3))
                 for i in range(3)]
  assert {len(p) for p in per_process} == {2}
  seen = [int(i) for p in per_process for b in p for i in b["index"][b["valid"]]]
  assert sorted(seen) == list(range(total))


def test_metadata_in_split_order(data):
  root, recs = data
  metadata = pipeline.load_split_metadata(root, "test")
  assert [m["video"] for m in metadata] == [r["video"] for r in recs["test"]]
  for m, r in zip(metadata, recs["test"]):
    assert m["caption"] == r["caption"] and m["label"] == int(r["label"])
    assert m["duration"] == pytest.approx(float(r["duration"]))
    np.testing.assert_array_equal(m["times"], r["times"])
    np.testing.assert_array_equal(m["event"], r["event"])


def test_worker_processes(data, tmp_path):
  """Grain hands each worker every other record of the shuffled stream and each worker batches its own,
  so batches hold the same records as without workers, regrouped; a restore continues identically."""
  root, recs = data
  plain = pipeline.make_train_iterator(make_config(root), 4, seed=2)
  config = make_config(root, workers=2)
  workers = pipeline.make_train_iterator(config, 4, seed=2)
  want = np.concatenate([next(plain)["index"] for _ in range(2)])
  got = [next(workers) for _ in range(2)]
  np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in got])), np.sort(want))
  np.testing.assert_array_equal(got[0]["index"], want[0::2])
  for batch in got:
    check_batch(batch, recs["train"], ["features", "regions"])

  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(workers)))
  manager.wait_until_finished()
  expected = [next(workers)["index"] for _ in range(3)]
  fresh = pipeline.make_train_iterator(config, 4, seed=2)
  restored = manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  for want_index in expected:
    np.testing.assert_array_equal(next(restored)["index"], want_index)


def test_batches_hold_only_what_the_config_reads(tmp_path):
  """No spatial level: no regions in the batch (released features have none); the audio tower's input only."""
  rng = np.random.default_rng(5)
  recs = [make_record(i, 6, rng, with_prior=False) for i in range(4)]
  for record in recs:
    del record["regions"]
    record["audio_features"] = rng.normal(size=(6, 5)).astype(np.float32)
  config = make_config(write_records(tmp_path, {"train": recs}, shards=1), task="audio")
  config.loss.levels.spatial = 0.0
  config.model.audio.kind = "features"
  batch = next(pipeline.make_train_iterator(config, batch_size_per_process=2, seed=0))
  assert set(batch) == {"features", "audio_features", "tokens", "label", "mask", "index"}
  check_batch(batch, recs, ["features", "audio_features"])
  config.loss.levels.spatial = 1.0
  with pytest.raises(KeyError, match=r"has no 'regions' \(needed by loss.levels.spatial\)"):
    next(pipeline.make_train_iterator(config, batch_size_per_process=2, seed=0))
