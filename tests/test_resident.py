"""Device-resident data (data/resident.py, train/feed.py).

Against the Grain pipeline where the definitions coincide: the same fitted example for every record, every
placed record once per epoch (the order is documented to differ); against hand-fitted records; rows that never
leave their device on 8 devices; the train step and the eval embeddings equal to Grain-fed ones; a run killed
with SIGKILL on 8 devices resumes with identical per-step losses.
"""
import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from varcmp_jax.data import records as records_lib

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_checkpoint import newest_checkpoint, train_command, wait_for_step, write_feature_records  # noqa: E402
from test_sharding import load_config, run_with_devices, subprocess_env  # noqa: E402


def features_config(records_dir, **data):
  config = load_config("tiny_text", "features")
  config.data.records = str(records_dir)
  config.data.update(data)
  return config


def hand_fitted(records_dir, split, snippets):
  """{index: (features float32 (T, D), mask)} of every record, fitted by hand: zero-padded when shorter, the
  snippets at the centres of `snippets` equal parts (floor((k + 1/2) n / T)) when longer."""
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(str(next(pathlib.Path(records_dir).glob(f"{split}-*.array_record"))))
  fitted = {}
  for i, data in enumerate(reader.read_all()):
    features = np.asarray(records_lib.decode_record(data)["features"], np.float32)
    n = len(features)
    if n > snippets:
      features = features[[int((k + 0.5) * n / snippets) for k in range(snippets)]]
    out = np.zeros((snippets, features.shape[1]), np.float32)
    out[:len(features)] = features
    fitted[i] = (out, np.arange(snippets) < min(n, snippets))
  return fitted


def test_resident_examples_equal_grain_and_each_epoch_covers_the_split(tmp_path):
  """One device: the resident examples are Grain's (and the hand-fitted records), exactly; consecutive epochs are
  permutations of the split, a batch straddling two of them; a restored sampler continues the same stream."""
  import jax
  from varcmp_jax.data import pipeline, resident
  from varcmp_jax.train import sharding
  records_dir = write_feature_records(tmp_path / "records")          # 32 train records of 2-4 snippets
  config = features_config(records_dir, snippets=3)                  # some records padded, some cropped
  batch = 8
  grain = pipeline.make_train_iterator(config, batch, config.seed)
  grain_examples, grain_epoch = {}, []
  for _ in range(32 // batch):
    b = next(grain)
    grain_epoch += b["index"].tolist()
    grain_examples.update({int(i): {k: v[j] for k, v in b.items()} for j, i in enumerate(b["index"])})
  assert sorted(grain_epoch) == list(range(32))

  split = resident.load(config, "train", sharding.batch_sharding(sharding.make_mesh(config.mesh)), train=True)
  assert split.arrays["features"].dtype == np.float16 and split.arrays["regions"].dtype == np.float16
  assert split.rows == 32 and set(split.arrays) == set(grain_examples[0])
  hand = hand_fitted(records_dir, "train", 3)
  sampler = resident.EpochSampler(config.seed, split.rows, 12, split.blocks, 1)   # 12 does not divide 32
  stream = []
  for step in range(8):                                              # 96 rows = 3 epochs
    if step == 5:
      saved = sampler.state_dict()
    got = jax.device_get(split.gather(split.device_rows(sampler.next())))
    stream += got["index"].tolist()
    for j, index in enumerate(got["index"]):
      expected = grain_examples[int(index)]
      for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key][j], expected[key].dtype), expected[key], err_msg=key)
      np.testing.assert_array_equal(got["features"][j].astype(np.float32), hand[int(index)][0])
      np.testing.assert_array_equal(got["mask"][j], hand[int(index)][1])
  epochs = [stream[i:i + 32] for i in (0, 32, 64)]
  assert all(sorted(e) == list(range(32)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  assert saved == {"epoch": 1, "position": 28, "rows_per_device": 32, "devices": 1, "seed": config.seed}

  again = resident.EpochSampler(config.seed, split.rows, 12, split.blocks, 1)
  again.load_state_dict(saved)
  assert np.concatenate([again.next() for _ in range(3)]).tolist() == stream[60:]
  fresh = resident.EpochSampler(config.seed + 1, split.rows, 12, split.blocks, 1)
  assert fresh.next().tolist() != stream[:12]                         # the order comes from the seed


def test_the_feeds_sampler_follows_config_seed(tmp_path):
  """Two seeds, two batch orders through the train feed (each epoch still the whole split), and the seed in the
  sampler state a checkpoint saves."""
  import jax
  from varcmp_jax.train import feed as feed_lib
  from varcmp_jax.train import step as step_lib
  records_dir = write_feature_records(tmp_path / "records")
  orders = {}
  for seed in (3, 4):
    config = features_config(records_dir)
    config.seed = seed
    feed = feed_lib.ResidentFeed(step_lib.build(config), config, progress=False)
    orders[seed] = [jax.device_get(feed.split.gather(feed.next())["index"]).tolist() for _ in range(4)]
    assert sorted(sum(orders[seed], [])) == list(range(32))
    assert feed.checkpointable.state_dict()["seed"] == seed
  assert orders[3] != orders[4]


def test_resident_eval_with_a_partial_last_batch_embeds_every_record_once_as_grain(tmp_path):
  """13 records in batches of 5: the last batch holds 3 records and 2 padding rows. Each record is embedded
  exactly once, with the embeddings of the Grain pipeline."""
  import jax
  from varcmp_jax import evaluate
  from varcmp_jax.train import step as step_lib
  records_dir = write_feature_records(tmp_path / "records", splits=(("train", 8), ("test", 13)))
  config = features_config(records_dir)
  config.eval.batch_size = 5
  trainer = step_lib.build(config)
  params = trainer.init_state(config.seed)["params"]
  split = evaluate.resident_eval_split(trainer, "test")
  assert split is not None and split.rows == 15
  indices = np.concatenate([index for index, _ in evaluate.embed_batches(trainer, params, "test",
                                                                        resident_split=split, progress=False)])
  assert sorted(indices.tolist()) == list(range(13))
  on_devices = evaluate.embed_split(trainer, params, "test", resident_split=split)
  from_grain = evaluate.embed_split(trainer, params, "test", resident_split=None)
  for a, b in zip(jax.tree.leaves(on_devices), jax.tree.leaves(from_grain)):
    assert np.shape(a) == np.shape(b) and np.shape(a)[0] == 13
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)


def test_auto_says_which_and_why_and_follows_the_checkpoint(tmp_path):
  from varcmp_jax import config as config_lib
  from varcmp_jax.data import resident
  records_dir = write_feature_records(tmp_path / "records")
  # A record fitted to T = 4: tokens (77 int32), label, index (int32), mask (4 bool), features (4 x 32 float16),
  # regions (4 x 4 x 32 float16).
  per_record = 77 * 4 + 4 + 4 + 4 + 4 * 32 * 2 + 4 * 4 * 32 * 2
  on, line = resident.decide(features_config(records_dir), "train", 1)
  assert on and line == (f"data.resident=auto: on (32 train records, {32 * per_record / 2 ** 30:.3g} GiB per device "
                         "<= data.resident_max_gib=8)")
  on, line = resident.decide(features_config(records_dir, resident_max_gib=1e-5), "train", 1)
  assert not on and line.endswith(f"{32 * per_record / 2 ** 30:.3g} GiB per device > data.resident_max_gib=1e-05)")
  on, line = resident.decide(features_config(records_dir, resident_max_gib=1e-5), "train", 8)   # a device's share
  assert on and f"32 train records, {4 * per_record / 2 ** 30:.3g} GiB per device <=" in line
  frames = load_config("tiny_text", "frames")
  assert resident.decide(frames, "train", 1) == (False, "data.resident=auto: off in the frames regime (frames stay "
                                                        "on Grain)")
  assert resident.decide(features_config(records_dir), "train", 1, checkpoint_item="data")[0] is False
  assert resident.decide(features_config(records_dir, resident="off"), "train", 1, checkpoint_item=None)[0] is False
  with pytest.raises(ValueError, match="holds the Grain iterator state: the batch order would change; set "
                                       "--config.data.resident=off"):
    resident.decide(features_config(records_dir, resident="on"), "train", 1, checkpoint_item="data")
  with pytest.raises(ValueError, match="fewer than the 64 devices"):
    resident.decide(features_config(records_dir, resident="on"), "train", 64)
  frames.data.resident = "on"
  with pytest.raises(ValueError, match="data.resident='on' needs regime='features'"):
    config_lib.validate(frames)


# ---- 8 devices -----------------------------------------------------------------------------------------


def eight_devices_worker(records_dir: str, out_dir: str):
  """On 8 fake devices: where each batch row comes from, the same rows on a 2x4 mesh, the resident step against
  the Grain step on the same examples, and the eval embeddings from resident arrays against Grain's."""
  import jax
  import ml_collections
  from varcmp_jax import evaluate
  from varcmp_jax.data import pipeline, resident
  from varcmp_jax.train import feed as feed_lib
  from varcmp_jax.train import sharding, step as step_lib
  config = features_config(records_dir)                # batch 8: one row per device and step
  trainer = step_lib.build(config)
  feed = feed_lib.ResidentFeed(trainer, config, progress=False)
  report = {"rows": feed.split.rows, "blocks": feed.split.blocks, "indices": []}
  state = trainer.init_state(config.seed)
  steps = [feed.next() for _ in range(8)]              # 2 epochs of 4 rows per device
  run_step, _ = feed.compile(state, steps[0])
  fit = pipeline.decode_and_fit(config)                # the Grain pipeline's float32 examples
  source = pipeline.IndexedSource(records_dir, "train")
  grain_state, resident_losses, grain_losses = trainer.init_state(config.seed), [], []   # steps donate theirs
  for rows in steps:
    batch = feed.split.gather(rows)
    assert batch["features"].sharding.is_equivalent_to(trainer.batch_sharding, 3)
    indices = jax.device_get(batch["index"]).tolist()
    report["indices"].append(indices)
    host = [fit.map(source[i]) for i in indices]
    host = trainer.shard_batch({k: np.stack([e[k] for e in host]) for k in host[0]})
    if len(resident_losses) < 2:
      state, metrics = run_step(state, rows)
      grain_state, grain_metrics = trainer.train_step(grain_state, host)
      resident_losses.append(float(metrics["loss"]))
      grain_losses.append(float(grain_metrics["loss"]))
  report.update(resident_losses=resident_losses, grain_losses=grain_losses)

  mesh_2x4 = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}))
  other = resident.load(config, "train", sharding.batch_sharding(mesh_2x4), train=True, progress=False)
  sampler = resident.EpochSampler(config.seed, other.rows, 1, other.blocks, 8)
  report["indices_2x4"] = [jax.device_get(other.gather(other.device_rows(sampler.next()))["index"]).tolist()
                           for _ in range(8)]

  params = state["params"]
  report["eval"] = {}
  for eval_batch in (8, 16):     # 21 test records: blocks of 3 per device; 16 = 2 rows a device, the 2nd batch partial
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.eval.batch_size = eval_batch
    split = evaluate.resident_eval_split(trainer, "test", eval_config)
    indices = [index for index, _ in evaluate.embed_batches(trainer, params, "test", eval_config, resident_split=split,
                                                            progress=False)]
    on_devices = evaluate.embed_split(trainer, params, "test", eval_config, resident_split=split)
    from_grain = evaluate.embed_split(trainer, params, "test", eval_config, resident_split=None)
    report["eval"][eval_batch] = {
        "rows": split.rows, "indices": sorted(np.concatenate(indices).tolist()),
        "shapes": [[list(np.shape(a)), list(np.shape(b))] for a, b in zip(jax.tree.leaves(on_devices),
                                                                          jax.tree.leaves(from_grain))],
        "max_difference": max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                              for a, b in zip(jax.tree.leaves(on_devices), jax.tree.leaves(from_grain)))}
  with open(pathlib.Path(out_dir) / "report.json", "w") as f:
    json.dump(report, f)


def test_on_8_devices_rows_stay_on_their_device_and_the_step_and_eval_match_grain(tmp_path):
  records_dir = write_feature_records(tmp_path / "records", splits=(("train", 32), ("test", 21)))
  run_with_devices("eight_devices_worker", str(records_dir), str(tmp_path), devices=8)
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["rows"] == 4 and report["blocks"] == list(range(8))
  for indices in report["indices"]:                   # row j of a batch comes from device j's block
    assert [i // 4 for i in indices] == list(range(8))
  for epoch in (report["indices"][:4], report["indices"][4:]):
    assert sorted(sum(epoch, [])) == list(range(32))
  assert report["indices_2x4"] == report["indices"]   # the device count fixes the order, not the mesh shape
  np.testing.assert_allclose(report["resident_losses"], report["grain_losses"], rtol=1e-6, atol=1e-6)
  # Eval: 21 records in blocks of 3 (the last device's block all padding); 1 row a device and batch (rows 3), and
  # 2 (rows 4: each block's second batch half padding). Every record once, Grain's embeddings.
  for eval_batch, rows in (("8", 3), ("16", 4)):
    result = report["eval"][eval_batch]
    assert result["rows"] == rows and result["indices"] == list(range(21))
    assert all(a == b and a[0] == 21 for a, b in result["shapes"]) and result["max_difference"] < 1e-6


def test_killed_resident_run_on_8_devices_resumes_with_identical_losses(tmp_path):
  """SIGKILL after a checkpoint, then the same command again: the steps the killed run had logged after its last
  checkpoint are recomputed with identical losses. Also: throughput in metrics.jsonl, the periodic eval from
  resident arrays, the sampler item in the checkpoints, and Grain refused on resume."""
  from varcmp_jax.train import main as train_main_lib
  from varcmp_jax.train import metrics_log
  records_dir = write_feature_records(tmp_path / "records")
  workdir = tmp_path / "run"
  command = train_command(workdir, records_dir, "--config.train.num_steps=30", "--config.train.checkpoint_every=10",
                          "--config.train.warmup_steps=4", "--config.train.eval_every=20")
  env = subprocess_env(devices=8)
  run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_step(run, workdir, 14)
  run.send_signal(signal.SIGKILL)
  out, _ = run.communicate(timeout=60)
  assert "train data: data.resident=auto: on (32 train records" in out
  killed = {row["step"]: row for row in metrics_log.read_jsonl(str(workdir / "metrics.jsonl"))}
  resumed_from = newest_checkpoint(workdir)
  assert resumed_from < max(killed), (resumed_from, max(killed))

  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  got = metrics_log.read_jsonl(str(workdir / "metrics.jsonl"))
  assert [row["step"] for row in got] == list(range(1, 31))
  for row in got[resumed_from:max(killed)]:          # recomputed after the resume
    for key in ("loss", "loss_video", "loss_frame", "loss_spatial", "loss_mil", "grad_norm", "lr"):
      assert row[key] == killed[row["step"]][key], (row["step"], key)
  for row in got:
    assert row["step_time_s"] > 0 and row["samples_per_s"] > 0 and row["tflops_per_s"] > 0
    assert 0 <= row["input_wait_s"] < row["step_time_s"] * 10
  assert [h["step"] for h in metrics_log.read_jsonl(str(workdir / "eval_history.jsonl"))] == [20]
  assert "test data (eval): data.resident=auto: on (16 test records" in done.stdout
  assert sorted(p.name for p in (workdir / "checkpoints" / "30").iterdir() if p.is_dir()) == ["sampler", "state"]
  assert json.loads((workdir / "checkpoints" / "30" / "sampler" / "metadata").read_text()) == {
      "epoch": 7, "position": 2, "rows_per_device": 4, "devices": 8, "seed": 0}   # 30 rows of 4 per device
  with pytest.raises(SystemExit, match="holds the resident data's sampler state: the batch order would change; "
                                       "set --config.data.resident=on"):
    train_main_lib.train_main(command[4:] + ["--config.data.resident=off"])
